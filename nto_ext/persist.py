"""NTO's state_dict and load_state_dict, apart from the optimizer: torch's layout plus an
"nto" entry (schedule position, counters, active set, config, layout), and every check a
state passes before a load replaces anything (issue 17): by name or position, shapes,
dtypes, groups, counts, per-param state (the updater's), aliasing; torch AdamW's state is
imported. Only tensors, ints, floats, strings, lists, dicts, tuples and None are saved:
loadable with torch.load(weights_only=True)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .args import HYPER, check_hyper
from .checkpoint import (
    DENSE_KEYS,
    MAX_COUNT,
    Storages,
    canonical_name,
    check_count,
    check_keys,
    group_numbers,
    is_index,
    local_tensor,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NTO_KEYS = ("config", "layout", "step", "skipped_steps", "active", "offloaded",
             "with_state", "policy_state")


_AUTO_KEY = "budget_auto"  # under budget="auto": the activation bytes the plan was made for


def config_of(opt) -> dict[str, Any]:
    cfg = {**opt.policy.config(), **opt.policy.format_config(),
           "state_on_switch": opt.state_on_switch}
    auto = opt._auto()
    if auto is not None and auto.activations is not None:
        cfg[_AUTO_KEY] = auto.activations
    return cfg


def layout_of(opt) -> dict[str, Any]:
    """What a checkpoint must match: shapes and dtypes per param, and the names the user
    gave (None when params were given unnamed), which map a checkpoint by name."""
    infos = opt.table.infos
    names = [i.name for i in infos]
    return {"shapes": [list(i.shape) for i in infos],
            "dtypes": [str(i.dtype).removeprefix("torch.") for i in infos],
            "names": names if all(isinstance(n, str) for n in names) else None}


_TORCH_DSD = "torch/distributed/checkpoint/state_dict.py"


def refuse_torch_dsd(method: str) -> None:
    """Raise when torch's get/set_optimizer_state_dict called NTO's `method`: it assumes a
    state for every param (it even takes a zero-grad step to make one) and keeps only
    torch's keys, so NTO's moving active set would be saved without its schedule and
    refused or mis-loaded on resume. Lightning's ModelParallelStrategy, accelerate's
    save_state and Trainer's FSDP2 checkpoints go that way."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return
        if frame.f_code.co_filename.replace("\\", "/").endswith(_TORCH_DSD):
            raise TypeError(
                f"NTO.{method}() was called by torch's get/set_optimizer_state_dict, which "
                "cannot hold NTO's state (it exists for the active set only, with a schedule "
                "torch's layout drops); use nto_ext.distributed.save_optimizer_state / "
                "load_optimizer_state, nto_ext.lightning.NTOModelParallelStrategy "
                "(Lightning FSDP2) or nto_ext.hf.NTOTrainer (Trainer FSDP2)")
        frame = frame.f_back


