"""Checkpoints that are foreign, reordered, corrupted or crafted (issue 17 items 5, 6 and 9;
issue 16 item 10): params are matched by name, every tensor and count is validated before
anything is replaced, a refusal changes nothing, and torch.optim.AdamW states import.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings

import numpy as np
import pytest
import torch
from tiny import roundtrip
from toy import backward, same, snapshot, toy_params, train

from nto_ext import NTO

KW = {"budget": 80, "switch_every": 2, "state_on_switch": "offload", "lr": 1e-2}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(params, **kw) -> NTO:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NTO(params, **{**KW, **kw})


def trained(steps: int = 3, named=None, **kw) -> tuple[NTO, list]:
    named = named if named is not None else toy_params()
    opt = build(named, **kw)
    train(opt, [p for _, p in named], range(steps))
    return opt, named


def saved(steps: int = 3, **kw) -> dict:
    return roundtrip(trained(steps, **kw)[0].state_dict())


def _copy(st: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in st.items()}


def state_by_name(opt: NTO) -> dict:
    """Every param's state (device or offloaded) by name, copied."""
    out = {}
    for p, st in opt.state.items():
        if isinstance(p, torch.Tensor):
            out[opt.table.infos[opt.table.index[p]].name] = _copy(st)
    for i, st in opt.offloaded.items():
        out[("offloaded", opt.table.infos[i].name)] = _copy(st)
    return out


def _same_entry(a: dict, b: dict) -> bool:
    tensors = [k for k in a if isinstance(a[k], torch.Tensor)]
    return a.keys() == b.keys() and same([a[k] for k in tensors], [b[k] for k in tensors]) \
        and all(a[k] == b[k] for k in a if k not in tensors)


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_same_entry(a[k], b[k]) for k in a)


