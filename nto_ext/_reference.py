"""Pure-PyTorch reference of every op: the executable spec the kernels are tested against.

Readable first, not fast. Each function has the signature of its `torch.ops.nto.*` op and
runs the same argument checks, in the same order, with the same messages as the C++
kernels (csrc/checks.h): wrong dtypes raise TypeError, out-of-range indices IndexError,
every other bad argument ValueError; all before any tensor is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOATS = "torch.float32, torch.bfloat16, torch.float16"
_INT32_MAX = 2**31 - 1
# A step count's dtypes: those the compiled kernels read.
_STEP_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64,
                torch.int32, torch.int16, torch.int8, torch.uint8)
_STEPS = ", ".join(str(d) for d in _STEP_DTYPES)


# ------------------------------------------------------------------------------ checks


def _check_tensor(op: str, what: str, i: int, t, dtypes: Sequence[torch.dtype], allowed: str,
                  device: torch.device | None) -> None:
    """Type, dtype, layout and device of one list entry `what[i]`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {what}[{i}] is {type(t).__name__}; expected a Tensor")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {what}[{i}] has dtype {t.dtype}; allowed: {allowed}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {what}[{i}] is not a dense (strided) tensor")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {what}[{i}] is not contiguous; pass .contiguous() tensors")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {what}[{i}] is on {t.device} but the first tensor is on "
                         f"{device}; all tensors must share one device")


def _check_float_list(op: str, what: str, tensors: Sequence[torch.Tensor]) -> None:
    dev = tensors[0].device if tensors and isinstance(tensors[0], torch.Tensor) else None
    for i, t in enumerate(tensors):
        _check_tensor(op, what, i, t, _FLOAT_DTYPES, _FLOATS, dev)


def _check_same_length(op: str, first: str, n: int, **others: Sequence) -> None:
    one = first[:-1] if first.endswith("s") else first
    for name, lst in others.items():
        if len(lst) != n:
            raise ValueError(f"{op}: got {n} {first} but {len(lst)} {name}; "
                             f"every list needs one entry per {one}")


def _check_index_meta(op: str, what: str, i: int, idx, device: torch.device | None) -> None:
    _check_tensor(op, what, i, idx, _INDEX_DTYPES, "torch.int32, torch.int64", device)
    if idx.dim() != 1:
        raise ValueError(f"{op}: {what}[{i}] has {idx.dim()} dimensions; indices must be 1-D")


