"""Policies: which parameters train at each optimizer step, and when that changes.

A policy is built from `ParamInfo`s (no tensor values) and a `Budget`; `active(step)` is a
pure function of the constructor arguments (seed included) and the step, identical on
every rank. Randomness is counter-based: the permutation of cycle `c` comes from a
generator seeded with a hash of (seed, c), so there is no hidden RNG stream; the cursor in
`state_dict()` (which cycle the schedule is in, where it started) is a cache that makes
`active()` O(1) and is saved so a resumed run needs no replay.

- block (BAdam generalized): units (blocks, or tensors of blocks larger than the budget)
  are packed consecutively into groups that fit; one group trains for `switch_every`
  steps, then the next; `order` ascending / descending / random (re-shuffled every cycle).
- sample (LISA generalized): every cycle the units are shuffled; each period takes the
  next units of that permutation while they fit (or exactly `sample_layers` of them), so
  every unit trains once per cycle.
- `always` blocks (e.g. ("embed", "head")) train in every period and count against the
  budget, under both policies.

- sparse (SpIEL-style): K individual elements anywhere, chosen as a global top-K by
  gradient score, with periodic drop-and-regrow. `SparsePolicy` holds the schedule (which
  steps score every gradient, how many elements to hold and to regrow) and which tensors
  hold chosen elements; the element indices and compact state live in the optimizer's
  state, managed by `nto_ext.sparse`.

The optimizer only asks a policy for `active(step)`: the params that need a gradient at
that step.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .blocks import KIND_BLOCKS, Block, ParamInfo, Unit, discover_blocks, group_label, make_units
from .blocks import pack_consecutive as pack_consecutive
from .budget import Budget, bytes_per_element, format_bytes

ORDERS = ("ascending", "descending", "random")
log = logging.getLogger(__name__)


class Policy:
    """Decides the active parameter set (global indices) for every optimizer step."""

    name: ClassVar[str] = ""

    def active(self, step: int) -> frozenset[int]:
        """Indices of the parameters that train at optimizer step `step` (0 = first)."""
        raise NotImplementedError

    def active_names(self, step: int) -> list[str]:
        """Readable names of what trains at `step` (blocks or tensors)."""
        raise NotImplementedError

    @property
    def trainable(self) -> frozenset[int]:
        """Parameters that train at some step."""
        raise NotImplementedError

    @property
    def untrainable(self) -> list[int]:
        """Parameters that never train (larger than the budget)."""
        return []

    def config(self) -> dict[str, Any]:
        """What must match for a saved state to load (weights-only types)."""
        return {"policy": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def check_state_dict(self, state: object) -> None:
        """Raise ValueError when `state` cannot be loaded; touches nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"policy state must be a dict, got {type(state).__name__}")

    def check_cursor(self, step: int) -> None:
        """Raise ValueError when the loaded state cannot reach `step` directly (policies
        with a schedule cursor); nothing to check otherwise."""
        return None

    def remap_state_dict(self, state: dict[str, Any], perm: Sequence[int]) -> dict[str, Any]:
        """A checked `state` saved over params in another order: saved param j is param
        perm[j] here (a checkpoint matched by name). Nothing index-based by default."""
        return state


