"""Pure-PyTorch reference of every op: the executable spec the kernels are tested against.

Readable first, not fast. Each function has the signature of its `torch.ops.nto.*` op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_float_list(op: str, what: str, tensors: Sequence[torch.Tensor]) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {what}[{i}] is {type(t).__name__}, expected a Tensor")
        if t.dtype not in _FLOAT_DTYPES:
            raise RuntimeError(f"{op}: {what}[{i}] has dtype {t.dtype}; "
                               "allowed: float32, bfloat16, float16")
        if not t.is_contiguous():
            raise RuntimeError(f"{op}: {what}[{i}] is not contiguous; "
                               "pass .contiguous() tensors")
    if tensors:
        dev = tensors[0].device
        for i, t in enumerate(tensors):
            if t.device != dev:
                raise RuntimeError(f"{op}: {what}[{i}] is on {t.device} but the first tensor "
                                   f"is on {dev}; all tensors must share one device")


def param_stats(tensors: Sequence[torch.Tensor]):
    """Per tensor: numel (int64[n]), sum of squares (float64[n]), abs-max (float32[n]) and
    hist (int64[n, 256]): counts of elements whose |x| has fp32 exponent field e (zeros and
    subnormals in 0, inf/NaN in 255); bf16/fp16 are widened to fp32 first."""
    _check_float_list("param_stats", "tensors", tensors)
    n = len(tensors)
    dev = tensors[0].device if n else torch.device("cpu")
    numel = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=dev)
    sumsq = torch.zeros(n, dtype=torch.float64, device=dev)
    absmax = torch.zeros(n, dtype=torch.float32, device=dev)
    hist = torch.zeros(n, 256, dtype=torch.int64, device=dev)
    for i, t in enumerate(tensors):
        x = t.detach().reshape(-1).float()
        if x.numel() == 0:
            continue
        sumsq[i] = x.double().square().sum()
        absmax[i] = x.abs().max()
        exponent = (x.view(torch.int32) >> 23) & 0xFF
        hist[i] = torch.bincount(exponent.long(), minlength=256)
    return numel, sumsq, absmax, hist
