"""The updater of block and sample: every active param holds its whole gradient and its
state in a state format (`nto_ext.formats`, chosen by the policy per param dtype), updated
by one fused kernel call per (param group, device, dtype)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from ..args import check_grad, check_hyper
from ..checkpoint import Storages, local_tensor
from .base import Updater


class DenseUpdater(Updater):
    def fmt(self, p: torch.Tensor) -> Any:
        return self.policy.state_format(p.dtype)

    def trained(self) -> frozenset[int]:
        return self.host.active_set

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.host.state[p]
        if not st:  # lazily, like torch: only params that get a gradient have state
            st.update(self.fmt(p).new_state(p))
        return st

    def init_state(self) -> None:
        params = self.host.table.params
        for i in sorted(self.host.active_set):
            self._state(params[i])

    def update(self) -> None:
        entries = self._active_grads()
        if not entries or not self.host.guard.check(entries, self.host.table,
                                                    self.host.step_count):
            return
        batches: dict[tuple, list] = defaultdict(list)
        for gi, i, p, g in entries:
            local = local_tensor(p)
            batches[(gi, local.device, local.dtype)].append((i, local, local_tensor(g), p))
        step = self.host.step_count
        leaving = self.host.active_set - self.policy.active(step + 1)  # their period ends
        for (gi, _, _), items in batches.items():
            states = [self._state(p) for _, _, _, p in items]
            self.fmt(items[0][1]).update(self.host.param_groups[gi], items, states,
                                         self.host.table.call, seed=self.policy.seed,
                                         step=step, leaving=leaving)

    def _active_grads(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(group index, param index, param, grad) of every active param with a grad,
        each checked before anything changes (a refused step changes nothing)."""
        table, active = self.host.table, self.host.active_set
        out = []
        for gi, group in enumerate(self.host.param_groups):
            check_hyper(f"param group {gi}: ", group["lr"], group["betas"], group["eps"],
                        group["weight_decay"])
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                i = table.index[p]
                if i not in active:  # set by hand after the hook ran, or frozen by the
                    if table.infos[i].trainable:  # user: not ours to use (AdamW would)
                        p.grad = None
                    continue
                check_grad(table.label(i), p, g)
                st = self.host.state.get(p)
                if st:
                    self.fmt(p).check_entry(table.label(i), st, p)
                out.append((gi, i, p, g))
        return out

    def check_state(self, i: int, p: torch.Tensor, st: dict[str, Any], seen: Storages,
                    propagate: bool) -> dict[str, Any]:
        where = f"optimizer state for {self.host.table.label(i)}"
        return self.fmt(p).check_loaded(where, st, p, seen, propagate)

    def import_entry(self, where: str, st: dict[str, Any],
                     p: torch.Tensor) -> dict[str, Any] | None:
        return self.fmt(p).from_adamw(where, st, p)

    def transient_bytes(self) -> int:
        params, infos = self.host.table.params, self.host.table.infos
        return max((self.fmt(params[i]).transient_bytes(infos[i].numel)
                    for i in self.host.active_set), default=0)