def everything(opt: NTO, params: list) -> tuple:
    """All that a load could change."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return (snapshot(params), [p.requires_grad for p in params], state_by_name(opt),
            opt.step_count, opt.skipped_steps, sorted(opt.active_set),
            opt.policy.state_dict(), groups, sorted(opt.offloaded))


def assert_same(a: tuple, b: tuple) -> None:
    assert same(a[0], b[0]) and a[1] == b[1] and same_state(a[2], b[2]) and a[3:] == b[3:]


def refused(bad: dict, match: str, **kw) -> None:
    """`bad` is refused with `match` by an NTO that trained 3 steps, which is unchanged."""
    opt, named = trained(**kw)
    params = [p for _, p in named]
    backward(params, 3)  # grads pending
    before = everything(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_same(everything(opt, params), before)


def first(sd: dict) -> dict:
    return sd["state"][min(k for k in sd["state"] if isinstance(k, int))]


# ---------------------------------------------------------------- item 5: names


class AB(torch.nn.Module):
    def __init__(self, a_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        first_, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        if a_first:
            self.a, self.b = first_, second
        else:
            self.b, self.a = second, first_


def _ab_step(model: AB, opt: NTO, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(3, 4, generator=g)
    (model.a(x).square().sum() + 2 * model.b(x).sin().sum()).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("budget", ["100%", 20])
def test_submodules_declared_in_another_order_load_by_name(budget):
    """`a.weight` gets `a.weight`'s moments (by position it got `b.weight`'s), and training
    goes on bit-identically to the run that never stopped."""
    m1, m2 = AB(a_first=True), AB(a_first=False)
    assert [n for n, _ in m1.named_parameters()] != [n for n, _ in m2.named_parameters()]
    kw = {"budget": budget, "policy": "sparse", "switch_every": 2, "state_on_switch": "drop"}
    o1 = build(m1.named_parameters(), **kw)
    for s in range(3):
        _ab_step(m1, o1, s)
    sd = roundtrip(o1.state_dict())
    assert sd["nto"]["layout"]["names"] == ["a.weight", "a.bias", "b.weight", "b.bias"]
    m2.load_state_dict(m1.state_dict())
    o2 = build(m2.named_parameters(), **kw)
    o2.load_state_dict(sd)
    assert same_state(state_by_name(o2), state_by_name(o1))
    assert sorted(o2.active()) == sorted(o1.active())
    for s in range(3, 8):
        _ab_step(m1, o1, s)
        _ab_step(m2, o2, s)
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert same([p1[n] for n in sorted(p1)], [p2[n] for n in sorted(p1)])
    assert same_state(state_by_name(o2), state_by_name(o1))


def test_reorder_within_a_block_loads_by_name_under_the_block_policy():
    """Params reordered inside a block: the same schedule, state mapped by name, and
    training goes on bit-identically (gradients given by name)."""
    o1, named = trained(steps=5)
    sd = roundtrip(o1.state_dict())
    swapped = toy_params()
    swapped[1], swapped[2] = swapped[2], swapped[1]  # model.layers.0.w0 <-> w1
    trained_values = dict(named)
    with torch.no_grad():
        for n, p in swapped:
            p.copy_(trained_values[n])
    o2 = build(swapped)
    o2.load_state_dict(sd)
    assert same_state(state_by_name(o2), state_by_name(o1))
    params1 = [p for _, p in named]
    by_name = dict(swapped)
    params2 = [by_name[n] for n, _ in named]
    for s in range(5, 12):
        for o, ps in ((o1, params1), (o2, params2)):
            backward(ps, s)
            o.step()
            o.zero_grad()
    assert same(params1, params2) and same_state(state_by_name(o2), state_by_name(o1))


def test_blocks_in_another_order_with_another_schedule_are_refused():
    """Layers listed in reverse: NTO's schedule (in its own order) differs, so the saved
    active set cannot be continued: refused, naming the order, nothing changed."""
    sd = saved(steps=3)
    named = toy_params()
    rev = [named[0]] + named[1:9][::-1] + named[9:]
    opt = build(rev)
    before = everything(opt, [p for _, p in rev])
    with pytest.raises(ValueError, match=r"params are in another order than in the run that "
                                         r"saved it"):
        opt.load_state_dict(sd)
    assert_same(everything(opt, [p for _, p in rev]), before)


def test_other_names_are_refused_naming_the_first_mismatches():
    sd = saved()
    sd["nto"]["layout"]["names"][3] = "model.layers.1.renamed"
    refused(sd, r"1 saved name\(s\) are not params here \(first: \['model.layers.1.renamed'\]\)"
                r" and 1 param\(s\) here are not in the checkpoint \(first: "
                r"\['model.layers.1.w0'\]\)")


def test_wrapper_prefixes_are_ignored():
    """A checkpoint of a DDP-wrapped or compiled model (`module.`, `_orig_mod.`) loads."""
    o1, _ = trained()
    sd = roundtrip(o1.state_dict())
    sd["nto"]["layout"]["names"] = ["module._orig_mod." + n
                                    for n in sd["nto"]["layout"]["names"]]
    o2 = build(toy_params())
    o2.load_state_dict(sd)
    assert same_state(state_by_name(o2), state_by_name(o1))


def test_unnamed_side_loads_by_position_with_shape_checks():
    o1, _ = trained()
    sd = roundtrip(o1.state_dict())
    o2 = build([p for _, p in toy_params()])
    o2.load_state_dict(sd)  # named checkpoint, unnamed optimizer: by position
    saved_unnamed = roundtrip(o2.state_dict())
    assert saved_unnamed["nto"]["layout"]["names"] is None
    o3 = build(toy_params())
    o3.load_state_dict(saved_unnamed)  # unnamed checkpoint, named optimizer: by position
    assert same_state(state_by_name(o3), state_by_name(o1))
    bad = copy.deepcopy(saved_unnamed)
    bad["nto"]["layout"]["shapes"][1] = [8]
    refused(bad, r"parameter 'model.layers.0.w0' \(#1\) has shape \[8\] in the checkpoint "
                 r"but \[32\] here")


def test_another_dtype_is_refused():
    named = toy_params(dtype=torch.bfloat16)
    o1 = build(named, master_weights=False)  # with masters, the config differs first
    train(o1, [p for _, p in named], range(3))
    refused(roundtrip(o1.state_dict()), r"'model.embed_tokens.weight' \(#0\) was 'bfloat16' "
                                        r"in the checkpoint but is float32 here")


# ---------------------------------------------------------------- item 6: corruption


def _edit(fn, **kw):
    sd = copy.deepcopy(saved(**kw))
    fn(sd)
    return sd


def _nan(sd):
    first(sd)["exp_avg"][3] = float("nan")


def _inf_sq(sd):
    first(sd)["exp_avg_sq"][0] = float("inf")


def _negative(sd):
    first(sd)["exp_avg_sq"][5] = -1e-3


def _alias(sd):
    st = first(sd)
    st["exp_avg_sq"] = st["exp_avg"]


def _alias_across(sd):
    keys = sorted(k for k in sd["state"] if isinstance(k, int))
    a, b = sd["state"][keys[0]], sd["state"][keys[1]]
    if a["exp_avg"].shape == b["exp_avg"].shape:
        b["exp_avg"] = a["exp_avg"]
    else:  # a view into the other's storage
        n = b["exp_avg"].numel()
        big = torch.zeros(max(n, a["exp_avg"].numel()))
        a["exp_avg"] = big[: a["exp_avg"].numel()]
        b["exp_avg"] = big[:n]


def _extra(sd):
    first(sd)["junk"] = torch.zeros(1_000_000)


CORRUPT = [
    ("NaN in exp_avg", _nan, r"exp_avg holds NaN or Inf"),
    ("Inf in exp_avg_sq", _inf_sq, r"exp_avg_sq holds NaN or Inf"),
    ("negative exp_avg_sq", _negative, r"exp_avg_sq has negative values"),
    ("exp_avg and exp_avg_sq one tensor", _alias, r"exp_avg_sq shares memory with .*: exp_avg"),
    ("moments aliasing across params", _alias_across, r"exp_avg shares memory with"),
    ("an extra 4 MB per-param tensor", _extra,
     r"unexpected entry 'junk' \(a torch.float32 tensor of 1,000,000 elements\)"),
    ("per-param step -1", lambda sd: first(sd).update(step=torch.tensor(-1.0)),
     r"'step' is tensor\(-1.\); allowed: a whole number in \[0, 16777216\]"),
    ("per-param step NaN", lambda sd: first(sd).update(step=torch.tensor(float("nan"))),
     r"'step' is tensor\(nan\)"),
    ("per-param step 2.5", lambda sd: first(sd).update(step=2.5), r"'step' is 2.5"),
    ("per-param step 10**400", lambda sd: first(sd).update(step=10**400),
     r"'step' is 1000000000000000000000000000000000000000; allowed"),
    ("per-param step 1e30", lambda sd: first(sd).update(step=torch.tensor(1e30)),
     r"'step' is tensor\(1.0000e\+30\)"),
    ("per-param step a string", lambda sd: first(sd).update(step="3"),
     r"'step' is str; expected a 1-element float tensor or a number"),
    ("nto step 10**400", lambda sd: sd["nto"].update(step=10**400),
     r"nto\['step'\]=1000000000000000000000000000000000000000; allowed: an int in \[0, "),
    ("nto step -1", lambda sd: sd["nto"].update(step=-1), r"nto\['step'\]=-1; allowed"),
    ("nto step 3.0", lambda sd: sd["nto"].update(step=3.0), r"nto\['step'\]=3.0; allowed"),
    ("skipped_steps -1", lambda sd: sd["nto"].update(skipped_steps=-1),
     r"nto\['skipped_steps'\]=-1; allowed: an int in \[0, "),
    ("duplicate active index", lambda sd: sd["nto"].update(active=sd["nto"]["active"] * 2),
     r"nto\['active'\] must list distinct param indices"),
    ("a param renamed in layout['names']",
     lambda sd: sd["nto"]["layout"]["names"].__setitem__(3, "model.layers.1.renamed"),
     r"saved for other parameter names: 1 saved name\(s\) are not params here"),
    ("a name listed twice in layout['names']",
     lambda sd: sd["nto"]["layout"]["names"].__setitem__(3, "model.layers.0.w0"),
     r"layout\['names'\] lists 'model.layers.0.w0' twice"),
    ("lr NaN", lambda sd: sd["param_groups"][0].update(lr=float("nan")),
     r"param group 0: lr=nan; allowed: a finite number >= 0"),
    ("group params edited", lambda sd: sd["param_groups"][0].update(
        params=sd["param_groups"][0]["params"][::-1]), r"an edited checkpoint"),
]


@pytest.mark.parametrize("text,edit,msg", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupted_or_crafted_checkpoint_is_refused_and_changes_nothing(text, edit, msg):
    refused(_edit(edit), msg)


def test_nonfinite_moments_load_under_propagate():
    """nonfinite="propagate" keeps NaN/Inf as torch does; negative exp_avg_sq never."""
    opt, _ = trained(nonfinite="propagate")
    sd = _edit(_nan, nonfinite="propagate")
    opt.load_state_dict(sd)
    assert torch.isnan(next(iter(state_by_name(opt).values()))["exp_avg"]).any() or any(
        torch.isnan(st["exp_avg"]).any() for st in state_by_name(opt).values())
    refused(_edit(_negative, nonfinite="propagate"), r"exp_avg_sq has negative values",
            nonfinite="propagate")


@pytest.mark.parametrize("policy", ["block", "sparse"])
def test_view_of_a_large_storage_is_copied_compactly(policy):
    """A moment that is a view of a 40 MB storage: loaded as a compact copy, so the state
    measured after the load is the checkpoint's own size, not 40 MB."""
    kw = {"policy": policy, "state_on_switch": "drop"} if policy == "sparse" else {}
    sd = saved(**kw)
    st = first(sd)
    n = st["exp_avg"].numel()
    big = torch.zeros(10_000_000)
    big[1000:1000 + n] = st["exp_avg"].reshape(-1)
    st["exp_avg"] = big[1000:1000 + n].view(st["exp_avg"].shape)
    opt = build(toy_params(), **kw)
    opt.load_state_dict(sd)
    report = opt.memory_report()
    assert report["state_bytes"] + report["offload_bytes"] < 10_000
    assert same_state(state_by_name(opt), state_by_name(trained(**kw)[0]))


