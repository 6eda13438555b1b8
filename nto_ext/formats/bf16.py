"""bf16 moments (`state_dtype="bf16"`): torch.optim.AdamW's layout with both moments in
bfloat16, as torch's own AdamW keeps them for a bf16 param.

Per trained param: `exp_avg` and `exp_avg_sq` (bf16, the param's shape) and `step` (a 0-dim
float32 host tensor): 4 B per element instead of 8, so an fp32 model trains at 8 B per
element instead of 12 (`int8`: 6.03). The fused `ops.masked_adamw_` widens them, updates in
fp32 (the param's update uses the fp32 values) and rounds them to nearest even once, as
torch's fused AdamW does for bf16 state. Rounding to nearest loses an exp_avg_sq change
below half a bf16 step (2^-9 relative: beta2 = 0.999 moves v by 0.1% a step), so v follows
rises of the gradient faster than falls; `int8` (square-root map, per-block scales) does
not have this bias and costs less.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint import adamw_entry
from .fp32 import MOMENTS, Fp32Moments


class Bf16Moments(Fp32Moments):
    name = "bf16"
    moment_dtype = torch.bfloat16
    element_bytes = 4  # two bf16 moments per element

    def from_adamw(self, where: str, st: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """torch AdamW's moments of p (any float dtype), rounded to bf16."""
        full = adamw_entry(where, st, p, compact=False)
        return {**full, **{k: full[k].to(torch.bfloat16) for k in MOMENTS}}


BF16 = Bf16Moments()
