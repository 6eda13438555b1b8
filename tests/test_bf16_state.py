"""bf16 moments (issue 20, state_dtype="bf16"): masked_adamw_ with bf16 exp_avg /
exp_avg_sq against its reference (moments bit for bit, dense and indexed, every CPU
variant), the memory model, the budget invariant, resume in a fresh process, offload,
checkpoints and bad input."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_reliability as rel
import torch
from hypothesis import given
from test_int8 import (
    _model,
    _steps,
    adamw_after_one_step,
    budget_runs_with_state_dtype,
    check_resume_in_a_fresh_process,
    cpu_variant_outputs,
)

from nto_ext import NTO, _reference, ops
from nto_ext.formats import BF16

ROOT = Path(__file__).resolve().parents[1]
HAS_KERNELS = ops.backend() != "reference"
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="compiled extension not loaded")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
SIZES = [1, 7, 17, 33, 1000, 65536 + 300]  # below / past a vector block, past a work item
KW = dict(lr=1e-2, budget="40%", switch_every=2, state_dtype="bf16", state_on_switch="offload")


def _uniform(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """The same numbers under every CPU capability (torch's randn is not)."""
    return torch.from_numpy((np.random.default_rng(seed).random(n, dtype=np.float32) - 0.5)
                            * (2 * scale))


def _inputs(n: int, dtype, gdtype, indexed: bool):
    p, g = _uniform(n, 1).to(dtype), _uniform(n, 2, 0.1).to(gdtype)
    idx = torch.arange(0, n, 3) if indexed else None
    k = n if idx is None else idx.numel()
    m = _uniform(k, 3, 0.01).bfloat16()
    v = _uniform(k, 4, 1e-3).abs().bfloat16()
    return p, g, m, v, idx


def _run(fn, p, g, m, v, idx, steps=(1, 2, 3)):
    p, m, v = p.clone(), m.clone(), v.clone()
    for s in steps:
        fn([p], [g], [m], [v], [idx], ops._step_tensors(s, 1), *HYPER.values())
    return p, m, v


@needs_kernels
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("dtype,gdtype", [(torch.float32, torch.float32),
                                          (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16)])
@pytest.mark.parametrize("n", SIZES)
def test_kernel_equals_reference(n, dtype, gdtype, indexed):
    """bf16 moments bit for bit (each the fp32 update rounded to nearest once); the
    params as masked_adamw_'s fp32-state tests hold them (torch's fp32 reference rounds
    its own ops)."""
    args = _inputs(n, dtype, gdtype, indexed)
    got = _run(torch.ops.nto.masked_adamw_.default, *args)
    want = _run(_reference.masked_adamw_, *args)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=1e-6, atol=1e-6)
    if indexed:  # positions not indexed are not written
        rest = torch.ones(n, dtype=torch.bool)
        rest[args[4]] = False
        assert torch.equal(got[0][rest], args[0][rest])


