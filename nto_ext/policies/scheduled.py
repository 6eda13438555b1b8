"""Block and sample (and any policy of switching units): blocks, units, `always`,
periods and cycles, and the dense updater (every active param holds its whole gradient and
state, in `nto_ext.formats`' layout).

`active(step)` is a pure function of the constructor arguments (seed included) and the
step, identical on every rank. Randomness is counter-based: the permutation of cycle `c`
comes from a generator seeded with a hash of (seed, c), so there is no hidden RNG stream;
the cursor in `state_dict()` (which cycle the schedule is in, where it started) is a cache
that makes `active()` O(1) and is saved so a resumed run needs no replay. `always` blocks
(e.g. ("embed", "head")) train in every period and count against the budget.

order="importance" (issue 21) spends more steps where the gradient is large: at the first
step of each period the squared L2 norm of every active unit's gradient is recorded
(`observe`, from the updater's checked gradients, summed over FSDP2 shards, so identical on
every rank). A cycle's schedule is the policy's usual one with each period repeated in a
row about in proportion to its gradient norm, round(MEAN_REPEAT * norm / mean norm) times,
1 to `MAX_REPEAT` (a period of average norm trains MEAN_REPEAT periods, one of small
gradients once), from the scores known when the cycle is
first asked for (all of the cycle before: the lookahead `active(step + 1)` at a cycle's last
step comes after that step's scores). Cycle 0, and any cycle with an unscored unit, is the
usual schedule. Every unit still trains once per cycle, and a cycle is at most `MAX_REPEAT`
times the usual one, so every unit trains within 2 * MAX_REPEAT usual cycles. The scores
and those of the current and previous cycle's schedule are in `state_dict()`: resume is
exact; a look further back than one cycle is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import statistics
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..blocks import (
    KIND_BLOCKS,
    MAX_RANGES,
    Block,
    ParamInfo,
    Unit,
    discover_blocks,
    make_units,
    smallest_piece,
)
from ..budget import Budget, format_bytes
from ..formats import FP32
from .base import Config, Policy
from .dense import DenseUpdater

log = logging.getLogger(__name__)


IMPORTANCE = "importance"
MEAN_REPEAT, MAX_REPEAT = 2, 4  # order="importance": repeats of a period of average norm,
# and at most (module doc)


@dataclasses.dataclass(frozen=True)
class ScheduledConfig(Config):
    always: tuple[str, ...] = ()
    order: str | None = None  # None: the policy's first entry of ORDERS
    step_in_backward: bool = False  # update each param in its gradient hook (dense.py)
    ORDERS: ClassVar[tuple[str, ...]] = (IMPORTANCE,)

    def __post_init__(self) -> None:
        super().__post_init__()
        order = self.ORDERS[0] if self.order is None else self.order
        if not isinstance(order, str) or order not in self.ORDERS:
            raise ValueError(f"order={self.order!r}; allowed: "
                             f"{', '.join(map(repr, self.ORDERS))}")
        object.__setattr__(self, "order", order)
        if not isinstance(self.step_in_backward, bool):
            raise TypeError(f"step_in_backward={self.step_in_backward!r}; allowed: True or "
                            "False")
        if self.step_in_backward and order == IMPORTANCE:
            raise ValueError("order='importance' with step_in_backward=True; allowed: one of "
                             "them (importance scores the active gradients together at "
                             "step(), which step_in_backward has freed one by one)")
        a = self.always
        if isinstance(a, str) or not isinstance(a, (tuple, list)) or not all(
                isinstance(x, str) for x in a):
            raise TypeError(f"always={a!r}; allowed: a tuple of block names, e.g. "
                            "('embed', 'head')")
        object.__setattr__(self, "always", tuple(a))


def _generator(seed: int, cycle: int, salt: str) -> torch.Generator:
    digest = hashlib.blake2b(f"nto:{salt}:{seed}:{cycle}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _params_of(units: Sequence[Unit]) -> frozenset[int]:
    return frozenset(i for u in units for i in u.params)


class ScheduledPolicy(Policy):
    """Shared machinery of block and sample: units, `always`, periods and cycles."""

    Config = ScheduledConfig
    updater = DenseUpdater
    tensor_overhead_bytes = FP32.step_bytes  # one `step` scalar per trained tensor

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget,
                 config: ScheduledConfig) -> None:
        super().__init__(infos, budget, config)
        self.always = config.always
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
        # param -> its row ranges, for the params trained a range of rows at a time
        self.split: dict[int, list[tuple[int, int]]] = {}
        for u in self.units:
            if u.rows is not None:
                self.split.setdefault(u.params[0], []).append(u.rows)
        self._cycle, self._cycle_start = 0, 0
        self._cache: tuple[int, list[tuple[Unit, ...]]] | None = None
        self.order = config.order
        self._scores: dict[str, float] = {}  # importance: unit name -> its grad's |g|^2
        self._plans: dict[int, dict[str, float]] = {}  # cycle -> the scores it was made from

    # ---------------------------------------------------------------- costs and messages
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
        smallest = min(rest, key=lambda i: (self._piece_cost(i), self._splittable(i)))
        need = self._piece_cost(smallest)
        what = "rows of tensor" if self._splittable(smallest) else "tensor"
        raise ValueError(
            f"budget={self.budget.given} ({self._fmt(self.budget.amount)}) is below the "
            f"smallest unit that can train, {what} {self._label(smallest)} "
            f"({self._fmt(need)} under policy={self.name!r}); nothing would train. Raise the "
            f"budget to at least {self._fmt(need + self.budget.amount - self.capacity)}.")

    def _splittable(self, i: int) -> bool:
        return smallest_piece(self.infos[i]) < self.infos[i].numel

    def _piece_cost(self, i: int) -> int:
        """Cost of the smallest unit param i can train as: itself, or a range of rows."""
        return self.cost((i,), smallest_piece(self.infos[i]))

    def unit_bytes(self, units: Sequence[Unit]) -> int:
        """Device bytes of gradient + state of training `units` together (memory model)."""
        return sum(self.state_bytes(u.elements, self.infos[u.params[0]].dtype)
                   if u.rows is not None else
                   sum(self.state_bytes(self.infos[i].numel, self.infos[i].dtype)
                       for i in u.params) for u in units)

    def piece_sizes(self) -> list[int]:
        whole = [info.numel for i, info in enumerate(self.infos)
                 if info.trainable and i not in self.split]
        return whole + [(b - a) * (self.infos[i].numel // self.infos[i].shape[0])
                        for i, ranges in self.split.items() for a, b in ranges]

    def too_big_message(self) -> str | None:
        """One sentence naming the tensors that cannot train, or None."""
        if not self._too_big:
            return None
        big = sorted(self._too_big, key=lambda i: -self.cost((i,)))
        shown = ", ".join(f"{self._label(i)} ({self._fmt(self.cost((i,)))})" for i in big[:8])
        more = f" and {len(big) - 8} more" if len(big) > 8 else ""
        need = max(map(self._piece_cost, big)) + self.budget.amount - self.capacity
        return (f"{len(big)} parameter tensor(s) are larger than the budget "
                f"{self.budget.given} ({self._fmt(self.capacity)} left for switching units) "
                f"and cannot train under policy={self.name!r}, not even {MAX_RANGES} ranges "
                f"of rows at a time (1-D tensors: whole): {shown}{more}. To train them, "
                f"raise the budget to at least {self._fmt(need)}.")

    # ---------------------------------------------------------------- schedule
    def _make_schedule(self, cycle: int) -> list[tuple[Unit, ...]]:
        raise NotImplementedError

    def schedule(self, cycle: int) -> list[tuple[Unit, ...]]:
        """The periods of cycle `cycle`: each a tuple of switching units (without always)."""
        if self._cache is None or self._cache[0] != cycle:
            sched = self._make_schedule(cycle) if self.units else [()]
            if self.order == IMPORTANCE and self.units:
                sched = _repeat(sched, self._plan_scores(cycle))
            self._cache = (cycle, sched)
        return self._cache[1]

    def _plan_scores(self, cycle: int) -> dict[str, float]:
        """The scores cycle `cycle` is made from: those known when it is first asked for,
        kept while it is the current or the previous cycle (module doc)."""
        if cycle not in self._plans:
            self._plans = {c: v for c, v in self._plans.items() if c >= cycle - 1}
            self._plans[cycle] = dict(self._scores)
        return self._plans[cycle]

    def wants_scores(self, step: int) -> bool:
        return self.order == IMPORTANCE and step % self.switch_every == 0

    def observe(self, step: int, sq_norms: dict[int, float]) -> None:
        """Record the squared gradient norm of every switching unit training at `step`
        (param index -> |g|^2; a row unit's param holds only its rows' gradient)."""
        for u in self._period_units(step // self.switch_every):
            self._scores[u.name] = sum(sq_norms.get(i, 0.0) for i in u.params)

    def _period_units(self, period: int) -> tuple[Unit, ...]:
        if period < self._cycle_start:  # asked about the past: recompute from the start
            if self.order == IMPORTANCE:  # ... which only the cycle before can be
                self._step_back(period)
            else:
                self._cycle, self._cycle_start = 0, 0
        while True:
            sched = self.schedule(self._cycle)
            if period < self._cycle_start + len(sched):
                return sched[period - self._cycle_start]
            self._cycle_start += len(sched)
            self._cycle += 1

    def _step_back(self, period: int) -> None:
        prev = self._cycle - 1
        if prev not in self._plans:
            raise ValueError(f"order='importance': period {period} is before cycle "
                             f"{self._cycle}'s start ({self._cycle_start}) and the schedule "
                             "of an earlier cycle depends on scores no longer kept; allowed: "
                             "steps of the current or the previous cycle")
        self._cycle, self._cycle_start = prev, self._cycle_start - len(self.schedule(prev))

    def active_units(self, step: int) -> list[Unit]:
        return self.always_units + list(self._period_units(step // self.switch_every))

    def active(self, step: int) -> frozenset[int]:
        return _params_of(self.active_units(step))

    def active_rows(self, step: int) -> dict[int, tuple[int, int]]:
        """Params that train a range of their rows at `step`: param -> (start, stop)."""
        rows: dict[int, tuple[int, int]] = {}
        for u in self.active_units(step):
            if u.rows is not None:
                if u.params[0] in rows:  # row_ranges makes this impossible: say so loudly
                    raise RuntimeError(f"NTO internal error: two row ranges of "
                                       f"{self._label(u.params[0])} in one period")
                rows[u.params[0]] = u.rows
        return rows

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

    def _grad_itemsize(self, dtype: torch.dtype) -> int:
        """Bytes per element of the gradient kept until step(); 0 with step_in_backward,
        where each param's gradient is used and freed in backward (a transient)."""
        return 0 if self.cfg.step_in_backward else dtype.itemsize

    def transient_grad_bytes(self) -> int:
        """The largest dense gradient alive in backward outside the budget: a split tensor's
        (reduced to its rows in the hook), with step_in_backward any trained tensor's."""
        held = self.trainable if self.cfg.step_in_backward else self.split
        return max((self.infos[i].numel * self.infos[i].dtype.itemsize for i in held),
                   default=0)

    def bytes_per_element(self, dtype: torch.dtype) -> float:
        return self._grad_itemsize(dtype) + self.state_format(dtype).element_bytes

    def state_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return (numel * self._grad_itemsize(dtype) + self.state_format(dtype).state_bytes(numel)
                + self.tensor_overhead_bytes)

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        return {"policy": self.name, "budget_kind": self.budget.kind,
                "budget_amount": self.budget.amount, "switch_every": self.switch_every,
                "seed": self.seed, "always": list(self.always),
                **({"order": self.order} if self.order == IMPORTANCE else {}),
                # a byte budget holds other units without the gradient: refuse the other mode
                **({"step_in_backward": True} if self.cfg.step_in_backward
                   and self.budget.kind == "bytes" else {})}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cycle": self._cycle, "cycle_start": self._cycle_start}
        if self.order == IMPORTANCE:
            out.update(scores=dict(self._scores),
                       plans={c: dict(v) for c, v in self._plans.items()})
        return out

    def initial_state(self) -> dict[str, Any]:
        return {"cycle": 0, "cycle_start": 0,
                **({"scores": {}, "plans": {}} if self.order == IMPORTANCE else {})}

    def check_state_dict(self, state: object) -> None:
        super().check_state_dict(state)
        for key in ("cycle", "cycle_start"):
            v = state.get(key)  # type: ignore[union-attr]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"policy state {key!r} must be an int >= 0, got {v!r}")
        if self.order == IMPORTANCE:
            names = {u.name for u in self.units}
            plans = state.get("plans")  # type: ignore[union-attr]
            if not isinstance(plans, dict) or not all(
                    isinstance(c, int) and not isinstance(c, bool) for c in plans):
                raise ValueError(f"policy state 'plans' must be a dict of cycle -> scores "
                                 f"(order='importance'), got {type(plans).__name__}")
            for where, scores in [("scores", state.get("scores")),  # type: ignore[union-attr]
                                  *((f"plans[{c}]", v) for c, v in plans.items())]:
                _check_scores(where, scores, names)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._cycle, self._cycle_start = state["cycle"], state["cycle_start"]
        if self.order == IMPORTANCE:
            self._scores = {k: float(v) for k, v in state["scores"].items()}
            self._plans = {c: {k: float(x) for k, x in v.items()}
                           for c, v in state["plans"].items()}
            self._cache = None  # the schedules follow the loaded scores

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




def _repeat(periods: list[tuple[Unit, ...]],
            scores: dict[str, float]) -> list[tuple[Unit, ...]]:
    """order="importance": each period repeated round(MEAN_REPEAT * its gradient norm /
    the mean period's) times, 1..MAX_REPEAT; unchanged until every unit has a score."""
    if any(u.name not in scores for p in periods for u in p):
        return periods
    norms = [math.sqrt(sum(scores[u.name] for u in p)) for p in periods]
    mean = statistics.fmean(norms)
    if not mean > 0:
        return periods
    reps = [min(MAX_REPEAT, max(1, round(MEAN_REPEAT * n / mean))) for n in norms]
    return [p for p, r in zip(periods, reps) for _ in range(r)]


def _check_scores(where: str, scores: object, names: set[str]) -> None:
    if not isinstance(scores, dict) or not all(
            isinstance(k, str) and k in names and isinstance(v, float) and math.isfinite(v)
            and v >= 0 for k, v in scores.items()):
        raise ValueError(f"policy state {where!r} must map unit names of this model to "
                         f"finite floats >= 0 (order='importance'), got {scores!r:.200}")


def _short_list(names: Sequence[str], n: int = 12) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
