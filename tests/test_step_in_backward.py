"""step_in_backward=True (policies/dense.py): each active param is updated in its gradient
hook and its gradient freed there, so the training state is the moments alone. The params,
state and schedule must be bit for bit those of the usual backward-then-step run."""

from __future__ import annotations

import warnings

import pytest
import test_reliability as rel
import tiny
import torch
from hypothesis import given

from nto_ext import NTO
from nto_ext import args as nto_args

STEPS = 6


def _run(step_in_backward: bool, steps: int = STEPS, groups: bool = False, model=None,
         opt=None, start: int = 0, **kw):
    model = model or tiny.tiny_llama()
    if opt is None:
        params = tiny.three_groups(model) if groups else model.named_parameters()
        opt = NTO(params, lr=1e-2, step_in_backward=step_in_backward, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + start + s))
    for s in range(start, start + steps):
        tiny.train_step(model, opt, s)
        sched.step()
    return model, opt


def _assert_same(a, b):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


CASES = [dict(policy="block", budget="25%", switch_every=2),
         dict(policy="block", budget="5%", switch_every=1),  # the embedding in row ranges
         dict(policy="sample", budget="30%", switch_every=2, state_on_switch="offload"),
         dict(policy="block", budget="100%", state_dtype="int8"),
         dict(policy="block", budget="100%", state_dtype="int4"),  # issue 21's LM rows
         dict(policy="sample", budget="30%", switch_every=1, state_dtype="none")]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_bit_identical_to_step_after_backward(kw):
    """Three param groups (their own lr and decay) and an LR scheduler: the hook reads the
    group's lr as step() would."""
    a, oa = _run(False, groups=True, **kw)
    b, ob = _run(True, groups=True, **kw)
    _assert_same(a, b)
    init = dict(tiny.tiny_llama().named_parameters())
    moved = [n for n, p in b.named_parameters() if not torch.equal(p, init[n])]
    assert len(moved) >= 3, moved  # the runs trained (each period's params moved)
    assert oa.step_count == ob.step_count == STEPS
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key, v in sa[k].items():
            assert torch.equal(v, sb[k][key]) if isinstance(v, torch.Tensor) \
                else v == sb[k][key], (k, key)


@pytest.mark.parametrize("kw", [dict(), dict(stochastic_rounding=True)],
                         ids=["masters", "stochastic-rounding"])
def test_bf16_formats_bit_identical(kw):
    """bf16 params: fp32 masters (written back when a param's period ends) and stochastic
    rounding (counter-based noise) give the bits of the usual run."""
    def run(sib):
        model = tiny.tiny_llama(dtype=torch.bfloat16)
        return _run(sib, model=model, budget="25%", switch_every=2, **kw)[0]

    _assert_same(run(False), run(True))


def test_grad_norm_is_the_whole_steps():
    """`last_grad_norm` (NTOCallback's nto/grad_norm) adds up over the params of a step."""
    kw = dict(budget="25%", switch_every=2)
    _, oa = _run(False, **kw)
    _, ob = _run(True, **kw)
    assert ob.last_grad_norm == pytest.approx(oa.last_grad_norm, rel=1e-6)


def test_no_gradient_is_kept_and_the_budget_holds_more():
    """After backward no param holds a gradient; the budget counts the moments only, so a
    byte budget holds 12/8 the elements of fp32 moments (gradient kept) and the measured
    state stays within it; the transient is one dense gradient."""
    model = tiny.tiny_llama()
    budget = "40000B"
    keep = NTO(tiny.tiny_llama().named_parameters(), budget=budget)
    opt = NTO(model.named_parameters(), budget=budget, step_in_backward=True, switch_every=4)
    assert (keep.budget_elements(), opt.budget_elements()) == (40000 // 12, 40000 // 8)
    for s in range(7):  # the state is dropped at each switch (after every 4th step)
        x = tiny.batch(s)
        model(input_ids=x, labels=x).loss.backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        rep = opt.memory_report()
        assert rep["grad_bytes"] == 0 and (0 < rep["state_bytes"]) == (s % 4 != 3)
        assert rep["peak_total_bytes"] <= rep["budget_bytes"] == 40000
        largest = max(p.numel() * 4 for i, p in enumerate(opt.table.params)
                      if i in opt.active_set)
        assert rep["transient_bytes"] == largest


def test_none_format_trains_every_weight_in_step_counts():
    """No moments and no kept gradient: every weight trains in every step, and the state is
    one step count per tensor."""
    model = tiny.tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = NTO(model.named_parameters(), budget="1KiB", switch_every=1, state_dtype="none",
              step_in_backward=True)
    tiny.train_step(model, opt, 0)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.memory_report()["state_bytes"] == 4 * len(before)


def test_second_backward_before_step_raises():
    model = tiny.tiny_llama()
    opt = NTO(model.named_parameters(), budget="100%", step_in_backward=True)
    x = tiny.batch(0)
    model(input_ids=x, labels=x).loss.backward()
    once = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="second backward.*gradient accumulation"):
        model(input_ids=x, labels=x).loss.backward()
    opt.step()  # applies nothing of the refused backward; the next step works
    for n, p in model.named_parameters():
        assert torch.equal(p, once[n]), n
    model(input_ids=x, labels=x).loss.backward()


