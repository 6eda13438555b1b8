"""Checks of what NTO is given: hyper-parameters, AdamW keywords, params and param groups,
gradients. Every error names what was given and what is allowed, and is raised before
anything is changed."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .budget import FLOAT_DTYPES
from .checkpoint import is_real, local_tensor
from .grads import NONFINITE

HYPER = ("lr", "betas", "eps", "weight_decay")
STATE_ON_SWITCH = ("drop", "offload")
# Arguments that belong to the whole optimizer (they shape one schedule over all groups).
GLOBAL_ARGS = ("budget", "policy", "switch_every", "order", "seed", "state_on_switch",
               "nonfinite", "always", "max_grad_norm", "sample_layers", "regrow_fraction",
               "master_weights", "stochastic_rounding", "state_dtype")


def plain_number(x: object) -> object:
    """numpy and other real scalars as Python floats (ints stay ints), so state_dict() loads
    with torch.load(weights_only=True); anything else unchanged."""
    if is_real(x) and type(x) not in (int, float):  # np.float64 subclasses float
        return int(x) if isinstance(x, numbers.Integral) else float(x)
    return x


def check_hyper(where: str, lr: object, betas: object, eps: object,
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
    if not is_real(lr_value) or not math.isfinite(lr_value) or lr_value < 0:
        raise ValueError(f"{where}lr={lr!r}; allowed: a finite number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas={betas!r}; allowed: a pair (beta1, beta2), each in "
                         "[0, 1)")
    for k, b in enumerate(betas):
        if not is_real(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"{where}betas={tuple(betas)!r}: beta{k + 1}={b!r}; allowed: a "
                             "number in [0, 1)")
    for name, v in (("eps", eps), ("weight_decay", weight_decay)):
        if not is_real(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}{name}={v!r}; allowed: a finite number >= 0")


def check_knobs(where: str, group: dict[str, Any]) -> None:
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


def check_global(budget: object, state_on_switch: object, nonfinite: object,
                 max_grad_norm: object, policy: Any, state_dtype: str = "fp32") -> None:
    """The optimizer-wide arguments that are not the policy's (`policy`: its class;
    `state_dtype`: its validated config's)."""
    if not isinstance(state_on_switch, str) or state_on_switch not in STATE_ON_SWITCH:
        raise ValueError(f"state_on_switch={state_on_switch!r}; allowed: "
                         f"{', '.join(map(repr, STATE_ON_SWITCH))}")
    if state_on_switch != "drop" and state_dtype == "none":
        raise ValueError(f"state_on_switch={state_on_switch!r} with state_dtype='none'; "
                         "allowed: 'drop' (state_dtype='none' keeps no moments, so a param "
                         "that stops training has nothing to keep)")
    if state_on_switch != "drop" and policy.no_offload:
        raise ValueError(f"state_on_switch={state_on_switch!r} does not apply to "
                         f"policy={policy.name!r} ({policy.no_offload}); allowed here: 'drop'")
    if not isinstance(nonfinite, str) or nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite={nonfinite!r}; allowed: {', '.join(map(repr, NONFINITE))}")
    if max_grad_norm is not None and (not is_real(max_grad_norm)
                                      or not math.isfinite(max_grad_norm)
                                      or max_grad_norm <= 0):
        raise ValueError(f"max_grad_norm={max_grad_norm!r}; allowed: None or a finite "
                         "number > 0")
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Real, str)):
        raise TypeError(f"budget={budget!r} has type {type(budget).__name__}; allowed: an int "
                        "(elements), a float in (0, 1] or 'N%' (share of all elements), or "
                        "a byte size such as '512MiB', '2GB', '1.5GiB', '100KB'")


def check_step_in_backward(auto: bool, max_grad_norm: object) -> None:
    """What step_in_backward=True cannot run with (the policy's config checked the rest);
    `auto`: budget="auto" was given."""
    if max_grad_norm is not None:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} with step_in_backward=True; "
                         "allowed: None (clipping needs the norm of every gradient before "
                         "the first update, and step_in_backward updates each param as its "
                         "gradient arrives)")
    if auto:
        raise ValueError("budget='auto' with step_in_backward=True; allowed: an element or "
                         "byte budget ('auto' measures the gradients kept until step())")
    if multi_process():
        raise ValueError("step_in_backward=True in a run of more than one process; allowed: "
                         "one process (DDP and FSDP average each gradient over the ranks after "
                         "the hook that would update the param)")


def multi_process() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_param(where: str, p: object) -> None:
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