def pack(opt) -> dict[str, Any]:
    """NTO.state_dict() without its hooks. Per-param state of offloaded params is in
    "state" too (host tensors), listed in nto["offloaded"]; keys of `state` that are not
    params are kept as they are, as torch.optim.AdamW does."""
    groups, start = [], 0
    for g in opt.param_groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        packed["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        groups.append(packed)
    state: dict[int, dict[str, Any]] = {}
    other: dict[Any, Any] = {}
    for key, st in opt.state.items():
        i = opt.table.index.get(key) if isinstance(key, torch.Tensor) else None
        if i is None:
            if isinstance(key, torch.Tensor):  # torch raises KeyError here too
                raise ValueError("optimizer state: `state` holds a tensor key that is not "
                                 "a param of this optimizer; allowed: its params and "
                                 "non-tensor keys")
            other[key] = st
        elif st:
            state[i] = dict(st)
    for i, st in opt.offloaded.items():
        state[i] = dict(st)
    return {"state": {**dict(sorted(state.items())), **other}, "param_groups": groups,
            "nto": {"format": FORMAT_VERSION, "config": config_of(opt), "layout": layout_of(opt),
                    "step": opt.step_count, "skipped_steps": opt.guard.skipped_steps,
                    "active": sorted(opt.active_set), "offloaded": sorted(opt.offloaded),
                    "with_state": sorted(state),  # a checkpoint that lost one is refused
                    "policy_state": policy_state(opt)}}


def policy_state(opt) -> dict[str, Any]:
    opt.policy.active(opt.step_count)  # the schedule's cursor at the current step
    return opt.policy.state_dict()


@dataclass
class Loaded:
    """A checked state, ready to replace the optimizer's (nothing left that can fail)."""

    state: dict[Any, dict[str, Any]]
    offloaded: dict[int, dict[str, Any]]
    param_groups: list[dict[str, Any]]
    step: int
    skipped_steps: int
    active: frozenset[int]


def read(opt, sd: Any) -> Loaded:
    """Everything NTO.load_state_dict checks, in order; the policy's cursor is left as it
    was if any check fails (it is a cache, but nothing is changed by a refused load)."""
    if isinstance(sd, dict) and "nto" not in sd and "state" in sd and "param_groups" in sd:
        sd = import_adamw(opt, sd)
    undo = _adopt_auto_budget(opt, sd)
    try:
        return _read(opt, sd)
    except Exception:
        if undo is not None:
            undo()
        raise


def _adopt_auto_budget(opt, sd: Any) -> Callable[[], None] | None:
    """budget="auto" resuming a state saved under budget="auto": take the budget that run
    chose (and the activations it measured) instead of this run's provisional one, so the
    plans match; returns how to go back if the load is then refused."""
    auto = opt._auto()
    nto = sd.get("nto") if isinstance(sd, dict) else None
    cfg = nto.get("config") if isinstance(nto, dict) else None
    if auto is None or not isinstance(cfg, dict) or not is_index(cfg.get(_AUTO_KEY), 2**62) \
            or cfg.get("budget_kind") != "elements" \
            or not is_index(cfg.get("budget_amount"), 2**62) \
            or cfg["budget_amount"] == opt.budget.amount:
        return None
    before = auto.adopted()

    def replan(state: tuple[int | None, int | None]) -> None:
        auto.adopt(*state)
        infos = opt.table.infos
        opt._replace_plan(*opt._plan(infos), infos, opt._user_flags())

    replan((cfg["budget_amount"], cfg[_AUTO_KEY]))
    return lambda: replan(before)


def _read(opt, sd: Any) -> Loaded:
    sd, nto, reordered = check_loadable(opt, sd)
    cursor = opt.policy.state_dict()
    opt.policy.load_state_dict(nto["policy_state"])
    active = frozenset(nto["active"])
    try:
        opt.policy.check_cursor(nto["step"])
        if opt.policy.active(nto["step"]) != active:
            why = (" (the params are in another order than in the run that saved it, and "
                   "the schedule over this order differs: build NTO over the params in the "
                   "saved order)" if reordered else " (a foreign or edited checkpoint)")
            raise ValueError("optimizer state: the saved active set does not match the "
                             f"schedule at step {nto['step']}{why}; nothing was loaded")
        new_state, new_offloaded, other = build_loaded_state(opt, sd, nto)
        opt.updater.check_loaded(new_state, nto["step"])
        new_groups = loaded_groups(opt, sd["param_groups"])
    except Exception:
        opt.policy.load_state_dict(cursor)
        raise
    return Loaded({**new_state, **other}, new_offloaded, new_groups, nto["step"],
                  nto["skipped_steps"], active)


def check_loadable(opt, sd: object) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """(sd, nto, reordered): the checked state with its param indices translated to
    this optimizer's order (matched by name when both sides have names)."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        keys = sorted(sd, key=str)[:8] if isinstance(sd, dict) else "-"
        raise ValueError("optimizer state: expected a dict with 'state' and "
                         f"'param_groups' (from NTO.state_dict()), got {type(sd).__name__}"
                         f" with keys {keys}")
    nto = sd.get("nto")
    if not isinstance(nto, dict):
        raise ValueError("optimizer state: 'nto' is not a dict; allowed: a state from "
                         "NTO.state_dict() or torch.optim.AdamW.state_dict()")
    if nto.get("format") != FORMAT_VERSION:
        raise ValueError(f"optimizer state: format {nto.get('format')!r}; this version "
                         f"reads format {FORMAT_VERSION}")
    for key in _NTO_KEYS:
        if key not in nto:
            raise ValueError(f"optimizer state: nto[{key!r}] is missing (truncated "
                             "checkpoint?); nothing was loaded")
    check_config(opt, nto["config"])
    perm = check_layout(opt, nto["layout"], sd["param_groups"])
    for key in ("step", "skipped_steps"):
        check_count(f"nto[{key!r}]", nto[key], MAX_COUNT)
    n = len(opt.table.params)
    for key in ("active", "offloaded", "with_state"):
        v = nto[key]
        if not isinstance(v, (list, tuple)) or not all(is_index(i, n) for i in v) \
                or len(set(v)) != len(v):
            raise ValueError(f"optimizer state: nto[{key!r}] must list distinct param "
                             f"indices in [0, {n})")
    if not isinstance(sd["state"], dict):
        raise ValueError("optimizer state: 'state' is not a dict")
    opt.policy.check_state_dict(nto["policy_state"])
    reordered = perm != list(range(n))
    if reordered:
        sd, nto = remap(opt, sd, nto, perm)
    have = sorted(k for k in sd["state"] if is_index(k, n))
    bad = [k for k in sd["state"] if isinstance(k, int) and not is_index(k, n)]
    if not bad and have != sorted(nto["with_state"]):  # else: refused below
        lost = sorted(set(nto["with_state"]) - set(have))
        raise ValueError("optimizer state: 'state' holds entries for params "
                         f"{have[:8]} but the optimizer saved state for "
                         f"{sorted(nto['with_state'])[:8]}"
                         f"{f' (missing: {lost[:8]})' if lost else ''}; an edited or "
                         "partial checkpoint; nothing was loaded")
    return sd, nto, reordered


def remap(opt, sd: dict[str, Any], nto: dict[str, Any], perm: list[int],
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copies of sd and nto with saved param index j renamed perm[j] (nothing of the
    caller's is changed). Param groups keep their position (checked in _check_layout)."""
    n = len(perm)
    state = {perm[k] if is_index(k, n) else k: v for k, v in sd["state"].items()}
    new_nto = dict(nto)
    for key in ("active", "offloaded", "with_state"):
        new_nto[key] = sorted(perm[i] for i in nto[key])
    new_nto["policy_state"] = opt.policy.remap_state_dict(nto["policy_state"], perm)
    return {**sd, "state": state}, new_nto


def check_config(opt, saved: object) -> None:
    mine = config_of(opt)
    if not isinstance(saved, dict):
        raise ValueError("optimizer state: nto['config'] is not a dict")
    if saved.get("policy") != mine["policy"]:
        raise ValueError(f"optimizer state was saved with policy={saved.get('policy')!r} "
                         f"but this optimizer has policy={mine['policy']!r}; build NTO "
                         "with the arguments of the run that saved it")
    keys = [*mine, *(k for k in saved if k not in mine)]  # a format saved but not here
    keys = [k for k in keys if k != _AUTO_KEY]  # a measurement, not an argument
    diff = [f"{k}: saved {saved.get(k)!r}, here {mine.get(k)!r}" for k in keys
            if _plain(saved.get(k)) != _plain(mine.get(k))]
    if diff:
        # a format key is saved only when in use: absent = the run did not use it
        hint = "".join(f"; the checkpoint's run did not use {k} (pass {k}=False)"
                       for k in ("master_weights", "stochastic_rounding")
                       if k in mine and k not in saved)
        raise ValueError("optimizer state was saved with other NTO arguments ("
                         + "; ".join(diff) + f"){hint}; build NTO with the arguments of "
                         "the run that saved it")


def check_layout(opt, layout: object, saved_groups: object) -> list[int]:
    """perm[j] = this optimizer's index of the checkpoint's param j: by name when both
    sides have names, else by position; shapes and dtypes checked through it."""
    shapes = layout.get("shapes") if isinstance(layout, dict) else None
    mine = layout_of(opt)
    n = len(mine["shapes"])
    if not isinstance(shapes, list) or len(shapes) != n:
        got = len(shapes) if isinstance(shapes, list) else "?"
        raise ValueError(f"optimizer state is for {got} parameters but this optimizer "
                         f"has {n}; load it into an NTO built over the same model")
    names = layout.get("names")  # type: ignore[union-attr]
    perm = (match_names(opt, names) if names is not None and mine["names"] is not None
            else list(range(n)))
    dtypes = layout.get("dtypes")  # type: ignore[union-attr]
    if dtypes is not None and (not isinstance(dtypes, list) or len(dtypes) != n):
        raise ValueError(f"optimizer state: layout['dtypes'] must list {n} dtypes")
    for j, s in enumerate(shapes):
        i = perm[j]
        if not isinstance(s, (list, tuple)) or list(s) != mine["shapes"][i]:
            raise ValueError(f"optimizer state: {opt.table.label(i)} (#{i}) has shape "
                             f"{s!r:.60} in the checkpoint but {mine['shapes'][i]} here; "
                             "load it into an NTO built over the same model")
        if dtypes is not None and dtypes[j] != mine["dtypes"][i]:
            raise ValueError(f"optimizer state: {opt.table.label(i)} (#{i}) was "
                             f"{dtypes[j]!r:.40} in the checkpoint but is "
                             f"{mine['dtypes'][i]} here; load the model in the dtype of "
                             "the run that saved it (or cast it after loading)")
    check_groups(opt, saved_groups, perm)
    return perm


def match_names(opt, saved: object) -> list[int]:
    """perm by name; torch.compile's `_orig_mod.` and DDP's `module.` prefixes are
    ignored when the exact names do not all match. Refuses names that do not match."""
    mine = [i.name for i in opt.table.infos]
    if not isinstance(saved, list) or not all(isinstance(s, str) for s in saved) \
            or len(saved) != len(mine):
        raise ValueError(f"optimizer state: layout['names'] must list {len(mine)} names "
                         "(one str per param)")
    dup = next((s for k, s in enumerate(saved) if s in saved[:k]), None)
    if dup is not None:
        raise ValueError(f"optimizer state: layout['names'] lists {dup!r} twice (an edited "
                         "checkpoint); nothing was loaded")
    for canon in (lambda s: s, canonical_name):
        index = {canon(m): i for i, m in enumerate(mine)}  # type: ignore[arg-type]
        if len(index) == len(mine) and all(canon(s) in index for s in saved):
            return [index[canon(s)] for s in saved]
    extra = [s for s in saved if s not in set(mine)]
    absent = [m for m in mine if m not in set(saved)]
    raise ValueError(
        f"optimizer state was saved for other parameter names: {len(extra)} saved "
        f"name(s) are not params here (first: {extra[:3]}) and {len(absent)} param(s) "
        f"here are not in the checkpoint (first: {absent[:3]}); load it into an NTO "
        "built over the same model (same parameter names)")


def check_groups(opt, saved_groups: object, perm: list[int]) -> None:
    """Same number of groups, each holding the same params (through perm), with valid
    hyper-parameters (any real number type: converted to float when loaded)."""
    if not isinstance(saved_groups, list) or len(saved_groups) != len(opt.param_groups):
        got = len(saved_groups) if isinstance(saved_groups, list) else "no list of"
        raise ValueError(f"optimizer state has {got} param groups but this "
                         f"optimizer has {len(opt.param_groups)}")
    start = 0
    for k, (sg, g) in enumerate(zip(saved_groups, opt.param_groups)):
        ids = sg.get("params") if isinstance(sg, dict) else None
        size = len(g["params"])
        if not isinstance(ids, (list, tuple)) or len(ids) != size:
            raise ValueError(f"optimizer state: param group {k} has a different number "
                             "of params than this optimizer's")
        if list(ids) != list(range(start, start + size)):
            raise ValueError(f"optimizer state: param group {k} lists params "
                             f"{list(ids)[:4]}...; expected the indices "
                             f"{start}..{start + size - 1} (an edited checkpoint)")
        here = {opt.table.index[p] for p in g["params"]}
        moved = [perm[j] for j in ids if perm[j] not in here]
        if moved:
            raise ValueError(f"optimizer state: {opt.table.label(moved[0])} was in param "
                             f"group {k} in the checkpoint but is in another group here; "
                             "build the param groups as in the run that saved it")
        start += size
        missing = [h for h in HYPER if h not in sg]
        if missing:  # the next step() would fail on it, after the load changed everything
            raise ValueError(f"optimizer state: param group {k} has no {missing[0]!r} "
                             "(truncated checkpoint?); nothing was loaded")
        h = group_numbers(sg)
        check_hyper(f"optimizer state: param group {k}: ", h["lr"], h["betas"],
                     h["eps"], h["weight_decay"])


def loaded_groups(opt, saved_groups: list) -> list[dict[str, Any]]:
    """The param groups after a load: the saved entries (hyper-parameters as Python
    floats, so a re-saved state loads with weights_only=True) with this optimizer's
    params and names."""
    new_groups = []
    for g, saved in zip(opt.param_groups, saved_groups):
        ng = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
        ng.update(group_numbers(saved))
        ng["params"] = g["params"]
        if "param_names" in g:
            ng["param_names"] = g["param_names"]
        elif "param_names" in saved:  # as torch: names given on either side are kept
            ng["param_names"] = list(saved["param_names"])
        new_groups.append(ng)
    return new_groups


def build_loaded_state(opt, sd: dict[str, Any], nto: dict[str, Any],
                        ) -> tuple[dict, dict, dict]:
    """(device state, offloaded state, non-param entries) from a checked checkpoint;
    every tensor validated, none aliasing another or a param, none keeping a larger
    storage than it needs."""
    active, offloaded = set(nto["active"]), set(nto["offloaded"])
    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    new_offloaded: dict[int, dict[str, Any]] = {}
    other: dict[Any, Any] = {}
    seen = Storages((opt.table.label(i), p) for i, p in enumerate(opt.table.params))
    for key, st in sd["state"].items():
        if not isinstance(key, int) or isinstance(key, bool):
            other[key] = st  # not a param: kept as it is, as torch.optim.AdamW does
            continue
        if not is_index(key, len(opt.table.params)):
            raise ValueError(f"optimizer state: key {key!r} in 'state' is not a param "
                             f"index (this optimizer has {len(opt.table.params)} params)")
        p = opt.table.params[key]
        st = check_param_state(opt, key, p, st, seen)
        if key in offloaded:
            new_offloaded[key] = {k: to_host(v, p) for k, v in st.items()}
        elif key in active:
            new_state[p] = {k: to_param_device(k, v, p) for k, v in st.items()}
        else:
            raise ValueError(f"optimizer state holds state for {opt.table.label(key)}, which "
                             "is neither active nor offloaded at the saved step (a foreign "
                             "or edited checkpoint); nothing was loaded")
    return new_state, new_offloaded, other


def check_param_state(opt, i: int, p: torch.Tensor, st: object,
                      seen: Storages) -> dict[str, Any]:
    """The state of param i as it will be kept, validated by the updater (keys, dtypes,
    shapes, finite unless nonfinite="propagate", counts), tensors compact and not aliasing
    anything else loaded."""
    if not isinstance(st, dict):
        raise ValueError(f"optimizer state for {opt.table.label(i)} is not a dict")
    return opt.updater.check_state(i, p, st, seen, opt.guard.nonfinite == "propagate")



def import_adamw(opt, sd: dict[str, Any]) -> dict[str, Any]:
    """An NTO state (in this optimizer's param order) from a torch.optim.AdamW (or Adam
    with decoupled or no weight decay) state_dict: its hyper-parameters and, per param,
    its moments (cast to fp32) and step count. NTO's schedule starts at step 0: the
    params active there get their moments; the others' are offloaded
    (state_on_switch="offload") or dropped (logged). Sparse keeps them only at 100%."""
    perm = foreign_perm(opt, sd)
    n = len(opt.table.params)
    if not isinstance(sd["state"], dict):
        raise ValueError("optimizer state: 'state' is not a dict")
    cursor = opt.policy.state_dict()
    active = opt.policy.active(0)
    opt.policy.load_state_dict(cursor)
    state: dict[Any, Any] = {}
    offloaded, dropped = [], 0
    for key, st in sd["state"].items():
        if not isinstance(key, int) or isinstance(key, bool):
            state[key] = st
            continue
        if not is_index(key, n):
            raise ValueError(f"optimizer state: key {key!r} in 'state' is not a param "
                             f"index (this optimizer has {n} params)")
        where = f"optimizer state (torch AdamW) for {opt.table.label(perm[key])}"
        if not isinstance(st, dict):
            raise ValueError(f"{where} is not a dict")
        check_keys(where, st, DENSE_KEYS)
        i = perm[key]
        if i not in active and (opt.state_on_switch != "offload"
                                or i not in opt.policy.trainable):
            dropped += 1
            continue
        entry = opt.updater.import_entry(where, st, opt.table.params[i])
        if entry is None:  # the policy does not keep it (e.g. nothing chosen at step 0)
            dropped += 1
            continue
        if i not in active:
            offloaded.append(i)
        state[i] = entry
    log.info("NTO: imported a torch AdamW state: moments of %d params loaded (%d of "
             "them offloaded), %d dropped (not trained at NTO's step 0 under policy=%r)",
             len(state) - sum(not isinstance(k, int) for k in state), len(offloaded),
             dropped, opt.policy.name)
    groups, start = [], 0
    for g, sg in zip(opt.param_groups, sd["param_groups"]):
        ng = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        ng.update({k: sg[k] for k in (*HYPER, "initial_lr") if k in sg})
        ng["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        groups.append(ng)
    with_state = sorted(k for k in state if isinstance(k, int))
    return {"state": state, "param_groups": groups, "nto": {
        "format": FORMAT_VERSION, "config": config_of(opt), "layout": layout_of(opt),
        "step": 0, "skipped_steps": 0, "active": sorted(active),
        "offloaded": sorted(offloaded), "with_state": with_state,
        "policy_state": opt.policy.initial_state()}}


def foreign_perm(opt, sd: dict[str, Any]) -> list[int]:
    """perm[j] = this optimizer's index of a torch optimizer state's param j (by the
    groups' `param_names` when both sides have names, else by position); refuses
    states that are not AdamW's (or Adam's with decoupled or no weight decay)."""
    groups = sd["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups) \
            or not all(isinstance(g, dict) for g in groups):
        got = len(groups) if isinstance(groups, list) else type(groups).__name__
        raise ValueError(f"optimizer state (no 'nto' entry: saved by another optimizer) "
                         f"has {got} param groups but this optimizer has "
                         f"{len(opt.param_groups)}; build NTO with the param groups of "
                         "the run that saved it")
    for k, (sg, g) in enumerate(zip(groups, opt.param_groups)):
        missing = [h for h in HYPER if h not in sg]
        if missing:
            raise ValueError(f"optimizer state: no 'nto' entry and param group {k} has no "
                             f"{missing[0]!r}: it was saved by another optimizer (e.g. "
                             "torch.optim.SGD); allowed: a state from NTO.state_dict() or "
                             "torch.optim.AdamW")
        if sg.get("amsgrad"):
            raise ValueError(f"optimizer state: param group {k} has amsgrad=True "
                             "(torch.optim.AdamW(amsgrad=True)); NTO does not implement "
                             "amsgrad, so its max_exp_avg_sq cannot be continued; "
                             "allowed: an AdamW state with amsgrad=False")
        if sg.get("decoupled_weight_decay") is False and sg.get("weight_decay"):
            raise ValueError(f"optimizer state: param group {k} is torch.optim.Adam's "
                             "(L2 weight decay, decoupled_weight_decay=False) with "
                             f"weight_decay={sg['weight_decay']!r}; NTO is AdamW (decoupled "
                             "decay); allowed: an AdamW state, or Adam's with "
                             "weight_decay=0")
        if bool(sg.get("maximize", False)) != bool(g.get("maximize", False)):
            raise ValueError(f"optimizer state: param group {k} has maximize="
                             f"{sg.get('maximize')!r} but this optimizer's has "
                             f"{g.get('maximize', False)!r}; build NTO with the same "
                             "maximize")
    names = [s for sg in groups for s in sg.get("param_names", ())]
    total = sum(len(sg.get("params", ())) for sg in groups)
    if total != len(opt.table.params):
        raise ValueError(f"optimizer state is for {total} parameters but this optimizer "
                         f"has {len(opt.table.params)}; load it into an NTO built over the "
                         "same parameters")
    mine_named = all(i.name is not None for i in opt.table.infos)
    if all("param_names" in sg for sg in groups) and mine_named:
        perm = match_names(opt, names)
    else:
        perm = list(range(len(opt.table.params)))
    check_groups(opt, groups, perm)
    return perm


def _plain(v: object) -> object:
    """Compare configs across save/load: tuples and lists alike."""
    return list(v) if isinstance(v, tuple) else v


def to_host(v: Any, p: torch.Tensor | None = None) -> Any:
    """A host copy of one state value (pinned when CUDA is in use); CPU tensors are kept."""
    if not isinstance(v, torch.Tensor) or v.device.type == "cpu":
        return v
    host = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=True)
    host.copy_(v)
    return host


def to_param_device(key: str, v: Any, p: torch.Tensor) -> Any:
    """State value on the device it lives on while training: `step` on the host (as
    torch.optim.AdamW keeps it), everything else next to the param. Dtypes are kept."""
    if not isinstance(v, torch.Tensor):
        return v
    if key == "step":
        return v.to("cpu")
    return v.to(local_tensor(p).device)
