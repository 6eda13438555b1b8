"""class NTO (nto_ext/optimizer.py): AdamW equality, the budget invariant, lifecycle,
non-finite handling, state_dict and the bad-input table."""

import math
import warnings

import pytest
import torch
from tiny import (
    batch,
    one_thread,  # noqa: F401  (autouse fixture)
    roundtrip,
    three_groups,
    tiny_llama,
    train_step,
)

from nto_ext import NTO
from nto_ext.budget import STEP_BYTES

N_ELEMENTS, N_TENSORS = 45_344, 39
FULL_BYTES = N_ELEMENTS * 12 + N_TENSORS * STEP_BYTES  # NTO at 100% on fp32


class P:
    """A params argument built lazily, with the source text the README table shows."""

    def __init__(self, text, factory):
        self.text, self.factory = text, factory

    def __repr__(self):
        return self.text


def _w(*shape, **kw):
    return torch.nn.Parameter(torch.zeros(*shape, **kw))


_shared = _w(3)
_noncontig = torch.nn.Parameter(torch.zeros(4, 3).t())

# The bad-input table: (NTO keyword arguments, exception, regex of the message). Every
# message says what was given and what is allowed. `params` defaults to a tiny Llama's
# named_parameters(). docs/ and the README's table are generated from this list.
BAD_INPUTS = [
    ({"lr": -1.0}, ValueError, r"lr=-1.0; allowed: a finite number >= 0"),
    ({"lr": float("nan")}, ValueError, r"lr=nan; allowed: a finite number >= 0"),
    ({"lr": "fast"}, ValueError, r"lr='fast'; allowed: a finite number >= 0"),
    ({"betas": (1.0, 0.999)}, ValueError, r"beta1=1.0; allowed: a number in \[0, 1\)"),
    ({"betas": (0.9, -0.1)}, ValueError, r"beta2=-0.1; allowed: a number in \[0, 1\)"),
    ({"betas": 0.9}, ValueError, r"betas=0.9; allowed: a pair \(beta1, beta2\)"),
    ({"eps": -1e-8}, ValueError, r"eps=-1e-08; allowed: a finite number >= 0"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay=-0.1; allowed: a finite number >= 0"),
    ({"budget": 0}, ValueError, r"budget=0: an element budget must be > 0; allowed: an int"),
    ({"budget": -3}, ValueError, r"budget=-3: an element budget must be > 0"),
    ({"budget": 1.5}, ValueError, r"budget=1.5: a float budget is a share .* \(0, 1\]"),
    ({"budget": "150%"}, ValueError, r"budget='150%': a percentage must be in \(0%, 100%\]"),
    ({"budget": "ten percent"}, ValueError, r"budget='ten percent': cannot parse it"),
    ({"budget": "5XB"}, ValueError, r"budget='5XB': cannot parse it \(byte units: B, KB"),
    ({"budget": "0MiB"}, ValueError, r"budget='0MiB': a byte budget must be at least 1 byte"),
    ({"budget": None}, TypeError, r"budget=None has type NoneType; allowed: an int"),
    ({"budget": True}, TypeError, r"budget=True has type bool; allowed"),
    ({"budget": 10}, ValueError,
     r"budget=10 \(10 elements\) is below the smallest unit that can train, tensor "
     r"'model.layers.0.input_layernorm.weight' \(32 elements.*Raise the budget to at least "
     r"32 elements"),
    ({"budget": "100B"}, ValueError,
     r"budget='100B' .* is below the smallest unit .* \(388 B .*at least 388 B"),
    ({"policy": "lisa"}, ValueError, r"policy='lisa'; allowed: 'block', 'sample', 'sparse'"),
    ({"policy": None}, ValueError, r"policy=None; allowed: 'block', 'sample', 'sparse'"),
    ({"switch_every": 0}, ValueError, r"switch_every=0; allowed: an int >= 1"),
    ({"switch_every": 2.5}, ValueError, r"switch_every=2.5; allowed: an int >= 1"),
    ({"order": "sideways"}, ValueError,
     r"order='sideways'; allowed: 'ascending', 'descending', 'random', 'importance'"),
    ({"policy": "sample", "order": "ascending"}, ValueError,
     r"order='ascending'; allowed: 'random', 'importance'"),
    ({"policy": "sparse", "order": "random"}, ValueError,
     r"order='random' applies to policy='block' and 'sample' only"),
    ({"seed": -1}, ValueError, r"seed=-1; allowed: an int in \[0, 2\*\*63\)"),
    ({"seed": "abc"}, ValueError, r"seed='abc'; allowed: an int"),
    ({"state_on_switch": "keep"}, ValueError,
     r"state_on_switch='keep'; allowed: 'drop', 'offload'"),
    ({"nonfinite": "ignore"}, ValueError,
     r"nonfinite='ignore'; allowed: 'skip', 'raise', 'propagate'"),
    ({"always": "embed"}, TypeError, r"always='embed'; allowed: a tuple of block names"),
    ({"always": ("embeddings",)}, ValueError,
     r"always=\('embeddings',\): no block named \['embeddings'\]; blocks of this model: "
     r"'embed'"),
    ({"always": ("embed", "head"), "budget": 5000}, ValueError,
     r"always=\('embed', 'head'\) needs 8,192 elements but budget=5000 is 5,000 elements"),
    ({"max_grad_norm": 0}, ValueError, r"max_grad_norm=0; allowed: None or a finite number > 0"),
    ({"max_grad_norm": -1.0}, ValueError, r"max_grad_norm=-1.0; allowed: None or a finite"),
    ({"sample_layers": 2}, ValueError, r"sample_layers=2 applies to policy='sample' only"),
    ({"policy": "sample", "sample_layers": 0}, ValueError,
     r"sample_layers=0; allowed: None or an int >= 1"),
    ({"params": P("[]", lambda: [])}, ValueError, r"params is empty; allowed: at least one"),
    ({"params": P("torch.zeros(3)", lambda: torch.zeros(3))}, TypeError,
     r"params is a torch.FloatTensor; allowed: an iterable of tensors"),
    ({"params": P("[3]", lambda: [3])}, TypeError,
     r"params\[0\] is int; allowed: torch.Tensor / nn.Parameter"),
    ({"params": P("[zeros(3, dtype=torch.int64)]", lambda: [torch.zeros(3, dtype=torch.int64)])},
     TypeError, r"has dtype torch.int64; allowed: torch.float32, torch.bfloat16, torch.float16"),
    ({"params": P("[zeros(3, dtype=torch.float64)]", lambda: [_w(3, dtype=torch.float64)])},
     TypeError, r"has dtype torch.float64; allowed: torch.float32"),
    ({"params": P("[zeros(3, dtype=torch.complex64)]", lambda: [_w(3, dtype=torch.complex64)])},
     TypeError, r"has dtype torch.complex64; allowed"),
    ({"params": P("[sparse_coo tensor]", lambda: [torch.zeros(3, 3).to_sparse()])}, TypeError,
     r"has layout torch.sparse_coo; allowed: dense \(torch.strided\) tensors"),
    ({"params": P("[p, p]", lambda: [_shared, _shared])}, ValueError,
     r"parameter params\[1\] of param group 0 is given twice .*allowed: each parameter once"),
    ({"params": P("[{'params': [p]}, {'params': [p]}]",
                  lambda: [{"params": [_shared]}, {"params": [_shared]}])}, ValueError,
     r"is given twice"),
    ({"params": P("[('w', p), ('w2', p)]", lambda: [("w", _shared), ("w2", _shared)])},
     ValueError, r"parameter 'w2' is given twice \(first as 'w'\)"),
    ({"params": P("[w * 2]  (non-leaf)", lambda: [_w(3, requires_grad=True) * 2])}, ValueError,
     r"is not a leaf tensor .*allowed: leaf tensors"),
    ({"params": P("[w.t()]  (non-contiguous)", lambda: [_noncontig]), "policy": "sparse"},
     ValueError, r"is not contiguous; policy='sparse' needs contiguous params"),
    ({"params": P("{p}", lambda: [{"params": {_shared}}])}, TypeError,
     r"params is a set, whose order changes between runs; allowed: a list"),
    ({"params": P("[(1, p)]", lambda: [(1, _shared)])}, TypeError,
     r"params\[0\] is a tuple \(int, Parameter\); allowed: \(name: str, param: Tensor\)"),
    ({"params": P("[{'lr': 1.0}]", lambda: [{"lr": 1.0}])}, ValueError,
     r"param group 0: no 'params' key"),
    ({"params": P("[{'params': []}]", lambda: [{"params": []}])}, ValueError,
     r"no parameter requires grad .*nothing would train"),
    ({"params": P("[w]  (requires_grad=False)", lambda: [_w(3).requires_grad_(False)])},
     ValueError, r"no parameter requires grad .*nothing would train"),
    ({"params": P("[{'params': [p], 'lr': -1}]", lambda: [{"params": [_w(3)], "lr": -1}])},
     ValueError, r"param group 0: lr=-1; allowed: a finite number >= 0"),
    ({"params": P("[{'params': [p], 'budget': '5%'}]",
                  lambda: [{"params": [_w(3)], "budget": "5%"}])}, ValueError,
     r"param group 0: 'budget' is set per group; allowed per group: lr, betas, eps, "
     r"weight_decay"),
    ({"params": P("[{'params': [('a', p)]}, {'params': [q]}]",
                  lambda: [{"params": [("a", _w(3))]}, {"params": [_w(3)]}])}, ValueError,
     r"some param groups have names and some do not"),
    # bf16/fp16 state formats (issue 19); the model here is fp32
    ({"master_weights": True}, ValueError,
     r"master_weights=True but no trainable param is bf16 or fp16"),
    ({"stochastic_rounding": True}, ValueError,
     r"stochastic_rounding=True but no trainable param is bf16 or fp16"),
    ({"master_weights": True, "stochastic_rounding": True}, ValueError,
     r"master_weights=True with stochastic_rounding=True; allowed: one of them"),
    ({"master_weights": "yes"}, TypeError, r"master_weights='yes'; allowed: None"),
    ({"master_weights": True, "policy": "sparse"}, ValueError,  # fp32 params, sparse too
     r"master_weights=True but no trainable param is bf16 or fp16"),
    ({"step_in_backward": "yes"}, TypeError, r"step_in_backward='yes'; allowed: True or False"),
    ({"step_in_backward": True, "max_grad_norm": 1.0}, ValueError,
     r"max_grad_norm=1.0 with step_in_backward=True; allowed: None"),
    ({"step_in_backward": True, "budget": "auto"}, ValueError,
     r"budget='auto' with step_in_backward=True; allowed: an element or byte budget"),
    ({"step_in_backward": True, "policy": "sparse"}, ValueError,
     r"step_in_backward=True applies to policy='block' and 'sample' only"),
    ({"step_in_backward": True, "order": "importance"}, ValueError,
     r"order='importance' with step_in_backward=True; allowed: one of them"),
    ({"state_dtype": "int2"}, ValueError,
     r"state_dtype='int2'; allowed: 'fp32', 'int8', 'int4', 'bf16', 'none'"),
    ({"state_dtype": "int4", "policy": "sparse"}, ValueError,
     r"state_dtype='int4' with policy='sparse'; allowed here: 'fp32', 'int8' or 'bf16'"),
]


def _bad_id(case):
    kwargs = case[0]
    return ",".join(f"{k}={v!r}" for k, v in kwargs.items())[:60]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_INPUTS, ids=[_bad_id(c) for c in BAD_INPUTS])