def check_contiguous(policy: Any, groups: list[dict[str, Any]]) -> None:
    """A policy that addresses elements of the flattened param in place takes contiguous
    params only (the others train strided params through a contiguous copy)."""
    if not policy.needs_contiguous:
        return
    for k, g in enumerate(groups):
        for j, p in enumerate(g["params"]):
            if not local_tensor(p).is_contiguous():
                name = g["param_names"][j] if "param_names" in g else f"params[{j}]"
                raise ValueError(f"param group {k}: param {name!r} is not contiguous; "
                                 f"policy={policy.name!r} needs contiguous params (make it so "
                                 "with `param.data = param.data.contiguous()`), or use a "
                                 "policy that trains strided params through a copy")


def check_grad_layout(where: str, g: torch.Tensor) -> None:
    if g.layout != torch.strided:
        raise TypeError(f"{where} has a sparse gradient; allowed: dense gradients (build "
                        "nn.Embedding with sparse=False)")


def check_grad(where: str, p: torch.Tensor, g: torch.Tensor) -> None:
    """What the kernels need of one param and its grad, named by the param."""
    local, lg = local_tensor(p), local_tensor(g)
    if local.device.type == "meta":
        raise ValueError(f"{where} is on the meta device (no data); materialize the model "
                         "(to_empty(), load weights) before step()")
    check_param(where, p)
    check_grad_layout(where, g)
    if lg.shape != local.shape or lg.dtype != local.dtype or lg.device != local.device:
        raise ValueError(f"the gradient of {where} is a {lg.dtype} tensor of shape "
                         f"{tuple(lg.shape)} on {lg.device}; expected {local.dtype}, "
                         f"{tuple(local.shape)} on {local.device} (as the param); nothing "
                         "was changed")


def normalize_groups(params: object) -> list[dict[str, Any]]:
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
    groups = [normalize_group(k, dict(g)) for k, g in enumerate(items)]
    check_named(groups)
    if any("param_names" in g for g in groups):  # torch: all groups named, empty ones too
        for g in groups:
            g.setdefault("param_names", [])
    check_duplicates(groups)
    return groups


def check_named(groups: list[dict[str, Any]], named: bool | None = None) -> None:
    """All groups with names or none (empty groups go either way)."""
    flags = [("param_names" in g) for g in groups if g["params"]]
    if named is not None:
        flags.append(named)
    if any(flags) and not all(flags):
        raise ValueError("some param groups have names and some do not; allowed: name all "
                         "params ((name, param) pairs) or none")


def normalize_group(k: int, group: dict[str, Any]) -> dict[str, Any]:
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
        check_param(label, p)
    g = {key: plain_number(v) for key, v in group.items()
         if key not in ("params", "param_names")}
    if isinstance(g.get("betas"), (tuple, list)):
        g["betas"] = tuple(plain_number(b) for b in g["betas"])
    check_knobs(where, g)
    g["params"] = tensors
    if names:
        g["param_names"] = names
    return g


def check_duplicates(groups: list[dict[str, Any]],
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


def check_added_group(groups: list[dict[str, Any]], defaults: dict[str, Any], table: Any,
                      param_group: dict[str, Any]) -> dict[str, Any]:
    """A group for add_param_group after construction, normalized and checked against
    the optimizer's `groups`, `defaults` and params (`table`: nto_ext.params.ParamTable)."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group is a {type(param_group).__name__}; allowed: a dict "
                        "like {'params': [...], 'lr': 1e-4}")
    k = len(groups)
    group = normalize_group(k, dict(param_group))
    named = any("param_names" in g for g in groups)
    check_named([group], named if table.params else None)
    if named:
        group.setdefault("param_names", [])
    g_full = {**defaults, **group}
    check_hyper(f"param group {k}: ", g_full["lr"], g_full["betas"], g_full["eps"],
                g_full["weight_decay"])
    infos = table.infos
    seen = {id(p): repr(infos[i].name) if infos[i].name else f"#{i}"
            for i, p in enumerate(table.params)}
    check_duplicates([group], seen, {i.name for i in infos if i.name})
    return group


def check_trainable(infos: list[Any]) -> int:
    """The trainable elements of `infos` (ParamInfo); ValueError when there are none."""
    total = sum(i.numel for i in infos if i.trainable)
    if total == 0:
        raise ValueError("no parameter requires grad (every param given has "
                         "requires_grad=False or no elements); nothing would train. Set "
                         "requires_grad=True on what should train before building NTO")
    return total
