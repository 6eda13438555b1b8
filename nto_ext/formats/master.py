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

Both run one fused kernel call (`ops.masked_adamw_lowp_`) over the active params: it reads
the bf16/fp16 gradient directly, updates the fp32 master (or an fp32 value of the param, in
registers) with masked_adamw_'s math and writes the param back rounded; no temporaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from .. import _reference, ops
from ..checkpoint import Storages, check_moment, check_values, local_tensor
from .fp32 import MOMENTS, Fp32Moments


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 copy: the kernel walks value, grad and moments in one flat order."""
    return t.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)


class _Fp32Compute(Fp32Moments):
    """AdamW in fp32 on bf16/fp16 params: one fused `ops.masked_adamw_lowp_` call reads the
    low-precision grads, updates `_masters` (or fp32 values of the params) and writes the
    params back rounded (stochastically where `_stochastic` says)."""

    def _masters(self, states: list[dict[str, Any]], params: list) -> list[torch.Tensor]:
        raise NotImplementedError

    def _stochastic(self, last: bool) -> bool:
        """Whether a param rounds stochastically this step (`last`: its period's last)."""
        raise NotImplementedError

    def update(self, group: dict[str, Any], items: list, states: list[dict[str, Any]],
               call: Callable[..., Any], *, seed: int = 0, step: int = 0,
               leaving: frozenset[int] = frozenset()) -> None:
        # strided params (transposed views) go through contiguous copies, written back
        params = [t if t.is_contiguous() else t.contiguous() for _, t, _, _ in items]
        grads = [g if g.is_contiguous() else g.contiguous() for _, _, g, _ in items]
        indices = [i for i, _, _, _ in items]
        masters = self._masters(states, [t for _, t, _, _ in items])
        steps = [st["step"] for st in states]
        beta1, beta2 = group["betas"]
        stochastic = [self._stochastic(i in leaving) for i in indices]
        call(ops.masked_adamw_lowp_, indices, params, grads,
             [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], masters,
             [s + 1 for s in steps], stochastic=stochastic,
             keys=[stream_key(seed, step, i) if sr else 0  # a key only where it is read
                   for i, sr in zip(indices, stochastic)], lr=float(group["lr"]),
             beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
             weight_decay=float(group["weight_decay"]),
             maximize=bool(group.get("maximize", False)))
        torch._foreach_add_(steps, 1.0)  # counted once the kernel has run
        for (_, t, _, _), staged in zip(items, params):
            if staged is not t:
                t.copy_(staged)


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

    def _masters(self, states: list[dict[str, Any]], params: list) -> list[torch.Tensor]:
        for st, t in zip(states, params):
            if "master" not in st:  # a state made while the param was fp32 (model.to(bf16))
                st["master"] = _fp32_copy(t)
        return [st["master"] for st in states]

    def _stochastic(self, last: bool) -> bool:
        # the master goes after the last step of a period: round stochastically then, so the
        # progress below half an ulp it gathered this period is kept on average, not lost;
        # else to nearest even, as every torch cast
        return last


class StochasticRounding(_Fp32Compute):
    name = "stochastic"

    def _masters(self, states: list[dict[str, Any]], params: list) -> list[torch.Tensor]:
        return []  # the kernel updates an fp32 value of each param, in registers

    def _stochastic(self, last: bool) -> bool:
        return True


def stream_key(seed: int, step: int, index: int) -> int:
    """The 64-bit key of param `index`'s random stream at `step` (its low and high 32 bits
    are the hash keys of `_reference.sr_uniform`)."""
    digest = hashlib.blake2b(f"nto:sr:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniform(seed: int, step: int, index: int, start: int, n: int,
            device: torch.device) -> torch.Tensor:
    """n fp32 numbers in [0, 1) for elements start..start+n-1 of param `index` at `step`:
    a pure function of its arguments (24 random bits each)."""
    return _reference.sr_uniform(stream_key(seed, step, index), start, n, device)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, step: int,
                     index: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 `x` rounded to `dtype` (bf16/fp16) stochastically with param `index`'s stream at
    `step` (`_reference.stochastic_round`, what the kernel does), element j at position j
    or positions[j] of the flattened param. Returns a flat tensor."""
    return _reference.stochastic_round(x, dtype, stream_key(seed, step, index), positions)


MASTER = MasterWeights()
STOCHASTIC = StochasticRounding()