def test_bad_input(kwargs, exc, msg):
    kwargs = dict(kwargs)
    model = tiny_llama()
    params = kwargs.pop("params", None)
    params = params.factory() if params is not None else model.named_parameters()
    with pytest.raises(exc, match=msg):
        NTO(params, **kwargs)
    # refused before touching anything: no hook installed, requires_grad as it was
    for p in model.parameters():
        assert p.requires_grad and not p._post_accumulate_grad_hooks


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = NTO(emb.named_parameters(), budget="100%")
    with pytest.raises(TypeError, match="has a sparse gradient; allowed: dense gradients"):
        emb(torch.tensor([1, 2])).sum().backward()
    assert not opt.state


# ----------------------------------------------------------------------- AdamW at 100%


def _run_pair(steps, nto_kwargs, sched=None, clip=None, named=True):
    m1, m2 = tiny_llama(), tiny_llama()
    o1 = torch.optim.AdamW(three_groups(m1, named=False), lr=1e-3, weight_decay=0.01)
    o2 = NTO(three_groups(m2, named=named), lr=1e-3, weight_decay=0.01, **nto_kwargs)
    s1 = sched(o1) if sched else None
    s2 = sched(o2) if sched else None
    for step in range(steps):
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            x = batch(step)
            m(input_ids=x, labels=x).loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            o.step()
            o.zero_grad()
            if s:
                s.step()
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    return diff, o1, o2


