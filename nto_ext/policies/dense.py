"""The updater of block and sample: every active param holds its gradient and its state in
a state format (`nto_ext.formats`, chosen by the policy per param dtype), updated by one
fused kernel call per (param group, device, dtype).

A param larger than the budget trains a range of its rows at a time (`Unit.rows`): its
gradient is reduced in the post-accumulate-grad hook to the active rows (a compact buffer,
the dense gradient freed at once; the dense one is reported as `transient_bytes`; under
DDP and Trainer at step() instead, after the averaging and clipping that follow the hook), its
state holds those rows' moments and `"rows": [start, stop]`, and the kernel updates the
row view `p[start:stop]` (contiguous for a contiguous param; a strided one goes through
the format's contiguous copy). When the range changes, its state is dropped, or under
state_on_switch="offload" parked on the host in the state's `"parked"` entry
({start: state}) and brought back when the range trains again. The compact buffer is used
up by step(), as the sparse policy's are: the user's `model.zero_grad()` (what Trainer
calls) clears p.grad but cannot reach it, so a buffer kept would add this step's rows into
the next step's gradient.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from .. import persist
from ..args import check_grad, check_hyper, check_param, multi_process
from ..checkpoint import Storages, local_tensor
from ..formats import FP32
from ..grads import sq_norms
from .base import Updater, measure

Rows = tuple[int, int]


class DenseUpdater(Updater):
    def fmt(self, p: torch.Tensor) -> Any:
        return self.policy.state_format(p.dtype)

    def __init__(self, host: Any, policy: Any) -> None:
        super().__init__(host, policy)
        self.compact: dict[int, tuple[Rows, torch.Tensor]] = {}  # param -> its rows' grad
        self.in_backward = policy.cfg.step_in_backward
        self.stepped_at: dict[int, int] = {}  # step_in_backward: param -> step it updated at

    def trained(self) -> frozenset[int]:
        return self.host.active_set

    def trainable_elements(self) -> int:
        infos, rows = self.host.table.infos, self._rows()
        return sum((rows[i][1] - rows[i][0]) * (infos[i].numel // infos[i].shape[0])
                   if i in rows else infos[i].numel for i in self.trained())

    def _rows(self) -> dict[int, Rows]:
        """Params training a range of rows now: param -> (start, stop)."""
        return self.policy.active_rows(self.host.step_count) if self.policy.split else {}

    def _state(self, i: int, rows: Rows | None = None) -> dict[str, Any]:
        p = self.host.table.params[i]
        st = self.host.state[p]
        if not st or (rows is not None and "step" not in st):
            # lazily, like torch: only params that get a gradient have state
            st.update(self.fmt(p).new_state(p if rows is None else _view(p, rows)))
            if rows is not None:
                st["rows"] = list(rows)
        return st

    def init_state(self) -> None:
        rows = self._rows()
        for i in sorted(self.host.active_set):
            self._state(i, rows.get(i))

    # ---------------------------------------------------------------- gradients
    def on_grad(self, i: int, p: torch.Tensor) -> None:
        rows = self._rows().get(i)
        if self.in_backward:
            self._step_in_backward(i, p, rows)
            return
        if rows is None:
            return
        self._refuse_sharded(i, p)
        # Reduced at step() instead when something acts on the dense gradient after this
        # hook: DDP averages it over the ranks, Trainer clips it (torch's clip_grad_norm_
        # over model.parameters() would miss rows already moved to the compact buffer).
        if not (self.host.fold_rows_at_step or multi_process()):
            self._fold(i, p, rows)

    def _refuse_sharded(self, i: int, p: torch.Tensor) -> None:
        if hasattr(p.grad, "device_mesh") or hasattr(p, "device_mesh"):
            raise ValueError(
                f"{self.host.table.label(i)} is larger than the budget and trains a range of "
                "rows at a time, which NTO does not do on FSDP2-sharded (DTensor) params "
                "yet; raise the budget so that every tensor fits whole (`nto plan` names "
                "the split tensors), or use DDP, where split tensors train")

    def _fold(self, i: int, p: torch.Tensor, rows: Rows) -> None:
        """Add the active rows of p.grad to the compact buffer and free p.grad."""
        g = p.grad
        if g is None:
            return
        self._refuse_sharded(i, p)
        with torch.no_grad():
            part = g[rows[0]:rows[1]]
            have = self.compact.get(i)
            if have is None or have[0] != rows:
                buf = torch.empty(part.shape, dtype=part.dtype, device=part.device)
                self.compact[i] = (rows, buf.copy_(part))
            else:  # accumulation: the same additions autograd makes on the dense grad
                have[1].add_(part)
        p.grad = None

    def _step_in_backward(self, i: int, p: torch.Tensor, rows: Rows | None) -> None:
        """step_in_backward: update param i now, with the gradient backward has just
        finished, and free that gradient."""
        host = self.host
        step = host.step_count
        if multi_process():
            raise RuntimeError("step_in_backward=True in a run of more than one process: "
                               "DDP/FSDP would average this gradient after the update; "
                               "allowed: one process")
        if host.guard.max_grad_norm is not None:  # set on the optimizer after construction
            raise RuntimeError(f"max_grad_norm={host.guard.max_grad_norm!r} with "
                               "step_in_backward=True; allowed: None (clipping needs every "
                               "gradient before the first update)")
        if self.stepped_at.get(i) == step:
            p.grad = None  # step() must not apply it either
            raise RuntimeError(
                f"step_in_backward=True: a second backward reached {host.table.label(i)} "
                f"before step() (gradient accumulation, or two losses backpropagated "
                f"separately); each backward updates the params it reaches, so allowed: one "
                f"backward per optimizer step (sum the losses first). This param was updated "
                f"once at step {step}; the gradient of this backward was dropped")
        gi = self._group_of(i)
        _check_group(gi, self.host.param_groups[gi])
        if rows is not None:
            self._fold(i, p, rows)
        entry = self._entry(gi, i, p, rows)
        if entry is None:
            return
        try:
            with torch.no_grad():
                self._update([entry])
        finally:
            p.grad = None
            self.compact.pop(i, None)
        self.stepped_at[i] = step

    def _group_of(self, i: int) -> int:
        end = 0
        for gi, group in enumerate(self.host.param_groups):
            end += len(group["params"])
            if i < end:
                return gi
        raise IndexError(f"param index {i} is past the param groups")  # pragma: no cover

    def grad_tensors(self) -> list[torch.Tensor]:
        return [buf for _, buf in self.compact.values()]

    def transient_bytes(self) -> int:
        """The largest of: the dense gradient of a param training a range of rows (alive
        in backward until its hook reduces it), and the format's step temporaries."""
        params, infos, rows = self.host.table.params, self.host.table.infos, self._rows()
        held = self.host.active_set if self.in_backward else rows  # dense grads in backward
        dense = max((infos[i].numel * infos[i].dtype.itemsize for i in held), default=0)
        fmt = max((self.fmt(params[i]).transient_bytes(infos[i].numel)
                   for i in self.host.active_set), default=0)
        return max(dense, fmt)

    def clear(self) -> None:
        self.compact.clear()

    # ---------------------------------------------------------------- update
    def update(self) -> None:
        self._update(self._active_grads())
        if self.compact:  # used up (module doc); the step's peak holds them
            self.peak = max(self.peak, sum(measure(self.host, self)))
            self.compact.clear()

    def _update(self, entries: list) -> None:
        """The update of `entries` = [(group, param index, param or its rows, grad)]."""
        if not entries or not self.host.guard.check(entries, self.host.table,
                                                    self.host.step_count):
            return
        rows = self._rows()
        batches: dict[tuple, list] = defaultdict(list)
        for gi, i, p, g in entries:
            local = local_tensor(p)
            batches[(gi, local.device, local.dtype)].append((i, local, local_tensor(g), p))
        step = self.host.step_count
        if self.policy.wants_scores(step):  # before the lookahead below (scheduled.py)
            self.policy.observe(step, sq_norms(entries, self.host.table))
        leaving = self.host.active_set - self.policy.active(step + 1)  # their period ends
        for (gi, _, _), items in batches.items():
            states = [self._state(i, rows.get(i)) for i, _, _, _ in items]
            self.fmt(items[0][1]).update(self.host.param_groups[gi], items, states,
                                         self.host.table.call, seed=self.policy.seed,
                                         step=step, leaving=leaving)

    def _active_grads(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(group index, param index, param or its active rows, grad) of every active
        param with a grad, each checked before anything changes (a refused step changes
        nothing)."""
        table, rows = self.host.table, self._rows()
        out = []
        for gi, group in enumerate(self.host.param_groups):
            _check_group(gi, group)
            for p in group["params"]:
                i = table.index[p]
                entry = self._entry(gi, i, p, rows.get(i))
                if entry is not None:
                    out.append(entry)
        return out

    def _entry(self, gi: int, i: int, p: torch.Tensor, rows: Rows | None,
               ) -> tuple[int, int, torch.Tensor, torch.Tensor] | None:
        """(group index, param index, param or its active rows, grad) of param i, checked
        (its group's hyper-parameters apart); None when it has nothing to update."""
        table = self.host.table
        if rows is not None:
            entry = self._rows_entry(i, p, rows)
            return None if entry is None else (gi, i, *entry)
        g = p.grad
        if g is None:
            return None
        if i not in self.host.active_set:  # set by hand after the hook ran, or frozen by
            if table.infos[i].trainable:  # the user: not ours to use (AdamW would)
                p.grad = None
            return None
        check_grad(table.label(i), p, g)
        st = self.host.state.get(p)
        if st:
            self.fmt(p).check_entry(table.label(i), st, p)
        return gi, i, p, g

    def _rows_entry(self, i: int, p: torch.Tensor, rows: Rows,
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row view, compact grad) of a param training `rows`; a dense grad still on the
        param (set by hand after the hook, or left for step(): see on_grad) is reduced
        first."""
        label = self.host.table.label(i)
        if p.grad is not None:
            check_grad(label, p, p.grad)
            self._fold(i, p, rows)
        if i not in self.compact:
            return None
        check_param(label, p)
        view = _view(p, rows)
        st = self.host.state.get(p)
        if st and "step" in st:
            if st.get("rows") != list(rows):
                raise ValueError(f"the state of {label} is for rows {st.get('rows')!r} but "
                                 f"rows {list(rows)} train now (a state edited by hand); "
                                 "nothing was changed")
            self.fmt(p).check_entry(label, st, view)
        return view, self.compact[i][1]

    # ---------------------------------------------------------------- switches
    def advance(self, step: int) -> None:
        """Before the active set changes: a param whose range of rows changes loses its
        compact gradient, and its state is dropped or parked (see the module doc)."""
        if not self.policy.split:
            return
        new = self.policy.active_rows(step)
        # NTO applies the new active set (retiring first, then restoring what is in
        # `offloaded`) only when it differs; otherwise the new range's state comes back here
        applied = self.policy.active(step) != self.host.active_set
        for i in self.policy.split:
            rows = new.get(i)
            if i in self.compact and self.compact[i][0] != rows:
                del self.compact[i]
            if rows is not None:
                self._switch_rows(i, rows, applied)

    def _switch_rows(self, i: int, rows: Rows, applied: bool) -> None:
        host, p = self.host, self.host.table.params[i]
        st = host.state.get(p) or host.offloaded.get(i)
        if not st:
            return
        cur = st.get("rows")
        parked = dict(st.get("parked", {}))
        if cur == list(rows) or (cur is None and rows[0] not in parked):
            return
        host.state.pop(p, None)
        host.offloaded.pop(i, None)
        if host.state_on_switch != "offload":
            return  # dropped, as a whole param's state is when it stops training
        if cur is not None:
            parked[cur[0]] = {k: persist.to_host(v) for k, v in st.items() if k != "parked"}
        entry = {**parked.pop(rows[0], {}), **({"parked": parked} if parked else {})}
        if not entry:
            return
        if applied:
            host.offloaded[i] = entry  # restored by NTO after the old set is retired
        else:
            host.state[p] = {k: persist.to_param_device(k, v, p) for k, v in entry.items()}

    # ---------------------------------------------------------------- persistence
    def check_state(self, i: int, p: torch.Tensor, st: dict[str, Any], seen: Storages,
                    propagate: bool) -> dict[str, Any]:
        where = f"optimizer state for {self.host.table.label(i)}"
        if i not in self.policy.split:
            return self.fmt(p).check_loaded(where, st, p, seen, propagate)
        st = dict(st)
        parked = st.pop("parked", None)
        out = self._check_range(where, i, p, st, seen, propagate) if st else {}
        if parked is None:
            return out
        if not isinstance(parked, dict) or not parked:
            raise ValueError(f"{where}: 'parked' must be a non-empty dict {{row start: "
                             f"state}}, got {type(parked).__name__}")
        out["parked"] = {}
        for start, entry in parked.items():
            w = f"{where}, parked rows from {start!r}"
            if not isinstance(entry, dict):
                raise ValueError(f"{w}: not a dict")
            checked = self._check_range(w, i, p, entry, seen, propagate)
            if checked["rows"][0] != start or checked["rows"] == out.get("rows"):
                raise ValueError(f"{w}: holds rows {checked['rows']} (an edited checkpoint); "
                                 "allowed: the rows its key starts, not the active ones")
            out["parked"][start] = {k: persist.to_host(v) for k, v in checked.items()}
        return out

    def _check_range(self, where: str, i: int, p: torch.Tensor, st: dict[str, Any],
                     seen: Storages, propagate: bool) -> dict[str, Any]:
        """One range's state: `rows` one of the param's ranges, moments of its shape."""
        st = dict(st)
        rows = st.pop("rows", None)
        ranges = self.policy.split[i]
        if not isinstance(rows, (list, tuple)) or tuple(rows) not in ranges:
            shown = ", ".join(f"[{a}, {b}]" for a, b in ranges[:4])
            raise ValueError(f"{where}: 'rows' is {rows!r:.60}; allowed: one of the param's "
                             f"row ranges under this budget ({shown}"
                             f"{', ...' if len(ranges) > 4 else ''})")
        view = _view(p, tuple(rows))
        return {**self.fmt(p).check_loaded(where, st, view, seen, propagate),
                "rows": list(rows)}

    def check_loaded(self, new_state: dict[torch.Tensor, dict[str, Any]], step: int) -> None:
        """An active param training a range of rows has that range's state, if any."""
        if not self.policy.split:
            return
        rows = self.policy.active_rows(step)
        for p, st in new_state.items():
            i = self.host.table.index[p]
            if "rows" in st and st["rows"] != list(rows.get(i, ())):
                raise ValueError(f"optimizer state for {self.host.table.label(i)} holds rows "
                                 f"{st['rows']} but rows {list(rows.get(i, ()))} train at "
                                 f"step {step} (a foreign or edited checkpoint); nothing was "
                                 "loaded")

    def import_entry(self, where: str, st: dict[str, Any],
                     p: torch.Tensor) -> dict[str, Any] | None:
        i = self.host.table.index[p]
        if i not in self.policy.split:
            return self.fmt(p).from_adamw(where, st, p)
        full = FP32.from_adamw(where, st, p)  # checked; each range converted on its own
        cursor = self.policy.state_dict()
        first = self.policy.active_rows(0).get(i)  # an imported state starts at step 0
        self.policy.load_state_dict(cursor)

        def piece(rows: Rows) -> dict[str, Any]:
            part = {k: (v if k == "step" else v[rows[0]:rows[1]]).clone()
                    for k, v in full.items()}
            return {**self.fmt(p).from_adamw(where, part, _view(p, rows)), "rows": list(rows)}

        out = piece(first) if first is not None else {}
        if self.host.state_on_switch == "offload":
            parked = {r[0]: piece(r) for r in self.policy.split[i] if r != first}
            if parked:
                out["parked"] = parked
        return out or None


def _check_group(gi: int, group: dict[str, Any]) -> None:
    check_hyper(f"param group {gi}: ", group["lr"], group["betas"], group["eps"],
                group["weight_decay"])


def _view(p: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Rows [start, stop) of p: a view (contiguous when p is)."""
    return p.detach()[rows[0]:rows[1]]
