"""What a policy is, as the optimizer sees it: one narrow interface, no names.

A policy has two halves:
- the *schedule* (`Policy`): built from `ParamInfo`s (no tensor values), a `Budget` and
  its validated `Config`; says which params need a gradient at each step (`active`), what
  it costs per element (its memory model), and what of it a checkpoint saves;
- the *updater* (`Updater`): what happens to the active params' tensors, called by NTO at
  four points (gradient hook, step, schedule advance, zero_grad) and when a state loads.

`NTO` holds one of each and never asks which policy it has. A new policy is one module:
a `Config` subclass, a `Policy` subclass naming it and its updater, and one line in
`nto_ext.policies.POLICIES`.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Protocol

import torch

from ..blocks import ParamInfo
from ..budget import Budget, storage_bytes
from ..checkpoint import Storages
from ..formats import LOW_PRECISION, OWN_STATE_DTYPES, STATE_DTYPES, Fp32Moments, choose


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated policy arguments (every policy has these). Subclasses add fields and
    validate them in `__post_init__`; NTO passes only the fields a policy's config has.
    `master_weights`, `stochastic_rounding`: the state format of bf16/fp16 params;
    `state_dtype`: how the moments are stored (`nto_ext.formats.choose`)."""

    switch_every: int = 50
    seed: int = 0
    master_weights: bool | None = None
    stochastic_rounding: bool = False
    state_dtype: str = "fp32"

    def __post_init__(self) -> None:
        v = self.switch_every
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"switch_every={v!r}; allowed: an int >= 1 (optimizer steps "
                             "between changes of the active set)")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ValueError(f"seed={s!r}; allowed: an int in [0, 2**63)")
        m, sr = self.master_weights, self.stochastic_rounding
        if not isinstance(m, (bool, type(None))):
            raise TypeError(f"master_weights={m!r}; allowed: None (the default: fp32 master "
                            "weights for bf16/fp16 params), True or False")
        if not isinstance(sr, bool):
            raise TypeError(f"stochastic_rounding={sr!r}; allowed: True or False")
        if m and sr:
            raise ValueError("master_weights=True with stochastic_rounding=True; allowed: one "
                             "of them (masters keep an fp32 copy of the active bf16/fp16 "
                             "params; stochastic rounding keeps none)")
        d = self.state_dtype
        if not isinstance(d, str) or d not in STATE_DTYPES:
            raise ValueError(f"state_dtype={d!r}; allowed: {', '.join(map(repr, STATE_DTYPES))}"
                             " (how AdamW's two moments are stored: 'int8' keeps them in 8 "
                             "bits, 2.03 B per element instead of 8; 'int4' both in one byte, "
                             "1.13 B; 'bf16' in 4 B; 'none' keeps none, with switch_every=1)")
        if d == "none" and self.switch_every != 1:
            raise ValueError(f"state_dtype='none' with switch_every={v}; allowed: "
                             "switch_every=1 (state_dtype='none' keeps no moments: every "
                             "update is AdamW's first step from a fresh state, which is what "
                             "a param that trains one step gets anyway; in longer periods "
                             "AdamW reads its moments), or state_dtype 'fp32', 'int8', "
                             "'int4' or 'bf16'")
        if d != "fp32" and (m or sr):
            other = "master_weights" if m else "stochastic_rounding"
            raise ValueError(f"state_dtype={d!r} with {other}=True; allowed: one of them "
                             "(the int8, int4 and bf16 formats update bf16/fp16 params in "
                             "place, "
                             "rounded to nearest; masters and stochastic rounding run with fp32 "
                             "moments only, for now)")


class Host(Protocol):
    """What an updater may use of the optimizer that owns it."""

    state: Any  # param -> per-param state dict (torch.optim.Optimizer.state)
    param_groups: list[dict[str, Any]]
    offloaded: dict[int, dict[str, Any]]  # param index -> its state on the host

    @property
    def table(self) -> Any: ...  # nto_ext.params.ParamTable: params, infos, labels

    @property
    def guard(self) -> Any: ...  # nto_ext.grads.GradGuard: non-finite check, clipping

    @property
    def step_count(self) -> int: ...

    @property
    def active_set(self) -> frozenset[int]: ...