def test_sparse_compact_state_is_checked_too():
    kw = {"policy": "sparse", "state_on_switch": "drop"}
    refused(_edit(_negative, **kw), r"exp_avg_sq has negative values", **kw)
    refused(_edit(_extra, **kw), r"unexpected entry 'junk'", **kw)
    refused(_edit(lambda sd: first(sd).update(step=[10**400] * len(first(sd)["step"])), **kw),
            r"step counts in \[0, 16777216\]", **kw)
    refused(_edit(_alias, **kw), r"shares memory", **kw)


def _file_with_flipped_bit(sd: dict, value: torch.Tensor, bit: int) -> dict:
    """sd saved to bytes, one bit of `value`'s first element flipped in the file, loaded."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    data = bytearray(buf.getvalue())
    needle = value.reshape(-1)[:4].numpy().tobytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0
    data[at + bit // 8] ^= 1 << (bit % 8)
    return torch.load(io.BytesIO(bytes(data)), weights_only=True)


@pytest.mark.parametrize("value,bit,match", [
    (3.0, 31, r"exp_avg_sq has negative values"),  # the sign bit: -3.0
    (1.5, 30, r"exp_avg_sq holds NaN or Inf")])  # exponent 127 -> 255: NaN
def test_flipped_bits_in_a_checkpoint_file_are_refused(value, bit, match):
    """Flips that make a moment negative or non-finite are caught. (A flip to another
    plausible finite value cannot be told from a real one without a checksum.)"""
    sd = saved()
    v = first(sd)["exp_avg_sq"]
    v.reshape(-1)[0] = value
    flipped = _file_with_flipped_bit(sd, v, bit)
    refused(flipped, match)


# ---------------------------------------------------------------- item 9: number types


@pytest.mark.parametrize("lr", [np.float32(0.01), np.float64(0.01), torch.tensor(0.01)],
                         ids=["np.float32", "np.float64", "tensor"])
def test_hyper_parameters_of_any_number_type_load_as_python_floats(lr):
    sd = saved()
    sd["param_groups"][0].update(lr=lr, weight_decay=np.float32(0.0), eps=np.float64(1e-8),
                                 betas=(np.float32(0.9), torch.tensor(0.999)))
    opt = build(toy_params())
    opt.load_state_dict(sd)
    g = opt.param_groups[0]
    assert type(g["lr"]) is float and type(g["weight_decay"]) is float
    assert type(g["eps"]) is float and all(type(b) is float for b in g["betas"])
    assert g["lr"] == pytest.approx(0.01)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["param_groups"][0]["lr"] == g["lr"]


# ---------------------------------------------------------------- issue 16 item 10


def test_state_dict_with_a_pre_hook_and_a_non_param_key_mirrors_torch():
    named = toy_params()
    opt = build(named)
    adamw = torch.optim.AdamW([p.detach().clone().requires_grad_() for _, p in named])

    def pre_hook(o):
        o.state["test"] = 1

    for o in (opt, adamw):
        o.register_state_dict_pre_hook(pre_hook)
        assert o.state_dict()["state"]["test"] == 1
    train(opt, [p for _, p in named], range(3))
    opt.memory_report()  # a non-param key is not a param's state
    sd = roundtrip(opt.state_dict())
    other = build(toy_params())
    other.load_state_dict(sd)
    assert other.state["test"] == 1 and other.step_count == 3


@pytest.mark.parametrize("step", [int, float, np.int64], ids=["int", "float", "np.int64"])
def test_python_number_step_is_accepted(step):
    sd = saved()
    keys = [k for k in sd["state"] if isinstance(k, int)]
    reference = build(toy_params())
    reference.load_state_dict(copy.deepcopy(sd))
    for k in keys:
        sd["state"][k]["step"] = step(float(sd["state"][k]["step"]))
    opt = build(toy_params())
    opt.load_state_dict(sd)
    assert same_state(state_by_name(opt), state_by_name(reference))


def _adamw_run(steps: int = 3, dtype=torch.float32, **kw):
    named = toy_params(dtype=dtype)
    params = [p for _, p in named]
    adamw = torch.optim.AdamW(params, lr=1e-2, **kw)
    for s in range(steps):
        backward(params, s)
        adamw.step()
        adamw.zero_grad()
    return adamw, named


def test_adamw_state_imports_at_100_percent_and_continues_as_adamw():
    """Continuing a fused AdamW run with NTO(budget="100%") after loading its state is
    AdamW(fused=True) continued (bit-identical on CPU)."""
    adamw, named = _adamw_run(fused=True)
    sd = roundtrip(adamw.state_dict())
    twin = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    opt = build([p for _, p in twin], budget="100%", state_on_switch="drop")
    opt.load_state_dict(sd)
    assert len(opt.state) == len(twin) and opt.step_count == 0
    assert all(float(st["step"]) == 3 for st in opt.state.values())
    params, params2 = [p for _, p in named], [p for _, p in twin]
    for s in range(3, 8):
        backward(params, s)
        adamw.step()
        adamw.zero_grad()
        backward(params2, s)
        opt.step()
        opt.zero_grad()
    assert same(params, params2)


@pytest.mark.parametrize("mode", ["drop", "offload"])
def test_adamw_state_imports_at_a_partial_budget(mode, caplog):
    """The params active at NTO's step 0 get their AdamW moments; the others' are
    offloaded (state_on_switch="offload") or dropped, with an info log."""
    adamw, named = _adamw_run()
    sd = roundtrip(adamw.state_dict())
    opt = build(toy_params(), state_on_switch=mode)
    with caplog.at_level(logging.INFO, logger="nto_ext.persist"):
        opt.load_state_dict(sd)
    active = opt.policy.active(0)
    assert {opt.table.index[p] for p in opt.state} == set(active)
    for p in opt.state:
        i = opt.table.index[p]
        assert same([opt.state[p]["exp_avg"]], [sd["state"][i]["exp_avg"]])
    n_rest = len(named) - len(active)
    if mode == "offload":
        assert sorted(opt.offloaded) == sorted(set(range(len(named))) - active)
        assert f"{len(active) + n_rest} params loaded ({n_rest} of them offloaded), 0 dropped" \
            in caplog.text
    else:
        assert not opt.offloaded and f"dropped {n_rest}" not in caplog.text
        assert f"{n_rest} dropped" in caplog.text


def test_adamw_state_of_bf16_params_imports_fp32_moments():
    adamw, named = _adamw_run(dtype=torch.bfloat16)
    sd = roundtrip(adamw.state_dict())
    opt = build(toy_params(dtype=torch.bfloat16), budget="100%", state_on_switch="drop")
    opt.load_state_dict(sd)
    st = next(iter(opt.state.values()))
    assert st["exp_avg"].dtype == torch.float32


def test_adamw_state_imports_into_sparse_at_100_percent():
    adamw, named = _adamw_run()
    sd = roundtrip(adamw.state_dict())
    opt = build(toy_params(), budget="100%", policy="sparse", state_on_switch="drop")
    opt.load_state_dict(sd)
    for p, st in opt.state.items():
        i = opt.table.index[p]
        assert st["step"] == [3] and same([st["exp_avg"]], [sd["state"][i]["exp_avg"]])


def _sgd():
    return torch.optim.SGD([p for _, p in toy_params()], lr=0.1).state_dict()


FOREIGN = [
    ("AdamW(amsgrad=True)", lambda: _adamw_run(amsgrad=True)[0].state_dict(),
     r"amsgrad=True .* NTO does not implement amsgrad"),
    ("Adam with L2 weight decay", lambda: torch.optim.Adam(
        [p for _, p in toy_params()], weight_decay=0.1).state_dict(),
     r"torch.optim.Adam's \(L2 weight decay"),
    ("SGD", _sgd, r"no 'nto' entry and param group 0 has no 'betas'"),
    ("AdamW over fewer params", lambda: torch.optim.AdamW(
        [p for _, p in toy_params()][:5]).state_dict(),
     r"optimizer state is for 5 parameters but this optimizer has 11"),
    ("AdamW with an extra per-param tensor", lambda: _with_junk(), r"unexpected entry 'junk'"),
    ("AdamW with max_exp_avg_sq in one state", lambda: _with_max(), r"has max_exp_avg_sq"),
]


def _with_junk():
    sd = _adamw_run()[0].state_dict()
    sd["state"][0]["junk"] = torch.zeros(10)
    return sd


def _with_max():
    sd = _adamw_run()[0].state_dict()
    sd["state"][0]["max_exp_avg_sq"] = torch.zeros(64)
    return sd


@pytest.mark.parametrize("text,factory,msg", FOREIGN, ids=[c[0] for c in FOREIGN])
def test_foreign_states_that_cannot_be_continued_are_refused(text, factory, msg):
    refused(factory(), msg)


def test_adamw_state_with_names_maps_by_name():
    """torch's AdamW over named params saves `param_names`: matched by name."""
    named = toy_params()
    adamw = torch.optim.AdamW(named, lr=1e-2)
    backward([p for _, p in named], 0)
    adamw.step()
    sd = roundtrip(adamw.state_dict())
    swapped = toy_params()
    swapped[1], swapped[2] = swapped[2], swapped[1]
    opt = build(swapped, budget="100%", state_on_switch="drop")
    opt.load_state_dict(sd)
    for name, p in swapped:
        j = [n for n, _ in named].index(name)
        assert same([opt.state[p]["exp_avg"]], [sd["state"][j]["exp_avg"]])