def test_full_budget_equals_adamw_several_groups():
    diff, o1, o2 = _run_pair(50, {"budget": "100%"})
    assert diff <= 1e-6
    assert [g["lr"] for g in o2.param_groups] == [1e-3, 1e-3, 3e-3]
    for p1, p2 in zip([p for g in o1.param_groups for p in g["params"]],
                      [p for g in o2.param_groups for p in g["params"]]):
        s1, s2 = o1.state[p1], o2.state[p2]
        assert float(s1["step"]) == float(s2["step"]) == 50.0
        assert (s1["exp_avg"] - s2["exp_avg"]).abs().max() <= 1e-6


@pytest.mark.parametrize("budget", [1.0, N_ELEMENTS, "1GiB"])
def test_every_way_to_say_everything_is_adamw(budget):
    diff, _, o2 = _run_pair(5, {"budget": budget})
    assert diff <= 1e-6
    assert o2.memory_report()["trainable_elements"] == N_ELEMENTS


@pytest.mark.parametrize("name", ["cosine", "lambda"])
def test_lr_schedulers(name):
    if name == "cosine":
        def sched(o):
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
    else:
        def sched(o):
            return torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s))
    diff, o1, o2 = _run_pair(12, {"budget": "100%"}, sched=sched)
    assert diff <= 1e-6
    assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o2.param_groups]
    assert o2.param_groups[0]["lr"] != 1e-3


