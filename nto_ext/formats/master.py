"""bf16/fp16 params trained as well as fp32: fp32 master weights, or stochastic rounding.

At fine-tuning learning rates most AdamW updates of a bf16 weight are below half its ulp:
rounded to nearest, they vanish. Two formats keep them:

- `MasterWeights` ("master"): an fp32 copy of the param, `master`, for the *active* set
  only (made from the param when its state is made; dropped or offloaded with the moments
  at a switch, as all of a param's state is). AdamW updates the master; the param gets it
  rounded to nearest every step but the last of its period, where it is rounded
  stochastically (else the period's progress below half an ulp would go with the
  master). 12 B per element (moments 8 + master 4).
- `StochasticRounding` ("stochastic"): no extra state (8 B per element, as fp32 moments);
  the fp32 result is rounded to the param's dtype up or down with probability given by
  its distance to each (unbiased), the coin drawn from a counter-based stream keyed on
  (seed, step, param, element): deterministic, independent of threads, bit-exact on resume.

Both run the fp32 kernel (`ops.masked_adamw_`) on fp32 values (the master, or an fp32 copy
of the param) reading the model's bf16/fp16 gradient directly (no fp32 copy of it), a batch
of at most the largest tensor's elements at a time; the param is then written back rounded.
A kernel that also fuses that write-back (and the stochastic rounding) is left for later.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..checkpoint import Storages, check_moment, check_values, local_tensor
from .fp32 import MOMENTS, Fp32Moments

_MASK32 = 0xFFFFFFFF
_SR_CHUNK = 1 << 20  # elements rounded at once: bounds the int64 temporaries
_SR_TEMP = 96  # bytes of temporaries per element of a chunk (an upper bound)


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 copy: the kernel walks value, grad and moments in one flat order."""
    return t.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)