def _has_values(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (tracing, the ops' fake implementations): their
    metadata is checked, their contents cannot be."""
    return t.device.type != "meta" and not isinstance(t, FakeTensor)


def _check_index_values(op: str, what: str, i: int, idx: torch.Tensor,
                        limit: int | None, target: str) -> None:
    """Sorted ascending, unique, and in [0, limit) (limit None: only >= 0).

    Names the first offending entry; runs before anything is read or written through them.
    """
    if idx.numel() == 0 or not _has_values(idx):
        return
    x = idx.long().cpu()
    bad_order = torch.nonzero(x[1:] <= x[:-1])
    bad_range = torch.nonzero((x < 0) | (x >= limit) if limit is not None else (x < 0))
    first_order = int(bad_order[0]) + 1 if len(bad_order) else None
    first_range = int(bad_range[0]) if len(bad_range) else None
    # Report whichever violation comes first in the list (as a serial scan would).
    if first_range is not None and (first_order is None or first_range <= first_order):
        j = first_range
        if limit is None:
            raise IndexError(f"{op}: {what}[{i}][{j}] = {int(x[j])} is negative; "
                             "positions are >= 0")
        allowed = f"0..{limit - 1}" if limit > 0 else "none (it is empty)"
        raise IndexError(f"{op}: {what}[{i}][{j}] = {int(x[j])} is out of range for {target} "
                         f"with {limit} elements; allowed: {allowed}")
    if first_order is not None:
        j = first_order
        raise ValueError(f"{op}: {what}[{i}][{j}] = {int(x[j])} follows {int(x[j - 1])}; "
                         "indices must be sorted ascending and unique (torch.unique sorts)")


def _positions_at_use(op: str, i: int, idx: torch.Tensor, limit: int,
                      target: str) -> torch.Tensor:
    """indices[i] read once more, into a private int64 copy, for the op to use.

    The checks read them before, but another thread may have changed them since (the
    kernels run with the GIL released): the copy is checked again against the range (a
    changed value is never used; the error says what happened), and every later use reads
    the copy. Order and uniqueness are not checked again: a changed order gives wrong
    values, never an access out of range, and the check already refused bad input."""
    pos = idx.to(torch.int64, copy=True)
    if pos.numel() and _has_values(pos):
        bad = torch.nonzero((pos < 0) | (pos >= limit))
        if len(bad):
            j = int(bad[0])
            raise IndexError(
                f"{op}: indices[{i}][{j}] = {int(pos[j])} is out of range for {target} with "
                f"{limit} elements when the kernel read it, after it had passed the op's "
                f"index check: another thread changed indices[{i}] during the call. "
                f"{target} and the tensors after it were not updated (those before were); "
                "do not write to index tensors while an op uses them")
    return pos


def _index_dtype_for(numel: int) -> torch.dtype:
    return torch.int64 if numel > _INT32_MAX else torch.int32


# ------------------------------------------------------------------------ param_stats


def param_stats(tensors: Sequence[torch.Tensor], histogram: bool = True):
    """Per tensor: numel (int64[n]), sum of squares (float64[n]), abs-max (float32[n]) and
    hist (int64[n, 256]): counts of elements whose |x| has fp32 exponent field e (zeros and
    subnormals in 0, inf/NaN in 255); bf16/fp16 are widened to fp32 first. With
    histogram=False, hist is int64[n, 0] and the CPU kernel skips its work (a NaN still
    makes absmax NaN, an inf makes it inf: enough for a non-finite check). This reference sums
    squares in float64; the CPU kernel accumulates them in fp32 lanes flushed to float64 every
    <= 260 squares (relative error <= ~1.6e-5 worst case, ~1e-7 typical; all in float64 for a
    65536-element work item whose |x| max is outside [2^-40, 2^56])."""
    _check_float_list("param_stats", "tensors", tensors)
    n = len(tensors)
    dev = tensors[0].device if n else torch.device("cpu")
    numel = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=dev)
    sumsq = torch.zeros(n, dtype=torch.float64, device=dev)
    absmax = torch.zeros(n, dtype=torch.float32, device=dev)
    hist = torch.zeros(n, 256 if histogram else 0, dtype=torch.int64, device=dev)
    for i, t in enumerate(tensors):
        x = t.detach().reshape(-1).float()
        if x.numel() == 0:
            continue
        sumsq[i] = x.double().square().sum()
        absmax[i] = x.abs().max()
        if histogram:
            exponent = (x.view(torch.int32) >> 23) & 0xFF
            hist[i] = torch.bincount(exponent.long(), minlength=256)
    return numel, sumsq, absmax, hist


# ---------------------------------------------------------------------- masked_adamw_


def _check_hyper(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 op: str = "masked_adamw_") -> None:
    for name, v, ok, rule in (("lr", lr, lr >= 0.0, ">= 0"),
                              ("beta1", beta1, 0.0 <= beta1 < 1.0, "in [0, 1)"),
                              ("beta2", beta2, 0.0 <= beta2 < 1.0, "in [0, 1)"),
                              ("eps", eps, eps >= 0.0, ">= 0"),
                              ("weight_decay", weight_decay, weight_decay >= 0.0, ">= 0")):
        if not ok:  # NaN fails every comparison, so it is refused too
            raise ValueError(f"{op}: {name}={v} is not allowed; {name} must be {rule}")


def _check_param_grad(op: str, i: int, p, g, dev: torch.device,
                      fp32_takes_low: bool = False) -> None:
    """params[i] and grads[i] of both AdamW ops: float tensors on `dev`; the grad in the
    param's dtype or fp32, or (masked_adamw_ only: `fp32_takes_low`) any float dtype for
    an fp32 param -- a bf16 model's fp32 master updated from the model's gradient."""
    _check_tensor(op, "params", i, p, _FLOAT_DTYPES, _FLOATS, dev)
    _check_tensor(op, "grads", i, g, _FLOAT_DTYPES, _FLOATS, dev)
    if g.dtype not in (p.dtype, torch.float32) and not (fp32_takes_low
                                                        and p.dtype == torch.float32):
        allowed = p.dtype if p.dtype == torch.float32 else f"{p.dtype} or torch.float32"
        raise TypeError(f"{op}: grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype}; "
                        f"allowed: {allowed}")


def _check_adamw_entry(i: int, p, g, m, v, idx, step, dev: torch.device) -> None:
    """Metadata of entry i: dtypes, layouts, devices and lengths (no tensor contents)."""
    op = "masked_adamw_"
    _check_param_grad(op, i, p, g, dev, fp32_takes_low=True)
    moments = (torch.float32, torch.bfloat16)
    _check_tensor(op, "exp_avgs", i, m, moments, "torch.float32 or torch.bfloat16", dev)
    _check_tensor(op, "exp_avg_sqs", i, v, moments, "torch.float32 or torch.bfloat16", dev)
    if m.dtype != v.dtype:
        raise TypeError(f"{op}: exp_avgs[{i}] has dtype {m.dtype} but exp_avg_sqs[{i}] has "
                        f"{v.dtype}; allowed: both moments of one dtype")
    if idx is not None:
        _check_index_meta(op, "indices", i, idx, dev)
    length = p.numel() if idx is None else idx.numel()
    where = f"params[{i}].numel()" if idx is None else f"len(indices[{i}])"
    for name, t in (("exp_avgs", m), ("exp_avg_sqs", v)):
        if t.numel() != length:
            raise ValueError(f"{op}: {name}[{i}] has {t.numel()} elements but {where} is "
                             f"{length}; state must have one element per updated position")
    if g.numel() != length and g.numel() != p.numel():
        raise ValueError(f"{op}: grads[{i}] has {g.numel()} elements; allowed: {length} "
                         f"(compact) or {p.numel()} (dense, like params[{i}])")
    _check_step_meta(op, i, step, dev)


def _check_step_meta(op: str, i: int, step, dev: torch.device) -> None:
    if not isinstance(step, torch.Tensor):
        raise TypeError(f"{op}: steps[{i}] is {type(step).__name__}; expected a Tensor "
                        f"(ops.{op} converts ints)")
    if step.numel() != 1:
        raise ValueError(f"{op}: steps[{i}] has {step.numel()} elements; allowed: one step "
                         "count per tensor (a 1-element tensor or a number)")
    if step.dtype not in _STEP_DTYPES:
        raise TypeError(f"{op}: steps[{i}] has dtype {step.dtype}; allowed: {_STEPS} (or a "
                        "number); convert it with .to(torch.float64)")
    if step.device != dev and step.device.type != "cpu":
        raise ValueError(f"{op}: steps[{i}] is on {step.device}; a 1-element step must "
                         f"be on the cpu or on {dev}")


def _check_steps_values(i: int, step: torch.Tensor, op: str = "masked_adamw_") -> None:
    if not _has_values(step):
        return
    low = float(step.item())
    if not low >= 1:  # also refuses NaN
        raise ValueError(f"{op}: steps[{i}] holds a step count of {low:g}; step "
                         "counts start at 1 (the count after incrementing)")


def check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, indices, steps,
                       lr, beta1, beta2, eps, weight_decay) -> None:
    """Every argument check of masked_adamw_, in the kernels' order."""
    op = "masked_adamw_"
    _check_hyper(lr, beta1, beta2, eps, weight_decay)
    _check_same_length(op, "params", len(params), grads=grads, exp_avgs=exp_avgs,
                       exp_avg_sqs=exp_avg_sqs, indices=indices, steps=steps)
    if not params:
        return
    dev = params[0].device if isinstance(params[0], torch.Tensor) else None
    for i in range(len(params)):
        _check_adamw_entry(i, params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], indices[i],
                           steps[i], dev)
    for i in range(len(params)):
        if indices[i] is not None:
            _check_index_values(op, "indices", i, indices[i], params[i].numel(), f"params[{i}]")
        _check_steps_values(i, steps[i])


def _adamw_scalar_step(p, g, m, v, step: float, lr, beta1, beta2, eps, weight_decay,
                       sqrt=torch.sqrt) -> None:
    """torch.optim.AdamW's _single_tensor_adam, same formula order (fp32 tensors); `sqrt`
    may be `sqrt_rn`, the kernels' correctly rounded root, for bit-for-bit specs."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step  # Python floats: double precision
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (sqrt(v) / math.sqrt(bias_correction2)).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                  indices: Sequence[torch.Tensor | None], steps: Sequence[torch.Tensor],
                  lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float) -> None:
    """In-place AdamW (torch.optim.AdamW math, decoupled decay) on whole tensors
    (indices[i] None) or at sorted unique positions of the flattened param (compact state
    of len(indices[i]) elements; grad compact or dense). Math in fp32; bf16/fp16 params are
    widened, updated and rounded back once; so are bf16 moments (state_dtype="bf16"),
    after the update has used their fp32 values. Elements not indexed are not written.

    steps[i]: one count for the whole tensor, a 1-element tensor of any real dtype (the count
    after incrementing; bias corrections in double)."""
    check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, indices, steps,
                       lr, beta1, beta2, eps, weight_decay)
    with torch.no_grad():
        for i, (p, g, m, v, idx, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs,
                                                         indices, steps)):
            flat = p.view(-1)
            if idx is None:
                p32 = flat.float()  # the param itself when it is fp32
                g32 = g.reshape(-1).float()
            else:
                pos = _positions_at_use("masked_adamw_", i, idx, flat.numel(), f"params[{i}]")
                p32 = flat[pos].float()
                g32 = g.reshape(-1)[pos] if g.numel() != idx.numel() else g.reshape(-1)
                g32 = g32.float()
            m32, v32 = m.view(-1).float(), v.view(-1).float()  # fp32 moments: themselves
            _adamw_scalar_step(p32, g32, m32, v32, float(step.item()),
                               lr, beta1, beta2, eps, weight_decay)
            if m.dtype != torch.float32:  # bf16 moments: rounded to nearest once, after
                m.view(-1).copy_(m32)
                v.view(-1).copy_(v32)
            if idx is None:
                if p32.data_ptr() != flat.data_ptr():
                    flat.copy_(p32)  # round back once
            else:
                flat[pos] = p32.to(p.dtype)  # the positions read above, not idx again


# --------------------------------------------------------------- adamw_first_step_

_FIRST_OP = "adamw_first_step_"


def check_adamw_first_step(params, grads, lr, beta1, beta2, eps, weight_decay) -> None:
    """Every argument check of adamw_first_step_, in the kernels' order."""
    _check_hyper(lr, beta1, beta2, eps, weight_decay, _FIRST_OP)
    _check_same_length(_FIRST_OP, "params", len(params), grads=grads)
    if not params:
        return
    dev = params[0].device if isinstance(params[0], torch.Tensor) else None
    for i, (p, g) in enumerate(zip(params, grads)):
        _check_param_grad(_FIRST_OP, i, p, g, dev)
        if g.numel() != p.numel():
            raise ValueError(f"{_FIRST_OP}: grads[{i}] has {g.numel()} elements; allowed: "
                             f"{p.numel()} (params[{i}] has {p.numel()})")


def adamw_first_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float) -> None:
    """The first update of a fresh torch.optim.AdamW state, moments kept nowhere: by
    definition masked_adamw_ (dense) on zero fp32 moments at step 1, which are then
    dropped (m_hat = g, v_hat = g^2: p -= lr (wd p + g / (|g| + eps)) up to rounding).
    The update of state_dtype="none" (formats/none.py)."""
    check_adamw_first_step(params, grads, lr, beta1, beta2, eps, weight_decay)
    for p, g in zip(params, grads):
        zeros = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for _ in "mv"]
        masked_adamw_([p], [g], [zeros[0]], [zeros[1]], [None],
                      [torch.ones(1, dtype=torch.float64)], lr, beta1, beta2, eps,
                      weight_decay)


