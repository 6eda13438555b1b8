"""class NTO: AdamW under a hard training-state memory budget.

The optimizer gathers; the policy decides; the ops compute. `NTO` owns every parameter it
is given from construction on, asks its policy (`policies.py`) which of them train at each
step, applies that set (requires_grad, .grad, state) and updates the active params with
one `ops.masked_adamw_` call per (param group, device, dtype).

Lifecycle (DESIGN.md, "The user-facing contract"):
- `__init__` validates everything, plans the schedule and installs post-accumulate-grad
  hooks that drop the gradients of inactive params as soon as they are produced. It never
  touches `requires_grad` (Trainer / DDP / FSDP wrap the model after the optimizer exists).
- The first `step()` or `train()`, and every switch, apply the active set: inactive params
  get `requires_grad=False`, `.grad=None` and lose their state (`state_on_switch="drop"`)
  or have it moved to host memory ("offload", pinned when CUDA is used; restored
  bit-exactly when they train again).
- `state` keeps torch's layout (`step`, `exp_avg`, `exp_avg_sq`; moments in fp32) and
  `param_groups` carry `lr`, `betas`, `eps`, `weight_decay`, so LR schedulers work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .auto import AutoBudget, check_auto_args, make_auto  # auto budget (issue 23)
from .blocks import ParamInfo
from .budget import (
    FLOAT_DTYPES,
    Budget,
    bytes_per_element,
    format_bytes,
    parse_budget,
    state_bytes,
    tensor_overhead_bytes,
)
from .checkpoint import (
    DENSE_KEYS,
    MAX_COUNT,
    Storages,
    adamw_entry,
    canonical_name,
    check_count,
    check_keys,
    check_moment,
    check_values,
    group_numbers,
    is_index,
    is_real,
    loaded_step,
    local_tensor,
)
from .policies import Policy, make_policy, validate_policy_args
from .sparse import SparseEngine

log = logging.getLogger(__name__)

STATE_ON_SWITCH = ("drop", "offload")
NONFINITE = ("skip", "raise", "propagate")
HYPER = ("lr", "betas", "eps", "weight_decay")
# Arguments that belong to the whole optimizer (they shape one schedule over all groups).
GLOBAL_ARGS = ("budget", "policy", "switch_every", "order", "seed", "state_on_switch",
               "nonfinite", "always", "max_grad_norm", "sample_layers", "regrow_fraction")
INDEX_KEYS = ("indices",)  # state entries reported as index bytes (sparse policy)
FORMAT_VERSION = 1
# The anchor (kept requiring grad in every period) is the smallest of the first params
# whose gradient arrives in the first backward: those nearest the loss.
_ANCHOR_CANDIDATES = 3


# --------------------------------------------------------------------------- validation


_is_number = is_real  # a real number of any type (Python, numpy, ...), not a bool


def _plain_number(x: object) -> object:
    """numpy and other real scalars as Python floats (ints stay ints), so state_dict() loads
    with torch.load(weights_only=True); anything else unchanged."""
    if _is_number(x) and type(x) not in (int, float):  # np.float64 subclasses float
        return int(x) if isinstance(x, numbers.Integral) else float(x)
    return x


def _check_hyper(where: str, lr: object, betas: object, eps: object,
                 weight_decay: object) -> None:
    """AdamW hyper-parameters: ValueError / TypeError saying what was given and allowed."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.device.type == "meta" or lr.is_complex():
            raise ValueError(f"{where}lr is a tensor of shape {tuple(lr.shape)} on "
                             f"{lr.device}; allowed: a number or a 1-element real tensor "
                             "with data")
        lr_value: object = lr.item()
    else:
        lr_value = lr
    if not _is_number(lr_value) or not math.isfinite(lr_value) or lr_value < 0:
        raise ValueError(f"{where}lr={lr!r}; allowed: a finite number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas={betas!r}; allowed: a pair (beta1, beta2), each in "
                         "[0, 1)")
    for k, b in enumerate(betas):
        if not _is_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"{where}betas={tuple(betas)!r}: beta{k + 1}={b!r}; allowed: a "
                             "number in [0, 1)")
    for name, v in (("eps", eps), ("weight_decay", weight_decay)):
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}{name}={v!r}; allowed: a finite number >= 0")


def _check_knobs(where: str, group: dict[str, Any]) -> None:
    """torch.optim.AdamW's implementation keywords, accepted at the values that change
    nothing here (NTO always runs its own fused kernel); `maximize` is implemented."""
    for key in ("foreach", "fused"):
        v = group.get(key)
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{where}{key}={v!r}; allowed: None, True or False (NTO always "
                            "runs its own fused kernel)")
    if not isinstance(group.get("maximize", False), bool):
        raise TypeError(f"{where}maximize={group['maximize']!r}; allowed: True or False")
    why = {"amsgrad": "NTO keeps two moments per trained element (no max_exp_avg_sq)",
           "capturable": "NTO's step reads its schedule on the host (no CUDA-graph capture)",
           "differentiable": "NTO's kernels update params in place under no_grad"}
    for key, reason in why.items():
        if group.get(key, False) not in (False, None):
            raise ValueError(f"{where}{key}={group[key]!r} is not supported: {reason}; "
                             f"allowed: {key}=False")


def _check_global(budget: object, policy: object, switch_every: object, order: object,
                  seed: object, state_on_switch: object, nonfinite: object, always: object,
                  max_grad_norm: object, sample_layers: object,
                  regrow_fraction: object = None) -> None:
    validate_policy_args(policy, switch_every=switch_every, order=order, seed=seed,
                         always=always, sample_layers=sample_layers,
                         regrow_fraction=regrow_fraction)
    if not isinstance(state_on_switch, str) or state_on_switch not in STATE_ON_SWITCH:
        raise ValueError(f"state_on_switch={state_on_switch!r}; allowed: "
                         f"{', '.join(map(repr, STATE_ON_SWITCH))}")
    if policy == "sparse" and state_on_switch != "drop":
        raise ValueError(f"state_on_switch={state_on_switch!r} applies to policy='block' and "
                         "'sample' (policy='sparse' carries the moments of kept elements and "
                         "starts grown ones at zero); allowed here: 'drop'")
    if not isinstance(nonfinite, str) or nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite={nonfinite!r}; allowed: {', '.join(map(repr, NONFINITE))}")
    if max_grad_norm is not None and (not _is_number(max_grad_norm)
                                      or not math.isfinite(max_grad_norm)
                                      or max_grad_norm <= 0):
        raise ValueError(f"max_grad_norm={max_grad_norm!r}; allowed: None or a finite "
                         "number > 0")
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Real, str)):
        raise TypeError(f"budget={budget!r} has type {type(budget).__name__}; allowed: an int "
                        "(elements), a float in (0, 1] or 'N%' (share of all elements), or "
                        "a byte size such as '512MiB', '2GB', '1.5GiB', '100KB'")


def _check_param(where: str, p: object) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} is {type(p).__name__}; allowed: torch.Tensor / nn.Parameter "
                        "(or (name, param) pairs, or param-group dicts)")
    if p.layout != torch.strided:
        raise TypeError(f"{where} has layout {p.layout}; allowed: dense (torch.strided) "
                        "tensors. NTO does not train sparse tensors")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; allowed: torch.float32, "
                        "torch.bfloat16, torch.float16 (NTO's fused kernels compute in fp32: "
                        "for float64 or complex params use torch.optim.AdamW)")
    if not p.is_leaf:
        raise ValueError(f"{where} is not a leaf tensor (it was computed from others); "
                         "allowed: leaf tensors such as nn.Parameter")


def _check_sparse_layout(policy: object, groups: list[dict[str, Any]]) -> None:
    """The sparse policy addresses elements of the flattened param in place: contiguous
    params only (block and sample train strided params through a contiguous copy)."""
    if policy != "sparse":
        return
    for k, g in enumerate(groups):
        for j, p in enumerate(g["params"]):
            if not _local(p).is_contiguous():
                name = g["param_names"][j] if "param_names" in g else f"params[{j}]"
                raise ValueError(f"param group {k}: param {name!r} is not contiguous; "
                                 "policy='sparse' needs contiguous params (make it so with "
                                 "`param.data = param.data.contiguous()`), or use "
                                 "policy='block' / 'sample', which train strided params")


_local = local_tensor  # the local shard of a DTensor (FSDP2), else the tensor itself


