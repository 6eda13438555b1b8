"""class NTO: AdamW under a hard training-state memory budget.

`NTO` owns every parameter it is given, asks its policy (`nto_ext.policies`) which train at
each step, applies that set (requires_grad, .grad, state) and lets the policy's updater
update them, never asking which policy it has (all that differs is behind Policy/Updater).

Lifecycle (DESIGN.md, "The user-facing contract"): `__init__` validates everything, plans
the schedule and installs hooks that drop inactive gradients as they are produced, never
touching `requires_grad` (Trainer / DDP / FSDP wrap the model after the optimizer exists).
The first `step()` or `train()`, and every switch, apply the active set: inactive params
get `requires_grad=False`, `.grad=None`, and their state dropped or offloaded to the host
(`state_on_switch`). `state` and `param_groups` keep torch's layout (LR schedulers work).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from . import persist
from .args import (
    check_added_group,
    check_contiguous,
    check_global,
    check_grad_layout,
    check_hyper,
    check_knobs,
    check_step_in_backward,
    check_trainable,
    normalize_groups,
    plain_number,
)
from .auto import AutoBudget, check_auto_args, is_auto, make_auto
from .blocks import ParamInfo
from .budget import Budget, parse_budget, state_bytes, storage_bytes
from .grads import GradGuard
from .ownership import ParamHandles, grad_hook, register_hook, switch, user_flag
from .params import ParamTable
from .policies import DEFAULT_POLICY, Policy, configure, policy_class
from .policies.base import host_bytes, measure

log = logging.getLogger(__name__)

# The anchor (kept requiring grad in every period) is the smallest of the first params
# whose gradient arrives in the first backward: those nearest the loss.
_ANCHOR_CANDIDATES = 3


def _guarded(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.guard, name),
                    lambda self, v: setattr(self.guard, name, v), doc=doc)


class NTO(torch.optim.Optimizer):
    """AdamW that keeps gradients and moments only for what trains now, within `budget`.

    Args:
        params: tensors, `(name, tensor)` pairs (`model.named_parameters()`; names drive
            block discovery) or param-group dicts with per-group `lr`, `betas`, `eps`,
            `weight_decay`.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW` (decoupled weight decay).
        budget: int = trainable elements; float in (0, 1] or "N%" = share of all elements;
            byte string ("512MiB", "2GB", "1.5GiB") = device bytes of gradient + state per
            the policy's memory model. "100%" is AdamW. "auto": the largest budget whose
            measured peak fits `memory` (or the device's free memory), with activations
            measured on the first batch (`nto_ext.auto`).
        policy: a name in `nto_ext.policies.POLICIES` (README "Policies"): groups of
            consecutive blocks taking turns (the default), blocks drawn at random each
            period, or individual elements anywhere chosen by gradient score.
        switch_every: optimizer steps between changes of the active set (>= 1).
        seed: seeds every random choice (counter-based: identical on all ranks).
        order, always, sample_layers, regrow_fraction: policy arguments (each policy's
            `Config`; one a policy does not take must keep its default): the order units
            take turns in (block: "ascending" (None), "descending", "random"; sample:
            "random" (None); both: "importance", more steps where the gradient is large),
            blocks trained in every period (e.g. ("embed", "head")), units drawn per period
            (LISA), share of the chosen elements regrown every `switch_every` steps.
        state_on_switch: "drop" (freed when a param stops training) or "offload" (to the host).
        nonfinite: "skip" (a step with NaN/Inf in an active grad changes nothing and is
            counted in `skipped_steps`), "raise" (FloatingPointError naming the param) or
            "propagate" (as torch).
        max_grad_norm: clip the active gradients to this total L2 norm (None: no clipping).
            Compact gradients (sparse; rows of a tensor larger than the budget) free the
            dense ones in backward, unseen by `clip_grad_norm_`: pass it here.
        memory: with budget="auto" only: the memory to fit ("20GiB", or an int of bytes).
        master_weights, stochastic_rounding, state_dtype: bf16/fp16 params' fp32 masters (None:
            default) or stochastic rounding; the moments' "fp32", "int8", "int4" (block,
            sample) or "bf16"
            (nto_ext/formats).
        step_in_backward: block and sample: update each active param in its gradient hook,
            as soon as backward has produced its gradient, and free the gradient there
            (PyTorch's "optimizer step in backward"; LOMO). The training state is then the
            moments alone (the gradient is a transient, one tensor at a time), so a byte
            budget holds more elements. `step()` advances the schedule. Needs one backward
            per step (a second backward before step(), i.e. gradient accumulation, raises),
            one process (DDP/FSDP average the gradients after the hook), no clipping
            (max_grad_norm needs every gradient first) and no budget="auto"; under
            nonfinite="skip" a param with NaN/Inf in its gradient keeps its value while the
            params updated before it in that backward keep their update.
        maximize: as torch.optim.AdamW (per group too). `foreach`, `fused` (None/True/False)
            and `amsgrad`, `capturable`, `differentiable` (False only) are accepted so code
            written for AdamW runs unchanged; NTO always runs its own fused kernel.

    Params with requires_grad=False when NTO is built are frozen: never trained or counted.
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, budget: int | float | str = "10%",
                 policy: str = DEFAULT_POLICY, switch_every: int = 50,
                 order: str | None = None, seed: int = 0, state_on_switch: str = "drop",
                 nonfinite: str = "skip", always: Sequence[str] = (),
                 max_grad_norm: float | None = None, sample_layers: int | None = None,
                 regrow_fraction: float | None = None, *, memory: int | str | None = None,
                 master_weights: bool | None = None, stochastic_rounding: bool = False,
                 state_dtype: str = "fp32", step_in_backward: bool = False,
                 maximize: bool = False, amsgrad: bool = False,
                 foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        lr, eps, weight_decay = (plain_number(v) for v in (lr, eps, weight_decay))
        if isinstance(betas, (tuple, list)):
            betas = tuple(plain_number(b) for b in betas)  # type: ignore[assignment]
        budget = plain_number(budget)  # type: ignore[assignment]
        check_hyper("", lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "maximize": maximize, "amsgrad": amsgrad, "foreach": foreach,
                    "fused": fused, "capturable": capturable, "differentiable": differentiable}
        check_knobs("", defaults)
        cls = policy_class(policy)
        cfg = configure(policy, switch_every=switch_every, order=order, seed=seed,
                        always=always, sample_layers=sample_layers,
                        regrow_fraction=regrow_fraction, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding, state_dtype=state_dtype,
                        step_in_backward=step_in_backward)
        check_global(budget, state_on_switch, nonfinite, max_grad_norm, cls, cfg.state_dtype)
        check_auto_args(budget, memory)
        if step_in_backward:
            check_step_in_backward(is_auto(budget), max_grad_norm)
        groups = normalize_groups(params)
        for k, g in enumerate(groups):
            check_hyper(f"param group {k}: ", g.get("lr", lr), g.get("betas", betas),
                        g.get("eps", eps), g.get("weight_decay", weight_decay))
        check_contiguous(cls, groups)
        auto = make_auto(budget, memory, [p for g in groups for p in g["params"]])
        self._args = {"budget": auto or budget, "policy": policy, "config": cfg}
        infos = [ParamInfo(g["param_names"][j] if "param_names" in g else None,
                           tuple(p.shape), p.dtype, user_flag(p))
                 for g in groups for j, p in enumerate(g["params"])]
        self.budget, self.policy = self._plan(infos)
        # Everything is valid: from here on the optimizer is built and params are owned.
        self._constructing = True
        super().__init__(groups, defaults)
        self._constructing = False
        self.state_on_switch = state_on_switch
        self.guard = GradGuard(nonfinite, max_grad_norm, step_in_backward)
        self._step = 0
        self.offloaded: dict[int, dict[str, Any]] = {}
        self._attach(infos, [i.trainable for i in infos])
        msg = self.policy.too_big_message()
        if msg and auto is None:  # auto warns at its measured plan
            warnings.warn(f"NTO: {msg}", UserWarning, stacklevel=2)
        log.info("NTO: %s policy, budget %s, %d of %d tensors trainable, first active: %s",
                 policy, self.budget.describe(), len(self.policy.trainable), len(infos),
                 ", ".join(self.policy.active_names(0))[:200])

    def _plan(self, infos: list[ParamInfo]) -> tuple[Budget, Policy]:
        """Budget and policy over `infos` (the budget's shares count trainable elements)."""
        total = check_trainable(infos)
        given, cls, cfg = self._args["budget"], policy_class(self._args["policy"]), \
            self._args["config"]
        if isinstance(given, AutoBudget):
            return given.plan(infos, cls.name, lambda b: cls(infos, b, cfg))
        budget = parse_budget(given, total)
        return budget, cls(infos, budget, cfg)

    def _attach(self, infos: list[ParamInfo], flags: list[bool]) -> None:
        """Runtime wiring over param_groups: the param table, updater, hooks, ownership
        (after __init__'s checks, and again after unpickling / deepcopy / a re-plan)."""
        self.table = ParamTable([p for g in self.param_groups for p in g["params"]], infos)
        self.updater = self.policy.updater(self, self.policy)
        self._peak_bytes = 0
        self._active = self.policy.active(self._step)
        self._applied = False
        self._fired: list[int] = []  # first params whose gradient came in the first backward
        self._anchor: int | None = None
        owned = self.table.trainable()
        self._handles = ParamHandles([self.table.params[i] for i in owned],
                                     [flags[i] for i in owned])
        self._hook_params()
        weakref.finalize(self, self._handles.release).atexit = False

    # ------------------------------------------------------------------ public state
    @property
    def step_count(self) -> int:
        """Optimizer steps taken (the schedule position), skipped steps included."""
        return self._step

    @property
    def active_set(self) -> frozenset[int]:
        """Indices (param_groups order) of the params that need a gradient now."""
        return self._active

    @property
    def anchor(self) -> int | None:
        """Index of the param kept requiring grad in every period (None: not chosen yet)."""
        return self._anchor

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by torch.amp.GradScaler after backward. True only while NTO holds gradients
        the scaler cannot reach (used or reduced in backward, off p.grad): the scaler then
        calls step() directly instead of its unscale_ and inf check, and step() refuses by
        name. Otherwise False: the scaler unscales p.grad itself and skips step() on an
        overflow, as for torch's AdamW (Lightning still lets you clip)."""
        return self.guard.in_backward or bool(self.updater.grad_tensors())

    extra_reports: dict[str, Callable[[], Any]] = {}  # name -> measure, set per instance
    fold_rows_at_step = False  # True: split tensors' dense grads wait for step (dense.py)
    # the GradGuard's settings and counters, as attributes of the optimizer
    skipped_steps = _guarded("skipped_steps", "Steps skipped for NaN/Inf gradients.")
    last_grad_norm = _guarded("last_grad_norm", "L2 norm of the last step's active grads.")
    nonfinite = _guarded("nonfinite", "'skip', 'raise' or 'propagate' (see NTO).")
    max_grad_norm = _guarded("max_grad_norm", "Clip norm of the active grads, or None.")

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """What deepcopy / pickle need to rebuild a working NTO over the copied params."""
        return {"defaults": self.defaults, "state": self.state,
                "param_groups": self.param_groups,
                "_nto": {"args": self._args, "state_on_switch": self.state_on_switch,
                         "guard": self.guard, "infos": self.table.infos,
                         "flags": self._user_flags(), "step": self._step,
                         "offloaded": self.offloaded, "anchor": self._anchor,
                         "policy_state": persist.policy_state(self)}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        nto = state.pop("_nto", None)
        super().__setstate__(state)
        if nto is None:  # torch's own pickled layout: nothing to rebuild from
            raise ValueError("NTO cannot be unpickled from a torch.optim state without its "
                             "'_nto' entry; build NTO(...) and use load_state_dict")
        self._args, self.state_on_switch = nto["args"], nto["state_on_switch"]
        self.guard, self._step, self.offloaded = nto["guard"], nto["step"], nto["offloaded"]
        self.guard.last_grad_norm = None
        self.budget, self.policy = self._plan(nto["infos"])
        self.policy.load_state_dict(nto["policy_state"])
        self._attach(nto["infos"], nto["flags"])
        self._anchor = nto["anchor"]

    def _user_flags(self) -> list[bool]:
        """requires_grad as the user set it, per param (frozen ones: False)."""
        flags = [False] * len(self.table.params)
        for p, f in zip(self._handles.params, self._handles.flags):
            flags[self.table.index[p]] = f
        return flags

    # ------------------------------------------------------------------ torch API
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch: the new params join the schedule, the budget (a share budget counts
        them too) and the state from the next step()."""
        if getattr(self, "_constructing", False):
            super().add_param_group(param_group)
            return
        self._check_usable()
        group = check_added_group(self.param_groups, self.defaults, self.table, param_group)
        check_contiguous(type(self.policy), [group])
        names = group.get("param_names")
        new = [ParamInfo(names[j] if names else None, tuple(p.shape), p.dtype, user_flag(p))
               for j, p in enumerate(group["params"])]
        infos = self.table.infos
        budget, policy = self._plan(infos + new)  # may refuse: nothing changed yet
        flags = self._user_flags() + [i.trainable for i in new]
        self._constructing = True
        try:
            super().add_param_group(group)
        finally:
            self._constructing = False
        self._replace_plan(budget, policy, infos + new, flags)
        log.info("NTO: a param group of %d params joined the plan (budget %s)",
                 len(new), budget.describe())

    def _replace_plan(self, budget: Budget, policy: Policy, infos: list[ParamInfo],
                      flags: list[bool]) -> None:
        """Switch to a new plan over the params now in param_groups; the active set is
        applied at the next step() (state of params that keep training carries over)."""
        self._handles.release()
        policy.take_over(self.policy)
        self.budget, self.policy = budget, policy
        anchor = self._anchor
        self._attach(infos, flags)
        self._anchor = anchor

    def train(self) -> None:
        """Apply the active set now (as the first `step()` would); for Trainer and
        schedule-free style loops."""
        self._check_usable()
        self._sync_params()
        self._ensure_applied()

    def eval(self) -> None:
        """Nothing to do: NTO keeps no separate evaluation weights."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW update of the active params, then advance the schedule. A step refused
        with an error changes nothing: fix the cause and step again."""
        # torch's get/set_optimizer_state_dict take a zero-grad step on an empty state
        # before they call state_dict(): refuse there, before the schedule moves
        persist.refuse_torch_dsd("step")
        self._check_usable()
        if hasattr(self, "found_inf"):  # set by a GradScaler: see _step_supports_amp_scaling
            self._refuse_grad_scaler()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_params()
        self._follow_dtypes()
        self._choose_anchor()
        auto = self._auto()  # measures the forward/backward just run; re-plans if needed
        if auto and auto.measure(sum(measure(self, self.updater)), self._anchor is not None):
            self._replace_plan(*self._plan(self.table.infos), self.table.infos,
                               self._user_flags())
        self._ensure_applied()
        with torch.no_grad():
            self.updater.update()
        self._peak_bytes = max(self._peak_bytes, sum(measure(self, self.updater)))
        self._advance()
        if auto:  # the next forward/backward is measured from here
            auto.restart(sum(measure(self, self.updater)))
        return loss

    def _refuse_grad_scaler(self) -> None:
        """A torch.amp.GradScaler cannot have checked or unscaled the gradients NTO used or
        reduced in backward: refused before step() changes anything (under
        step_in_backward, backward has already updated the params: the message says so)."""
        if self.guard.in_backward:
            where = ("step_in_backward=True already updated the params in this backward, with "
                     "gradients the scaler had not checked or unscaled (that update stands: "
                     "resume from your last checkpoint)")
        else:
            rows = [n for n in self.active_blocks() if n.endswith("]")]  # "emb.weight[0:64]"
            held = (f"the rows of {', '.join(rows)[:200]} (larger than the budget)" if rows
                    else f"policy={self.policy.name!r}'s compact gradients")
            where = (f"NTO reduced gradients in backward ({held}), off p.grad, where the "
                     "scaler cannot check or unscale them; nothing was changed")
        raise ValueError(f"a torch.amp.GradScaler (fp16) drives this step, but {where}. "
                         "Allowed: bf16 autocast (no scaler), or a "
                         "GradScaler with policy 'block' or 'sample', step_in_backward=False "
                         "and a budget at which every tensor fits whole (`nto plan` names the "
                         "split ones), or Trainer(fp16=True), which keeps split tensors' "
                         "gradients until step()")

    def _auto(self) -> AutoBudget | None:
        return self._args["budget"] if isinstance(self._args["budget"], AutoBudget) else None

    def _check_usable(self) -> None:
        if self._handles.released:
            raise RuntimeError("this NTO is detached from its params (remove_hooks() was "
                               "called, or a newer NTO was built over the same params); "
                               "build a new NTO to train them")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch; gradient buffers the policy keeps itself go too."""
        self.updater.clear()
        super().zero_grad(set_to_none)

    def init_state(self) -> None:
        """Create the (zero) state of every active param now instead of at its first
        update; the numbers are the same either way. For tools that need a non-empty
        `state` before training (torch.distributed.checkpoint otherwise runs a step with
        zero gradients, which would advance NTO's schedule)."""
        self._sync_params()
        self.updater.init_state()

    # ------------------------------------------------------------------ reporting
    def active(self) -> list[str] | list[int]:
        """Names of the params that train now (indices when params were given unnamed)."""
        idx = sorted(self.updater.trained())
        if any("param_names" in g for g in self.param_groups):
            return [self.table.infos[i].name for i in idx]  # type: ignore[misc]
        return idx

    def active_blocks(self) -> list[str]:
        """Names of the blocks (or split tensors) that train now."""
        return self.policy.active_names(self._step)

    def memory_report(self) -> dict[str, Any]:
        """Training-state memory measured from real storage, in bytes (each storage once):
        grad_bytes (params' .grad and the policy's gradient buffers), state_bytes, index_bytes,
        total_bytes (their sum: the budgeted training state now), peak_total_bytes (the
        largest total inside step(), after the update and before a switch frees anything),
        offload_bytes (host copies, parked row ranges too), transient_bytes (temporary
        buffers outside the total), and what `extra_reports` measures
        (distributed.track_ddp: ddp_bucket_bytes)."""
        self._sync_params()
        grad_b, state_b, index_b = measure(self, self.updater)
        total = grad_b + state_b + index_b
        infos = self.table.infos
        return {
            "grad_bytes": grad_b, "state_bytes": state_b, "index_bytes": index_b,
            "offload_bytes": host_bytes(self),
            "transient_bytes": self.updater.transient_bytes(), "total_bytes": total,
            "peak_total_bytes": max(self._peak_bytes, total, self.updater.peak),
            "budget_bytes": self.budget_bytes(), "budget_elements": self.budget_elements(),
            "trainable_elements": self.updater.trainable_elements(),
            "trainable_tensors": len(self.updater.trained()),
            "skipped_steps": self.skipped_steps, "step": self._step,
            "weights_bytes": storage_bytes(self.table.params),
            "adamw_bytes": sum(state_bytes("adamw", i.numel, i.dtype) for i in infos
                               if i.trainable),
            "policy": self.policy.name, "budget": self.budget.text,
            **({"budget_auto": auto.report()} if (auto := self._auto()) else {}),
            **{k: f() for k, f in self.extra_reports.items()}}

    def reset_peak(self) -> None:
        """Forget the peak measured so far (memory_report()["peak_total_bytes"])."""
        self._peak_bytes = 0
        self.updater.peak = 0

    def budget_bytes(self) -> int:
        """The budget in device bytes of gradient + state (the policy's memory model)."""
        return self.policy.budget_bytes()

    def budget_elements(self) -> int:
        """The budget in elements (byte budgets: bytes / smallest bytes per element)."""
        return self.policy.budget_elements()

    # ------------------------------------------------------------------ hooks
    def _on_grad(self, index: int, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: drop the gradient of an inactive param at once."""
        if index >= len(self.table.params) or self.table.params[index] is not p:
            return  # a copied param (deepcopy copies hooks): not one of ours
        if len(self._fired) < _ANCHOR_CANDIDATES and self._anchor is None:
            self._fired.append(index)
        if index not in self._active:
            p.grad = None
            return
        if p.grad is not None:
            check_grad_layout(self.table.label(index), p.grad)
        self.updater.on_grad(index, p)

    def remove_hooks(self) -> None:
        """Detach NTO from the params: remove its gradient hooks and give each param the
        requires_grad it had when NTO was built. Done automatically when the optimizer is
        garbage-collected or a newer NTO is built over the same params; call it yourself
        when something else (an LR scheduler, Trainer) still holds this NTO and you want
        the model back now. Stepping this optimizer afterwards raises."""
        self._handles.release()

    def _hook_params(self) -> None:
        """NTO's post-accumulate-grad hook on every trainable param (weak reference to
        self, so the hooks never keep NTO alive)."""
        ref = weakref.ref(self)
        self._handles.hooks = [register_hook(self.table.params[i], grad_hook(ref, i))
                               for i in self.table.trainable()]

    # ------------------------------------------------------------------ replaced params
    def _sync_params(self) -> None:
        """Follow params that were replaced in `param_groups` after construction (issue 6:
        accelerate's FSDP2 prepare, `Accelerator.prepare(model, opt)`, swaps every param for
        its sharded DTensor): re-index them, move their state and hooks over, and apply the
        active set to them at the next train()/step(). DESIGN.md: NTO finds params only
        through param_groups."""
        now = [p for g in self.param_groups for p in g["params"]]
        if not self.table.check_replaced(now):
            return
        self._handles.remove_hooks()
        index = self.table.index
        self.state = defaultdict(dict, {(now[index[p]] if p in index else p): st
                                        for p, st in self.state.items()})
        self.table.reindex(now)
        self._handles.follow([now[i] for i in self.table.trainable()])
        self._hook_params()
        self._applied = False
        log.info("NTO: %d params were replaced in param_groups (e.g. sharded); following them",
                 len(now))

    def _follow_dtypes(self) -> None:
        """A param whose dtype changed since the plan (`model.to(torch.float32)`) changes
        its bytes per element: re-plan so a byte budget still holds. A changed shape is
        refused (its state no longer fits): nothing is changed."""
        changed = self.table.changed_dtypes()
        if not changed:
            return
        params = self.table.params
        infos = [dataclasses.replace(info, dtype=params[i].dtype) if i in changed else info
                 for i, info in enumerate(self.table.infos)]
        budget, policy = self._plan(infos)
        log.info("NTO: %d params changed dtype (e.g. %s is now %s); re-planned the budget",
                 len(changed), self.table.label(changed[0]), params[changed[0]].dtype)
        self._replace_plan(budget, policy, infos, self._user_flags())

    # ------------------------------------------------------------------ the active set
    def _choose_anchor(self) -> None:
        """After the first backward, keep one cheap used param requiring grad in every
        period: the smallest of the first params whose gradient arrived (nearest the loss).
        Then a period whose active params are all unused in forward (a pooler under mean
        pooling, an unrouted expert) leaves the loss something to differentiate, and the
        user's backward never fails where AdamW's would run (issue 16). Its gradient is
        dropped in the hook like any inactive one."""
        if self._anchor is None and self._fired:
            self._anchor = min(self._fired, key=lambda i: self.table.infos[i].numel)
            self._applied = False

    def _ensure_applied(self) -> None:
        if not self._applied:
            self._apply_active()
            self._applied = True

    def _apply_active(self) -> None:
        """Make params, grads and state agree with `self._active`: inactive params lose
        requires_grad, grad and (device) state; active params regain them. Retiring runs
        first, so offloaded state comes back only after the old set's grads and state are
        gone: the device peak of a switch stays within the budget (issue 10). Before the
        first backward (no anchor known yet) nothing is frozen: the hooks drop the inactive
        gradients as they come."""
        owned = self.table.trainable()
        for i in owned:
            p = self.table.params[i]
            if i not in self._active:
                if i == self._anchor:
                    if not p.requires_grad:
                        switch(p, True)
                elif p.requires_grad and self._anchor is not None:
                    switch(p, False)
                p.grad = None
                if p in self.state:
                    st = self.state.pop(p)
                    if self.state_on_switch == "offload":
                        self.offloaded[i] = {k: persist.to_host(v) for k, v in st.items()}
        for i in owned:
            p = self.table.params[i]
            if i in self._active:
                if not p.requires_grad:
                    switch(p, True)
                if i in self.offloaded:
                    self._restore(i, p)

    def _restore(self, i: int, p: torch.Tensor) -> None:
        """Offloaded state back next to its param (a point the budget tests watch)."""
        st = self.offloaded.pop(i)
        self.state[p] = {k: persist.to_param_device(k, v, p) for k, v in st.items()}

    def _advance(self) -> None:
        self._step += 1
        self.updater.advance(self._step)
        new = self.policy.active(self._step)
        if new != self._active:
            log.debug("NTO: step %d switches to %s", self._step,
                      ", ".join(self.policy.active_names(self._step))[:200])
            self._active = new
            self._apply_active()
            self._applied = True

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """torch's layout ({"state": {index: {...}}, "param_groups": [...]}) plus "nto":
        the schedule position, counters, active set, config and layout (shapes, dtypes,
        names); see `nto_ext.persist`. Loadable with torch.load(weights_only=True)."""
        persist.refuse_torch_dsd("state_dict")
        self._sync_params()
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = persist.pack(self)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from `state_dict()`, or import one of torch.optim.AdamW / Adam
        (no "nto" entry). Params are matched by name when both sides have names, else by
        position; shapes and dtypes must match. Every tensor and count is validated before
        anything is replaced; keeps the saved dtypes (fp32 moments of a bf16 param stay
        fp32). Refuses, with ValueError and without changing anything, a state from
        another optimizer, policy, configuration or parameter layout, and corrupted or
        crafted values (non-finite moments unless nonfinite="propagate", negative
        exp_avg_sq, aliasing tensors, extra per-param entries, bad counts)."""
        persist.refuse_torch_dsd("load_state_dict")
        sd = dict(state_dict) if isinstance(state_dict, dict) else state_dict
        self._sync_params()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        loaded = persist.read(self, sd)
        # Commit: nothing below can fail.
        self.state = defaultdict(dict, loaded.state)
        self.offloaded = loaded.offloaded
        self.param_groups = loaded.param_groups
        self._step = loaded.step
        self.guard.skipped_steps = loaded.skipped_steps
        self._active = loaded.active
        self._applied = False  # applied on the next step() / train(), as after __init__
        self.updater.clear()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