# ---------------------------------------------------------------- masked_adamw_int8_

Q8_BLOCK = 256  # elements per quantization block (one fp32 scale per moment per block)
M_LEVELS = 127  # exp_avg: signed levels, |q| <= 127
W_LEVELS = 255  # sqrt(exp_avg_sq): unsigned levels
_Q8_OP = "masked_adamw_int8_"


def q8_blocks(numel: int) -> int:
    """Quantization blocks (scales per moment) of a tensor of `numel` elements."""
    return -(-numel // Q8_BLOCK)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """fp32 square root correctly rounded, as the kernels' (torch's CPU sqrt is not
    always): the double root of an fp32 value rounds to the nearest fp32 exactly."""
    return x.double().sqrt().float()


def pad_blocks(x: torch.Tensor, nb: int, block: int = Q8_BLOCK) -> torch.Tensor:
    """Flat fp32 `x` zero padded to nb whole blocks of `block`, as [nb, block]."""
    out = torch.zeros(nb * block, dtype=torch.float32, device=x.device)
    out[:x.numel()] = x.reshape(-1)
    return out.view(nb, block)


def dequantize_q8(qm: torch.Tensor, sm: torch.Tensor, qw: torch.Tensor,
                  sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) in fp32, [nb, Q8_BLOCK] (zero padded), from the 8-bit state:
    exp_avg = q|q| * scale, sqrt(exp_avg_sq) = w = q^2 * scale (squares of integers up to
    255 are exact in fp32: one rounding each), exp_avg_sq = w * w."""
    m, w = dequantize_q8_roots(qm, sm, qw, sw)
    return m, w * w