def _generator(seed: int, cycle: int, salt: str) -> torch.Generator:
    digest = hashlib.blake2b(f"nto:{salt}:{seed}:{cycle}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _params_of(units: Sequence[Unit]) -> frozenset[int]:
    return frozenset(i for u in units for i in u.params)


class ScheduledPolicy(Policy):
    """Shared machinery of block and sample: units, `always`, periods and cycles."""

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget, *, switch_every: int = 50,
                 seed: int = 0, always: Sequence[str] = ()) -> None:
        self.infos = list(infos)
        self.budget = budget
        self.switch_every = switch_every
        self.seed = seed
        self.always = tuple(always)
        self.blocks: list[Block] = discover_blocks(self.infos)
        names = [b.name for b in self.blocks]
        unknown = [a for a in self.always if a not in names and a not in KIND_BLOCKS]
        if unknown:
            raise ValueError(f"always={self.always!r}: no block named {unknown!r}; blocks of "
                             f"this model: {_short_list(names)}; also allowed, when the "
                             f"model lacks them: {', '.join(KIND_BLOCKS)}")
        absent = [a for a in self.always if a not in names]
        if absent:  # e.g. GPT-2: the head is the embedding's tensor, listed once as "embed"
            log.info("always=%r: this model has no %s block (absent, or tied into another "
                     "block); training the others always", self.always, ", ".join(absent))
        fixed = [b for b in self.blocks if b.name in self.always]
        fixed_cost = self.cost([i for b in fixed for i in b.params])
        if fixed_cost > budget.amount:
            raise ValueError(
                f"always={self.always!r} needs {self._fmt(fixed_cost)} but budget="
                f"{budget.given} is {self._fmt(budget.amount)}; raise the budget or train "
                "fewer blocks always")
        self.always_units = [Unit(b.name, b.name, b.params, self._elements(b.params),
                                  self.cost(b.params)) for b in fixed]
        self.capacity = budget.amount - fixed_cost
        rest = [b for b in self.blocks if b.name not in self.always]
        self.units, self._too_big = make_units(rest, self.infos, self.cost, self.capacity)
        if not self.units and not self.always_units:
            self._raise_nothing_fits()
        self._trainable = _params_of(self.units) | _params_of(self.always_units)
        self._cycle, self._cycle_start = 0, 0
        self._cache: tuple[int, list[tuple[Unit, ...]]] | None = None

    # ---------------------------------------------------------------- costs and messages
    def cost(self, params: Sequence[int]) -> int:
        """Cost of training `params` together, in budget units (elements or bytes)."""
        return self.budget.cost(((self.infos[i].numel, self.infos[i].dtype) for i in params),
                                self.name)

    def _elements(self, params: Sequence[int]) -> int:
        return sum(self.infos[i].numel for i in params)

    def _fmt(self, amount: int) -> str:
        if self.budget.kind == "elements":
            return f"{amount:,} elements"
        return f"{format_bytes(amount)} ({amount:,} bytes)"

    def _label(self, i: int) -> str:
        return repr(self.infos[i].name) if self.infos[i].name is not None else f"#{i}"

    def _raise_nothing_fits(self) -> None:
        rest = [i for b in self.blocks if b.name not in self.always for i in b.params]
        smallest = min(rest, key=lambda i: self.cost((i,)))
        need = self.cost((smallest,))
        raise ValueError(
            f"budget={self.budget.given} ({self._fmt(self.budget.amount)}) is below the "
            f"smallest unit that can train, tensor {self._label(smallest)} "
            f"({self._fmt(need)} under policy={self.name!r}); nothing would train. Raise the "
            f"budget to at least {self._fmt(need + self.budget.amount - self.capacity)}.")

    def too_big_message(self) -> str | None:
        """One sentence naming the tensors that cannot train, or None."""
        if not self._too_big:
            return None
        big = sorted(self._too_big, key=lambda i: -self.cost((i,)))
        shown = ", ".join(f"{self._label(i)} ({self._fmt(self.cost((i,)))})" for i in big[:8])
        more = f" and {len(big) - 8} more" if len(big) > 8 else ""
        need = self.cost((big[0],)) + self.budget.amount - self.capacity
        return (f"{len(big)} parameter tensor(s) are larger than the budget "
                f"{self.budget.given} ({self._fmt(self.capacity)} left for switching units) "
                f"and cannot train under policy={self.name!r}: {shown}{more}. To train them, "
                f"raise the budget to at least {self._fmt(need)}.")

    # ---------------------------------------------------------------- schedule
    def _make_schedule(self, cycle: int) -> list[tuple[Unit, ...]]:
        raise NotImplementedError

    def schedule(self, cycle: int) -> list[tuple[Unit, ...]]:
        """The periods of cycle `cycle`: each a tuple of switching units (without always)."""
        if self._cache is None or self._cache[0] != cycle:
            sched = self._make_schedule(cycle) if self.units else [()]
            self._cache = (cycle, sched)
        return self._cache[1]

    def _period_units(self, period: int) -> tuple[Unit, ...]:
        if period < self._cycle_start:  # asked about the past: recompute from the start
            self._cycle, self._cycle_start = 0, 0
        while True:
            sched = self.schedule(self._cycle)
            if period < self._cycle_start + len(sched):
                return sched[period - self._cycle_start]
            self._cycle_start += len(sched)
            self._cycle += 1

    def active_units(self, step: int) -> list[Unit]:
        return self.always_units + list(self._period_units(step // self.switch_every))

    def active(self, step: int) -> frozenset[int]:
        return _params_of(self.active_units(step))

    def active_names(self, step: int) -> list[str]:
        return [u.name for u in self.active_units(step)]

    def cycle_steps(self, cycle: int = 0) -> int:
        """Optimizer steps in cycle `cycle` (every trainable unit trains once in a cycle)."""
        return len(self.schedule(cycle)) * self.switch_every

    @property
    def trainable(self) -> frozenset[int]:
        return self._trainable

    @property
    def untrainable(self) -> list[int]:
        return list(self._too_big)

    def max_active_cost(self, cycles: int = 1) -> int:
        """Largest cost of an active set over the first `cycles` cycles, in budget units."""
        fixed = sum(u.cost for u in self.always_units)
        peak = max(sum(u.cost for u in p) for c in range(cycles) for p in self.schedule(c))
        return fixed + peak

    def describe_groups(self, cycle: int = 0) -> list[str]:
        return [group_label(self.always_units + list(p)) for p in self.schedule(cycle)]

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        return {"policy": self.name, "budget_kind": self.budget.kind,
                "budget_amount": self.budget.amount, "switch_every": self.switch_every,
                "seed": self.seed, "always": list(self.always)}

    def state_dict(self) -> dict[str, Any]:
        return {"cycle": self._cycle, "cycle_start": self._cycle_start}

    def check_state_dict(self, state: object) -> None:
        super().check_state_dict(state)
        for key in ("cycle", "cycle_start"):
            v = state.get(key)  # type: ignore[union-attr]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"policy state {key!r} must be an int >= 0, got {v!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._cycle, self._cycle_start = state["cycle"], state["cycle_start"]

    def check_cursor(self, step: int) -> None:
        """ValueError unless the cursor's cycle holds `step` (as every saved state's does:
        NTO.state_dict() places it there), so a loaded state never walks cycles to reach
        its step: an edited step or cursor is refused at once instead of walking for hours."""
        period = step // self.switch_every
        end = self._cycle_start + len(self.schedule(self._cycle))
        if not self._cycle_start <= period < end:
            raise ValueError(f"policy state: cycle {self._cycle} covers periods "
                             f"{self._cycle_start}..{end - 1}, but step {step} is in period "
                             f"{period} (a foreign or edited checkpoint); nothing was loaded")


class BlockPolicy(ScheduledPolicy):
    """BAdam generalized: consecutive units packed into groups; groups take turns."""

    name = "block"

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget, *, order: str = "ascending",
                 **kw: Any) -> None:
        super().__init__(infos, budget, **kw)
        self.order = order
        self.groups = pack_consecutive(self.units, self.capacity)

    def _make_schedule(self, cycle: int) -> list[tuple[Unit, ...]]:
        if self.order == "ascending":
            return list(self.groups)
        if self.order == "descending":
            return self.groups[::-1]
        perm = torch.randperm(len(self.groups), generator=_generator(self.seed, cycle, "block"))
        return [self.groups[i] for i in perm.tolist()]

    def _period_units(self, period: int) -> tuple[Unit, ...]:
        n = max(len(self.groups), 1)  # fixed cycle length: no walk needed
        self._cycle, self._cycle_start = period // n, (period // n) * n
        return self.schedule(self._cycle)[period % n]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "order": self.order}


