"""State formats: how the state of a trained param is laid out, checked, loaded and
updated (one module each). The dense policies keep their state in a format; a new one
(bf16 master weights, 8-bit moments) is a module here plus its kernel variants in csrc/.
"""

from .fp32 import FP32, Fp32Moments

FORMATS = {FP32.name: FP32}

__all__ = ["FORMATS", "FP32", "Fp32Moments"]