def dequantize_q8_roots(qm: torch.Tensor, sm: torch.Tensor, qw: torch.Tensor,
                        sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, w = sqrt(exp_avg_sq)) as `dequantize_q8` computes them."""
    nb = sm.numel()
    q = pad_blocks(qm.reshape(-1).float(), nb)
    m = (q * q.abs()) * sm.view(nb, 1)
    q = pad_blocks(qw.reshape(-1).float(), nb)
    return m, (q * q) * sw.view(nb, 1)


def _levels(x: torch.Tensor, scale: torch.Tensor, top: int) -> torch.Tensor:
    """sqrt(|x| / scale) rounded half up, per block, in [0, top]; NaN -> 0: the number of
    k in 1..top with (k - 1/2)^2 <= y, y = |x| * fp32(1 / scale) (0 for scale 0), decided by
    exact comparisons (the thresholds are exact in fp32; no sqrt is rounded)."""
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    y = x.abs() * inv.view(-1, 1)
    k = torch.arange(1, top + 1, dtype=torch.float32, device=x.device)
    thresholds = (k - 0.5) * (k - 0.5)
    u = torch.searchsorted(thresholds, y.reshape(-1).contiguous(), right=True)
    u = u.reshape(y.shape).to(torch.float32)
    return torch.where(y == y, u, torch.zeros_like(u))


def quantize_q8(m: torch.Tensor, w: torch.Tensor, numel: int):
    """8-bit state (qm int8, sm fp32, qw uint8, sw fp32) of fp32 exp_avg `m` and
    w = sqrt(exp_avg_sq), both [nb, Q8_BLOCK]; qm and qw have `numel` elements.

    Per block, scales from the abs-max (NaN propagates): sm = max|m| / 127^2 and
    sw = max w / 255^2; levels q = sqrt(|x| / scale) rounded half up (_levels), signed
    for m. The square-root
    map spends levels on small values: a value 100x below its block's largest keeps ~8%
    precision instead of rounding to zero as a linear map makes it. A positive w never
    rounds to level 0: no update is divided by eps alone."""
    sm = m.abs().amax(1) / float(M_LEVELS * M_LEVELS)
    u = _levels(m, sm, M_LEVELS)
    qm = torch.where(m < 0, -u, u).reshape(-1)[:numel].to(torch.int8)
    sw = w.amax(1) / float(W_LEVELS * W_LEVELS)
    u = _levels(w, sw, W_LEVELS)
    u = torch.where((u == 0) & (w > 0), torch.ones_like(u), u)
    return qm, sm, u.reshape(-1)[:numel].to(torch.uint8), sw


def _check_int8_entry(i: int, p, g, m, v, sm, sv, idx, step, dev: torch.device) -> None:
    op = _Q8_OP
    _check_param_grad(op, i, p, g, dev)
    _check_tensor(op, "exp_avgs", i, m, (torch.int8,), "torch.int8", dev)
    _check_tensor(op, "exp_avg_sqs", i, v, (torch.uint8,), "torch.uint8", dev)
    _check_tensor(op, "exp_avg_scales", i, sm, (torch.float32,), "torch.float32", dev)
    _check_tensor(op, "exp_avg_sq_scales", i, sv, (torch.float32,), "torch.float32", dev)
    if idx is not None:
        _check_index_meta(op, "indices", i, idx, dev)
    n = p.numel() if idx is None else idx.numel()
    of = f"params[{i}] has" if idx is None else f"indices[{i}] holds"
    for name, t, want in (("grads", g, n), ("exp_avgs", m, n), ("exp_avg_sqs", v, n),
                          ("exp_avg_scales", sm, q8_blocks(n)),
                          ("exp_avg_sq_scales", sv, q8_blocks(n))):
        if t.numel() != want:
            raise ValueError(f"{op}: {name}[{i}] has {t.numel()} elements; allowed: {want} "
                             f"({of} {n} elements, {q8_blocks(n)} blocks of {Q8_BLOCK})")
    _check_step_meta(op, i, step, dev)


def check_masked_adamw_int8(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                            exp_avg_sq_scales, indices, steps, lr, beta1, beta2, eps,
                            weight_decay) -> None:
    """Every argument check of masked_adamw_int8_, in the kernels' order."""
    op = _Q8_OP
    _check_hyper(lr, beta1, beta2, eps, weight_decay, op)
    _check_same_length(op, "params", len(params), grads=grads, exp_avgs=exp_avgs,
                       exp_avg_sqs=exp_avg_sqs, exp_avg_scales=exp_avg_scales,
                       exp_avg_sq_scales=exp_avg_sq_scales, indices=indices, steps=steps)
    if not params:
        return
    dev = params[0].device if isinstance(params[0], torch.Tensor) else None
    for i in range(len(params)):
        _check_int8_entry(i, params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                          exp_avg_scales[i], exp_avg_sq_scales[i], indices[i], steps[i], dev)
    for i in range(len(params)):
        if indices[i] is not None:
            _check_index_values(op, "indices", i, indices[i], params[i].numel(), f"params[{i}]")
        _check_steps_values(i, steps[i], op)