class _Fp32Compute(Fp32Moments):
    """AdamW in fp32 on `_source` values of bf16/fp16 params, written back by `_write`."""

    def _source(self, st: dict[str, Any], t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _write(self, t: torch.Tensor, value: torch.Tensor, seed: int, step: int,
               index: int, last: bool) -> None:
        raise NotImplementedError

    def update(self, group: dict[str, Any], items: list, states: list[dict[str, Any]],
               call: Callable[..., Any], *, seed: int = 0, step: int = 0,
               leaving: frozenset[int] = frozenset()) -> None:
        beta1, beta2 = group["betas"]
        hyper = {"lr": float(group["lr"]), "beta1": float(beta1), "beta2": float(beta2),
                 "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}
        for batch in _batches(list(zip(items, states))):
            values = [self._source(st, t) for (_, t, _, _), st in batch]
            grads = [g.contiguous() for (_, _, g, _), _ in batch]  # the kernel's flat order
            if group.get("maximize", False):  # AdamW's maximize: descend on -grad (a copy)
                grads = torch._foreach_neg(grads)
            steps = [st["step"] for _, st in batch]
            self._kernel(call, [i for (i, _, _, _), _ in batch], values, grads,
                         [st for _, st in batch], [s + 1 for s in steps], **hyper)
            torch._foreach_add_(steps, 1.0)  # counted once the kernel has run
            for ((i, t, _, _), _), value in zip(batch, values):
                self._write(t, value, seed, step, i, i in leaving)


def _batches(pairs: list) -> Iterator[list]:
    """Consecutive batches of at most the largest tensor's elements: the fp32 gradient
    copies never exceed one tensor's worth, while small tensors share a kernel call."""
    cap = max((t.numel() for (_, t, _, _), _ in pairs), default=0)
    batch: list = []
    size = 0
    for pair in pairs:
        n = pair[0][1].numel()
        if batch and size + n > cap:
            yield batch
            batch, size = [], 0
        batch.append(pair)
        size += n
    if batch:
        yield batch


class MasterWeights(_Fp32Compute):
    name = "master"
    keys = ("step", *MOMENTS, "master")
    element_bytes = 12  # two fp32 moments + the fp32 master

    def new_state(self, p: torch.Tensor) -> dict[str, Any]:
        return {**super().new_state(p), "master": _fp32_copy(local_tensor(p))}

    def check_entry(self, where: str, st: dict[str, Any], p: torch.Tensor) -> None:
        super().check_entry(where, st, p)
        if "master" in st:
            m, local = local_tensor(st["master"]), local_tensor(p)
            if m.shape != local.shape or m.device != local.device or m.dtype != torch.float32:
                raise ValueError(f"the master of {where} is a {m.dtype} tensor of shape "
                                 f"{tuple(m.shape)} on {m.device}; expected torch.float32, "
                                 f"{tuple(local.shape)} on {local.device}; nothing was changed")

    def check_loaded(self, where: str, st: dict[str, Any], p: torch.Tensor, seen: Storages,
                     propagate: bool) -> dict[str, Any]:
        if "master" not in st:
            raise ValueError(f"{where}: no 'master' entry; allowed: a state saved with fp32 "
                             "master weights (build NTO with the master_weights of the run "
                             "that saved it); nothing was loaded")
        check_moment(where, "master", st["master"], local_tensor(p).shape)
        out = super().check_loaded(where, st, p, seen, propagate)
        check_values(where, "master", out["master"], propagate)
        return out

    def from_adamw(self, where: str, st: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        out = super().from_adamw(where, st, p)
        out["master"] = self.new_state(p)["master"]  # AdamW's weights are the param itself
        return out

    def _source(self, st: dict[str, Any], t: torch.Tensor) -> torch.Tensor:
        if "master" not in st:  # a state made while the param was fp32 (model.to(bf16))
            st["master"] = _fp32_copy(t)
        return st["master"]

    def transient_bytes(self, numel: int) -> int:
        # at most a 16-bit copy of one batch's gradients (maximize, or a non-contiguous
        # grad) + the rounding's temporaries at a period's end
        return 2 * numel + _SR_TEMP * min(numel, _SR_CHUNK)

    def _write(self, t: torch.Tensor, value: torch.Tensor, seed: int, step: int,
               index: int, last: bool) -> None:
        if last:  # the master goes after this step: round stochastically, so the progress
            # below half an ulp it gathered this period is kept on average, not lost
            STOCHASTIC._write(t, value, seed, step, index, last)
        else:
            t.copy_(value)  # round to nearest even, as every torch cast


class StochasticRounding(_Fp32Compute):
    name = "stochastic"

    def transient_bytes(self, numel: int) -> int:
        # fp32 param copies (+ at most 16-bit grad copies) of one batch; rounding temporaries
        return 6 * numel + _SR_TEMP * min(numel, _SR_CHUNK)

    def _source(self, st: dict[str, Any], t: torch.Tensor) -> torch.Tensor:
        return _fp32_copy(t)

    def _write(self, t: torch.Tensor, value: torch.Tensor, seed: int, step: int,
               index: int, last: bool) -> None:
        t.copy_(stochastic_round(value, t.dtype, seed, step, index).view(t.shape))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons' integer hash) on int64 tensors holding uint32 values;
    int64 products wrap, and the mask keeps their low 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _stream_key(seed: int, step: int, index: int) -> tuple[int, int]:
    digest = hashlib.blake2b(f"nto:sr:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "little")
    return key & _MASK32, key >> 32


def uniform(seed: int, step: int, index: int, start: int, n: int,
            device: torch.device) -> torch.Tensor:
    """n fp32 numbers in [0, 1) for elements start..start+n-1 of param `index` at `step`:
    a pure function of its arguments (24 random bits each)."""
    k1, k2 = _stream_key(seed, step, index)
    pos = torch.arange(start, start + n, dtype=torch.int64, device=device)
    h = _hash32(_hash32((pos & _MASK32) ^ k1) ^ (pos >> 32) ^ k2)
    return (h >> 8).to(torch.float32) * 2.0**-24


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, step: int,
                     index: int) -> torch.Tensor:
    """fp32 `x` rounded to `dtype` (bf16/fp16): to the neighbour on the far side of the
    nearest value r with probability |x - r| / |n - r|, so E[result] = x. Both neighbours
    are one unit apart in the 16-bit pattern; NaN, Inf and values rounding to Inf stay as
    rounding to nearest makes them. Returns a flat tensor."""
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype, device=x.device)
    for start in range(0, flat.numel(), _SR_CHUNK):
        xs = flat[start:start + _SR_CHUNK]
        r = xs.to(dtype)
        bits = r.view(torch.int16).to(torch.int32)
        away = xs.abs() > r.float().abs()  # the far neighbour is further from zero
        mag = (bits & 0x7FFF) + torch.where(away, 1, -1)
        n = (bits & 0x8000) | mag.clamp(0, 0x7FFF)
        n = (n - ((n >> 15) << 16)).to(torch.int16).view(dtype)  # as a signed 16-bit pattern
        p = (xs - r.float()).abs() / (n.float() - r.float()).abs()
        u = uniform(seed, step, index, start, xs.numel(), x.device)
        take = (u < p) & torch.isfinite(r) & torch.isfinite(n) & (xs != r.float())
        out[start:start + _SR_CHUNK] = torch.where(take, n, r)
    return out


MASTER = MasterWeights()
STOCHASTIC = StochasticRounding()