class SamplePolicy(ScheduledPolicy):
    """LISA generalized: shuffled units, taken per period while they fit (or n at a time)."""

    name = "sample"

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget, *,
                 sample_layers: int | None = None, **kw: Any) -> None:
        super().__init__(infos, budget, **kw)
        self.sample_layers = sample_layers
        if sample_layers is not None:
            self._check_sample_layers(sample_layers)

    def _check_sample_layers(self, n: int) -> None:
        if n > len(self.units):
            raise ValueError(f"sample_layers={n} but only {len(self.units)} units can be "
                             f"drawn under budget={self.budget.given}; allowed: 1.."
                             f"{len(self.units)}")
        worst = sum(sorted((u.cost for u in self.units), reverse=True)[:n])
        if worst > self.capacity:
            raise ValueError(
                f"sample_layers={n}: the {n} largest units need {self._fmt(worst)} but budget="
                f"{self.budget.given} leaves {self._fmt(self.capacity)} for them; raise the "
                "budget or lower sample_layers")

    def _make_schedule(self, cycle: int) -> list[tuple[Unit, ...]]:
        perm = torch.randperm(len(self.units), generator=_generator(self.seed, cycle, "sample"))
        order = [self.units[i] for i in perm.tolist()]
        n = self.sample_layers
        if n is None:
            return pack_consecutive(order, self.capacity)
        periods = [tuple(order[k:k + n]) for k in range(0, len(order), n)]
        short = n - len(periods[-1])
        if short:  # keep the count fixed: top up the last period from the cycle's start
            periods[-1] = periods[-1] + tuple(order[:short])
        return periods

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sample_layers": self.sample_layers}


