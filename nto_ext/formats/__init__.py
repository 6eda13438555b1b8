"""State formats: how the state of a trained param is laid out, checked, loaded and
updated (one module each). The dense policies keep their state in a format chosen per
param dtype by `choose`; a new one is a module here plus its kernel variants in csrc/.
"""

from __future__ import annotations

import torch

from .bf16 import BF16, Bf16Moments
from .fp32 import FP32, Fp32Moments
from .int4 import INT4, Int4Moments
from .int8 import INT8, Int8Moments
from .master import MASTER, STOCHASTIC, MasterWeights, StochasticRounding
from .none import NONE, NoMoments

FORMATS = {f.name: f for f in (FP32, MASTER, STOCHASTIC, INT8, INT4, BF16, NONE)}
LOW_PRECISION = (torch.bfloat16, torch.float16)
# NTO(state_dtype=...): how the moments are stored ("none": not at all, formats/none.py)
STATE_DTYPES = ("fp32", "int8", "int4", "bf16", "none")
OWN_STATE_DTYPES = {f.name: f for f in (INT8, INT4, BF16, NONE)}  # the formats state_dtype names

__all__ = ["BF16", "FORMATS", "FP32", "INT4", "INT8", "MASTER", "NONE", "STOCHASTIC",
           "LOW_PRECISION", "OWN_STATE_DTYPES", "STATE_DTYPES", "Bf16Moments", "Fp32Moments",
           "Int4Moments", "Int8Moments", "MasterWeights", "NoMoments", "StochasticRounding",
           "choose"]


def choose(dtype: torch.dtype, master_weights: bool | None, stochastic_rounding: bool,
           state_dtype: str = "fp32") -> Fp32Moments:
    """The format of a param of `dtype` (the arguments as validated by policies.Config):
    state_dtype="int8" / "int4" / "bf16" / "none": 8-bit / 4-bit / bf16 / no moments for
    every dtype (no masters: Config refuses them);
    else fp32 params keep fp32 moments; bf16/fp16 ones round stochastically when asked,
    else keep fp32 masters unless master_weights=False (None: the default, masters)."""
    if state_dtype != "fp32":
        return OWN_STATE_DTYPES[state_dtype]
    if dtype not in LOW_PRECISION:
        return FP32
    if stochastic_rounding:
        return STOCHASTIC
    return FP32 if master_weights is False else MASTER