def masked_adamw_int8_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                       exp_avg_scales: Sequence[torch.Tensor],
                       exp_avg_sq_scales: Sequence[torch.Tensor],
                       indices: Sequence[torch.Tensor | None], steps: Sequence[torch.Tensor],
                       lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float) -> None:
    """In-place AdamW with 8-bit moments (formats/int8.py) on whole tensors (indices[i]
    None) or at sorted unique positions of the flattened param (indices[i]: the compact
    state of policy="sparse"; grad, moments and blocks follow the positions' order, the
    grad compact). Per block of Q8_BLOCK elements (positions), dequantize
    (`dequantize_q8`), update in fp32 as masked_adamw_ does but for sqrt(exp_avg_sq)
    (correctly rounded) multiplied by the fp32 1/sqrt(1-beta2^t) instead of divided by
    sqrt(1-beta2^t) (one division less per element in the kernels), requantize
    (`quantize_q8`). bf16/fp16 params are widened, updated and rounded back."""
    check_masked_adamw_int8(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                            exp_avg_sq_scales, indices, steps, lr, beta1, beta2, eps,
                            weight_decay)
    with torch.no_grad():
        for i, (p, g, qm, qw, sm, sw, idx, step) in enumerate(zip(
                params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                indices, steps)):
            flat = p.view(-1)
            pos = None if idx is None else _positions_at_use(_Q8_OP, i, idx, flat.numel(),
                                                             f"params[{i}]")
            n, nb = qm.numel(), sm.numel()
            if n == 0:
                continue
            x = flat if pos is None else flat[pos]
            p32, g32 = pad_blocks(x.float(), nb), pad_blocks(g.reshape(-1).float(), nb)
            m, v = dequantize_q8(qm, sm, qw, sw)
            w = _adamw_q_update(p32, g32, m, v, float(step.item()), lr, beta1, beta2, eps,
                                weight_decay)
            if pos is None:
                flat.copy_(p32.view(-1)[:n])
            else:
                flat[pos] = p32.view(-1)[:n].to(p.dtype)
            new = quantize_q8(m, w, n)
            for dst, src in zip((qm, sm, qw, sw), new):
                dst.view(-1).copy_(src)


# ---------------------------------------------------------------- masked_adamw_int4_

Q4_BLOCK = 64  # elements per block of the 4-bit format (one fp32 scale per moment per block)
Q4_M_LEVELS = 15  # exp_avg: signed levels, |q| <= 15 (31 values)
Q4_W_LEVELS = 7  # sqrt(exp_avg_sq): levels 0..7 (8 values)
_Q4_OP = "masked_adamw_int4_"


def q4_blocks(numel: int) -> int:
    """Blocks (scales per moment) of the 4-bit format for `numel` elements."""
    return -(-numel // Q4_BLOCK)


def dequantize_q4_roots(codes: torch.Tensor, sm: torch.Tensor,
                        sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, w = sqrt(exp_avg_sq)) in fp32, [nb, Q4_BLOCK] (zero padded), of the
    4-bit state: one byte per element, |qm| in bits 7-4, qw in bits 3-1, the sign of qm
    in bit 0 (every byte is a valid code; zero moments are the zero byte); exp_avg =
    qm|qm| * sm, w = qw^2 * sw (the square-root maps of the 8-bit format, fewer levels)."""
    nb = sm.numel()
    c = codes.reshape(-1).to(torch.int32)
    mag = (c >> 4).float()
    qm = torch.where((c & 1) == 1, -mag, mag)
    qw = ((c >> 1) & 7).float()
    return (pad_blocks(qm * qm.abs(), nb, Q4_BLOCK) * sm.view(nb, 1),
            pad_blocks(qw * qw, nb, Q4_BLOCK) * sw.view(nb, 1))


def quantize_q4(m: torch.Tensor, w: torch.Tensor, numel: int):
    """4-bit state (codes uint8, sm fp32, sw fp32) of fp32 exp_avg `m` and
    w = sqrt(exp_avg_sq), both [nb, Q4_BLOCK]: quantize_q8's maps and rounding (levels by
    exact comparisons, a positive w at least level 1, NaN propagates to the scales) with
    15 levels a side for m (sm = max|m| / 15^2) and 7 for w (sw = max w / 7^2), joined in
    one byte per element (`dequantize_q4_roots`)."""
    sm = m.abs().amax(1) / float(Q4_M_LEVELS * Q4_M_LEVELS)
    u = _levels(m, sm, Q4_M_LEVELS)
    negative = ((m < 0) & (u > 0)).to(torch.int32)
    sw = w.amax(1) / float(Q4_W_LEVELS * Q4_W_LEVELS)
    qw = _levels(w, sw, Q4_W_LEVELS)
    qw = torch.where((qw == 0) & (w > 0), torch.ones_like(qw), qw)
    codes = (u.to(torch.int32) << 4) | (qw.to(torch.int32) << 1) | negative
    return codes.reshape(-1)[:numel].to(torch.uint8), sm, sw


def check_masked_adamw_int4(params, grads, codes, exp_avg_scales, exp_avg_sq_scales, steps,
                            lr, beta1, beta2, eps, weight_decay) -> None:
    """Every argument check of masked_adamw_int4_, in the kernels' order."""
    op = _Q4_OP
    _check_hyper(lr, beta1, beta2, eps, weight_decay, op)
    _check_same_length(op, "params", len(params), grads=grads, codes=codes,
                       exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
                       steps=steps)
    if not params:
        return
    dev = params[0].device if isinstance(params[0], torch.Tensor) else None
    for i, (p, g, c, sm, sw, step) in enumerate(zip(params, grads, codes, exp_avg_scales,
                                                    exp_avg_sq_scales, steps)):
        _check_param_grad(op, i, p, g, dev)
        _check_tensor(op, "codes", i, c, (torch.uint8,), "torch.uint8", dev)
        _check_tensor(op, "exp_avg_scales", i, sm, (torch.float32,), "torch.float32", dev)
        _check_tensor(op, "exp_avg_sq_scales", i, sw, (torch.float32,), "torch.float32", dev)
        n = p.numel()
        for name, t, want in (("grads", g, n), ("codes", c, n),
                              ("exp_avg_scales", sm, q4_blocks(n)),
                              ("exp_avg_sq_scales", sw, q4_blocks(n))):
            if t.numel() != want:
                raise ValueError(f"{op}: {name}[{i}] has {t.numel()} elements; allowed: "
                                 f"{want} (params[{i}] has {n} elements, {q4_blocks(n)} "
                                 f"blocks of {Q4_BLOCK})")
        _check_step_meta(op, i, step, dev)
    for i in range(len(params)):
        _check_steps_values(i, steps[i], op)