@pytest.mark.parametrize("budget", ["100%", "25%"])
def test_trainer_checkpoint_of_torch_adamw_resumes_under_nto(tmp_path, budget):
    """The real path: optimizer.pt saved by a Trainer run with torch AdamW, resumed by a
    Trainer run with NTO. At 100% it continues as AdamW does (to fp32 rounding: Trainer's
    AdamW is the foreach one); at 25% it trains on from the imported state."""
    pytest.importorskip("transformers")
    import dist_worker as W
    from transformers import Trainer, TrainingArguments

    from nto_ext.hf import nto_optimizer

    def args(out, **kw):
        return TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=2, max_steps=6,
            learning_rate=1e-2, weight_decay=0.01, report_to="none", use_cpu=True,
            save_strategy="steps", save_steps=3, logging_steps=1, disable_tqdm=True, seed=0,
            dataloader_num_workers=0, **kw)

    def run(out, nto: bool, resume=None):
        model = W.tiny_llama()
        a = args(out)
        extra = ({"optimizer_cls_and_kwargs": nto_optimizer(model, a, budget=budget,
                                                            switch_every=2)} if nto else {})
        tr = Trainer(model=model, args=a, train_dataset=W.SeqDataset(), **extra)
        tr.train(resume_from_checkpoint=resume)
        return tr

    full = run(tmp_path / "a", nto=False)
    ckpt = tmp_path / "a" / "checkpoint-3"
    resumed = run(tmp_path / "b", nto=True, resume=str(ckpt))
    assert isinstance(resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer")
                      else resumed.optimizer, NTO)
    losses = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    assert len(losses) == 3 and all(np.isfinite(losses))
    if budget == "100%":
        for (n, p), (_, q) in zip(full.model.named_parameters(),
                                  resumed.model.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_a_moment_that_is_a_param_is_refused():
    """An in-memory state whose exp_avg is the loading optimizer's own param (a crafted or
    mixed-up dict): the update would write the moment into the weights."""
    sd = saved()
    opt, named = trained()
    params = [p for _, p in named]
    k = min(k for k in sd["state"] if isinstance(k, int))
    sd["state"][k]["exp_avg"] = params[k].data
    before = everything(opt, params)
    with pytest.raises(ValueError, match=rf"exp_avg shares memory with parameter "
                                         rf"'{named[k][0]}'"):
        opt.load_state_dict(sd)
    assert_same(everything(opt, params), before)