def _normalize_groups(params: object) -> list[dict[str, Any]]:
    """params / (name, param) pairs / group dicts -> group dicts with a `params` list of
    tensors and, when named, `param_names`; every check that needs no state."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"params is a {torch.typename(params)}; allowed: an iterable of "
                        "tensors, of (name, tensor) pairs, or of param-group dicts")
    if isinstance(params, dict):
        params = [params]
    try:
        items = list(params)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"params={params!r} is not iterable; allowed: an iterable of tensors, "
                        "of (name, tensor) pairs, or of param-group dicts") from None
    if not items:
        raise ValueError("params is empty; allowed: at least one parameter (pass "
                         "model.named_parameters() or model.parameters())")
    if not all(isinstance(x, dict) for x in items):
        if any(isinstance(x, dict) for x in items):
            raise TypeError("params mixes param-group dicts with tensors; allowed: all dicts "
                            "or none")
        items = [{"params": items}]
    groups = [_normalize_group(k, dict(g)) for k, g in enumerate(items)]
    _check_named(groups)
    if any("param_names" in g for g in groups):  # torch: all groups named, empty ones too
        for g in groups:
            g.setdefault("param_names", [])
    _check_duplicates(groups)
    return groups


def _check_named(groups: list[dict[str, Any]], named: bool | None = None) -> None:
    """All groups with names or none (empty groups go either way)."""
    flags = [("param_names" in g) for g in groups if g["params"]]
    if named is not None:
        flags.append(named)
    if any(flags) and not all(flags):
        raise ValueError("some param groups have names and some do not; allowed: name all "
                         "params ((name, param) pairs) or none")


def _normalize_group(k: int, group: dict[str, Any]) -> dict[str, Any]:
    where = f"param group {k}: "
    if "params" not in group:
        raise ValueError(f"{where}no 'params' key; allowed: dicts like {{'params': [...], "
                         "'lr': 1e-4}")
    bad = [key for key in group if key in GLOBAL_ARGS]
    if bad:
        raise ValueError(f"{where}{bad[0]!r} is set per group; allowed per group: "
                         f"{', '.join(HYPER)} (pass {bad[0]}= to NTO(...) for all params)")
    raw = group["params"]
    if isinstance(raw, torch.Tensor):
        raw = [raw]
    elif isinstance(raw, set):
        raise TypeError(f"{where}params is a set, whose order changes between runs; allowed: "
                        "a list or other ordered iterable")
    raw = list(raw)
    tensors, names = [], []
    for j, x in enumerate(raw):
        if isinstance(x, tuple):
            if len(x) != 2 or not isinstance(x[0], str):
                kinds = ", ".join(type(e).__name__ for e in x)
                raise TypeError(f"{where}params[{j}] is a tuple ({kinds}); allowed: "
                                "(name: str, param: Tensor)")
            names.append(x[0])
            x = x[1]
        tensors.append(x)
    if names and len(names) != len(tensors):
        raise ValueError(f"{where}some params have names and some do not; allowed: all "
                         "(name, param) pairs or all plain params")
    if "param_names" in group and not names and tensors:
        names = list(group["param_names"])
        if len(names) != len(tensors) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}param_names has {len(names)} entries for "
                             f"{len(tensors)} params; allowed: one str per param")
    for j, p in enumerate(tensors):
        label = f"{where}param {names[j]!r}" if names else f"{where}params[{j}]"
        _check_param(label, p)
    g = {key: _plain_number(v) for key, v in group.items()
         if key not in ("params", "param_names")}
    if isinstance(g.get("betas"), (tuple, list)):
        g["betas"] = tuple(_plain_number(b) for b in g["betas"])
    _check_knobs(where, g)
    g["params"] = tensors
    if names:
        g["param_names"] = names
    return g


def _check_duplicates(groups: list[dict[str, Any]],
                      seen: dict[int, str] | None = None,
                      seen_names: set[str] | None = None) -> None:
    seen = {} if seen is None else dict(seen)
    seen_names = set() if seen_names is None else set(seen_names)
    for k, g in enumerate(groups):
        names = g.get("param_names")
        for j, p in enumerate(g["params"]):
            label = repr(names[j]) if names else f"params[{j}] of param group {k}"
            if id(p) in seen:
                raise ValueError(f"parameter {label} is given twice (first as {seen[id(p)]}); "
                                 "allowed: each parameter once (tied weights appear once in "
                                 "model.named_parameters())")
            seen[id(p)] = label
            if names:
                if names[j] in seen_names:
                    raise ValueError(f"two parameters are named {names[j]!r}; allowed: "
                                     "unique names (checkpoints map state by name)")
                seen_names.add(names[j])


# --------------------------------------------------------------------------- ownership


# param -> the _ParamHandles of the live NTO that owns it. A second NTO built over the same
# params takes them over (a re-run notebook cell): it reads the flags the user set from
# here, not the False flags the first NTO left, and detaches the first (issue 17).
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _drop_grad_hook(ref: weakref.ReferenceType, index: int) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._on_grad(index, p)
    return hook


def _register_hook(p: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> Any:
    """register_post_accumulate_grad_hook, also on a param that does not require grad now
    (torch refuses those): the flag is switched on for the call and restored, so __init__
    leaves requires_grad as it found it."""
    if p.requires_grad:
        return p.register_post_accumulate_grad_hook(hook)
    p.requires_grad_(True)
    try:
        return p.register_post_accumulate_grad_hook(hook)
    finally:
        p.requires_grad_(False)


# Set on a param while NTO has switched its requires_grad off. deepcopy / pickle of the
# model carry it, so an NTO built over a copy of a model in training still sees the flag
# the user set (True) instead of NTO's temporary False.
_FROZEN_BY_NTO = "_nto_switched_off"


def _user_flag(p: torch.Tensor) -> bool:
    """The requires_grad the user set on `p`: recorded by the NTO that owns it, if any."""
    owner = _OWNERS.get(p)
    if owner is not None:
        return owner.flag_of(p)
    return bool(p.requires_grad) or bool(getattr(p, _FROZEN_BY_NTO, False))


def _switch(p: torch.Tensor, on: bool) -> None:
    """requires_grad as NTO sets it, with the marker that says it was NTO."""
    p.requires_grad_(on)
    if on:
        p.__dict__.pop(_FROZEN_BY_NTO, None)
    else:
        setattr(p, _FROZEN_BY_NTO, True)


class _ParamHandles:
    """What NTO changes on the params it trains: its gradient hooks, and requires_grad
    (switched off while a param is inactive). `release()` removes the hooks and gives each
    param back the flag it had when NTO was built; it runs when the optimizer is
    garbage-collected (weakref.finalize, reference cycles included), on
    `NTO.remove_hooks()`, or when a newer NTO takes the params over, so a model outlives its
    NTO unchanged."""

    def __init__(self, params: list[torch.Tensor], flags: list[bool]) -> None:
        self.params: list[torch.Tensor] = []
        self.flags: list[bool] = []
        self.hooks: list[Any] = []
        self.released = False
        self.add(params, flags)

    def add(self, params: list[torch.Tensor], flags: list[bool]) -> None:
        """Own `params` (their user flags given): a previous owner is released first."""
        for prev in {id(o): o for p in params if (o := _OWNERS.get(p)) is not None
                     and o is not self}.values():
            prev.release()
            warnings.warn("NTO: another NTO was built over the same parameters; the older "
                          "one is detached (stepping it raises)", UserWarning, stacklevel=5)
        self.params += params
        self.flags += flags
        for p in params:
            _OWNERS[p] = self

    def flag_of(self, p: torch.Tensor) -> bool:
        return next(f for q, f in zip(self.params, self.flags) if q is p)

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def release(self) -> None:
        self.remove_hooks()
        self.released = True
        for p, flag in zip(self.params, self.flags):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            p.__dict__.pop(_FROZEN_BY_NTO, None)
            if _OWNERS.get(p) is self:
                del _OWNERS[p]


class NTO(torch.optim.Optimizer):
    """AdamW that keeps gradients and moments only for what trains now, within `budget`.

    Args:
        params: tensors, `(name, tensor)` pairs (`model.named_parameters()`; names drive
            block discovery) or param-group dicts with per-group `lr`, `betas`, `eps`,
            `weight_decay`.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (decoupled weight decay).
        budget: int = trainable elements; float in (0, 1] or "N%" = share of all elements;
            byte string ("512MiB", "2GB", "1.5GiB") = device bytes of gradient + state per
            the memory model (`nto_ext.budget`). "100%" is AdamW. "auto": the largest
            budget whose measured peak fits `memory` (or the device's free memory), with
            activations measured on the first batch (`nto_ext.auto`).
        policy: "block" (groups of consecutive blocks take turns), "sample" (random
            blocks each period) or "sparse" (individual elements anywhere, a global top-K
            by gradient score with compact state; see nto_ext.sparse).
        switch_every: optimizer steps between changes of the active set (>= 1); sparse:
            between regrowths.
        order: block policy: "ascending", "descending" or "random" (re-shuffled per cycle).
        seed: seeds every random choice (counter-based: identical on all ranks).
        state_on_switch: "drop" (state freed when a param stops training) or "offload"
            (kept in host memory, restored bit-exactly).
        nonfinite: "skip" (a step with NaN/Inf in an active grad changes nothing and is
            counted in `skipped_steps`), "raise" (FloatingPointError naming the param) or
            "propagate" (as torch).
        always: block names that train in every period (e.g. ("embed", "head")).
        max_grad_norm: clip the active gradients to this total L2 norm (None: no clipping).
            Sparse: over the compact gradients (dense ones are freed in backward, so
            `clip_grad_norm_` and Trainer's own clipping see none: pass it here).
        sample_layers: sample policy: draw exactly this many units per period (LISA).
        regrow_fraction: sparse policy: share of the chosen elements dropped and regrown
            every `switch_every` steps, in [0, 0.25] (None: 0.1; 0: keep the first choice).
        memory: with budget="auto" only: the memory to fit ("20GiB", or an int of bytes).
        maximize: as torch.optim.AdamW (per group too). `foreach`, `fused` (None/True/False)
            and `amsgrad`, `capturable`, `differentiable` (False only) are accepted so code
            written for AdamW runs unchanged; NTO always runs its own fused kernel.

    Params with requires_grad=False when NTO is built are the user's frozen params: never
    trained, never counted in the budget, their flag never turned on (as AdamW skips them).
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, budget: int | float | str = "10%",
                 policy: str = "block", switch_every: int = 50, order: str = "ascending",
                 seed: int = 0, state_on_switch: str = "drop", nonfinite: str = "skip",
                 always: Sequence[str] = (), max_grad_norm: float | None = None,
                 sample_layers: int | None = None,
                 regrow_fraction: float | None = None, *,
                 memory: int | str | None = None,  # auto budget (issue 23)
                 maximize: bool = False,
                 amsgrad: bool = False, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False,
                 differentiable: bool = False) -> None:
        lr, eps, weight_decay = (_plain_number(v) for v in (lr, eps, weight_decay))
        if isinstance(betas, (tuple, list)):
            betas = tuple(_plain_number(b) for b in betas)  # type: ignore[assignment]
        budget = _plain_number(budget)  # type: ignore[assignment]
        _check_hyper("", lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize, "amsgrad": amsgrad, "foreach": foreach,
                    "fused": fused, "capturable": capturable, "differentiable": differentiable}
        _check_knobs("", defaults)
        _check_global(budget, policy, switch_every, order, seed, state_on_switch, nonfinite,
                      always, max_grad_norm, sample_layers, regrow_fraction)
        check_auto_args(budget, memory)  # auto budget (issue 23)
        groups = _normalize_groups(params)
        for k, g in enumerate(groups):
            _check_hyper(f"param group {k}: ", g.get("lr", lr), g.get("betas", betas),
                         g.get("eps", eps), g.get("weight_decay", weight_decay))
        self._args = {"budget": budget, "policy": policy, "switch_every": switch_every,
                      "order": order, "seed": seed, "always": tuple(always),
                      "sample_layers": sample_layers, "regrow_fraction": regrow_fraction}
        tensors = [p for g in groups for p in g["params"]]
        _check_sparse_layout(policy, groups)
        if (auto := make_auto(budget, memory, tensors)) is not None:  # auto budget (issue 23)
            self._args["budget"] = auto
        infos = [ParamInfo(g["param_names"][j] if "param_names" in g else None,
                           tuple(p.shape), p.dtype, _user_flag(p))
                 for g in groups for j, p in enumerate(g["params"])]
        self.budget, self.policy = self._plan(infos)
        # Everything is valid: from here on the optimizer is built and params are owned.
        self._constructing = True
        super().__init__(groups, defaults)
        self._constructing = False
        self.state_on_switch = state_on_switch
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm
        self._step = 0
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self._offloaded: dict[int, dict[str, Any]] = {}
        self._attach(infos, [i.trainable for i in infos])
        msg = getattr(self.policy, "too_big_message", lambda: None)()
        if msg and auto is None:  # auto budget (issue 23): it warns at its measured plan
            warnings.warn(f"NTO: {msg}", UserWarning, stacklevel=2)
        log.info("NTO: %s policy, budget %s, %d of %d tensors trainable, first active: %s",
                 policy, self.budget.describe(), len(self.policy.trainable), len(tensors),
                 ", ".join(self.policy.active_names(0))[:200])

    def _plan(self, infos: list[ParamInfo]) -> tuple[Budget, Policy]:
        """Budget and policy over `infos` (the budget's shares count trainable elements)."""
        total = sum(i.numel for i in infos if i.trainable)
        if total == 0:
            raise ValueError("no parameter requires grad (every param given has "
                             "requires_grad=False or no elements); nothing would train. Set "
                             "requires_grad=True on what should train before building NTO")
        args = {k: v for k, v in self._args.items() if k not in ("budget", "policy")}
        if isinstance(self._args["budget"], AutoBudget):  # auto budget (issue 23)
            return self._args["budget"].plan(infos, self._args["policy"], lambda b: make_policy(
                self._args["policy"], infos, b, **args))
        budget = parse_budget(self._args["budget"], total)
        return budget, make_policy(self._args["policy"], infos, budget, **args)

    def _attach(self, infos: list[ParamInfo], flags: list[bool]) -> None:
        """Runtime wiring over param_groups: indices, hooks, ownership (after __init__'s
        checks, and again after unpickling / deepcopy)."""
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._index = {p: i for i, p in enumerate(self._params)}
        self._infos = infos
        self._named = any("param_names" in g for g in self.param_groups)
        self._peak_bytes = 0
        self._active = self.policy.active(self._step)
        self._applied = False
        self._fired: list[int] = []  # first params whose gradient came in the first backward
        self._anchor: int | None = None
        self._sparse = SparseEngine(self) if self.policy.name == "sparse" else None
        owned = self._trainable_indices()
        self._handles = _ParamHandles([self._params[i] for i in owned],
                                      [flags[i] for i in owned])
        self._hook_params()
        weakref.finalize(self, self._handles.release).atexit = False

    def _trainable_indices(self) -> list[int]:
        return [i for i, info in enumerate(self._infos) if info.trainable]

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """What deepcopy / pickle need to rebuild a working NTO over the copied params."""
        return {"defaults": self.defaults, "state": self.state,
                "param_groups": self.param_groups,
                "_nto": {"args": self._args, "state_on_switch": self.state_on_switch,
                         "nonfinite": self.nonfinite, "max_grad_norm": self.max_grad_norm,
                         "infos": self._infos, "flags": self._user_flags(),
                         "step": self._step, "skipped_steps": self.skipped_steps,
                         "offloaded": self._offloaded, "anchor": self._anchor,
                         "policy_state": self._policy_state()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        nto = state.pop("_nto", None)
        super().__setstate__(state)
        if nto is None:  # torch's own pickled layout: nothing to rebuild from
            raise ValueError("NTO cannot be unpickled from a torch.optim state without its "
                             "'_nto' entry; build NTO(...) and use load_state_dict")
        self._args = nto["args"]
        self.state_on_switch, self.nonfinite = nto["state_on_switch"], nto["nonfinite"]
        self.max_grad_norm = nto["max_grad_norm"]
        self._step, self.skipped_steps = nto["step"], nto["skipped_steps"]
        self.last_grad_norm = None
        self._offloaded = nto["offloaded"]
        self.budget, self.policy = self._plan(nto["infos"])
        self.policy.load_state_dict(nto["policy_state"])
        self._attach(nto["infos"], nto["flags"])
        self._anchor = nto["anchor"]

    def _user_flags(self) -> list[bool]:
        """requires_grad as the user set it, per param (frozen ones: False)."""
        flags = [False] * len(self._params)
        for p, f in zip(self._handles.params, self._handles.flags):
            flags[self._index[p]] = f
        return flags

    # ------------------------------------------------------------------ torch API
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch: the new params join the schedule, the budget (a share budget counts
        them too) and the state from the next step()."""
        if getattr(self, "_constructing", False):
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group is a {type(param_group).__name__}; allowed: a dict "
                            "like {'params': [...], 'lr': 1e-4}")
        self._check_usable()
        k = len(self.param_groups)
        group = _normalize_group(k, dict(param_group))
        _check_named([group], self._named if self._params else None)
        if self._named:
            group.setdefault("param_names", [])
        g_full = {**self.defaults, **group}
        _check_hyper(f"param group {k}: ", g_full["lr"], g_full["betas"], g_full["eps"],
                     g_full["weight_decay"])
        seen = {id(p): repr(self._infos[i].name) if self._infos[i].name else f"#{i}"
                for i, p in enumerate(self._params)}
        _check_duplicates([group], seen, {i.name for i in self._infos if i.name})
        _check_sparse_layout(self._args["policy"], [group])
        names = group.get("param_names")
        new = [ParamInfo(names[j] if names else None, tuple(p.shape), p.dtype, _user_flag(p))
               for j, p in enumerate(group["params"])]
        infos = self._infos + new
        budget, policy = self._plan(infos)  # may refuse: nothing changed yet
        flags = self._user_flags() + [i.trainable for i in new]
        self._constructing = True
        try:
            super().add_param_group(group)
        finally:
            self._constructing = False
        self._replace_plan(budget, policy, infos, flags)
        log.info("NTO: a param group of %d params joined the plan (budget %s)",
                 len(new), budget.describe())

    def _replace_plan(self, budget: Budget, policy: Policy, infos: list[ParamInfo],
                      flags: list[bool]) -> None:
        """Switch to a new plan over the params now in param_groups; the active set is
        applied at the next step() (state of params that keep training carries over)."""
        old_sparse = self._sparse
        selected = self.policy.selected if old_sparse is not None else None
        self._handles.release()
        self.budget, self.policy = budget, policy
        if selected is not None:
            policy.set_selected(selected)
        anchor = self._anchor
        self._attach(infos, flags)
        self._anchor = anchor
        if old_sparse is not None and self._sparse is not None:
            self._sparse.clear()

    def train(self) -> None:
        """Apply the active set now (as the first `step()` would); for Trainer and
        schedule-free style loops."""
        self._check_usable()
        self._sync_params()
        self._ensure_applied()

    def eval(self) -> None:
        """Nothing to do: NTO keeps no separate evaluation weights."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW update of the active params, then advance the schedule. A step refused
        with an error changes nothing: fix the cause and step again."""
        self._check_usable()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_params()
        self._follow_dtypes()
        self._choose_anchor()
        # auto budget (issue 23): measure the forward/backward just run; re-plan if needed
        auto = self._args["budget"] if isinstance(self._args["budget"], AutoBudget) else None
        if auto is not None and auto.measure(sum(self._measure()), self._anchor is not None):
            self._replace_plan(*self._plan(self._infos), self._infos, self._user_flags())
        self._ensure_applied()
        with torch.no_grad():
            self._update()
        self._peak_bytes = max(self._peak_bytes, sum(self._measure()))
        self._advance()
        if auto is not None:  # auto budget (issue 23): the next forward/backward is measured
            auto.restart(sum(self._measure()))
        return loss

    def _check_usable(self) -> None:
        if self._handles.released:
            raise RuntimeError("this NTO is detached from its params (remove_hooks() was "
                               "called, or a newer NTO was built over the same params); "
                               "build a new NTO to train them")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch; the sparse policy's compact gradients and candidates go too."""
        if self._sparse is not None:
            self._sparse.clear()
        super().zero_grad(set_to_none)

    def init_state(self) -> None:
        """Create the (zero) state of every active param now instead of at its first
        update; the numbers are the same either way. For tools that need a non-empty
        `state` before training (torch.distributed.checkpoint otherwise runs a step with
        zero gradients, which would advance NTO's schedule)."""
        self._sync_params()
        if self._sparse is not None:
            self._sparse.init_state()
            return
        for i in sorted(self._active):
            self._init_state(self._params[i])

    # ------------------------------------------------------------------ reporting
    def active(self) -> list[str] | list[int]:
        """Names of the params that train now (indices when params were given unnamed)."""
        idx = sorted(self.policy.selected if self._sparse is not None else self._active)
        if self._named:
            return [self._infos[i].name for i in idx]  # type: ignore[misc]
        return idx

    def active_blocks(self) -> list[str]:
        """Names of the blocks (or split tensors) that train now."""
        return self.policy.active_names(self._step)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (the schedule position), skipped steps included."""
        return self._step

    def memory_report(self) -> dict[str, Any]:
        """Training-state memory measured from real storage, in bytes.

        grad_bytes: storages of all params' .grad; state_bytes: optimizer state tensors
        (moments and step counts) of every param; index_bytes: index tensors (sparse);
        offload_bytes: state kept in host memory; transient_bytes: temporary buffers
        (sparse: the largest dense gradient seen in backward, or drop / regrowth temporary;
        0 otherwise); total_bytes = grad + state + index (the budgeted training state, now;
        sparse: compact gradients and scoring candidates count as grad and index).
        peak_total_bytes: the largest total measured inside step(), right after the update
        and before a switch frees anything (grads and state both alive): the step's peak.
        Storages are counted once each (deduplicated by device and data pointer).
        """
        self._sync_params()
        grad_b, state_b, index_b = self._measure()
        offl = [v for st in self._offloaded.values() for v in st.values()
                if isinstance(v, torch.Tensor)]
        total = grad_b + state_b + index_b
        sp = self._sparse
        peak = max(self._peak_bytes, total, sp.peak if sp else 0)
        return {
            "grad_bytes": grad_b, "state_bytes": state_b, "index_bytes": index_b,
            "offload_bytes": _storage_bytes(offl),
            "transient_bytes": sp.transient_bytes() if sp else 0,
            "total_bytes": total, "peak_total_bytes": peak,
            "budget_bytes": self.budget_bytes(), "budget_elements": self.budget_elements(),
            "trainable_elements": (sp.trainable_elements() if sp else
                                   sum(self._infos[i].numel for i in self._active)),
            "trainable_tensors": len(self.policy.selected if sp else self._active),
            "skipped_steps": self.skipped_steps, "step": self._step,
            "weights_bytes": _storage_bytes(self._params),
            "adamw_bytes": sum(state_bytes("adamw", i.numel, i.dtype) for i in self._infos
                               if i.trainable),
            "policy": self.policy.name, "budget": self.budget.text,
            **({"budget_auto": self._args["budget"].report()}  # auto budget (issue 23)
               if isinstance(self._args["budget"], AutoBudget) else {}),
        }

    def reset_peak(self) -> None:
        """Forget the peak measured so far (memory_report()["peak_total_bytes"])."""
        self._peak_bytes = 0
        if self._sparse is not None:
            self._sparse.peak = 0

    def _measure(self) -> tuple[int, int, int]:
        """(grad, state, index) bytes from real storage."""
        grads = [p.grad for p in self._params if p.grad is not None]
        state, index = [], []
        for st in self.state.values():
            if not isinstance(st, dict):  # a non-param key (torch allows opt.state["x"] = 1)
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    (index if k in INDEX_KEYS else state).append(v)
        if self._sparse is not None:  # compact gradients and scoring candidates
            grads += self._sparse.grad_tensors()
            index += self._sparse.index_tensors()
        return _storage_bytes(grads), _storage_bytes(state), _storage_bytes(index)

    def budget_bytes(self) -> int:
        """The budget in device bytes of gradient + state. Element budgets are converted
        with the memory model: elements x bytes/element (largest dtype) plus one step
        scalar for each tensor that could train at once (dense policies)."""
        if self.budget.kind == "bytes":
            return self.budget.amount
        bpe = max(bytes_per_element(self.policy.name, i.dtype) for i in self._infos
                  if i.trainable)
        per_tensor = tensor_overhead_bytes(self.policy.name)
        return self.budget.amount * bpe + per_tensor * self._max_tensors(self.budget.amount)

    def budget_elements(self) -> int:
        """The budget in elements (byte budgets: bytes / smallest bytes per element)."""
        if self.budget.kind == "elements":
            return self.budget.amount
        bpe = min(bytes_per_element(self.policy.name, i.dtype) for i in self._infos
                  if i.trainable)
        return self.budget.amount // bpe

    def _max_tensors(self, elements: int) -> int:
        n, used = 0, 0
        for size in sorted(i.numel for i in self._infos if i.trainable):
            if used + size > elements:
                break
            n, used = n + 1, used + size
        return n

    # ------------------------------------------------------------------ hooks
    def _on_grad(self, index: int, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: drop the gradient of an inactive param at once."""
        if index >= len(self._params) or self._params[index] is not p:
            return  # a copied param (deepcopy copies hooks): not one of ours
        if len(self._fired) < _ANCHOR_CANDIDATES and self._anchor is None:
            self._fired.append(index)
        if index not in self._active:
            p.grad = None
        elif p.grad is not None and p.grad.layout != torch.strided:
            raise TypeError(f"{self._label(index)} got a sparse gradient; allowed: dense "
                            "gradients (build nn.Embedding with sparse=False)")
        elif self._sparse is not None:  # gather the chosen entries, free the dense grad
            self._sparse.on_grad(index, p)

    def remove_hooks(self) -> None:
        """Detach NTO from the params: remove its gradient hooks and give each param the
        requires_grad it had when NTO was built. Done automatically when the optimizer is
        garbage-collected or a newer NTO is built over the same params; call it yourself
        when something else (an LR scheduler, Trainer) still holds this NTO and you want
        the model back now. Stepping this optimizer afterwards raises."""
        self._handles.release()

    def _hook_params(self) -> None:
        """NTO's post-accumulate-grad hook on every trainable param (weak reference to
        self, so the hooks never keep NTO alive)."""
        ref = weakref.ref(self)
        self._handles.hooks = [_register_hook(self._params[i], _drop_grad_hook(ref, i))
                               for i in self._trainable_indices()]

    def _label(self, index: int) -> str:
        name = self._infos[index].name
        return f"parameter {name!r}" if name is not None else f"parameter #{index}"

    # ------------------------------------------------------------------ replaced params
    def _sync_params(self) -> None:
        """Follow params that were replaced in `param_groups` after construction (issue 6:
        accelerate's FSDP2 prepare, `Accelerator.prepare(model, opt)`, swaps every param for
        its sharded DTensor): re-index them, move their state and hooks over, and apply the
        active set to them at the next train()/step(). DESIGN.md: NTO finds params only
        through param_groups."""
        now = [p for g in self.param_groups for p in g["params"]]
        if len(now) == len(self._params) and all(a is b for a, b in zip(now, self._params)):
            return
        if len(now) != len(self._params):
            raise ValueError(f"param_groups now hold {len(now)} params, NTO was built over "
                             f"{len(self._params)}; allowed: the same params, or each "
                             "replaced by one of the same shape (a sharded or moved copy); "
                             "add params with add_param_group")
        for i, p in enumerate(now):
            if tuple(p.shape) != tuple(self._infos[i].shape):
                raise ValueError(f"{self._label(i)} was replaced in param_groups by a tensor of "
                                 f"shape {tuple(p.shape)}, expected {tuple(self._infos[i].shape)}"
                                 "; allowed: a copy of the same (global) shape")
        self._handles.remove_hooks()
        self.state = defaultdict(dict, {(now[self._index[p]] if p in self._index else p): st
                                        for p, st in self.state.items()})
        self._params, self._index = now, {p: i for i, p in enumerate(now)}
        owned = self._trainable_indices()  # same order: the flags recorded at __init__ apply
        self._handles.params = [now[i] for i in owned]
        for p in self._handles.params:
            _OWNERS[p] = self._handles
        self._hook_params()
        self._applied = False
        log.info("NTO: %d params were replaced in param_groups (e.g. sharded); following them",
                 len(now))

    def _follow_dtypes(self) -> None:
        """A param whose dtype changed since the plan (`model.to(torch.float32)`) changes
        its bytes per element: re-plan so a byte budget still holds. A changed shape is
        refused (its state no longer fits): nothing is changed."""
        changed = []
        for i, p in enumerate(self._params):
            info = self._infos[i]
            if tuple(p.shape) != info.shape:
                raise ValueError(f"{self._label(i)} has shape {tuple(p.shape)} but NTO was "
                                 f"built over shape {info.shape} (p.data was replaced or "
                                 "reshaped); its state no longer fits: restore the shape, or "
                                 "build a new NTO; nothing was changed")
            if p.dtype != info.dtype:
                _check_param(self._label(i), p)
                changed.append(i)
        if not changed:
            return
        infos = [dataclasses.replace(info, dtype=self._params[i].dtype) if i in changed
                 else info for i, info in enumerate(self._infos)]
        budget, policy = self._plan(infos)
        log.info("NTO: %d params changed dtype (e.g. %s is now %s); re-planned the budget",
                 len(changed), self._label(changed[0]), self._params[changed[0]].dtype)
        self._replace_plan(budget, policy, infos, self._user_flags())

    # ------------------------------------------------------------------ the active set
    def _choose_anchor(self) -> None:
        """After the first backward, keep one cheap used param requiring grad in every
        period: the smallest of the first params whose gradient arrived (nearest the loss).
        Then a period whose active params are all unused in forward (a pooler under mean
        pooling, an unrouted expert) leaves the loss something to differentiate, and the
        user's backward never fails where AdamW's would run (issue 16). Its gradient is
        dropped in the hook like any inactive one."""
        if self._anchor is None and self._fired:
            self._anchor = min(self._fired, key=lambda i: self._infos[i].numel)
            self._applied = False

    def _ensure_applied(self) -> None:
        if not self._applied:
            self._apply_active()
            self._applied = True

    def _apply_active(self) -> None:
        """Make params, grads and state agree with `self._active`: inactive params lose
        requires_grad, grad and (device) state; active params regain them. Retiring runs
        first, so offloaded state comes back only after the old set's grads and state are
        gone: the device peak of a switch stays within the budget (issue 10). Before the
        first backward (no anchor known yet) nothing is frozen: the hooks drop the inactive
        gradients as they come."""
        owned = self._trainable_indices()
        for i in owned:
            p = self._params[i]
            if i not in self._active:
                if i == self._anchor:
                    if not p.requires_grad:
                        _switch(p, True)
                elif p.requires_grad and self._anchor is not None:
                    _switch(p, False)
                p.grad = None
                if p in self.state:
                    self._retire(i, p)
        for i in owned:
            p = self._params[i]
            if i in self._active:
                if not p.requires_grad:
                    _switch(p, True)
                if i in self._offloaded:
                    self._restore(i, p)

    def _retire(self, i: int, p: torch.Tensor) -> None:
        st = self.state.pop(p)
        if self.state_on_switch == "offload":
            self._offloaded[i] = {k: _to_host(v) for k, v in st.items()}

    def _restore(self, i: int, p: torch.Tensor) -> None:
        host = self._offloaded.pop(i)
        self.state[p] = {k: _to_param_device(k, v, p) for k, v in host.items()}

    def _advance(self) -> None:
        self._step += 1
        if self._sparse is not None:  # before a regrowth: drop the weakest elements
            self._sparse.advance(self._step)
        new = self.policy.active(self._step)
        if new != self._active:
            log.debug("NTO: step %d switches to %s", self._step,
                      ", ".join(self.policy.active_names(self._step))[:200])
            self._active = new
            self._apply_active()
            self._applied = True

    # ------------------------------------------------------------------ the update
    def _active_grads(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(group index, param index, param, grad) of every active param with a grad,
        each checked before anything changes (a refused step changes nothing)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            _check_hyper(f"param group {gi}: ", group["lr"], group["betas"], group["eps"],
                         group["weight_decay"])
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                i = self._index[p]
                if i not in self._active:  # set by hand after the hook ran, or frozen by the
                    if self._infos[i].trainable:  # user: not ours to use (AdamW would)
                        p.grad = None
                    continue
                self._check_entry(i, p, g)
                out.append((gi, i, p, g))
        return out

    def _check_entry(self, i: int, p: torch.Tensor, g: torch.Tensor) -> None:
        """What the kernels need of one param, its grad and state, named by the param."""
        local, lg = _local(p), _local(g)
        if local.device.type == "meta":
            raise ValueError(f"{self._label(i)} is on the meta device (no data); materialize "
                             "the model (to_empty(), load weights) before step()")
        _check_param(self._label(i), p)
        if g.layout != torch.strided:
            raise TypeError(f"{self._label(i)} has a sparse gradient; allowed: dense "
                            "gradients (build nn.Embedding with sparse=False)")
        if lg.shape != local.shape or lg.dtype != local.dtype or lg.device != local.device:
            raise ValueError(f"the gradient of {self._label(i)} is a {lg.dtype} tensor of "
                             f"shape {tuple(lg.shape)} on {lg.device}; expected "
                             f"{local.dtype}, {tuple(local.shape)} on {local.device} (as the "
                             "param); nothing was changed")
        st = self.state.get(p)
        if self._sparse is None and st:
            for key in ("exp_avg", "exp_avg_sq"):
                v = _local(st[key])
                if v.shape != local.shape or v.device != local.device:
                    raise ValueError(f"the {key} of {self._label(i)} has shape "
                                     f"{tuple(v.shape)} on {v.device}; the param has "
                                     f"{tuple(local.shape)} on {local.device}; nothing was "
                                     "changed")

    def _check_grads(self, entries: list) -> bool:
        """Non-finite check and clipping over all active grads; False = skip this step.
        Under FSDP2 (DTensor grads, one shard per rank) the squared norm and the count of
        non-finite shards are summed over the ranks first (nto_ext.hf's engineer, issue 6:
        with local values each rank clipped by its own norm, and a NaN in one shard made
        only that rank skip)."""
        if self.nonfinite == "propagate" and self.max_grad_norm is None:
            return True
        by_dev: dict[torch.device, list[int]] = defaultdict(list)
        for k, (_, _, _, g) in enumerate(entries):
            by_dev[g.device].append(k)
        sumsq, n_bad, first_bad = 0.0, 0, None
        for ks in by_dev.values():
            # no histogram: a NaN or inf in a grad makes its absmax non-finite
            grads = [_local(entries[k][3]).contiguous() for k in ks]
            _, sq, absmax, _ = self._op(ops.param_stats, [entries[k][1] for k in ks], grads,
                                        histogram=False)
            flags = ~torch.isfinite(absmax)
            bad = flags.nonzero().flatten().tolist()
            if bad and first_bad is None:
                first_bad = entries[ks[bad[0]]][1]
            n_bad += len(bad)
            sumsq += float(sq.sum())
        sumsq, n_bad = _sum_over_shards(entries, sumsq, n_bad)
        where = self._label(first_bad) if first_bad is not None else "a shard on another rank"
        if n_bad and self.nonfinite == "raise":
            raise FloatingPointError(f"NTO: the gradient of {where} holds NaN or Inf "
                                     "(nonfinite='raise'); params were not updated")
        if n_bad and self.nonfinite == "skip":
            self.skipped_steps += 1
            self.last_grad_norm = float("nan")
            log.warning("NTO: step %d skipped: NaN/Inf in the gradient of %s (%d skipped so "
                        "far)", self._step, where, self.skipped_steps)
            return False
        norm = math.sqrt(sumsq)
        self.last_grad_norm = norm
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            coef = self.max_grad_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            for ks in by_dev.values():
                torch._foreach_mul_([_local(entries[k][3]) for k in ks], coef)
        return True

    def _op(self, op: Callable[..., Any], index: list[int], *args: Any, **kw: Any) -> Any:
        """Call an op over params `index`; its errors name the param, not a list position."""
        try:
            return op(*args, **kw)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            text = re.sub(r"(\w+)\[(\d+)\]", lambda m: (
                f"{m.group(1)}[{m.group(2)}] ({self._label(index[int(m.group(2))])})"
                if int(m.group(2)) < len(index) else m.group(0)), str(e))
            raise type(e)(text) from e

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:  # lazily, like torch: only params that get a gradient have state
            local = _local(p)
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
            st["exp_avg_sq"] = torch.zeros(local.shape, dtype=torch.float32,
                                           device=local.device)
        return st

    def _update(self) -> None:
        if self._sparse is not None:
            self._sparse.update()
            return
        entries = self._active_grads()
        if not entries or not self._check_grads(entries):
            return
        batches: dict[tuple, list] = defaultdict(list)
        for gi, i, p, g in entries:
            local = _local(p)
            batches[(gi, local.device, local.dtype)].append((i, local, _local(g), p))
        for (gi, _, _), items in batches.items():
            self._update_batch(self.param_groups[gi], items)

    def _update_batch(self, group: dict[str, Any], items: list) -> None:
        """One fused kernel call over params of one group, device and dtype. Strided params
        (transposed views, channels_last) go through contiguous copies, written back."""
        states = [self._init_state(p) for _, _, _, p in items]
        params = [t if t.is_contiguous() else t.contiguous() for _, t, _, _ in items]
        grads = [g if g.is_contiguous() else g.contiguous() for _, _, g, _ in items]
        steps = [st["step"] for st in states]
        beta1, beta2 = group["betas"]
        maximize = group.get("maximize", False)
        if maximize:  # AdamW's maximize: descend on -grad (negated in place, then back)
            torch._foreach_neg_(grads)
        try:
            self._op(ops.masked_adamw_, [i for i, _, _, _ in items], params, grads,
                     [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                     [None] * len(items), [s + 1 for s in steps], lr=float(group["lr"]),
                     beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                     weight_decay=float(group["weight_decay"]))
        finally:
            if maximize:
                torch._foreach_neg_(grads)
        torch._foreach_add_(steps, 1.0)  # counted once the kernel has run
        for (_, t, _, _), staged in zip(items, params):
            if staged is not t:
                t.copy_(staged)

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict[str, Any]:
        return {**self.policy.config(), "state_on_switch": self.state_on_switch}

    def _layout(self) -> dict[str, Any]:
        """What a checkpoint must match: shapes and dtypes per param, and the names the
        user gave (None when params were given unnamed), which map a checkpoint by name."""
        names = [i.name for i in self._infos]
        return {"shapes": [list(i.shape) for i in self._infos],
                "dtypes": [str(i.dtype).removeprefix("torch.") for i in self._infos],
                "names": names if all(isinstance(n, str) for n in names) else None}

    def state_dict(self) -> dict[str, Any]:
        """torch's layout ({"state": {index: {...}}, "param_groups": [...]}) plus "nto":
        the schedule position, counters, active set, config and layout (shapes, dtypes,
        names). Per-param state of offloaded params is in "state" too (host tensors),
        listed in nto["offloaded"]. Keys of `state` that are not params (torch allows
        `opt.state["foo"] = ...`) are kept as they are, as torch.optim.AdamW does.
        Only tensors, ints, floats, strings, lists, dicts, tuples and None: loadable with
        torch.load(weights_only=True)."""
        self._sync_params()
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        groups, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        state: dict[int, dict[str, Any]] = {}
        other: dict[Any, Any] = {}
        for key, st in self.state.items():
            i = self._index.get(key) if isinstance(key, torch.Tensor) else None
            if i is None:
                if isinstance(key, torch.Tensor):  # torch raises KeyError here too
                    raise ValueError("optimizer state: `state` holds a tensor key that is not "
                                     "a param of this optimizer; allowed: its params and "
                                     "non-tensor keys")
                other[key] = st
            elif st:
                state[i] = dict(st)
        for i, st in self._offloaded.items():
            state[i] = dict(st)
        sd: dict[str, Any] = {"state": {**dict(sorted(state.items())), **other},
                              "param_groups": groups}
        sd["nto"] = {
            "format": FORMAT_VERSION,
            "config": self._config(),
            "layout": self._layout(),
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "active": sorted(self._active),
            "offloaded": sorted(self._offloaded),
            "with_state": sorted(state),  # a checkpoint that lost an entry is refused
            "policy_state": self._policy_state(),
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _policy_state(self) -> dict[str, Any]:
        self.policy.active(self._step)  # the schedule's cursor at the current step
        return self.policy.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from `state_dict()`, or import one of torch.optim.AdamW / Adam
        (no "nto" entry: see `_import_adamw`). Params are matched by name when both sides
        have names, else by position; shapes and dtypes must match. Every tensor and count
        is validated before anything is replaced; keeps the saved dtypes (fp32 moments of
        a bf16 param stay fp32). Refuses, with ValueError and without changing anything,
        a state from another optimizer, policy, configuration or parameter layout, and
        corrupted or crafted values (non-finite moments unless nonfinite="propagate",
        negative exp_avg_sq, aliasing tensors, extra per-param entries, bad counts)."""
        sd = dict(state_dict) if isinstance(state_dict, dict) else state_dict
        self._sync_params()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        if isinstance(sd, dict) and "nto" not in sd and "state" in sd and "param_groups" in sd:
            sd = self._import_adamw(sd)
        sd, nto, reordered = self._check_loadable(sd)
        cursor = self.policy.state_dict()
        self.policy.load_state_dict(nto["policy_state"])
        active = frozenset(nto["active"])
        try:
            self.policy.check_cursor(nto["step"])
            if self.policy.active(nto["step"]) != active:
                why = (" (the params are in another order than in the run that saved it, "
                       "and the schedule over this order differs: build NTO over the "
                       "params in the saved order)" if reordered else
                       " (a foreign or edited checkpoint)")
                raise ValueError("optimizer state: the saved active set does not match the "
                                 f"schedule at step {nto['step']}{why}; nothing was loaded")
            new_state, new_offloaded, other = self._build_loaded_state(sd, nto)
            if self._sparse is not None:
                self._sparse.check_loaded(new_state)
            new_groups = self._loaded_groups(sd["param_groups"])
        except Exception:
            self.policy.load_state_dict(cursor)  # the cursor is a cache, but leave it as it was
            raise
        # Commit: nothing below can fail.
        self.state = defaultdict(dict, new_state)
        self.state.update(other)
        self._offloaded = new_offloaded
        self.param_groups = new_groups
        self._step = nto["step"]
        self.skipped_steps = nto["skipped_steps"]
        self._active = active
        self._applied = False  # applied on the next step() / train(), as after __init__
        if self._sparse is not None:
            self._sparse.clear()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_loadable(self, sd: object) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """(sd, nto, reordered): the checked state with its param indices translated to
        this optimizer's order (matched by name when both sides have names)."""
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            keys = sorted(sd, key=str)[:8] if isinstance(sd, dict) else "-"
            raise ValueError("optimizer state: expected a dict with 'state' and "
                             f"'param_groups' (from NTO.state_dict()), got {type(sd).__name__}"
                             f" with keys {keys}")
        nto = sd.get("nto")
        if not isinstance(nto, dict):
            raise ValueError("optimizer state: 'nto' is not a dict; allowed: a state from "
                             "NTO.state_dict() or torch.optim.AdamW.state_dict()")
        if nto.get("format") != FORMAT_VERSION:
            raise ValueError(f"optimizer state: format {nto.get('format')!r}; this version "
                             f"reads format {FORMAT_VERSION}")
        for key in ("config", "layout", "step", "skipped_steps", "active", "offloaded",
                    "with_state", "policy_state"):
            if key not in nto:
                raise ValueError(f"optimizer state: nto[{key!r}] is missing (truncated "
                                 "checkpoint?); nothing was loaded")
        self._check_config(nto["config"])
        perm = self._check_layout(nto["layout"], sd["param_groups"])
        for key in ("step", "skipped_steps"):
            check_count(f"nto[{key!r}]", nto[key], MAX_COUNT)
        n = len(self._params)
        for key in ("active", "offloaded", "with_state"):
            v = nto[key]
            if not isinstance(v, (list, tuple)) or not all(is_index(i, n) for i in v) \
                    or len(set(v)) != len(v):
                raise ValueError(f"optimizer state: nto[{key!r}] must list distinct param "
                                 f"indices in [0, {n})")
        if not isinstance(sd["state"], dict):
            raise ValueError("optimizer state: 'state' is not a dict")
        self.policy.check_state_dict(nto["policy_state"])
        reordered = perm != list(range(n))
        if reordered:
            sd, nto = self._remap(sd, nto, perm)
        have = sorted(k for k in sd["state"] if is_index(k, n))
        bad = [k for k in sd["state"] if isinstance(k, int) and not is_index(k, n)]
        if not bad and have != sorted(nto["with_state"]):  # else: refused below
            lost = sorted(set(nto["with_state"]) - set(have))
            raise ValueError("optimizer state: 'state' holds entries for params "
                             f"{have[:8]} but the optimizer saved state for "
                             f"{sorted(nto['with_state'])[:8]}"
                             f"{f' (missing: {lost[:8]})' if lost else ''}; an edited or "
                             "partial checkpoint; nothing was loaded")
        return sd, nto, reordered

    def _remap(self, sd: dict[str, Any], nto: dict[str, Any], perm: list[int],
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Copies of sd and nto with saved param index j renamed perm[j] (nothing of the
        caller's is changed). Param groups keep their position (checked in _check_layout)."""
        n = len(perm)
        state = {perm[k] if is_index(k, n) else k: v for k, v in sd["state"].items()}
        new_nto = dict(nto)
        for key in ("active", "offloaded", "with_state"):
            new_nto[key] = sorted(perm[i] for i in nto[key])
        new_nto["policy_state"] = self.policy.remap_state_dict(nto["policy_state"], perm)
        return {**sd, "state": state}, new_nto

    def _check_config(self, saved: object) -> None:
        mine = self._config()
        if not isinstance(saved, dict):
            raise ValueError("optimizer state: nto['config'] is not a dict")
        if saved.get("policy") != mine["policy"]:
            raise ValueError(f"optimizer state was saved with policy={saved.get('policy')!r} "
                             f"but this optimizer has policy={mine['policy']!r}; build NTO "
                             "with the arguments of the run that saved it")
        diff = [f"{k}: saved {saved.get(k)!r}, here {v!r}" for k, v in mine.items()
                if _plain(saved.get(k)) != _plain(v)]
        if diff:
            raise ValueError("optimizer state was saved with other NTO arguments ("
                             + "; ".join(diff) + "); build NTO with the arguments of the "
                             "run that saved it")

    def _check_layout(self, layout: object, saved_groups: object) -> list[int]:
        """perm[j] = this optimizer's index of the checkpoint's param j: by name when both
        sides have names, else by position; shapes and dtypes checked through it."""
        shapes = layout.get("shapes") if isinstance(layout, dict) else None
        mine = self._layout()
        n = len(mine["shapes"])
        if not isinstance(shapes, list) or len(shapes) != n:
            got = len(shapes) if isinstance(shapes, list) else "?"
            raise ValueError(f"optimizer state is for {got} parameters but this optimizer "
                             f"has {n}; load it into an NTO built over the same model")
        names = layout.get("names")  # type: ignore[union-attr]
        perm = (self._match_names(names) if names is not None and mine["names"] is not None
                else list(range(n)))
        dtypes = layout.get("dtypes")  # type: ignore[union-attr]
        if dtypes is not None and (not isinstance(dtypes, list) or len(dtypes) != n):
            raise ValueError(f"optimizer state: layout['dtypes'] must list {n} dtypes")
        for j, s in enumerate(shapes):
            i = perm[j]
            if not isinstance(s, (list, tuple)) or list(s) != mine["shapes"][i]:
                raise ValueError(f"optimizer state: {self._label(i)} (#{i}) has shape "
                                 f"{s!r:.60} in the checkpoint but {mine['shapes'][i]} here; "
                                 "load it into an NTO built over the same model")
            if dtypes is not None and dtypes[j] != mine["dtypes"][i]:
                raise ValueError(f"optimizer state: {self._label(i)} (#{i}) was "
                                 f"{dtypes[j]!r:.40} in the checkpoint but is "
                                 f"{mine['dtypes'][i]} here; load the model in the dtype of "
                                 "the run that saved it (or cast it after loading)")
        self._check_groups(saved_groups, perm)
        return perm

    def _match_names(self, saved: object) -> list[int]:
        """perm by name; torch.compile's `_orig_mod.` and DDP's `module.` prefixes are
        ignored when the exact names do not all match. Refuses names that do not match."""
        mine = [i.name for i in self._infos]
        if not isinstance(saved, list) or not all(isinstance(s, str) for s in saved) \
                or len(saved) != len(mine):
            raise ValueError(f"optimizer state: layout['names'] must list {len(mine)} names "
                             "(one str per param)")
        dup = next((s for k, s in enumerate(saved) if s in saved[:k]), None)
        if dup is not None:
            raise ValueError(f"optimizer state: layout['names'] lists {dup!r} twice (an edited "
                             "checkpoint); nothing was loaded")
        for canon in (lambda s: s, canonical_name):
            index = {canon(m): i for i, m in enumerate(mine)}  # type: ignore[arg-type]
            if len(index) == len(mine) and all(canon(s) in index for s in saved):
                return [index[canon(s)] for s in saved]
        extra = [s for s in saved if s not in set(mine)]
        absent = [m for m in mine if m not in set(saved)]
        raise ValueError(
            f"optimizer state was saved for other parameter names: {len(extra)} saved "
            f"name(s) are not params here (first: {extra[:3]}) and {len(absent)} param(s) "
            f"here are not in the checkpoint (first: {absent[:3]}); load it into an NTO "
            "built over the same model (same parameter names)")

    def _check_groups(self, saved_groups: object, perm: list[int]) -> None:
        """Same number of groups, each holding the same params (through perm), with valid
        hyper-parameters (any real number type: converted to float when loaded)."""
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            got = len(saved_groups) if isinstance(saved_groups, list) else "no list of"
            raise ValueError(f"optimizer state has {got} param groups but this "
                             f"optimizer has {len(self.param_groups)}")
        start = 0
        for k, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            ids = sg.get("params") if isinstance(sg, dict) else None
            size = len(g["params"])
            if not isinstance(ids, (list, tuple)) or len(ids) != size:
                raise ValueError(f"optimizer state: param group {k} has a different number "
                                 "of params than this optimizer's")
            if list(ids) != list(range(start, start + size)):
                raise ValueError(f"optimizer state: param group {k} lists params "
                                 f"{list(ids)[:4]}...; expected the indices "
                                 f"{start}..{start + size - 1} (an edited checkpoint)")
            here = {self._index[p] for p in g["params"]}
            moved = [perm[j] for j in ids if perm[j] not in here]
            if moved:
                raise ValueError(f"optimizer state: {self._label(moved[0])} was in param "
                                 f"group {k} in the checkpoint but is in another group here; "
                                 "build the param groups as in the run that saved it")
            start += size
            missing = [h for h in HYPER if h not in sg]
            if missing:  # the next step() would fail on it, after the load changed everything
                raise ValueError(f"optimizer state: param group {k} has no {missing[0]!r} "
                                 "(truncated checkpoint?); nothing was loaded")
            h = group_numbers(sg)
            _check_hyper(f"optimizer state: param group {k}: ", h["lr"], h["betas"],
                         h["eps"], h["weight_decay"])

    def _loaded_groups(self, saved_groups: list) -> list[dict[str, Any]]:
        """The param groups after a load: the saved entries (hyper-parameters as Python
        floats, so a re-saved state loads with weights_only=True) with this optimizer's
        params and names."""
        new_groups = []
        for g, saved in zip(self.param_groups, saved_groups):
            ng = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            ng.update(group_numbers(saved))
            ng["params"] = g["params"]
            if "param_names" in g:
                ng["param_names"] = g["param_names"]
            elif "param_names" in saved:  # as torch: names given on either side are kept
                ng["param_names"] = list(saved["param_names"])
            new_groups.append(ng)
        return new_groups

    def _build_loaded_state(self, sd: dict[str, Any], nto: dict[str, Any],
                            ) -> tuple[dict, dict, dict]:
        """(device state, offloaded state, non-param entries) from a checked checkpoint;
        every tensor validated, none aliasing another or a param, none keeping a larger
        storage than it needs."""
        active, offloaded = set(nto["active"]), set(nto["offloaded"])
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        new_offloaded: dict[int, dict[str, Any]] = {}
        other: dict[Any, Any] = {}
        seen = Storages((self._label(i), p) for i, p in enumerate(self._params))
        for key, st in sd["state"].items():
            if not isinstance(key, int) or isinstance(key, bool):
                other[key] = st  # not a param: kept as it is, as torch.optim.AdamW does
                continue
            if not is_index(key, len(self._params)):
                raise ValueError(f"optimizer state: key {key!r} in 'state' is not a param "
                                 f"index (this optimizer has {len(self._params)} params)")
            p = self._params[key]
            st = self._check_param_state(key, p, st, seen)
            if key in offloaded:
                new_offloaded[key] = {k: _to_host(v, p) for k, v in st.items()}
            elif key in active:
                new_state[p] = {k: _to_param_device(k, v, p) for k, v in st.items()}
            else:
                raise ValueError(f"optimizer state holds state for {self._label(key)}, which "
                                 "is neither active nor offloaded at the saved step (a foreign "
                                 "or edited checkpoint); nothing was loaded")
        return new_state, new_offloaded, other

    def _check_param_state(self, i: int, p: torch.Tensor, st: object,
                           seen: Storages) -> dict[str, Any]:
        """The state of param i as it will be kept: validated (keys, dtypes, shapes, finite
        unless nonfinite="propagate", exp_avg_sq >= 0, counts), `step` as a float32 tensor,
        tensors compact and not aliasing anything else loaded."""
        where = f"optimizer state for {self._label(i)}"
        if not isinstance(st, dict):
            raise ValueError(f"{where} is not a dict")
        if self._sparse is not None:  # compact (sparse) state
            self._sparse.check_state(i, p, st)
            out = dict(st)
        else:
            check_keys(where, st, DENSE_KEYS)
            for key in ("exp_avg", "exp_avg_sq"):
                check_moment(where, key, st.get(key), _local(p).shape)
            out = {k: (loaded_step(where, v) if k == "step" else v) for k, v in st.items()}
        out = {k: seen.claim(f"{where}: {k}", v) if isinstance(v, torch.Tensor) else v
               for k, v in out.items()}
        for key in ("exp_avg", "exp_avg_sq"):
            check_values(where, key, out[key], self.nonfinite == "propagate")
        return out

    def _import_adamw(self, sd: dict[str, Any]) -> dict[str, Any]:
        """An NTO state (in this optimizer's param order) from a torch.optim.AdamW (or Adam
        with decoupled or no weight decay) state_dict: its hyper-parameters and, per param,
        its moments (cast to fp32) and step count. NTO's schedule starts at step 0: the
        params active there get their moments; the others' are offloaded
        (state_on_switch="offload") or dropped (logged). Sparse keeps them only at 100%."""
        perm = self._foreign_perm(sd)
        n = len(self._params)
        if not isinstance(sd["state"], dict):
            raise ValueError("optimizer state: 'state' is not a dict")
        cursor = self.policy.state_dict()
        active = self.policy.active(0)
        # sparse: every element chosen from the start at 100%, else nothing chosen at step 0
        policy_state = ({"selected": []} if self._sparse is not None and not self.policy.dense
                        else self.policy.state_dict())
        self.policy.load_state_dict(cursor)
        keep_all = self._sparse is not None and self.policy.dense
        state: dict[Any, Any] = {}
        offloaded, dropped = [], 0
        for key, st in sd["state"].items():
            if not isinstance(key, int) or isinstance(key, bool):
                state[key] = st
                continue
            if not is_index(key, n):
                raise ValueError(f"optimizer state: key {key!r} in 'state' is not a param "
                                 f"index (this optimizer has {n} params)")
            where = f"optimizer state (torch AdamW) for {self._label(perm[key])}"
            if not isinstance(st, dict):
                raise ValueError(f"{where} is not a dict")
            check_keys(where, st, DENSE_KEYS)
            i = perm[key]
            if self._sparse is not None and not keep_all:
                dropped += 1
                continue
            if i not in active and (self.state_on_switch != "offload"
                                    or i not in self.policy.trainable):
                dropped += 1
                continue
            if i not in active:
                offloaded.append(i)
            state[i] = adamw_entry(where, st, self._params[i], self._sparse is not None)
        log.info("NTO: imported a torch AdamW state: moments of %d params loaded (%d of "
                 "them offloaded), %d dropped (not trained at NTO's step 0%s)",
                 len(state) - sum(not isinstance(k, int) for k in state), len(offloaded),
                 dropped, "; sparse keeps them only at budget 100%"
                 if self._sparse is not None else "")
        groups, start = [], 0
        for g, sg in zip(self.param_groups, sd["param_groups"]):
            ng = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            ng.update({k: sg[k] for k in (*HYPER, "initial_lr") if k in sg})
            ng["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(ng)
        with_state = sorted(k for k in state if isinstance(k, int))
        return {"state": state, "param_groups": groups, "nto": {
            "format": FORMAT_VERSION, "config": self._config(), "layout": self._layout(),
            "step": 0, "skipped_steps": 0, "active": sorted(active),
            "offloaded": sorted(offloaded), "with_state": with_state,
            "policy_state": policy_state}}

    def _foreign_perm(self, sd: dict[str, Any]) -> list[int]:
        """perm[j] = this optimizer's index of a torch optimizer state's param j (by the
        groups' `param_names` when both sides have names, else by position); refuses
        states that are not AdamW's (or Adam's with decoupled or no weight decay)."""
        groups = sd["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups) \
                or not all(isinstance(g, dict) for g in groups):
            got = len(groups) if isinstance(groups, list) else type(groups).__name__
            raise ValueError(f"optimizer state (no 'nto' entry: saved by another optimizer) "
                             f"has {got} param groups but this optimizer has "
                             f"{len(self.param_groups)}; build NTO with the param groups of "
                             "the run that saved it")
        for k, (sg, g) in enumerate(zip(groups, self.param_groups)):
            missing = [h for h in HYPER if h not in sg]
            if missing:
                raise ValueError(f"optimizer state: no 'nto' entry and param group {k} has no "
                                 f"{missing[0]!r}: it was saved by another optimizer (e.g. "
                                 "torch.optim.SGD); allowed: a state from NTO.state_dict() or "
                                 "torch.optim.AdamW")
            if sg.get("amsgrad"):
                raise ValueError(f"optimizer state: param group {k} has amsgrad=True "
                                 "(torch.optim.AdamW(amsgrad=True)); NTO does not implement "
                                 "amsgrad, so its max_exp_avg_sq cannot be continued; "
                                 "allowed: an AdamW state with amsgrad=False")
            if sg.get("decoupled_weight_decay") is False and sg.get("weight_decay"):
                raise ValueError(f"optimizer state: param group {k} is torch.optim.Adam's "
                                 "(L2 weight decay, decoupled_weight_decay=False) with "
                                 f"weight_decay={sg['weight_decay']!r}; NTO is AdamW (decoupled "
                                 "decay); allowed: an AdamW state, or Adam's with "
                                 "weight_decay=0")
            if bool(sg.get("maximize", False)) != bool(g.get("maximize", False)):
                raise ValueError(f"optimizer state: param group {k} has maximize="
                                 f"{sg.get('maximize')!r} but this optimizer's has "
                                 f"{g.get('maximize', False)!r}; build NTO with the same "
                                 "maximize")
        names = [s for sg in groups for s in sg.get("param_names", ())]
        total = sum(len(sg.get("params", ())) for sg in groups)
        if total != len(self._params):
            raise ValueError(f"optimizer state is for {total} parameters but this optimizer "
                             f"has {len(self._params)}; load it into an NTO built over the "
                             "same parameters")
        mine_named = all(i.name is not None for i in self._infos)
        if all("param_names" in sg for sg in groups) and mine_named:
            perm = self._match_names(names)
        else:
            perm = list(range(len(self._params)))
        self._check_groups(groups, perm)
        return perm


# --------------------------------------------------------------------------- helpers


def _sum_over_shards(entries: list, sumsq: float, n_bad: int) -> tuple[float, int]:
    """(sumsq, n_bad) summed over the ranks that hold shards of the grads, when the grads
    are DTensors sharded on a device mesh (FSDP2); unchanged otherwise (DDP grads are
    replicated, one process has nothing to reduce). Assumes one mesh for all params, as
    fully_shard with a single mesh gives."""
    g = next((e[3] for e in entries if hasattr(e[3], "device_mesh")), None)
    if g is None:
        return sumsq, n_bad
    dims = [d for d, pl in enumerate(g.placements) if pl.is_shard()]
    if not dims:
        return sumsq, n_bad
    buf = torch.tensor([sumsq, float(n_bad)], dtype=torch.float64, device=_local(g).device)
    for d in dims:
        torch.distributed.all_reduce(buf, group=g.device_mesh.get_group(d))
    return float(buf[0]), int(buf[1])


def _plain(v: object) -> object:
    """Compare configs across save/load: tuples and lists alike."""
    return list(v) if isinstance(v, tuple) else v


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (each storage counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        t = _local(t)
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        key = (str(t.device), s.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += s.nbytes()
    return total


def _to_host(v: Any, p: torch.Tensor | None = None) -> Any:
    """A host copy of one state value (pinned when CUDA is in use); CPU tensors are kept."""
    if not isinstance(v, torch.Tensor) or v.device.type == "cpu":
        return v
    host = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=True)
    host.copy_(v)
    return host


def _to_param_device(key: str, v: Any, p: torch.Tensor) -> Any:
    """State value on the device it lives on while training: `step` on the host (as
    torch.optim.AdamW keeps it), everything else next to the param. Dtypes are kept."""
    if not isinstance(v, torch.Tensor):
        return v
    if key == "step":
        return v.to("cpu")
    return v.to(_local(p).device)


def describe_memory(report: dict[str, Any]) -> str:
    """One line of a memory_report() for logs."""
    return (f"grad {format_bytes(report['grad_bytes'])}, state "
            f"{format_bytes(report['state_bytes'])}, total {format_bytes(report['total_bytes'])}"
            f" of budget {format_bytes(report['budget_bytes'])}")

