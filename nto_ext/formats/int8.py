"""8-bit moments (`state_dtype="int8"`): both AdamW moments blockwise in 8 bits.

Per trained param, flat (one element per param element, in its flattened order):
`exp_avg` int8 and `exp_avg_sq` uint8, `exp_avg_scale` and `exp_avg_sq_scale` fp32 (one
per block of 256 elements) and `step` (a 0-dim float32 host tensor, as AdamW keeps it):
2 + 8/256 = 2.03 B per element instead of 8, so a byte budget trains ~2x the elements.

The map (`_reference.quantize_q8`, the spec; the kernels do the same bit for bit):
- scales from the block's abs-max (dynamic, as bitsandbytes / torchao): a block of small
  gradients keeps its own range;
- exp_avg: q = sqrt(|m| / s) rounded half up, in [-127, 127], m = q|q| s with
  s = max|m| / 127^2.
  A square-root map, not linear: it spends levels on the small values (a value 100x
  below its block's largest keeps ~8% precision; a linear map rounds it to zero);
- exp_avg_sq: the same map of its root w = sqrt(v) (what the update divides by), in
  [0, 255]: v spans the square of the gradients' range, w half of it in log terms, and
  the map halves it again, so roots down to 1/65025 of the block's largest stay non-zero;
  and a positive w never rounds to zero (no update is divided by eps alone).
Levels are decided by exact comparisons, no rounded sqrt: q is the number of k in 1..top
with (k - 1/2)^2 <= |x| * fp32(1 / s) (the thresholds are exact in fp32; round half up at
exact ties): deterministic, independent of threads and vector width, bit-exact on resume.

One fused kernel call (`ops.masked_adamw_int8_`) dequantizes, updates and requantizes a
batch of params of one group, device and dtype. bf16/fp16 params are updated in fp32 and
rounded to nearest (no fp32 master: `policies.Config` refuses master weights with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import ops
from .._reference import Q8_BLOCK, dequantize_q8_roots, pad_blocks, q8_blocks, quantize_q8, sqrt_rn
from ..checkpoint import Storages, adamw_entry, check_keys, loaded_step, local_tensor
from .fp32 import Fp32Moments

SCALES = ("exp_avg_scale", "exp_avg_sq_scale")
# key -> (dtype, one element per: "element" of the param or "block" of Q8_BLOCK)
LAYOUT = {"exp_avg": (torch.int8, "element"), "exp_avg_sq": (torch.uint8, "element"),
          "exp_avg_scale": (torch.float32, "block"),
          "exp_avg_sq_scale": (torch.float32, "block")}


class Int8Moments(Fp32Moments):
    """Also the base of the other blockwise quantized formats (formats/int4.py): a layout of
    per-element and per-block tensors, two fp32 scales per block."""
    name = "int8"
    layout = LAYOUT
    block = Q8_BLOCK
    keys = ("step", *LAYOUT)
    moment_bytes = 2  # two 8-bit moments per element
    element_bytes = moment_bytes + 8 / Q8_BLOCK  # + two fp32 scales per block
    tensor_bytes = 8  # a last partial block's scales

    def state_bytes(self, numel: int) -> int:
        return self.moment_bytes * numel + 8 * self._blocks(numel)

    def _blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def _sizes(self, p: torch.Tensor) -> dict[str, int]:
        n = local_tensor(p).numel()
        return {"element": n, "block": self._blocks(n)}

    def new_state(self, p: torch.Tensor) -> dict[str, Any]:
        local, sizes = local_tensor(p), self._sizes(p)
        return {"step": torch.tensor(0.0, dtype=torch.float32),
                **{k: torch.zeros(sizes[per], dtype=dt, device=local.device)
                   for k, (dt, per) in self.layout.items()}}

    def _mismatch(self, key: str, v: object, p: torch.Tensor) -> str | None:
        """Why `v` cannot be the `key` entry of param p (None: it can)."""
        dtype, per = self.layout[key]
        want = (self._sizes(p)[per],)
        local = local_tensor(p)
        if not isinstance(v, torch.Tensor):
            return f"{key} is {type(v).__name__}; expected a {dtype} tensor of shape {want}"
        v = local_tensor(v)
        if (v.dtype, tuple(v.shape), v.device) != (dtype, want, local.device) \
                or not v.is_contiguous():
            return (f"{key} is a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}; "
                    f"expected contiguous {dtype} of shape {want} on {local.device} (one per "
                    f"{per}{f' of {self.block} elements' if per == 'block' else ''})")
        return None

    def check_entry(self, where: str, st: dict[str, Any], p: torch.Tensor) -> None:
        for key in self.layout:
            why = self._mismatch(key, st.get(key), p)
            if why:
                raise ValueError(f"the state of {where}: {why}; nothing was changed")

    def check_loaded(self, where: str, st: dict[str, Any], p: torch.Tensor, seen: Storages,
                     propagate: bool) -> dict[str, Any]:
        """Keys, dtypes, shapes; scales finite (unless `propagate`) and >= 0; `step` a
        float32 tensor; no aliasing; the levels the map makes (`_check_values`)."""
        check_keys(where, st, self.keys)
        out = {}
        for key in self.layout:
            why = self._mismatch(key, st.get(key), p)
            if why:
                raise ValueError(f"{where}: {why} (as NTO.state_dict() saves it with "
                                 f"state_dtype='{self.name}'); nothing was loaded")
            out[key] = seen.claim(f"{where}: {key}", st[key])
        out["step"] = loaded_step(where, st.get("step"))
        self._check_values(where, {k: local_tensor(out[k]) for k in self.layout}, propagate)
        return out

    def _check_values(self, where: str, st: dict[str, torch.Tensor], propagate: bool) -> None:
        check_values(where, st, propagate)

    def _quantize(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> dict[str, Any]:
        return quantize(exp_avg, exp_avg_sq)

    def from_adamw(self, where: str, st: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """torch AdamW's fp32 moments of p, quantized."""
        full = adamw_entry(where, st, p, compact=False)
        return {"step": full["step"], **self._quantize(full["exp_avg"], full["exp_avg_sq"])}

    def _kernel(self, call: Callable[..., Any], indices: list[int], params: list, grads: list,
                states: list[dict[str, Any]], steps: list, **hyper: float) -> None:
        call(ops.masked_adamw_int8_, indices, params, grads,
             *([st[k] for st in states] for k in LAYOUT), steps, **hyper)