def masked_adamw_int4_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       codes: Sequence[torch.Tensor], exp_avg_scales: Sequence[torch.Tensor],
                       exp_avg_sq_scales: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
                       lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float) -> None:
    """In-place AdamW with both moments in one byte per element (formats/int4.py), whole
    tensors: per block of Q4_BLOCK elements, dequantize (`dequantize_q4_roots`), update
    as masked_adamw_int8_ does, requantize (`quantize_q4`). bf16/fp16 params are
    widened, updated and rounded back."""
    check_masked_adamw_int4(params, grads, codes, exp_avg_scales, exp_avg_sq_scales, steps,
                            lr, beta1, beta2, eps, weight_decay)
    with torch.no_grad():
        for p, g, c, sm, sw, step in zip(params, grads, codes, exp_avg_scales,
                                         exp_avg_sq_scales, steps):
            n, nb = p.numel(), sm.numel()
            if n == 0:
                continue
            flat = p.view(-1)
            p32 = pad_blocks(flat.float(), nb, Q4_BLOCK)
            g32 = pad_blocks(g.reshape(-1).float(), nb, Q4_BLOCK)
            m, w = dequantize_q4_roots(c, sm, sw)
            new_w = _adamw_q_update(p32, g32, m, w * w, float(step.item()), lr, beta1, beta2,
                                    eps, weight_decay)
            flat.copy_(p32.view(-1)[:n])
            for dst, src in zip((c, sm, sw), quantize_q4(m, new_w, n)):
                dst.view(-1).copy_(src)


def _adamw_q_update(p32, g32, m, v, t: float, lr, beta1, beta2, eps, weight_decay):
    """The quantized formats' fp32 update in place of p32, m, v; returns sqrt(new v)
    (correctly rounded): AdamW's, sqrt(v) multiplied by the fp32 1/sqrt(1-beta2^t) instead
    of divided by sqrt(1-beta2^t) (one division less per element in the kernels)."""
    p32.mul_(1 - lr * weight_decay)
    m.lerp_(g32, 1 - beta1)
    v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
    w = sqrt_rn(v)
    denom = (w * (1 / math.sqrt(1 - beta2**t))).add_(eps)
    p32.addcdiv_(m, denom, value=-(lr / (1 - beta1**t)))
    return w


# ---------------------------------------------------------------- masked_adamw_lowp_

_LOWP_OP = "masked_adamw_lowp_"
_LOWP_DTYPES = (torch.bfloat16, torch.float16)
_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons' integer hash) on int64 tensors holding uint32 values;
    int64 products wrap, and the mask keeps their low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def sr_uniform(key: int, start: int, n: int, device: torch.device) -> torch.Tensor:
    """n fp32 numbers in [0, 1) for elements start..start+n-1 of the stream `key` (a 64-bit
    integer, signed or not: its low and high 32 bits are the hash keys): 24 random bits
    each, a pure function of (key, position)."""
    return sr_uniform_at(key, torch.arange(start, start + n, dtype=torch.int64, device=device))


def sr_uniform_at(key: int, positions: torch.Tensor) -> torch.Tensor:
    """sr_uniform at the given element positions (int64) of the stream `key`."""
    k1, k2 = key & _MASK32, (key >> 32) & _MASK32
    pos = positions.to(torch.int64)
    h = _hash32(_hash32((pos & _MASK32) ^ k1) ^ (pos >> 32) ^ k2)
    return (h >> 8).to(torch.float32) * 2.0**-24