VARIANT = r"""
import hashlib, torch
from test_bf16_state import _inputs, _run
h = hashlib.sha256()
for indexed in (False, True):
    out = _run(torch.ops.nto.masked_adamw_.default, *_inputs(4096 + 77, torch.float32,
               torch.float32, indexed))
    for t in out:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@needs_kernels
def test_every_cpu_variant_gives_the_same_bits():
    digests = cpu_variant_outputs(VARIANT)
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("over,err,msg", [
    ({"m": torch.zeros(300, dtype=torch.float16)}, TypeError,
     r"exp_avgs\[0\] has dtype torch.float16; allowed: torch.float32 or torch.bfloat16"),
    ({"v": torch.zeros(300)}, TypeError, r"exp_avgs\[0\] has dtype torch.bfloat16 but "
     r"exp_avg_sqs\[0\] has torch.float32; allowed: both moments of one dtype"),
])
def test_bad_moment_dtypes_are_named_alike_by_kernel_and_reference(over, err, msg):
    impls = [_reference.masked_adamw_] + ([torch.ops.nto.masked_adamw_.default]
                                          if HAS_KERNELS else [])
    for fn in impls:
        a = dict(p=torch.zeros(300), g=torch.zeros(300), m=torch.zeros(300, dtype=torch.bfloat16),
                 v=torch.zeros(300, dtype=torch.bfloat16))
        a.update(over)
        with pytest.raises(err, match=msg):
            fn([a["p"]], [a["g"]], [a["m"]], [a["v"]], [None], ops._step_tensors(1, 1),
               *HYPER.values())


# ------------------------------------------------------------------- through NTO


def test_adamw_through_nto_keeps_bf16_moments_close_to_fp32():
    runs = {}
    for sd in ("fp32", "bf16"):
        named = _model()
        opt = NTO(named, lr=1e-2, budget="100%", state_dtype=sd)
        _steps(opt, named, 0, 5)
        runs[sd] = (named, opt)
    (a, _), (b, opt) = runs["fp32"], runs["bf16"]
    for (_, p), (_, q) in zip(a, b):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-3)  # lr 1e-2, 5 steps
    assert {st["exp_avg"].dtype for st in opt.state.values()} == {torch.bfloat16}


def test_memory_model_and_report_count_4_bytes_per_element():
    named = _model()
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype="bf16")
    _steps(opt, named, 0, 1)
    numels = [p.numel() for _, p in named]
    assert opt.memory_report()["state_bytes"] == 4 * sum(numels) + 4 * len(numels)
    assert opt.policy.bytes_per_element(torch.float32) == 4 + 4
    model = [torch.nn.Parameter(torch.zeros(256, 256)) for _ in range(24)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = NTO([(f"layers.{i}.w", p) for i, p in enumerate(model)], budget="5%")
        bf16 = NTO([(f"layers.{i}.w", p) for i, p in enumerate(model)],
                   budget=f"{fp32.budget_bytes()}B", state_dtype="bf16")
    assert 1.45 < bf16.budget_elements() / fp32.budget_elements() < 1.51  # 12 / 8 B


@pytest.mark.parametrize("kind", rel.KINDS)
@pytest.mark.parametrize("policy", ["block", "sample", "sparse"])
@rel.RUN_SETTINGS
@given(run=rel.budget_runs(widths=(1, 8)))
def test_budget_invariant_with_bf16_state(policy, kind, run):
    budget_runs_with_state_dtype("bf16", policy, kind, run)


def test_resume_in_a_fresh_process_is_bit_exact_and_offload_keeps_bf16(tmp_path):
    opt = check_resume_in_a_fresh_process(tmp_path, KW)
    assert {st["exp_avg"].dtype for st in opt.offloaded.values()} == {torch.bfloat16}


def _imports_adamw_rounded_to_bf16(policy: str) -> None:
    """torch AdamW's state loaded into NTO at 100% with bf16 moments: each moment rounded
    (flat under sparse, whose state is compact)."""
    named = _model()
    adamw = adamw_after_one_step(named)
    opt = NTO(named, lr=1e-2, budget="100%", policy=policy, state_dtype="bf16")
    opt.load_state_dict(adamw.state_dict())
    for _, p in named:
        for k in ("exp_avg", "exp_avg_sq"):
            want = adamw.state[p][k].bfloat16()
            assert torch.equal(opt.state[p][k], want.reshape(opt.state[p][k].shape))


def test_torch_adamw_state_imports_rounded_to_bf16():
    _imports_adamw_rounded_to_bf16("block")


@pytest.mark.parametrize("saved,loaded", [("bf16", "fp32"), ("fp32", "bf16"),
                                          ("bf16", "int8")])
def test_checkpoint_needs_the_same_state_dtype(saved, loaded):
    named = _model()
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype=saved)
    _steps(opt, named, 0, 1)
    other = NTO(_model(), lr=1e-2, budget="100%", state_dtype=loaded)
    with pytest.raises(ValueError, match="state_dtype: saved"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("edit,msg", [
    (lambda st: st.update(exp_avg=st["exp_avg"].float()), "expected contiguous torch.bfloat16"),
    (lambda st: st["exp_avg_sq"].fill_(-1.0), "exp_avg_sq has negative values"),
    (lambda st: st["exp_avg"].fill_(float("nan")), "holds NaN or Inf"),
])
def test_corrupted_checkpoints_are_refused_with_no_change(edit, msg):
    named = _model()
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype="bf16")
    _steps(opt, named, 0, 2)
    sd = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors, as torch's
    edit(sd["state"][0])
    before = opt.state_dict()
    with pytest.raises(ValueError, match=msg):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(after["state"][0][k], before["state"][0][k])
               for k in before["state"][0])


def test_state_edited_by_hand_is_refused_at_step():
    named = _model()
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype="bf16")
    _steps(opt, named, 0, 1)
    p = named[0][1]
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].float()
    before = p.detach().clone()
    with pytest.raises(ValueError, match="expected torch.bfloat16"):
        _steps(opt, named, 1, 2)
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("kw,msg", [
    ({"master_weights": True}, "allowed: one of them"),
    ({}, "pass master_weights=False"),  # bf16 params: no masters with bf16 moments
])
def test_bad_arguments_are_refused(kw, msg):
    params = [torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16)) for _ in range(2)]
    with pytest.raises(ValueError, match=msg):
        NTO(params, budget="100%", state_dtype="bf16", **kw)
    assert all(not p._post_accumulate_grad_hooks for p in params)


def test_plan_knows_the_bf16_cost():
    from nto_ext.planner import plan

    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    fp32, bf16 = plan(model, "1200KiB"), plan(model, "1200KiB", state_dtype="bf16")
    assert max(g.elements for g in bf16.groups) > 1.2 * max(g.elements for g in fp32.groups)
    assert BF16.state_bytes(257) == 4 * 257
    assert "state format: bf16 (bf16 moments, 4 B per element)" in str(bf16)
    assert "state format: fp32 (fp32 moments" in str(fp32)
    assert bf16.to_dict()["state_format"] == "bf16"


# ------------------------------------------------------------------- sparse


def _sparse_run(state_dtype, steps, budget="20%", named=None, opt=None, start=0):
    named = named or _model()
    opt = opt or NTO(named, lr=1e-2, budget=budget, policy="sparse", switch_every=3,
                     state_dtype=state_dtype)
    _steps(opt, named, start, steps)
    return named, opt


def test_sparse_keeps_bf16_compact_moments_through_regrowth():
    """The compact moments stay bf16 through drops and regrowths (remap_state carries them
    bit for bit); 12 B per chosen element; the chosen count is the fp32 run's."""
    named, opt = _sparse_run("bf16", 10)  # regrowths at steps 3, 6, 9
    _, ref = _sparse_run("fp32", 10)
    states = [st for st in opt.state.values() if st]
    assert states and all(st[k].dtype == torch.bfloat16 for st in states
                          for k in ("exp_avg", "exp_avg_sq"))
    assert opt.policy.k == ref.policy.k
    chosen = sum(st["indices"].numel() for st in states)
    assert opt.memory_report()["state_bytes"] == 4 * chosen  # two bf16 moments
    assert opt.policy.bytes_per_element(torch.float32) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = NTO(_model(), budget="64KiB", policy="sparse")
        bf16 = NTO(_model(), budget="64KiB", policy="sparse", state_dtype="bf16")
    assert bf16.policy.k * 12 <= 65536 < (bf16.policy.k + 1) * 12
    assert fp32.policy.k * 16 <= 65536 < (fp32.policy.k + 1) * 16


