"""Checks and conversions for loading optimizer states (NTO's own and torch AdamW's):
every tensor and count of a checkpoint is validated here before NTO.load_state_dict
replaces anything (issue 17 items 5, 6 and 9; issue 16 item 10)."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (FSDP2 shards), else the tensor itself."""
    return getattr(t, "_local_tensor", t)


MAX_COUNT = 2**53  # schedule steps and skipped steps: exact as floats, walkable never needed
MAX_STEP = 2**24  # a float32 step tensor counts exactly up to here (torch's AdamW stops there)
DENSE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def is_index(k: object, n: int) -> bool:
    return isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n


def is_real(v: object) -> bool:
    """A real number of any numeric type (int, float, numpy scalars...), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_count(where: str, v: object, hi: int) -> None:
    if not is_index(v, hi + 1):
        raise ValueError(f"optimizer state: {where}={v!r:.40}; allowed: an int in [0, {hi}] "
                         "(a corrupted or edited checkpoint?); nothing was loaded")


def canonical_name(name: str) -> str:
    """A param name without the prefixes wrappers add: torch.compile's `_orig_mod.`
    (anywhere) and DDP's / DataParallel's leading `module.`."""
    name = name.replace("_orig_mod.", "")
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _as_float(v: object) -> object:
    """A hyper-parameter as a Python float when it is a real number of any type (numpy
    scalar, 1-element tensor); anything else unchanged, for _check_hyper to refuse."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.device.type == "meta" or v.is_complex() or v.dtype == torch.bool:
            return v
        v = v.detach().cpu().reshape(()).item()
    if not is_real(v):
        return v
    try:
        return float(v)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float range
        return math.inf


def group_numbers(group: dict[str, Any]) -> dict[str, Any]:
    """The group's hyper-parameters (and a scheduler's initial_lr) as Python floats."""
    out = {k: _as_float(group[k]) for k in ("lr", "eps", "weight_decay", "initial_lr")
           if k in group}
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)):
        out["betas"] = tuple(_as_float(b) for b in betas)
    elif "betas" in group:
        out["betas"] = betas
    return out


def check_keys(where: str, st: dict[str, Any], allowed: Sequence[str]) -> None:
    """Only the entries NTO keeps: an extra one (e.g. a 4 MB tensor in a crafted file)
    would live in memory outside the budget."""
    if "max_exp_avg_sq" in st:
        raise ValueError(f"{where}: has max_exp_avg_sq (torch.optim.AdamW(amsgrad=True)); NTO "
                         "does not implement amsgrad; allowed: a state saved with "
                         "amsgrad=False")
    extra = [k for k in st if k not in allowed]
    if extra:
        v = st[extra[0]]
        what = (f"a {v.dtype} tensor of {v.numel():,} elements" if isinstance(v, torch.Tensor)
                else type(v).__name__)
        raise ValueError(f"{where}: unexpected entry {extra[0]!r:.40} ({what}); allowed: "
                         f"{', '.join(allowed)} (a corrupted or crafted checkpoint?); nothing "
                         "was loaded")


def check_moment(where: str, key: str, v: object, shape: torch.Size,
                 dtype: torch.dtype = torch.float32) -> None:
    """What the kernels take (`dtype`, contiguous, with data, the param's shape): refused
    here, not at the next step() after the load has replaced everything (issue 10)."""
    if not isinstance(v, torch.Tensor) or v.shape != shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{where}: {key} is {got}, expected shape {tuple(shape)}")
    local = local_tensor(v)
    if local.dtype != dtype or local.device.type == "meta" or not local.is_contiguous():
        raise ValueError(f"{where}: {key} is a {local.dtype} tensor on {local.device}"
                         f"{'' if local.is_contiguous() else ' (not contiguous)'}; expected "
                         f"contiguous {dtype} moments with data (as NTO.state_dict() "
                         "saves them)")


def check_values(where: str, key: str, v: torch.Tensor, propagate: bool) -> None:
    """Finite moments (NaN/Inf allowed only under nonfinite="propagate", as torch keeps
    them) and exp_avg_sq >= 0 (a negative one makes sqrt NaN at the next step). One
    min/max pass, no temporary the size of the tensor (NaN propagates through both)."""
    local = local_tensor(v)
    if local.numel() == 0:
        return
    lo_t, hi_t = torch.aminmax(local)
    lo, hi = float(lo_t), float(hi_t)
    if not propagate and not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where}: {key} holds NaN or Inf (min {lo}, max {hi}); allowed: "
                         "finite moments (a corrupted checkpoint?), or build NTO with "
                         "nonfinite='propagate' to load it as torch would; nothing was loaded")
    negative = bool((local < 0).any()) if math.isnan(lo) else lo < 0
    if key == "exp_avg_sq" and negative:
        raise ValueError(f"{where}: exp_avg_sq has negative values (min {lo}); allowed: "
                         "values >= 0 (a mean of squares; a corrupted or crafted "
                         "checkpoint?); nothing was loaded")