def test_max_grad_norm_equals_clip_grad_norm():
    m1, m2 = tiny_llama(), tiny_llama()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-3)
    o2 = NTO(m2.named_parameters(), lr=1e-3, budget="100%", max_grad_norm=0.5)
    for step in range(10):
        x = batch(step)
        m1(input_ids=x, labels=x).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.5)
        o1.step()
        o1.zero_grad()
        m2(input_ids=x, labels=x).loss.backward()
        o2.step()
        o2.zero_grad()
        assert math.isclose(o2.last_grad_norm, float(norm), rel_tol=1e-5)
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    assert diff <= 1e-6


def test_step_closure_and_zero_grad_modes():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="10%")
    x = batch(0)

    def closure():
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    model(input_ids=x, labels=x).loss.backward()
    opt.zero_grad(set_to_none=False)
    for i, p in enumerate(opt.table.params):
        if i in opt.active_set:
            assert p.grad is not None and not p.grad.any()
        else:
            assert p.grad is None
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------- the invariant


def _budgets():
    out = []
    for policy in ("block", "sample"):
        for frac in (0.01, 0.1, 0.5):
            out.append((policy, frac))
            out.append((policy, f"{int(frac * FULL_BYTES)}B"))
    return out


@pytest.mark.parametrize("policy,budget", _budgets())
def test_budget_holds_and_everything_trains(policy, budget):
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1%: the big tensors train a range of rows at a time
        opt = NTO(model.named_parameters(), lr=1e-3, budget=budget, policy=policy,
                  switch_every=2, seed=1)
    trainable = opt.policy.trainable
    assert trainable == set(range(N_TENSORS))
    cycle = opt.policy.cycle_steps(0)
    assert cycle <= 300
    before = [p.detach().clone() for p in model.parameters()]
    changed_by_cycle_end = None
    for step in range(max(100, cycle)):
        x = batch(step)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        rep = opt.memory_report()
        assert rep["total_bytes"] <= rep["budget_bytes"], (step, rep)
        # measured inside step(), after the update and before a switch frees anything
        assert rep["peak_total_bytes"] <= rep["budget_bytes"], (step, rep)
        assert rep["trainable_elements"] <= rep["budget_elements"]
        for i, p in enumerate(opt.table.params):
            if i not in opt.active_set:  # the anchor keeps its flag (backward never fails)
                assert p.grad is None and (not p.requires_grad or i == opt.anchor)
        opt.zero_grad()
        if step + 1 == cycle:
            changed_by_cycle_end = {i for i, (a, p) in enumerate(zip(before, model.parameters()))
                                    if not torch.equal(a, p)}
    assert changed_by_cycle_end == set(trainable)
    untouched = set(range(N_TENSORS)) - set(trainable)
    for i in untouched:
        assert torch.equal(before[i], list(model.parameters())[i])