SR_CHUNK = 1 << 20  # elements rounded at once: bounds the int64 temporaries


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, key: int,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 `x` rounded to `dtype` (bf16/fp16): to the neighbour on the far side of the
    nearest value r with probability |x - r| / |n - r| (fp32 arithmetic), taken when the
    stream's u < p, so E[result] = x. Both neighbours are one unit apart in the 16-bit
    pattern; NaN, Inf and values rounding to Inf stay as rounding to nearest makes them.
    Element j draws at position j of the stream, or at positions[j] (compact values of a
    param, e.g. the sparse policy's chosen elements). Returns a flat tensor."""
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype, device=x.device)
    for start in range(0, flat.numel(), SR_CHUNK):
        xs = flat[start:start + SR_CHUNK]
        r = xs.to(dtype)
        bits = r.view(torch.int16).to(torch.int32)
        away = xs.abs() > r.float().abs()  # the far neighbour is further from zero
        mag = (bits & 0x7FFF) + torch.where(away, 1, -1)
        n = (bits & 0x8000) | mag.clamp(0, 0x7FFF)
        n = (n - ((n >> 15) << 16)).to(torch.int16).view(dtype)  # as a signed 16-bit pattern
        p = (xs - r.float()).abs() / (n.float() - r.float()).abs()
        u = (sr_uniform(key, start, xs.numel(), x.device) if positions is None
             else sr_uniform_at(key, positions[start:start + SR_CHUNK]))
        take = (u < p) & torch.isfinite(r) & torch.isfinite(n) & (xs != r.float())
        out[start:start + SR_CHUNK] = torch.where(take, n, r)
    return out


def _check_lowp_entry(i: int, p, g, m, v, master, step, dev: torch.device) -> None:
    op = _LOWP_OP
    _check_tensor(op, "params", i, p, _LOWP_DTYPES, "torch.bfloat16, torch.float16", dev)
    _check_tensor(op, "grads", i, g, _LOWP_DTYPES, "torch.bfloat16, torch.float16", dev)
    if g.dtype != p.dtype:
        raise TypeError(f"{op}: grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype}; "
                        f"allowed: {p.dtype}")
    _check_tensor(op, "exp_avgs", i, m, (torch.float32,), "torch.float32", dev)
    _check_tensor(op, "exp_avg_sqs", i, v, (torch.float32,), "torch.float32", dev)
    if master is not None:
        _check_tensor(op, "masters", i, master, (torch.float32,), "torch.float32", dev)
    n = p.numel()
    for name, t in (("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v), ("masters", master)):
        if t is not None and t.numel() != n:
            raise ValueError(f"{op}: {name}[{i}] has {t.numel()} elements; allowed: {n} "
                             f"(params[{i}] has {n})")
    _check_step_meta(op, i, step, dev)


def check_masked_adamw_lowp(params, grads, exp_avgs, exp_avg_sqs, masters, steps, stochastic,
                            keys, lr, beta1, beta2, eps, weight_decay, maximize) -> None:
    """Every argument check of masked_adamw_lowp_, in the kernels' order (the overlap check
    is the kernels' own, as for the other ops)."""
    op = _LOWP_OP
    _check_hyper(lr, beta1, beta2, eps, weight_decay, op)
    n = len(params)
    _check_same_length(op, "params", n, grads=grads, exp_avgs=exp_avgs,
                       exp_avg_sqs=exp_avg_sqs, steps=steps, stochastic=stochastic, keys=keys)
    if len(masters) not in (0, n):
        raise ValueError(f"{op}: got {n} params but {len(masters)} masters; allowed: one "
                         "master per param, or none (stochastic rounding of the param)")
    if not params:
        return
    dev = params[0].device if isinstance(params[0], torch.Tensor) else None
    for i in range(n):
        _check_lowp_entry(i, params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                          masters[i] if masters else None, steps[i], dev)
    for i in range(n):
        _check_steps_values(i, steps[i], op)


def masked_adamw_lowp_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                       masters: Sequence[torch.Tensor], steps: Sequence[torch.Tensor],
                       stochastic: Sequence[bool], keys: Sequence[int], lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float,
                       maximize: bool, sqrt=torch.sqrt) -> None:
    """In-place AdamW on whole bf16/fp16 params with their own-dtype grads (formats/master.py).
    The fp32 value updated is masters[i] (kept) or, with no masters, the param widened; the
    grad is widened (negated when `maximize`); the math is masked_adamw_'s. The param gets
    the value rounded to nearest even, or, where stochastic[i], `stochastic_round` with the
    stream keys[i] (element j uses position j of the flattened param).

    `sqrt`: torch's (the op's default: the reference backend trains as torch.optim.AdamW,
    bit for bit, like masked_adamw_'s reference), or `sqrt_rn`, the kernels' correctly
    rounded root: with it this is the kernels' bit-for-bit spec (torch's CPU sqrt is not
    always correctly rounded)."""
    check_masked_adamw_lowp(params, grads, exp_avgs, exp_avg_sqs, masters, steps, stochastic,
                            keys, lr, beta1, beta2, eps, weight_decay, maximize)
    with torch.no_grad():
        for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs,
                                                   steps)):
            value = masters[i].view(-1) if masters else p.reshape(-1).float()
            g32 = g.reshape(-1).float()
            if maximize:
                g32 = -g32
            _adamw_scalar_step(value, g32, m.view(-1), v.view(-1), float(step.item()),
                               lr, beta1, beta2, eps, weight_decay, sqrt=sqrt)
            if stochastic[i]:
                p.view(-1).copy_(stochastic_round(value, p.dtype, int(keys[i])))
            else:
                p.view(-1).copy_(value)  # round to nearest even