class Updater:
    """The tensor side of a policy. Defaults are what a policy with nothing to do there
    needs; `update`, `init_state`, `trained` and `check_state` are its own."""

    index_keys: ClassVar[tuple[str, ...]] = ()  # per-param state entries that are indices

    def __init__(self, host: Host, policy: Policy) -> None:
        self.host = weakref.proxy(host)  # no reference cycle: NTO is freed (and gives its
        self.policy = policy  # params back) as soon as the user drops it
        self.peak = 0  # largest grad + state + index it measured itself (0: none)

    def on_grad(self, i: int, p: torch.Tensor) -> None:
        """The gradient of active param i has arrived (post-accumulate-grad hook)."""

    def update(self) -> None:
        """The AdamW update of this step (inside step(), under no_grad)."""
        raise NotImplementedError

    def advance(self, step: int) -> None:
        """The schedule reaches `step`, before the active set changes."""

    def clear(self) -> None:
        """Forget what belongs to the current gradients (zero_grad, load, re-plan)."""

    def init_state(self) -> None:
        """Make the state of what trains now (NTO.init_state())."""
        raise NotImplementedError

    def trained(self) -> frozenset[int]:
        """Params that train now (hold state or will at their next update)."""
        raise NotImplementedError

    def trainable_elements(self) -> int:
        """Elements that train now."""
        infos = self.host.table.infos
        return sum(infos[i].numel for i in self.trained())

    def grad_tensors(self) -> list[torch.Tensor]:
        """Gradient memory it holds beyond the params' .grad (reported as gradient)."""
        return []

    def index_tensors(self) -> list[torch.Tensor]:
        """Index memory it holds beyond the state's index entries."""
        return []

    def transient_bytes(self) -> int:
        """Largest temporary buffer outside grad + state + index."""
        return 0

    def check_entry(self, i: int, p: torch.Tensor, st: dict[str, Any] | None) -> None:
        """Before an update: refuse (ValueError) a state the kernel cannot take."""

    def check_state(self, i: int, p: torch.Tensor, st: dict[str, Any], seen: Storages,
                    propagate: bool) -> dict[str, Any]:
        """A loaded per-param state, validated, as it will be kept."""
        raise NotImplementedError

    def check_loaded(self, new_state: dict[torch.Tensor, dict[str, Any]], step: int) -> None:
        """The loaded state as a whole agrees with the loaded policy state at `step`."""

    def import_entry(self, where: str, st: dict[str, Any],
                     p: torch.Tensor) -> dict[str, Any] | None:
        """One param's torch AdamW state as this updater keeps it (None: dropped)."""
        raise NotImplementedError