# Largest share of the chosen elements one regrowth replaces. The drop keeps its weakest
# candidates (8 B each, up to 2x the count) in the compact gradients' room (4 B per chosen
# element, free between steps): 16 * fraction <= 4 keeps the drop inside the budget.
MAX_REGROW_FRACTION = 0.25
DEFAULT_REGROW_FRACTION = 0.1


class SparsePolicy(Policy):
    """SpIEL-style: K individual elements anywhere, a global top-K by gradient score.

    K is the budget in elements (byte budgets: bytes // the sparse bytes per element). Step
    0 is a scoring step (every tensor gets its gradient, reduced to candidates tensor by
    tensor; the step chooses K elements and updates nothing). Every `switch_every` steps
    after it is a regrowth: `floor(regrow_fraction * K)` of the weakest chosen elements
    were dropped at the end of the step before, the step's gradients update the kept
    elements and score the rest, and as many new elements are grown from the top scores.
    Between scoring steps only tensors holding chosen elements need a gradient. With K >=
    all elements every element is chosen from the start: no scoring step, no regrowth
    (AdamW to fp32 rounding).
    """

    name = "sparse"

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget, *, switch_every: int = 50,
                 regrow_fraction: float | None = None) -> None:
        self.infos = list(infos)
        self.budget = budget
        self.switch_every = switch_every
        self.regrow_fraction = float(DEFAULT_REGROW_FRACTION if regrow_fraction is None
                                     else regrow_fraction)
        self.total = sum(i.numel for i in self.infos if i.trainable)
        self.k = min(self._budget_elements(), self.total)
        self.dense = self.k >= self.total
        self.regrow = 0 if self.dense else math.floor(self.regrow_fraction * self.k)
        everything = frozenset(j for j, i in enumerate(self.infos) if i.trainable)
        self._everything = everything
        self._selected = everything if self.dense else frozenset()

    def _budget_elements(self) -> int:
        if self.budget.kind == "elements":
            return self.budget.amount
        bpe = bytes_per_element(self.name, torch.float32)  # the same for every dtype
        k = self.budget.amount // bpe
        if k < 1:
            raise ValueError(
                f"budget={self.budget.given} ({self.budget.describe()}) is below one element "
                f"under policy='sparse' ({bpe} B per chosen element: fp32 gradient, two fp32 "
                "moments and an int32 index); nothing would train. "
                f"Raise the budget to at least {bpe}B.")
        return k

    # ---------------------------------------------------------------- the schedule
    def is_scoring(self, step: int) -> bool:
        """True when every tensor's gradient is scored at `step`: the first step, each
        regrowth, and any step while nothing is chosen (a first step without gradients)."""
        if self.dense:
            return False
        return (step == 0 or not self._selected
                or (self.regrow > 0 and step % self.switch_every == 0))

    def active(self, step: int) -> frozenset[int]:
        if self.dense or self.is_scoring(step):
            return self._everything
        return self._selected

    @property
    def selected(self) -> frozenset[int]:
        """Params that hold chosen elements now."""
        return self._selected

    def set_selected(self, params: Sequence[int] | frozenset[int]) -> None:
        self._selected = frozenset(params)

    def active_names(self, step: int) -> list[str]:
        return [self.infos[i].name if self.infos[i].name is not None else f"#{i}"
                for i in sorted(self._selected)]

    @property
    def trainable(self) -> frozenset[int]:
        return self._everything  # every element can be chosen

    def describe(self) -> str:
        regrow = (f"{self.regrow:,} regrown every {self.switch_every} steps"
                  if self.regrow else "no regrowth")
        return (f"{self.k:,} of {self.total:,} elements ({self.k / max(self.total, 1):.2%}), "
                f"{regrow}")

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        return {"policy": self.name, "budget_kind": self.budget.kind,
                "budget_amount": self.budget.amount, "switch_every": self.switch_every,
                "regrow_fraction": self.regrow_fraction}

    def state_dict(self) -> dict[str, Any]:
        return {"selected": sorted(self._selected)}

    def check_state_dict(self, state: object) -> None:
        super().check_state_dict(state)
        sel = state.get("selected")  # type: ignore[union-attr]
        n = len(self.infos)
        if not isinstance(sel, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in sel):
            raise ValueError(f"policy state 'selected' must list param indices in [0, {n}), "
                             f"got {sel!r}"[:300])
        frozen = sorted(set(sel) - self._everything)
        if frozen:
            raise ValueError(f"policy state 'selected' lists params {frozen[:8]} that were "
                             "frozen (requires_grad=False) when this optimizer was built")
        if self.dense and set(sel) != self._everything:
            raise ValueError("policy state 'selected' must list every param when the budget "
                             "covers every element")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._selected = frozenset(state["selected"])

    def remap_state_dict(self, state: dict[str, Any], perm: Sequence[int]) -> dict[str, Any]:
        return {**state, "selected": sorted(perm[i] for i in state["selected"])}