def test_budget_bytes_of_element_budget_is_the_memory_model():
    opt = NTO(tiny_llama().named_parameters(), budget=1000)
    # 1000 elements x 12 B + one step scalar for each tensor (or range of rows: none is
    # smaller than 512 elements here) that could train at once: at most 10 (nine
    # 32-element norms and one 512-element k_proj)
    assert opt.budget_bytes() == 1000 * 12 + STEP_BYTES * 10
    assert opt.budget_elements() == 1000


def test_memory_report_measures_storage():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="100%")
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    rep = opt.memory_report()
    assert rep["grad_bytes"] == N_ELEMENTS * 4
    assert rep["state_bytes"] == N_ELEMENTS * 8 + N_TENSORS * 4
    assert rep["total_bytes"] == rep["grad_bytes"] + rep["state_bytes"] == FULL_BYTES
    assert rep["peak_total_bytes"] == FULL_BYTES
    assert rep["adamw_bytes"] == FULL_BYTES  # torch AdamW on fp32: the same 12 B/element
    assert rep["index_bytes"] == rep["offload_bytes"] == rep["transient_bytes"] == 0
    assert rep["weights_bytes"] == N_ELEMENTS * 4 and rep["budget"] == "100%"
    for key in ("budget_bytes", "budget_elements", "trainable_elements", "skipped_steps"):
        assert isinstance(rep[key], int)
    opt.zero_grad()
    assert opt.memory_report()["grad_bytes"] == 0


@pytest.mark.parametrize("masters", [None, False])
def test_memory_report_bf16_counts_fp32_moments(masters):
    model = tiny_llama(dtype=torch.bfloat16)
    opt = NTO(model.named_parameters(), budget="100%", master_weights=masters)
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    rep = opt.memory_report()
    per = 8 if masters is False else 12  # two fp32 moments (+ the fp32 master: default)
    assert rep["grad_bytes"] == N_ELEMENTS * 2
    assert rep["state_bytes"] == N_ELEMENTS * per + N_TENSORS * 4
    assert rep["budget_bytes"] == N_ELEMENTS * (per + 2) + N_TENSORS * 4
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


# ----------------------------------------------------------------------- lifecycle


def test_init_never_touches_requires_grad():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    NTO(model.named_parameters(), budget="10%")
    flags = [p.requires_grad for p in model.parameters()]
    assert flags == [True] * (N_TENSORS - 1) + [False]


def test_inactive_grads_dropped_before_first_step():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="10%")
    active = opt.active()
    assert active == ["model.embed_tokens.weight"]
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        assert p.requires_grad  # not applied yet
        assert (p.grad is not None) == (n in active)
    opt.step()  # applies the active set: all but the active and the anchor are frozen
    anchor = opt.table.infos[opt.anchor].name
    assert anchor == "model.norm.weight"  # the smallest of the params nearest the loss
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in active or n == anchor)
    opt.eval()


def test_train_before_any_backward_freezes_nothing_yet():
    """Trainer calls train() before the first backward: with no anchor known yet nothing
    is frozen (the hooks drop inactive grads), so that backward cannot fail."""
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="10%")
    opt.train()
    assert all(p.requires_grad for p in model.parameters())


def test_too_big_tensors_named_in_one_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # split into ranges of rows: no warning
        NTO(tiny_llama().named_parameters(), budget="1%")
    named = [("embed.weight", torch.nn.Parameter(torch.zeros(4, 100))),
             ("wide.weight", torch.nn.Parameter(torch.zeros(2, 80))),
             ("layers.0.w", torch.nn.Parameter(torch.zeros(10, 10)))]
    with pytest.warns(UserWarning) as record:  # one row (100, 80) is larger than the budget
        opt = NTO(named, budget=50)
    msgs = [str(r.message) for r in record if "cannot train" in str(r.message)]
    assert len(msgs) == 1
    assert "'embed.weight' (400 elements), 'wide.weight' (160 elements)" in msgs[0]
    assert "2 parameter tensor(s) are larger than the budget" in msgs[0]
    assert opt.policy.split == {2: [(0, 5), (5, 10)]}


def test_unnamed_params_follow_module_order():
    model = tiny_llama()
    opt = NTO(model.parameters(), budget="10%", switch_every=1)
    assert opt.active() == [0]
    assert opt.active_blocks() == ["#0"]
    train_step(model, opt, 0)
    assert opt.active() == [1, 2, 3, 4]


