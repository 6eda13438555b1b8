"""fp32 moments: torch.optim.AdamW's state layout, with the moments always in fp32.

Per trained param: `exp_avg` and `exp_avg_sq` (fp32, the param's shape, next to it) and
`step` (a 0-dim float32 tensor on the host, as AdamW keeps it): 8 B per element and 4 B
per tensor. One fused `ops.masked_adamw_` call updates a batch of params of one group,
device and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import ops
from ..checkpoint import (
    Storages,
    adamw_entry,
    check_keys,
    check_moment,
    check_values,
    loaded_step,
    local_tensor,
)

MOMENTS = ("exp_avg", "exp_avg_sq")


class Fp32Moments:
    name = "fp32"
    keys = ("step", *MOMENTS)
    moment_dtype = torch.float32
    element_bytes: float = 8  # two fp32 moments per element
    step_bytes = 4  # one fp32 `step` scalar per tensor
    tensor_bytes = 0  # per tensor beyond element_bytes per element and the step (worst case)

    def transient_bytes(self, numel: int) -> int:
        """Largest temporary of an update whose largest tensor has `numel` elements."""
        return 0

    def new_state(self, p: torch.Tensor) -> dict[str, Any]:
        local = local_tensor(p)
        return {"step": torch.tensor(0.0, dtype=torch.float32),
                **{k: torch.zeros(local.shape, dtype=self.moment_dtype, device=local.device)
                   for k in MOMENTS}}

    def check_entry(self, where: str, st: dict[str, Any], p: torch.Tensor) -> None:
        """Before an update: the moments fit the param (a state edited by hand)."""
        local = local_tensor(p)
        for key in MOMENTS:
            v = local_tensor(st[key])
            if v.shape != local.shape or v.device != local.device \
                    or v.dtype != self.moment_dtype:
                raise ValueError(f"the {key} of {where} is a {v.dtype} tensor of shape "
                                 f"{tuple(v.shape)} on {v.device}; expected {self.moment_dtype} "
                                 f"of the param's shape {tuple(local.shape)} on "
                                 f"{local.device}; nothing was changed")

    def check_loaded(self, where: str, st: dict[str, Any], p: torch.Tensor, seen: Storages,
                     propagate: bool) -> dict[str, Any]:
        """A loaded state as it will be kept: keys, dtypes, shapes, finite values (unless
        `propagate`), exp_avg_sq >= 0, `step` a float32 tensor, no aliasing."""
        check_keys(where, st, self.keys)
        for key in MOMENTS:
            check_moment(where, key, st.get(key), local_tensor(p).shape, self.moment_dtype)
        out = {k: (loaded_step(where, v) if k == "step" else v) for k, v in st.items()}
        out = {k: seen.claim(f"{where}: {k}", v) if isinstance(v, torch.Tensor) else v
               for k, v in out.items()}
        for key in MOMENTS:
            check_values(where, key, out[key], propagate)
        return out

    def from_adamw(self, where: str, st: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        return adamw_entry(where, st, p, compact=False)

    def update(self, group: dict[str, Any], items: list, states: list[dict[str, Any]],
               call: Callable[..., Any], *, seed: int = 0, step: int = 0,
               leaving: frozenset[int] = frozenset()) -> None:
        """One fused kernel call over `items` = [(index, local param, local grad, param)]
        of one group, device and dtype. Strided params (transposed views, channels_last)
        go through contiguous copies, written back. `call(op, indices, *args)` runs an op
        so that its errors name the params. `seed`, `step` and `leaving` (the params
        whose period ends with this step) are for the formats of formats/master.py."""
        params = [t if t.is_contiguous() else t.contiguous() for _, t, _, _ in items]
        grads = [g if g.is_contiguous() else g.contiguous() for _, _, g, _ in items]
        steps = [st["step"] for st in states]
        beta1, beta2 = group["betas"]
        maximize = group.get("maximize", False)
        if maximize:  # AdamW's maximize: descend on -grad (negated in place, then back)
            torch._foreach_neg_(grads)
        try:
            self._kernel(call, [i for i, _, _, _ in items], params, grads, states,
                         [s + 1 for s in steps], lr=float(group["lr"]), beta1=float(beta1),
                         beta2=float(beta2), eps=float(group["eps"]),
                         weight_decay=float(group["weight_decay"]))
        finally:
            if maximize:
                torch._foreach_neg_(grads)
        torch._foreach_add_(steps, 1.0)  # counted once the kernel has run
        for (_, t, _, _), staged in zip(items, params):
            if staged is not t:
                t.copy_(staged)

    def _kernel(self, call: Callable[..., Any], indices: list[int], params: list, grads: list,
                states: list[dict[str, Any]], steps: list, **hyper: float) -> None:
        """The fused update of contiguous params and grads (steps: the counts after it)."""
        call(ops.masked_adamw_, indices, params, grads, [st["exp_avg"] for st in states],
             [st["exp_avg_sq"] for st in states], [None] * len(params), steps, **hyper)

    def state_bytes(self, numel: int) -> int:
        """Device bytes of the state of `numel` elements (the `step` scalar apart)."""
        return self.element_bytes * numel


FP32 = Fp32Moments()