def validate_policy_args(policy: object, *, switch_every: object = 50,
                         order: object = "ascending", seed: object = 0,
                         always: object = (), sample_layers: object = None,
                         regrow_fraction: object = None) -> None:
    """Check the policy arguments; TypeError / ValueError say what was given and allowed."""
    allowed = ", ".join(repr(p) for p in ("block", "sample", "sparse"))
    if not isinstance(policy, str) or policy not in ("block", "sample", "sparse"):
        raise ValueError(f"policy={policy!r}; allowed: {allowed}")
    if isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1:
        raise ValueError(f"switch_every={switch_every!r}; allowed: an int >= 1 (optimizer "
                         "steps between changes of the active set)")
    if not isinstance(order, str) or order not in ORDERS:
        raise ValueError(f"order={order!r}; allowed: {', '.join(map(repr, ORDERS))}")
    if order != "ascending" and policy != "block":
        raise ValueError(f"order={order!r} applies to policy='block' only (policy={policy!r} "
                         "draws at random with `seed`); allowed here: 'ascending'")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}; allowed: an int in [0, 2**63)")
    if isinstance(always, str) or not isinstance(always, (tuple, list)) or not all(
            isinstance(a, str) for a in always):
        raise TypeError(f"always={always!r}; allowed: a tuple of block names, e.g. "
                        "('embed', 'head')")
    if sample_layers is not None:
        if isinstance(sample_layers, bool) or not isinstance(sample_layers, int) \
                or sample_layers < 1:
            raise ValueError(f"sample_layers={sample_layers!r}; allowed: None or an int >= 1")
        if policy != "sample":
            raise ValueError(f"sample_layers={sample_layers!r} applies to policy='sample' only "
                             f"(policy={policy!r}); allowed here: None")
    _validate_sparse_args(policy, always, regrow_fraction)


def _validate_sparse_args(policy: object, always: object, regrow_fraction: object) -> None:
    if regrow_fraction is not None:
        if isinstance(regrow_fraction, bool) or not isinstance(regrow_fraction, (int, float)) \
                or not 0.0 <= regrow_fraction <= MAX_REGROW_FRACTION:
            raise ValueError(f"regrow_fraction={regrow_fraction!r}; allowed: None (0.1) or a "
                             f"number in [0, {MAX_REGROW_FRACTION}] (share of the chosen "
                             "elements replaced at each regrowth; 0 keeps the first choice)")
        if policy != "sparse":
            raise ValueError(f"regrow_fraction={regrow_fraction!r} applies to policy='sparse' "
                             f"only (policy={policy!r}); allowed here: None")
    if policy == "sparse" and always:
        raise ValueError(f"always={tuple(always)!r} applies to policy='block' and 'sample' "
                         "(policy='sparse' chooses elements in every tensor by gradient "
                         "score); allowed here: ()")


def make_policy(policy: str, infos: Sequence[ParamInfo], budget: Budget, *,
                switch_every: int = 50, order: str = "ascending", seed: int = 0,
                always: Sequence[str] = (), sample_layers: int | None = None,
                regrow_fraction: float | None = None) -> Policy:
    """Build the policy named `policy` (arguments already validated)."""
    common = {"switch_every": switch_every, "seed": seed, "always": tuple(always)}
    if policy == "block":
        return BlockPolicy(infos, budget, order=order, **common)
    if policy == "sample":
        return SamplePolicy(infos, budget, sample_layers=sample_layers, **common)
    if policy == "sparse":
        return SparsePolicy(infos, budget, switch_every=switch_every,
                            regrow_fraction=regrow_fraction)
    raise ValueError(f"policy={policy!r}; allowed: 'block', 'sample', 'sparse'")


def _short_list(names: Sequence[str], n: int = 12) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