def test_clipping_set_later_is_refused_in_backward():
    model = tiny.tiny_llama()
    opt = NTO(model.named_parameters(), budget="100%", step_in_backward=True)
    opt.max_grad_norm = 1.0
    x = tiny.batch(0)
    with pytest.raises(RuntimeError, match="max_grad_norm=1.0 with step_in_backward"):
        model(input_ids=x, labels=x).loss.backward()


def test_refused_in_a_multi_process_run(monkeypatch):
    """(The other refusals are in test_optimizer.BAD_INPUTS.)"""
    monkeypatch.setattr(nto_args, "multi_process", lambda: True)
    with pytest.raises(ValueError, match="more than one process"):
        NTO(tiny.tiny_llama().named_parameters(), step_in_backward=True)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_nonfinite_gradient(nonfinite):
    """A NaN in one param's gradient: under "skip" that param keeps its value (the others
    keep their update) and the step counts once; "raise" names the param and says that
    earlier params were updated."""
    model = tiny.tiny_llama()
    opt = NTO(model.named_parameters(), budget="100%", step_in_backward=True,
              nonfinite=nonfinite)
    bad = model.model.layers[0].mlp.down_proj.weight
    bad.register_hook(lambda g: g * float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = tiny.batch(0)
    loss = model(input_ids=x, labels=x).loss
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="down_proj.*updated those whose"):
            loss.backward()
        return
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["model.layers.0.mlp.down_proj.weight"],
                       before["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert opt.skipped_steps == 1


def test_resume_inside_a_period_is_bit_exact():
    """Saved after step 3 of a row-range schedule (periods of 2): a new model and NTO that
    load it continue exactly as the uninterrupted run."""
    kw = dict(policy="block", budget="5%", switch_every=2)
    full, _ = _run(True, **kw)
    half, opt = _run(True, steps=3, **kw)
    sd, weights = opt.state_dict(), {k: v.clone() for k, v in half.state_dict().items()}
    model = tiny.tiny_llama(seed=1)
    model.load_state_dict(weights)
    resumed = NTO(model.named_parameters(), lr=1e-2, step_in_backward=True, **kw)
    resumed.load_state_dict(sd)
    _run(True, steps=STEPS - 3, model=model, opt=resumed, start=3)
    _assert_same(full, model)


def test_checkpoint_of_the_other_mode():
    """The plan of a byte budget depends on the mode: a checkpoint says which it was and
    the other mode refuses it. An element budget plans the same units in both modes: a run
    resumes in the other mode bit for bit."""
    _, opt = _run(False, steps=1, budget="40000B")
    other = NTO(tiny.tiny_llama().named_parameters(), budget="40000B", step_in_backward=True)
    with pytest.raises(ValueError, match="step_in_backward: saved None, here True"):
        other.load_state_dict(opt.state_dict())
    kw = dict(budget="25%", switch_every=2)
    full, _ = _run(False, **kw)
    half, opt = _run(False, steps=3, **kw)
    model = tiny.tiny_llama(seed=1)
    model.load_state_dict(half.state_dict())
    resumed = NTO(model.named_parameters(), lr=1e-2, step_in_backward=True, **kw)
    resumed.load_state_dict(opt.state_dict())
    _run(True, steps=STEPS - 3, model=model, opt=resumed, start=3)
    _assert_same(full, model)


def test_trainer(tmp_path):
    """Trainer's defaults clip gradients (max_grad_norm=1.0) and may accumulate: refused by
    name; with max_grad_norm=0 and a cosine schedule the run is bit for bit the usual one."""
    import dist_worker as W
    from transformers import Trainer, TrainingArguments

    from nto_ext.hf import NTOCallback, nto_optimizer

    def args(**kw):
        return TrainingArguments(**{**dict(
            output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
            learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
            disable_tqdm=True, seed=0, dataloader_num_workers=0, logging_steps=2,
            lr_scheduler_type="cosine", warmup_steps=1), **kw})

    model = W.tiny_llama()
    for bad, match in ((args(), "max_grad_norm=1.0 with step_in_backward"),
                       (args(max_grad_norm=0, gradient_accumulation_steps=2),
                        "gradient_accumulation_steps=2 with step_in_backward")):
        with pytest.raises(ValueError, match=match):
            nto_optimizer(model, bad, step_in_backward=True)

    def run(sib):
        model = W.tiny_llama()
        a = args(max_grad_norm=0)
        tr = Trainer(model=model, args=a, train_dataset=W.SeqDataset(),
                     optimizer_cls_and_kwargs=nto_optimizer(
                         model, a, budget="25%", switch_every=2, step_in_backward=sib),
                     callbacks=[NTOCallback()])
        tr.train()
        return tr

    a, b = run(False), run(True)
    _assert_same(a.model, b.model)
    logs = [h for h in b.state.log_history if "loss" in h]
    assert logs and all(h["nto/grad_bytes"] == 0 for h in logs)


@pytest.mark.parametrize("how", ["tied", "checkpointing"])
def test_tied_weights_and_gradient_checkpointing(how):
    """A tied embedding / lm_head (SmolLM2, GPT-2) gets one update from both uses' summed
    gradient; under gradient checkpointing a layer recomputed in backward still sees its
    old weights: both bit for bit the usual run."""
    import transformers

    def model():
        torch.manual_seed(0)
        cfg = tiny.llama_config()
        cfg.tie_word_embeddings = how == "tied"
        m = transformers.LlamaForCausalLM(cfg)
        if how == "checkpointing":
            with warnings.catch_warnings():  # renamed activation_checkpointing_enable in v5
                warnings.simplefilter("ignore", FutureWarning)
                m.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        return m

    kw = dict(policy="sample", budget="100%", switch_every=1, state_dtype="none")
    a, _ = _run(False, model=model(), **kw)
    b, _ = _run(True, model=model(), **kw)
    if how == "tied":
        assert a.lm_head.weight is a.model.embed_tokens.weight
    _assert_same(a, b)
    assert not torch.equal(a.lm_head.weight, model().lm_head.weight)


def test_step_with_a_closure():
    """step(closure) (Lightning's automatic optimization, LBFGS-style loops): the closure's
    backward updates the params, step() advances the schedule."""
    a, _ = _run(False, budget="25%", switch_every=2)
    model = tiny.tiny_llama()
    opt = NTO(model.named_parameters(), lr=1e-2, budget="25%", switch_every=2,
              step_in_backward=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for s in range(STEPS):
        def closure(s=s):
            x = tiny.batch(s)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss
        assert opt.step(closure) is not None
        opt.zero_grad()
        sched.step()
    _assert_same(a, model)


FORMATS = {"bwd-fp32": (torch.float32, {}), "bwd-int8": (torch.float32, {"state_dtype": "int8"}),
           "bwd-none": (None, {"state_dtype": "none", "switch_every": 1,
                               "master_weights": False})}


@pytest.mark.parametrize("kind", rel.KINDS)
@pytest.mark.parametrize("policy", ["block", "sample"])
@rel.RUN_SETTINGS
@given(run=rel.budget_runs(widths=(1, 8)))
def test_budget_invariant(policy, kind, run):
    """test_reliability's invariant (measured storage within the budget after every
    backward and step) in backward: fp32, 8-bit and no moments (the last with a bf16/fp32
    mix), whole tensors and ranges of rows, one backward per step."""
    torch.set_num_threads(1)
    run = {**run, "accumulate": 1}
    for name, (dtype, fmt) in FORMATS.items():
        rel.DTYPES[name] = dtype
        rel.FORMAT_ARGS[name] = {**fmt, "step_in_backward": True}
        try:
            rel._budget_run(policy, kind, name, run)
        finally:
            del rel.DTYPES[name], rel.FORMAT_ARGS[name]


def test_a_guard_pickled_before_step_in_backward_loads():
    """A GradGuard pickled (inside an NTO) by a version without step_in_backward lacks its
    fields: unpickled, it works as one built without it."""
    import pickle

    from nto_ext.grads import GradGuard

    old = GradGuard("skip", None)
    for name in ("in_backward", "_counted", "_sumsq"):
        delattr(old, name)
    guard = pickle.loads(pickle.dumps(old))
    assert guard.in_backward is False
    assert guard.found_nonfinite("w", 3) is False and guard.skipped_steps == 1