def loaded_step(where: str, v: object) -> torch.Tensor:
    """A per-param step count as NTO keeps it (a float32 tensor), from a tensor or a
    Python / numpy number (torch accepts those): a whole number in [0, MAX_STEP]."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or not v.dtype.is_floating_point or v.device.type == "meta":
            raise ValueError(f"{where}: 'step' is a {v.dtype} tensor of shape "
                             f"{tuple(v.shape)} on {v.device}; expected a 1-element float "
                             "tensor or a number (as NTO.state_dict() saves it)")
        x = float(v.detach().cpu().reshape(()))
    elif is_real(v):
        try:
            x = float(v)  # type: ignore[arg-type]
        except OverflowError:
            x = math.inf
    else:
        raise ValueError(f"{where}: 'step' is {type(v).__name__}; expected a 1-element float "
                         "tensor or a number (as NTO.state_dict() saves it)")
    if not (math.isfinite(x) and 0 <= x <= MAX_STEP and x == math.floor(x)):
        raise ValueError(f"{where}: 'step' is {v!r:.40}; allowed: a whole number in [0, "
                         f"{MAX_STEP}] (a corrupted or edited checkpoint?); nothing was loaded")
    if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
        return v
    return torch.tensor(x, dtype=torch.float32)


class Storages:
    """Memory claimed by the tensors of a state being loaded (and by the params): a tensor
    overlapping another is refused (exp_avg and exp_avg_sq as one tensor would corrupt
    both); a tensor that is a view of a larger storage is copied compactly, so a crafted
    40 MB storage behind a 1 KB moment is never kept."""

    def __init__(self, owners: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.ranges: dict[tuple[str, int], list[tuple[int, int, str]]] = defaultdict(list)
        for label, t in owners:
            span = _span(local_tensor(t))
            if span is not None:
                self.ranges[span[0]].append((span[1], span[2], label))

    def claim(self, label: str, v: torch.Tensor) -> torch.Tensor:
        local = local_tensor(v)
        span = _span(local)
        if span is None:
            return v
        key, start, end = span
        for s, e, other in self.ranges[key]:
            if start < e and s < end:
                raise ValueError(f"{label} shares memory with {other} (aliasing tensors: a "
                                 "corrupted or crafted checkpoint); allowed: a separate tensor "
                                 "for each entry; nothing was loaded")
        self.ranges[key].append((start, end, label))
        if local.untyped_storage().nbytes() != local.numel() * local.element_size():
            return v.clone(memory_format=torch.contiguous_format)
        return v


def _span(t: torch.Tensor) -> tuple[tuple[str, int], int, int] | None:
    """((device, storage pointer), first byte, end byte) of the memory `t` reads."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    size = t.element_size()
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    start = t.storage_offset() * size
    return (str(t.device), t.untyped_storage().data_ptr()), start, start + extent * size


def adamw_entry(where: str, st: dict[str, Any], p: torch.Tensor, compact: bool,
                 ) -> dict[str, Any]:
    """One param's torch AdamW state as NTO keeps it: fp32 moments, a float32 step tensor
    (dense) or the compact state of every element (sparse at 100%)."""
    local = local_tensor(p)
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        v = st.get(key)
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point \
                and v.dtype != torch.float32 and tuple(v.shape) == tuple(local.shape):
            v = v.float()  # AdamW keeps moments in the param's dtype; NTO in fp32
        if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(local.shape):
            v = v.contiguous()  # AdamW's follow the param's memory format (channels_last)
        check_moment(where, key, v, local.shape)
        moments[key] = v
    step = loaded_step(where, st.get("step"))
    if not compact:
        return {"step": step, **moments}
    n = local.numel()
    return {"indices": torch.arange(n, dtype=torch.int64 if n > 2**31 - 1 else torch.int32,
                                    device=local.device),
            "exp_avg": moments["exp_avg"].reshape(-1).contiguous(),
            "exp_avg_sq": moments["exp_avg_sq"].reshape(-1).contiguous(),
            "step": [int(step)], "sizes": [n]}