def check_scales(where: str, st: dict[str, torch.Tensor], propagate: bool) -> None:
    """The scales of a loaded quantized state: finite and >= 0 (NaN/Inf only with
    nonfinite="propagate")."""
    for key in SCALES:
        s = st[key]
        bad = (s < 0) | ~torch.isfinite(s) if not propagate else s < 0
        if s.numel() and bool(bad.any()):
            raise ValueError(f"{where}: {key} holds negative or non-finite values; "
                             "allowed: finite scales >= 0 (NaN/Inf only with "
                             "nonfinite='propagate'); nothing was loaded")


def check_values(where: str, st: dict[str, torch.Tensor], propagate: bool) -> None:
    """The values of a loaded 8-bit state (layout checked already): `check_scales`; every
    level valid but -128, which the map never makes."""
    check_scales(where, st, propagate)
    if bool((st["exp_avg"] == -128).any()):
        raise ValueError(f"{where}: exp_avg holds -128; allowed: levels in [-127, 127] "
                         "(a corrupted or crafted checkpoint?); nothing was loaded")


def quantize(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 8-bit state of fp32 moments (any shape; flattened)."""
    return quantize_roots(exp_avg.reshape(-1), sqrt_rn(exp_avg_sq.reshape(-1).float()))


def quantize_roots(m: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 8-bit state of flat fp32 exp_avg `m` and w = sqrt(exp_avg_sq)."""
    n = m.numel()
    nb = q8_blocks(n)
    qm, sm, qw, sw = quantize_q8(pad_blocks(m, nb), pad_blocks(w, nb), n)
    return dict(zip(LAYOUT, (qm, qw, sm, sw)))


def dequantize(st: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq), flat fp32, of an 8-bit state."""
    m, w = dequantize_roots(st)
    return m, w * w


def dequantize_roots(st: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, sqrt(exp_avg_sq)), flat fp32, of an 8-bit state: the values the kernel
    starts from (requantizing them gives the same levels and scales back)."""
    n = st["exp_avg"].numel()
    m, w = dequantize_q8_roots(st["exp_avg"], st["exp_avg_scale"], st["exp_avg_sq"],
                               st["exp_avg_sq_scale"])
    return m.reshape(-1)[:n], w.reshape(-1)[:n]


INT8 = Int8Moments()
