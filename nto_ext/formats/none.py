"""No moments (`state_dtype="none"`): every update is the first step of a fresh
torch.optim.AdamW state, and nothing but the step count is kept.

Under block or sample with `switch_every=1` and `state_on_switch="drop"` a param trains
one step and its state is dropped: AdamW's moments start at zero, are written once and are
never read (m_hat = g, v_hat = g^2: p -= lr (wd p + g / (|g| + eps)) up to rounding).
This format skips them: `ops.adamw_first_step_` gives the param the bits `masked_adamw_`
gives it on a fresh state, and the training state is the gradient alone (4 B per fp32
element instead of 12), so a byte budget trains 3x the elements. A param drawn in two
consecutive periods, and an `always` unit (in every period), restarts at each step too (the
fp32 format keeps their moments).
`policies.Config` allows it only with switch_every=1; with longer periods the moments
would be read. Per trained param: `step` (a 0-dim float32 host tensor, as AdamW keeps
it), which counts the updates of its period; the kernel always runs AdamW's step 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import ops
from ..checkpoint import Storages, adamw_entry, check_keys, loaded_step
from .fp32 import Fp32Moments


class NoMoments(Fp32Moments):
    name = "none"
    keys = ("step",)
    element_bytes = 0  # no state per element: the gradient is all

    def new_state(self, p: torch.Tensor) -> dict[str, Any]:
        return {"step": torch.tensor(0.0, dtype=torch.float32)}

    def check_entry(self, where: str, st: dict[str, Any], p: torch.Tensor) -> None:
        """Nothing the kernel reads is in the state."""

    def check_loaded(self, where: str, st: dict[str, Any], p: torch.Tensor, seen: Storages,
                     propagate: bool) -> dict[str, Any]:
        check_keys(where, st, self.keys)
        return {"step": seen.claim(f"{where}: step", loaded_step(where, st.get("step")))}

    def from_adamw(self, where: str, st: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """torch AdamW's state of p, checked; its moments are not kept (no update reads
        them)."""
        return {"step": adamw_entry(where, st, p, compact=False)["step"]}

    def _kernel(self, call: Callable[..., Any], indices: list[int], params: list, grads: list,
                states: list[dict[str, Any]], steps: list, **hyper: float) -> None:
        call(ops.adamw_first_step_, indices, params, grads, **hyper)

    def state_bytes(self, numel: int) -> int:
        return 0


NONE = NoMoments()
