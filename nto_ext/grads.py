"""What happens to a step with NaN/Inf gradients (`nonfinite`), and gradient clipping
(`max_grad_norm`), over the active gradients of any policy."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import torch

from . import ops
from .checkpoint import local_tensor

log = logging.getLogger(__name__)

NONFINITE = ("skip", "raise", "propagate")


class GradGuard:
    """nonfinite: "skip" (the step changes nothing and is counted in `skipped_steps`),
    "raise" (FloatingPointError naming the param) or "propagate" (as torch).
    max_grad_norm: clip the active gradients to this total L2 norm (None: no clipping)."""

    def __init__(self, nonfinite: str, max_grad_norm: float | None,
                 in_backward: bool = False) -> None:
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        # step_in_backward: called once per param; a step's norm and skip add up over them
        self.in_backward = in_backward
        self._counted: int | None = None  # the last step counted in skipped_steps
        self._sumsq = (-1, 0.0)  # (step, squared norm so far) under in_backward

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A guard pickled (inside an NTO) before step_in_backward existed lacks its fields."""
        self.__dict__.update(in_backward=False, _counted=None, _sumsq=(-1, 0.0))
        self.__dict__.update(state)

    def found_nonfinite(self, where: str, step: int) -> bool:
        """NaN/Inf found in the gradient of `where`: raise, or count a skipped step and
        return False (skip), or return True (propagate: go on)."""
        if self.nonfinite == "propagate":
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(f"NTO: the gradient of {where} holds NaN or Inf "
                                     "(nonfinite='raise'); params were not updated"
                                     + (" (this one; step_in_backward=True updated those "
                                        "whose gradients came earlier in this backward)"
                                        if self.in_backward else ""))
        if self._counted == step:  # step_in_backward: one param of a step
            return False  # already counted (and logged)
        self._counted = step
        self.skipped_steps += 1
        self.last_grad_norm = float("nan")
        log.warning("NTO: step %d skipped: NaN/Inf in the gradient of %s (%d skipped so far)",
                    step, where, self.skipped_steps)
        return False

    def check(self, entries: list, table: Any, step: int) -> bool:
        """Non-finite check and clipping over `entries` = [(group, param index, param,
        grad)]; False = skip this step. Under FSDP2 (DTensor grads, one shard per rank)
        the squared norm and the count of non-finite shards are summed over the ranks
        first (with local values each rank clipped by its own norm, and a NaN in one shard
        made only that rank skip)."""
        if self.nonfinite == "propagate" and self.max_grad_norm is None:
            return True
        stats = _stats(entries, table)
        sumsq, n_bad, first_bad = 0.0, 0, None
        for ks, sq, absmax in stats:
            bad = (~torch.isfinite(absmax)).nonzero().flatten().tolist()
            if bad and first_bad is None:
                first_bad = entries[ks[bad[0]]][1]
            n_bad += len(bad)
            sumsq += float(sq.sum())
        sumsq, n_bad = _sum_over_shards(entries, [sumsq, float(n_bad)])
        n_bad = int(n_bad)
        if n_bad and self.nonfinite != "propagate":
            where = table.label(first_bad) if first_bad is not None else \
                "a shard on another rank"
            return self.found_nonfinite(where, step)
        if self.in_backward:  # this param's share of the step's norm
            sumsq += self._sumsq[1] if self._sumsq[0] == step else 0.0
            self._sumsq = (step, sumsq)
        norm = math.sqrt(sumsq)
        self.last_grad_norm = norm
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            coef = self.max_grad_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            for ks, _, _ in stats:
                torch._foreach_mul_([local_tensor(entries[k][3]) for k in ks], coef)
        return True


def sq_norms(entries: list, table: Any) -> dict[int, float]:
    """param index -> squared L2 norm of its gradient (summed over FSDP2 shards), for
    `entries` = [(group, param index, param, grad)] (a policy's importance scores)."""
    out = [0.0] * len(entries)
    for ks, sq, _ in _stats(entries, table):
        for k, v in zip(ks, sq.tolist()):
            out[k] = v
    return dict(zip((e[1] for e in entries), _sum_over_shards(entries, out)))


def _stats(entries: list, table: Any) -> list:
    """[(entry numbers, squared norms, absmax)] per device, one fused pass each (no
    histogram: a NaN or inf in a grad makes its absmax non-finite)."""
    by_dev: dict[torch.device, list[int]] = defaultdict(list)
    for k, (_, _, _, g) in enumerate(entries):
        by_dev[g.device].append(k)
    out = []
    for ks in by_dev.values():
        grads = [local_tensor(entries[k][3]).contiguous() for k in ks]
        _, sq, absmax, _ = table.call(ops.param_stats, [entries[k][1] for k in ks], grads,
                                      histogram=False)
        out.append((ks, sq, absmax))
    return out


def _sum_over_shards(entries: list, values: list[float]) -> list[float]:
    """`values` summed over the ranks that hold shards of the grads, when the grads are
    DTensors sharded on a device mesh (FSDP2); unchanged otherwise (DDP grads are
    replicated, one process has nothing to reduce). Over the replicate dims of an HSDP mesh
    the replicas agree after FSDP's all-reduce; the max makes the clip, the skip decision
    and the importance scores the same on every rank even if one replica saw a NaN the
    others did not. Assumes one mesh for all params, as fully_shard with a single mesh
    gives."""
    g = next((e[3] for e in entries if hasattr(e[3], "device_mesh")), None)
    if g is None or not any(pl.is_shard() for pl in g.placements):
        return values
    buf = torch.tensor(values, dtype=torch.float64, device=local_tensor(g).device)
    for d, pl in enumerate(g.placements):
        op = torch.distributed.ReduceOp.SUM if pl.is_shard() else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(buf, op=op, group=g.device_mesh.get_group(d))
    return buf.tolist()