def test_always_blocks_train_every_step():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="40%", policy="sample", switch_every=1,
              always=("embed", "head"))
    for step in range(6):
        assert {"embed", "head"} <= set(opt.active_blocks())
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(opt.active())
        train_step(model, opt, step)


def test_drop_frees_state_and_offload_restores_it_bit_exactly():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="10%", switch_every=1,
              state_on_switch="offload")
    p0 = opt.table.params[0]  # embed: trains in period 0 of every cycle
    train_step(model, opt, 0)
    assert 0 in opt.offloaded and p0 not in opt.state
    saved = {k: v.clone() for k, v in opt.offloaded[0].items()}
    rep = opt.memory_report()
    assert rep["offload_bytes"] == 4096 * 8 + 4
    n = len(opt.policy.groups)
    for step in range(1, n):
        train_step(model, opt, step)
    assert 0 in opt.active_set and 0 not in opt.offloaded
    for k, v in saved.items():
        assert torch.equal(opt.state[p0][k], v)  # restored, not yet updated
    train_step(model, opt, n)  # trains, then is offloaded again
    assert float(opt.offloaded[0]["step"]) == 2.0  # the count continues
    drop = NTO(tiny_llama().named_parameters(), budget="10%", switch_every=1)
    train_step(model, drop, 0)
    assert not drop.offloaded and drop.memory_report()["offload_bytes"] == 0


# ----------------------------------------------------------------------- non-finite


def _nan_step(nonfinite, where="model.layers.0.self_attn.q_proj.weight"):
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="100%", nonfinite=nonfinite)
    train_step(model, opt, 0)
    x = batch(1)
    model(input_ids=x, labels=x).loss.backward()
    dict(model.named_parameters())[where].grad[0, 0] = float("nan")
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()}
             for i, p in enumerate(opt.table.params)}
    return model, opt, params, state


def _unchanged(model, opt, params, state):
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for i, p in enumerate(opt.table.params):
        for k, v in state[i].items():
            assert torch.equal(opt.state[p][k], v)


def test_nonfinite_skip():
    model, opt, params, state = _nan_step("skip")
    opt.step()
    _unchanged(model, opt, params, state)
    assert opt.skipped_steps == 1 and opt.memory_report()["skipped_steps"] == 1
    assert opt.step_count == 2  # the schedule still advances
    opt.zero_grad()
    train_step(model, opt, 2)  # and training goes on
    assert not torch.equal(params[0], model.model.embed_tokens.weight)


def test_nonfinite_raise_names_the_parameter():
    model, opt, params, state = _nan_step("raise")
    with pytest.raises(FloatingPointError,
                       match="'model.layers.0.self_attn.q_proj.weight' holds NaN or Inf"):
        opt.step()
    _unchanged(model, opt, params, state)


def test_nonfinite_propagate_behaves_like_torch():
    model, opt, _, _ = _nan_step("propagate")
    ref = tiny_llama()
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    train_step(ref, ropt, 0)
    x = batch(1)
    ref(input_ids=x, labels=x).loss.backward()
    ref.model.layers[0].self_attn.q_proj.weight.grad[0, 0] = float("nan")
    ropt.step()
    opt.step()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-6, rtol=0)
    assert model.model.layers[0].self_attn.q_proj.weight[0, 0].isnan()


def test_nan_in_inactive_grad_is_ignored():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="10%")
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    model.lm_head.weight.grad = torch.full_like(model.lm_head.weight, float("nan"))
    opt.step()
    assert opt.skipped_steps == 0 and model.lm_head.weight.grad is None
    assert not model.lm_head.weight.isnan().any()


# ----------------------------------------------------------------------- state_dict


def test_state_dict_weights_only_and_dtypes_kept():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = NTO(model.named_parameters(), budget="30%", switch_every=2,
              state_on_switch="offload")
    for step in range(5):
        train_step(model, opt, step)
    sd = roundtrip(opt.state_dict())
    assert sd["nto"]["step"] == 5 and sd["nto"]["offloaded"]
    opt2 = NTO(tiny_llama(dtype=torch.bfloat16).named_parameters(), budget="30%",
               switch_every=2, state_on_switch="offload")
    opt2.load_state_dict(sd)
    for st in list(opt2.state.values()) + list(opt2.offloaded.values()):
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        assert st["step"].dtype == torch.float32
    assert opt2.active() == opt.active() and opt2.step_count == 5
    assert sorted(opt2.offloaded) == sorted(opt.offloaded)
    for i, p in enumerate(opt.table.params):
        for k, v in opt.state[p].items():
            assert torch.equal(opt2.state[opt2.table.params[i]][k], v)