class Policy:
    """Decides the active parameter set (global indices) for every optimizer step."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[Config]] = Config
    updater: ClassVar[type[Updater]] = Updater
    # state_on_switch="offload": None when supported, else why not (said in the error)
    no_offload: ClassVar[str | None] = None
    # Addresses elements of the flattened param in place: contiguous params only.
    needs_contiguous: ClassVar[bool] = False
    tensor_overhead_bytes: ClassVar[int] = 0  # memory model: fixed bytes per trained tensor
    # Frees the dense gradients in backward (folded into its own buffers): clipping must be
    # NTO's max_grad_norm, not clip_grad_norm_ (which would see no gradient).
    compact_grads: ClassVar[bool] = False

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget, config: Config) -> None:
        self.infos = list(infos)
        self.budget = budget
        self.cfg = config
        self.switch_every = config.switch_every
        self.seed = config.seed
        low = any(i.dtype in LOW_PRECISION for i in self.infos if i.trainable)
        asked = [f"{k}=True" for k in ("master_weights", "stochastic_rounding")
                 if getattr(config, k)]
        if asked and not low:
            raise ValueError(f"{asked[0]} but no trainable param is bf16 or fp16 (fp32 params "
                             "are updated in fp32 already); allowed here: leave it unset")
        if config.state_dtype != "fp32" and low and config.master_weights is None:
            raise ValueError(f"state_dtype={config.state_dtype!r} with bf16/fp16 params keeps "
                             "no fp32 master weights (their default): the params are updated "
                             "in place, rounded to nearest, and updates below half an ulp are "
                             "lost; allowed: pass master_weights=False to accept that, or "
                             "state_dtype='fp32' (masters), or train fp32 params")

    # ---------------------------------------------------------------- memory model
    def state_format(self, dtype: torch.dtype) -> Fp32Moments:
        """How the state of a param of `dtype` is kept (`nto_ext.formats`)."""
        return choose(dtype, self.cfg.master_weights, self.cfg.stochastic_rounding,
                      self.cfg.state_dtype)

    def format_config(self) -> dict[str, Any]:
        """The formats in use beyond fp32 moments, for the saved config (empty when none:
        checkpoints of fp32 runs keep loading)."""
        used = {self.state_format(i.dtype).name for i in self.infos if i.trainable}
        out: dict[str, Any] = {key: True for key, fmt in (("master_weights", "master"),
                                                          ("stochastic_rounding", "stochastic"))
                               if fmt in used}
        for name in OWN_STATE_DTYPES:
            if name in used:
                out["state_dtype"] = name
        return out

    def bytes_per_element(self, dtype: torch.dtype) -> float:
        """Device bytes of training state per trained element (gradient + state + index);
        not a whole number for 8-bit moments (2 + 8/256 B of state)."""
        raise NotImplementedError

    def tensor_bytes(self) -> int:
        """Most bytes one trained tensor (or range of rows) adds beyond bytes_per_element
        per element: the policy's fixed overhead, and a format's partial last block."""
        return self.tensor_overhead_bytes + max(
            (self.state_format(i.dtype).tensor_bytes for i in self.infos if i.trainable),
            default=0)

    def state_bytes(self, numel: int, dtype: torch.dtype) -> int:
        """Training-state bytes of one fully trained tensor."""
        return math.ceil(numel * self.bytes_per_element(dtype)) + self.tensor_overhead_bytes

    def cost(self, params: Iterable[int], elements: int | None = None) -> int:
        """Cost of training `params` together, in budget units (elements or bytes);
        `elements`: of one param, that many of its elements (a range of its rows)."""
        return self.budget.cost(((self.infos[i].numel if elements is None else elements,
                                  self.infos[i].dtype) for i in params), self.state_bytes)

    def budget_bytes(self) -> int:
        """The budget in device bytes of gradient + state. Element budgets are converted
        with the memory model: elements x bytes/element (largest dtype) plus the
        per-tensor bytes of each tensor that could train at once."""
        if self.budget.kind == "bytes":
            return self.budget.amount
        trainable = [i for i in self.infos if i.trainable]
        bpe = max(self.bytes_per_element(i.dtype) for i in trainable)
        n, used = 0, 0  # the most tensors (or row ranges) that fit the budget together
        for size in sorted(self.piece_sizes()):
            if used + size > self.budget.amount:
                break
            n, used = n + 1, used + size
        return math.ceil(self.budget.amount * bpe) + self.tensor_bytes() * n

    def piece_sizes(self) -> list[int]:
        """Elements of each thing that trains with its own per-tensor state: the
        trainable tensors (a policy that splits tensors: their pieces)."""
        return [i.numel for i in self.infos if i.trainable]

    def budget_elements(self) -> int:
        """The budget in elements (byte budgets: bytes / smallest bytes per element)."""
        if self.budget.kind == "elements":
            return self.budget.amount
        trainable = [i for i in self.infos if i.trainable]
        bpe = min(self.bytes_per_element(i.dtype) for i in trainable)
        if bpe == 0:  # no state per element (no moments, gradients used in backward)
            return sum(i.numel for i in trainable)
        return int(self.budget.amount // bpe)

    # ---------------------------------------------------------------- schedule
    def active(self, step: int) -> frozenset[int]:
        """Indices of the parameters that need a gradient at optimizer step `step`."""
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

    def too_big_message(self) -> str | None:
        """One sentence naming the tensors that cannot train, or None."""
        return None

    def take_over(self, old: Policy) -> None:
        """Carry what `old` (the plan this one replaces, same params first) learned."""

    def wants_scores(self, step: int) -> bool:
        """Whether `observe` wants the active gradients' squared norms at `step`."""
        return False

    def observe(self, step: int, sq_norms: dict[int, float]) -> None:
        """The squared L2 norm of each active param's gradient at `step` (param index ->
        |g|^2, summed over shards), before its update."""

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        """What must match for a saved state to load (weights-only types)."""
        return {"policy": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def initial_state(self) -> dict[str, Any]:
        """state_dict() of a fresh run at step 0 (an imported AdamW state starts there)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def check_state_dict(self, state: object) -> None:
        """Raise ValueError when `state` cannot be loaded; touches nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"policy state must be a dict, got {type(state).__name__}")

    def check_cursor(self, step: int) -> None:
        """Raise ValueError when the loaded state cannot reach `step` directly."""

    def remap_state_dict(self, state: dict[str, Any], perm: Sequence[int]) -> dict[str, Any]:
        """A checked `state` saved over params in another order: saved param j is param
        perm[j] here (a checkpoint matched by name). Nothing index-based by default."""
        return state


def host_bytes(host: Host) -> int:
    """Bytes of the host copies: offloaded state, and the parked state of the row ranges
    not training now of a param that trains another range (policies/dense.py)."""
    entries = [*host.offloaded.values(),
               *(st["parked"] for st in host.state.values() if isinstance(st, dict)
                 and isinstance(st.get("parked"), dict))]
    return storage_bytes(_tensors(entries))


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        yield from (t for v in obj.values() for t in _tensors(v))
    elif isinstance(obj, list):
        yield from (t for v in obj for t in _tensors(v))


def measure(host: Host, updater: Updater) -> tuple[int, int, int]:
    """(grad, state, index) bytes of the training state, from real storage: the params'
    .grad and the updater's gradient buffers; per-param state tensors (its index entries
    apart) and the updater's index buffers. Each storage counted once."""
    grads = [p.grad for p in host.table.params if p.grad is not None]
    grads += updater.grad_tensors()
    state, index = [], updater.index_tensors()
    for st in host.state.values():
        if not isinstance(st, dict):  # a non-param key (torch allows opt.state["x"] = 1)
            continue
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                (index if k in updater.index_keys else state).append(v)
    return storage_bytes(grads), storage_bytes(state), storage_bytes(index)
