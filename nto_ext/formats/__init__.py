"""State formats: how the state of a trained param is laid out, checked, loaded and
updated (one module each). The dense policies keep their state in a format chosen per
param dtype by `choose`; a new one (8-bit moments) is a module here plus its kernel
variants in csrc/.
"""

from __future__ import annotations

import torch

from .fp32 import FP32, Fp32Moments
from .master import MASTER, STOCHASTIC, MasterWeights, StochasticRounding

FORMATS = {f.name: f for f in (FP32, MASTER, STOCHASTIC)}
LOW_PRECISION = (torch.bfloat16, torch.float16)

__all__ = ["FORMATS", "FP32", "MASTER", "STOCHASTIC", "LOW_PRECISION", "Fp32Moments",
           "MasterWeights", "StochasticRounding", "choose"]


def choose(dtype: torch.dtype, master_weights: bool | None,
           stochastic_rounding: bool) -> Fp32Moments:
    """The format of a param of `dtype` (the arguments as validated by policies.Config):
    fp32 params keep fp32 moments; bf16/fp16 ones round stochastically when asked, else
    keep fp32 masters unless master_weights=False (None: the default, masters)."""
    if dtype not in LOW_PRECISION:
        return FP32
    if stochastic_rounding:
        return STOCHASTIC
    return FP32 if master_weights is False else MASTER