def masked_adamw_lowp_spec(*args) -> None:
    """masked_adamw_lowp_ with the kernels' correctly rounded root: what they equal bit for
    bit (tests/test_master_kernel.py)."""
    masked_adamw_lowp_(*args, sqrt=sqrt_rn)


# ------------------------------------------------------------------------ select_topk


def _rank_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering elements by |x| (as fp32), NaN below every number."""
    a = x.reshape(-1).float().abs()
    key = a.view(torch.int32).long() + 1  # fp32 bit patterns of |x| are monotone in |x|
    return torch.where(torch.isnan(a), torch.zeros_like(key), key)


def check_select_topk(tensors: Sequence[torch.Tensor], k: int) -> None:
    op = "select_topk"
    _check_float_list(op, "tensors", tensors)
    total = sum(t.numel() for t in tensors)
    if k < 0 or k > total:
        raise ValueError(f"{op}: k={k} is out of range; allowed: 0..{total} (the number of "
                         f"elements in all {len(tensors)} tensors)")


def select_topk(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Exact global top-k by |x| over the concatenated tensors; per tensor the selected
    positions (in the flattened tensor), ascending, int32 (int64 past 2**31-1 elements).
    Ties at the threshold go to the lowest concatenated position; NaN ranks below every
    number. (The kernels use a radix select; this reference sorts.)"""
    check_select_topk(tensors, k)
    sizes = [t.numel() for t in tensors]
    dev = tensors[0].device if tensors else torch.device("cpu")
    keys = torch.cat([_rank_keys(t.detach()) for t in tensors]) if tensors else \
        torch.zeros(0, dtype=torch.int64)
    order = torch.sort(keys, descending=True, stable=True).indices  # stable: lowest position first
    chosen = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    chosen[order[:k]] = True
    out, start = [], 0
    for n in sizes:
        pos = torch.nonzero(chosen[start:start + n]).view(-1)
        out.append(pos.to(device=dev, dtype=_index_dtype_for(n)))
        start += n
    return out


# ------------------------------------------------------------------------ remap_state


def check_remap_state(old_indices, new_indices, states) -> None:
    op = "remap_state"
    _check_same_length(op, "states", len(states), old_indices=old_indices,
                       new_indices=new_indices)
    if not states:
        return
    dev = states[0].device if isinstance(states[0], torch.Tensor) else None
    for i in range(len(states)):
        _check_index_meta(op, "old_indices", i, old_indices[i], dev)
        _check_index_meta(op, "new_indices", i, new_indices[i], dev)
        _check_tensor(op, "states", i, states[i], _FLOAT_DTYPES, _FLOATS, dev)
        s = states[i]
        if s.dim() == 0 or s.shape[-1] != old_indices[i].numel():
            last = s.shape[-1] if s.dim() else "no dimension"
            raise ValueError(f"{op}: states[{i}] has shape {tuple(s.shape)}; its last dimension "
                             f"({last}) must equal len(old_indices[{i}]) = "
                             f"{old_indices[i].numel()}")
    for i in range(len(states)):
        _check_index_values(op, "old_indices", i, old_indices[i], None, "positions")
        _check_index_values(op, "new_indices", i, new_indices[i], None, "positions")


def remap_state(old_indices: Sequence[torch.Tensor], new_indices: Sequence[torch.Tensor],
                states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """states[i] of shape [..., len(old_indices[i])] -> [..., len(new_indices[i])]: the values
    of positions in both index sets are carried over, positions new in new_indices are 0."""
    check_remap_state(old_indices, new_indices, states)
    out = []
    for old, new, s in zip(old_indices, new_indices, states):
        old, new = old.long(), new.long()
        res = torch.zeros(*s.shape[:-1], new.numel(), dtype=s.dtype, device=s.device)
        # where each new position would sit in old; a hit when old has it there
        at = torch.searchsorted(old, new).clamp(max=max(old.numel() - 1, 0))
        hit = (old[at] == new) if old.numel() else torch.zeros_like(new, dtype=torch.bool)
        res[..., hit] = s[..., at[hit]]
        out.append(res)
    return out


# ------------------------------------------------------------------ gather_accumulate_


def check_gather_accumulate(dense, indices, compact) -> None:
    op = "gather_accumulate_"
    _check_same_length(op, "dense", len(dense), indices=indices, compact=compact)
    if not dense:
        return
    dev = dense[0].device if isinstance(dense[0], torch.Tensor) else None
    for i in range(len(dense)):
        _check_tensor(op, "dense", i, dense[i], _FLOAT_DTYPES, _FLOATS, dev)
        _check_index_meta(op, "indices", i, indices[i], dev)
        _check_tensor(op, "compact", i, compact[i], (torch.float32,), "torch.float32", dev)
        if compact[i].numel() != indices[i].numel():
            raise ValueError(f"{op}: compact[{i}] has {compact[i].numel()} elements but "
                             f"len(indices[{i}]) is {indices[i].numel()}; they must match")
    for i in range(len(dense)):
        _check_index_values(op, "indices", i, indices[i], dense[i].numel(), f"dense[{i}]")


def gather_accumulate_(dense: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                       compact: Sequence[torch.Tensor]) -> None:
    """compact[i] += dense[i].view(-1)[indices[i]] in fp32 (one rounding per add), in place."""
    check_gather_accumulate(dense, indices, compact)
    with torch.no_grad():
        for i, (d, idx, c) in enumerate(zip(dense, indices, compact)):
            pos = _positions_at_use("gather_accumulate_", i, idx, d.numel(), f"dense[{i}]")
            c.view(-1).add_(d.reshape(-1)[pos].float())