def _fresh_sd_and_opt(**kw):
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="10%", switch_every=2, **kw)
    for step in range(3):
        train_step(model, opt, step)
    return opt.state_dict()


def _snapshot(opt):
    sd = opt.state_dict()
    return (sd["nto"], {i: {k: v.clone() for k, v in s.items()} for i, s in sd["state"].items()},
            [dict(g) for g in sd["param_groups"]])


REFUSALS = [
    ({"policy": "sample"}, r"saved with policy='block' but this optimizer has policy='sample'"),
    ({"budget": "20%"}, r"saved with other NTO arguments \(budget_amount: saved 4534, here 9068"),
    ({"state_on_switch": "offload"}, r"state_on_switch: saved 'drop', here 'offload'"),
    ({"switch_every": 3}, r"switch_every: saved 2, here 3"),
]


@pytest.mark.parametrize("change,msg", REFUSALS)
def test_load_refuses_other_config_and_changes_nothing(change, msg):
    sd = _fresh_sd_and_opt()
    model = tiny_llama()
    kw = {"budget": "10%", "switch_every": 2, **change}
    opt = NTO(model.named_parameters(), **kw)
    train_step(model, opt, 0)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=msg):
        opt.load_state_dict(sd)
    after = _snapshot(opt)
    assert before[0] == after[0] and before[2] == after[2]
    assert before[1].keys() == after[1].keys()
    for i in before[1]:
        assert all(torch.equal(before[1][i][k], after[1][i][k]) for k in before[1][i])


def test_load_refuses_other_layout_and_foreign_states():
    import transformers

    sd = _fresh_sd_and_opt()
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    small = NTO(transformers.LlamaForCausalLM(cfg).named_parameters(), budget=4534,
                switch_every=2)
    with pytest.raises(ValueError, match="state is for 39 parameters but this optimizer has 30"):
        small.load_state_dict(sd)
    cfg.num_hidden_layers, cfg.intermediate_size = 4, 48
    other = NTO(transformers.LlamaForCausalLM(cfg).named_parameters(), budget=4534,
                switch_every=2)
    with pytest.raises(ValueError, match=r"parameter 'model.layers.0.mlp.gate_proj.weight' \(#5\) "
                       r"has shape \[64, 32\] in the checkpoint but \[48, 32\] here"):
        other.load_state_dict(sd)
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="10%", switch_every=2)
    adamw = torch.optim.AdamW(model.parameters(), amsgrad=True)  # plain AdamW imports
    with pytest.raises(ValueError, match="amsgrad=True .* NTO does not implement amsgrad"):
        opt.load_state_dict(adamw.state_dict())
    truncated = {**sd, "nto": {k: v for k, v in sd["nto"].items() if k != "policy_state"}}
    with pytest.raises(ValueError, match=r"nto\['policy_state'\] is missing"):
        opt.load_state_dict(truncated)
    edited = {**sd, "nto": {**sd["nto"], "active": [5]}}
    with pytest.raises(ValueError, match="saved active set does not match the schedule"):
        opt.load_state_dict(edited)
    with pytest.raises(ValueError, match="expected a dict with 'state' and 'param_groups'"):
        opt.load_state_dict([1, 2])
    assert opt.step_count == 0 and not opt.state


def test_accelerate_style_roundtrip_before_first_step_changes_nothing():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="10%")
    opt.load_state_dict(opt.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    ref_model = tiny_llama()
    ref = NTO(ref_model.named_parameters(), budget="10%")
    for step in range(3):
        train_step(model, opt, step)
        train_step(ref_model, ref, step)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


@pytest.mark.slow
def test_memory_report_on_a_135m_model():
    """SmolLM2-135M's shape (random weights): 10% budget, measured state <= 0.12x AdamW."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) > 100e6
    opt = NTO(model.named_parameters(), lr=1e-5, budget="10%", switch_every=1)
    x = torch.randint(0, 49152, (1, 32))
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        rep = opt.memory_report()
        assert 0 < rep["peak_total_bytes"] <= rep["budget_bytes"]
        assert rep["peak_total_bytes"] <= 0.12 * rep["adamw_bytes"]
        opt.zero_grad()