def test_sparse_bf16_resume_across_a_regrowth_is_bit_exact():
    named, opt = _sparse_run("bf16", 5)
    sd = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for _, p in named]
    _sparse_run("bf16", 11, named=named, opt=opt, start=5)
    other = _model()
    for (_, p), w in zip(other, params):
        p.data.copy_(w)
    opt2 = NTO(other, lr=1e-2, budget="20%", policy="sparse", switch_every=3,
               state_dtype="bf16")
    opt2.load_state_dict(sd)
    _sparse_run("bf16", 11, named=other, opt=opt2, start=5)
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(named, other))
    for p, q in zip((p for _, p in named), (q for _, q in other)):
        a, b = opt.state.get(p), opt2.state.get(q)
        assert (a is None) == (b is None)
        if a:
            assert all(torch.equal(a[k], b[k]) for k in ("indices", "exp_avg", "exp_avg_sq"))


def test_sparse_checkpoint_moments_must_match_state_dtype():
    _, opt = _sparse_run("bf16", 2)
    sd = copy.deepcopy(opt.state_dict())
    k = next(k for k, st in sd["state"].items() if st)
    sd["state"][k]["exp_avg"] = sd["state"][k]["exp_avg"].float()
    other = NTO(_model(), lr=1e-2, budget="20%", policy="sparse", switch_every=3,
                state_dtype="bf16")
    with pytest.raises(ValueError, match="expected a contiguous torch.bfloat16 tensor"):
        other.load_state_dict(sd)


def test_sparse_at_100_percent_imports_torch_adamw_state_rounded_to_bf16():
    _imports_adamw_rounded_to_bf16("sparse")
