"""4-bit moments (`state_dtype="int4"`): both AdamW moments in one byte per element.

Per trained param, flat: `moments` uint8 (one byte per element of the param, in its
flattened order), `exp_avg_scale` and `exp_avg_sq_scale` fp32 (one per block of 64
elements) and `step` (a 0-dim float32 host tensor): 1 + 8/64 = 1.125 B per element instead
of fp32's 8 and int8's 2.03, so a byte budget holds ~1.8x int8's elements, and every
weight of a model fits in less than the bytes LoRA's state takes at a tenth of AdamW's.

The map (`_reference.quantize_q4`, the spec; the CPU kernel does the same bit for bit):
the 8-bit format's square-root maps and blockwise abs-max scales (formats/int8.py) with
fewer levels, shared unevenly because the first moment's precision is what the quality
measures (bench/update_rules.py, SmolLM2 on BBC News: 4 bits of m cost 3x 4 bits of v),
in blocks of 64 (blocks of 128 measured 0.002 worse on two seeds):
- exp_avg: 15 levels a side (m = q|q| s, s = max|m| / 15^2): 4 bits of |q| and a sign;
- sqrt(exp_avg_sq): 7 levels (w = q^2 s, s = max w / 7^2), a positive root at least 1.
One byte: |q_m| in bits 7-4, q_w in bits 3-1, the sign of q_m in bit 0; every byte is a
valid code, and zero moments are the zero byte.

One kernel call (`ops.masked_adamw_int4_`) dequantizes, updates and requantizes a batch of
whole params of one group, device and dtype (CPU: the block loop per capability; CUDA: a
warp per block, checked in the emulator, not yet on a GPU). bf16/fp16 params are updated
in fp32 and rounded to nearest (no fp32 master: `policies.Config` refuses master weights
with it). Whole tensors only: the sparse policy keeps fp32, int8 or bf16 moments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import ops
from .._reference import Q4_BLOCK, dequantize_q4_roots, pad_blocks, quantize_q4, sqrt_rn
from .int8 import Int8Moments, check_scales

# key -> (dtype, one element per: "element" of the param or "block" of Q4_BLOCK)
LAYOUT = {"moments": (torch.uint8, "element"),
          "exp_avg_scale": (torch.float32, "block"),
          "exp_avg_sq_scale": (torch.float32, "block")}


class Int4Moments(Int8Moments):
    name = "int4"
    layout = LAYOUT
    block = Q4_BLOCK
    keys = ("step", *LAYOUT)
    moment_bytes = 1  # one byte holds both moments
    element_bytes = moment_bytes + 8 / Q4_BLOCK  # + two fp32 scales per block of 64

    def _check_values(self, where: str, st: dict[str, torch.Tensor], propagate: bool) -> None:
        check_scales(where, st, propagate)  # every byte is a valid code

    def _quantize(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> dict[str, Any]:
        return quantize(exp_avg, exp_avg_sq)

    def _kernel(self, call: Callable[..., Any], indices: list[int], params: list, grads: list,
                states: list[dict[str, Any]], steps: list, **hyper: float) -> None:
        call(ops.masked_adamw_int4_, indices, params, grads,
             *([st[k] for st in states] for k in LAYOUT), steps, **hyper)


def quantize(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 4-bit state of fp32 moments (any shape; flattened)."""
    m, w = exp_avg.reshape(-1).float(), sqrt_rn(exp_avg_sq.reshape(-1).float())
    n = m.numel()
    nb = -(-n // Q4_BLOCK)
    codes, sm, sw = quantize_q4(pad_blocks(m, nb, Q4_BLOCK), pad_blocks(w, nb, Q4_BLOCK), n)
    return dict(zip(LAYOUT, (codes, sm, sw)))


def dequantize(st: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq), flat fp32, of a 4-bit state."""
    n = st["moments"].numel()
    m, w = dequantize_q4_roots(st["moments"], st["exp_avg_scale"], st["exp_avg_sq_scale"])
    return m.reshape(-1)[:n], (w * w).reshape(-1)[:n]


INT4 = Int4Moments()
