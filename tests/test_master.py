"""bf16/fp16 params (issue 19): fp32 master weights of the active set, stochastic rounding,
the arguments that choose them, their bytes and their checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nto_ext import NTO
from nto_ext.formats.master import stochastic_round, uniform

SHAPES = [(24, 16), (16,), (16, 24), (24,), (8, 24)]
BF16 = torch.bfloat16


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _grad(step: int, i: int) -> torch.Tensor:
    """The gradient of param i at `step`, in bf16 (a pure function of both)."""
    g = torch.Generator().manual_seed(1000 * step + i)
    return (torch.randn(SHAPES[i], generator=g) * 1e-2).to(BF16)


def _step(opt, params, step, cast=None):
    for i in opt.active_set:
        g = _grad(step, i)
        params[i].grad = g if cast is None else g.to(cast)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("state_on_switch", ["offload", "drop"])
def test_masters_train_as_fp32_would(state_on_switch):
    """bf16 params with masters == fp32 params given the same (bf16) gradients, rounded:
    bit for bit, at a partial budget whose switches offload the masters (they come back
    exactly). Under "drop" a master is made again from the bf16 param when its param
    becomes active. Each param is its master rounded to nearest, or stochastically (with
    the stream of its seed, step and index) at the step its period ends."""
    low, high = _params(BF16), _params(torch.float32)
    for a, b in zip(low, high):
        b.data.copy_(a.data.float())
    kw = dict(lr=3e-3, budget=700, switch_every=2, state_on_switch=state_on_switch)
    opt_low, opt_high = NTO(low, **kw), NTO(high, **kw)
    compared, retired_seen = 0, 0
    for step in range(14):
        assert opt_low.active_set == opt_high.active_set
        trained = sorted(opt_low.active_set)
        _step(opt_low, low, step)
        _step(opt_high, high, step, cast=torch.float32)
        for i in trained:
            st = opt_low.state.get(low[i]) or opt_low.offloaded.get(i)
            if st is None:  # dropped at the switch after this step
                continue
            compared += 1
            retired = i not in opt_low.active_set  # rounded stochastically as it left
            retired_seen += retired
            want = (stochastic_round(st["master"], BF16, 0, step, i).view(SHAPES[i])
                    if retired else st["master"].to(BF16))
            assert torch.equal(low[i].detach(), want), (step, i)
            if state_on_switch == "offload":
                assert torch.equal(st["master"], high[i].detach()), (step, i)
    assert compared > 10 and (retired_seen > 3 or state_on_switch == "drop")
    if state_on_switch == "drop":  # masters restarted from rounded params: fp32 differs
        assert any(not torch.equal(a.detach(), b.detach().to(BF16)) for a, b in zip(low, high))


CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_master import _params, _grad, BF16
from nto_ext import NTO, ops
assert ops.backend() == "reference", ops.backend()
low, ref = _params(BF16), [torch.nn.Parameter(p.detach().float()) for p in _params(BF16)]
kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
opt = NTO(low, budget="100%", **kw)
adamw = torch.optim.AdamW(ref, foreach=False, **kw)
for step in range(10):
    for i, (p, q) in enumerate(zip(low, ref)):
        p.grad, q.grad = _grad(step, i), _grad(step, i).float()
    opt.step(); adamw.step(); opt.zero_grad(); adamw.zero_grad()
    for p, q in zip(low, ref):
        assert torch.equal(opt.state[p]["master"], q.detach()), step
        assert torch.equal(p.detach(), q.detach().to(BF16)), step
print("ok")
"""


def test_masters_equal_torch_adamw_on_fp32_bitwise():
    """The pure-PyTorch reference: torch.optim.AdamW on fp32 copies, rounded to bf16 each
    step. Run with the reference kernels (NTO_EXT_BACKEND=reference: the compiled ones
    agree with it to rounding, tested in test_ops), in a fresh process."""
    env = {**os.environ, "NTO_EXT_BACKEND": "reference",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_memory_report_counts_masters_and_the_model():
    params = _params(BF16)
    opt = NTO(params, lr=1e-3, budget="100%")
    _step(opt, params, 0)
    rep = opt.memory_report()
    n = sum(p.numel() for p in params)
    assert rep["state_bytes"] == n * 12 + 4 * len(params)  # moments + master; step scalars
    assert rep["budget_bytes"] == n * 14 + 4 * len(params)  # + the bf16 grad
    assert rep["transient_bytes"] == 0  # the fused kernel reads the bf16 grad in place
    params = _params(BF16)
    plain = NTO(params, lr=1e-3, budget="100%", master_weights=False)
    _step(plain, params, 0)
    assert plain.memory_report()["state_bytes"] == n * 8 + 4 * len(params)


def test_fp32_params_of_a_mixed_model_keep_fp32_moments():
    params = _params(BF16)
    params[1] = torch.nn.Parameter(params[1].detach().float())
    opt = NTO(params, lr=1e-3, budget="100%")
    for i, p in enumerate(params):
        p.grad = _grad(0, i).to(p.dtype)
    opt.step()
    assert "master" not in opt.state[params[1]]
    assert "master" in opt.state[params[0]]


@pytest.mark.parametrize("kw,err,msg", [
    ({"master_weights": True, "stochastic_rounding": True}, ValueError, "allowed: one"),
    ({"master_weights": "yes"}, TypeError, "master_weights='yes'; allowed"),
    ({"stochastic_rounding": 1}, TypeError, "stochastic_rounding=1; allowed"),
    ({"master_weights": True, "stochastic_rounding": True, "policy": "sparse"}, ValueError,
     "allowed: one"),
    ({"state_dtype": "int8", "policy": "sparse"}, ValueError, "pass master_weights=False"),
])
def test_bad_combinations_are_refused_before_anything_changes(kw, err, msg):
    """On bf16 params (fp32 ones: tests/test_optimizer.py BAD_INPUTS)."""
    params = _params(BF16)
    flags = [p.requires_grad for p in params]
    with pytest.raises(err, match=msg):
        NTO(params, **kw)
    assert [p.requires_grad for p in params] == flags
    assert all(not p._post_accumulate_grad_hooks for p in params)


def test_per_group_format_is_refused():
    with pytest.raises(ValueError, match="'master_weights' is set per group"):
        NTO([{"params": _params(BF16), "master_weights": False}])


@pytest.mark.parametrize("policy", ["block", "sparse"])
@pytest.mark.parametrize("saved,loaded", [({}, {"master_weights": False}),
                                          ({"master_weights": False}, {}),
                                          ({"stochastic_rounding": True}, {})])
def test_checkpoint_needs_the_same_format(saved, loaded, policy):
    """A checkpoint of one bf16 format is refused by another, naming the argument (sparse
    too: its checkpoints from before masters were its default have no master rows)."""
    params = _params(BF16)
    opt = NTO(params, lr=1e-3, budget="100%", policy=policy, **saved)
    _step(opt, params, 0)
    sd = opt.state_dict()
    other = NTO(_params(BF16), lr=1e-3, budget="100%", policy=policy, **loaded)
    before = other.state_dict()
    with pytest.raises(ValueError, match="(master_weights|stochastic_rounding): saved"):
        other.load_state_dict(sd)
    assert other.state_dict()["nto"] == before["nto"]


# ------------------------------------------------------------------ stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_between_neighbours(dtype):
    lo = torch.tensor([1.0, -3.0, 1e-3, 0.0, 60000.0], dtype=dtype)
    hi = (lo.view(torch.int16) + 1).view(dtype)  # the next 16-bit pattern: a neighbour
    for frac in (0.25, 0.7):
        x = lo.float() + frac * (hi.float() - lo.float())
        draws = torch.stack([stochastic_round(x, dtype, 7, s, 3) for s in range(4000)])
        assert ((draws == lo) | (draws == hi)).all()
        up = (draws == hi).float().mean(0)
        assert ((up - frac).abs() < 4 * (frac * (1 - frac) / 4000) ** 0.5).all(), up
        mean = draws.float().mean(0)
        spread = (hi.float() - lo.float()).abs()
        assert ((mean - x).abs() <= 0.05 * spread).all()


def test_stochastic_rounding_keeps_exact_and_special_values():
    x = torch.tensor([1.0, 0.0, -2.5, float("inf"), float("nan"), 3.4e38, -1e-45])
    for step in range(50):
        out = stochastic_round(x, BF16, 0, step, 0)
        assert torch.equal(out[:4], x[:4].to(BF16)) and out[4].isnan()
        assert out[5] == float("inf")  # beyond the largest bf16: as rounding to nearest
        assert out[6].float() <= 0 and out[6].float() > -1e-39


def test_stochastic_stream_is_a_pure_function_of_its_key():
    a = uniform(3, 10, 2, 0, 5000, torch.device("cpu"))
    assert torch.equal(a, uniform(3, 10, 2, 0, 5000, torch.device("cpu")))
    assert torch.equal(a[100:], uniform(3, 10, 2, 100, 4900, torch.device("cpu")))
    for other in ((4, 10, 2), (3, 11, 2), (3, 10, 3)):
        assert not torch.equal(a, uniform(*other, 0, 5000, torch.device("cpu")))
    assert 0.0 <= float(a.min()) and float(a.max()) < 1.0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0))
        one = stochastic_round(x, BF16, 1, 2, 3)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(one.view(torch.int16),
                           stochastic_round(x, BF16, 1, 2, 3).view(torch.int16))
    finally:
        torch.set_num_threads(threads)


def test_stochastic_rounding_moves_updates_that_round_to_nothing():
    """At lr 1e-5 a bf16 weight near 1 never changes when rounded to nearest; with
    stochastic rounding it moves, by the fp32 update on average."""
    p_plain = torch.nn.Parameter(torch.ones(4096, dtype=BF16))
    p_sr = torch.nn.Parameter(torch.ones(4096, dtype=BF16))
    plain = NTO([p_plain], lr=1e-5, weight_decay=0.0, budget="100%", master_weights=False)
    sr = NTO([p_sr], lr=1e-5, weight_decay=0.0, budget="100%", stochastic_rounding=True)
    for _ in range(20):
        for p, opt in ((p_plain, plain), (p_sr, sr)):
            p.grad = torch.ones_like(p)
            opt.step()
            opt.zero_grad()
    assert torch.equal(p_plain.detach(), torch.ones_like(p_plain))
    moved = 1.0 - p_sr.detach().float().mean().item()
    assert abs(moved - 20 * 1e-5) < 0.25 * 20 * 1e-5, moved


@pytest.mark.parametrize("fmt", [{}, {"stochastic_rounding": True}])
def test_strided_params_train_as_contiguous_ones(fmt):
    base = torch.randn(16, 24, generator=torch.Generator().manual_seed(3)).to(BF16)
    strided = torch.nn.Parameter(base.t())  # a transposed view: not contiguous
    dense = torch.nn.Parameter(base.t().contiguous())
    start = dense.detach().clone()
    assert not strided.is_contiguous()
    opts = [NTO([p], lr=1e-2, budget="100%", **fmt) for p in (strided, dense)]
    for step in range(3):
        g = torch.randn(24, 16, generator=torch.Generator().manual_seed(step)).to(BF16)
        for p, opt in zip((strided, dense), opts):
            p.grad = g.clone() if p is dense else g.t().contiguous().t()
            opt.step()
            opt.zero_grad()
    assert torch.equal(strided.detach(), dense.detach())
    assert not torch.equal(dense.detach(), start)


# --------------------------------------------------------------- policy="sparse" (compact)


def _sparse_pair(**kw):
    """bf16 params and fp32 copies of them, each under NTO(policy="sparse", **kw)."""
    low, high = _params(BF16), _params(torch.float32)
    for a, b in zip(low, high):
        b.data.copy_(a.data.float())
    kw = dict(lr=3e-3, budget=300, policy="sparse", switch_every=2, weight_decay=0.1, **kw)
    return low, high, NTO(low, **kw), NTO(high, **kw)


def _chosen(opt, params):
    return {i: opt.state[p]["indices"].long() for i, p in enumerate(params)
            if p in opt.state and "indices" in opt.state[p]}


def test_sparse_masters_train_as_fp32_would():
    """Each chosen element keeps an fp32 master: with the same (bf16) gradients, the masters
    equal the fp32 run's weights bit for bit, the bf16 params hold them rounded to nearest,
    and elements never chosen are untouched (regrow_fraction 0: nothing is dropped)."""
    low, high, opt_low, opt_high = _sparse_pair(regrow_fraction=0.0)
    start = [p.detach().clone() for p in low]
    for step in range(8):
        _step(opt_low, low, step)
        _step(opt_high, high, step, cast=torch.float32)
        got, want = _chosen(opt_low, low), _chosen(opt_high, high)
        assert got.keys() == want.keys() and all(torch.equal(got[i], want[i]) for i in got)
        for i, idx in got.items():
            master = opt_low.state[low[i]]["master"]
            assert torch.equal(master, high[i].detach().reshape(-1)[idx]), (step, i)
            flat = low[i].detach().reshape(-1)
            assert torch.equal(flat[idx], master.to(BF16)), (step, i)
            rest = torch.ones(flat.numel(), dtype=torch.bool)
            rest[idx] = False
            assert torch.equal(flat[rest], start[i].reshape(-1)[rest]), (step, i)
    assert sum(v.numel() for v in got.values()) == 300
    rep = opt_low.memory_report()
    assert rep["state_bytes"] == 300 * 12  # moments and master (indices are index bytes)
    assert rep["budget_bytes"] == 300 * 20  # + the compact fp32 gradient and the index


def test_sparse_dropped_elements_keep_their_master_rounded_stochastically():
    """A dropped element's master goes; the param keeps it rounded stochastically with the
    param's stream of the step the schedule reached (so its progress below half an ulp is
    kept on average), not the nearest value the param held."""
    low, high, opt_low, opt_high = _sparse_pair(regrow_fraction=0.25)
    dropped = 0
    for step in range(9):
        before = _chosen(opt_low, low)
        _step(opt_low, low, step)
        _step(opt_high, high, step, cast=torch.float32)
        after = _chosen(opt_low, low)
        for i, idx in before.items():
            gone = idx[~torch.isin(idx, after.get(i, idx[:0]))]
            if step >= 3 or not gone.numel():  # up to the first regrowth masters == fp32
                continue
            want = stochastic_round(high[i].detach().reshape(-1)[gone], BF16, 0, step + 1, i,
                                    gone)
            assert torch.equal(low[i].detach().reshape(-1)[gone], want), (step, i)
            dropped += gone.numel()
    assert dropped > 10


@pytest.mark.parametrize("fmt", [{}, {"stochastic_rounding": True}])
def test_sparse_bf16_resume_is_bit_exact(fmt, tmp_path):
    """state_dict saved mid-run (weights_only), loaded into fresh params and optimizer:
    the rest of the run is bit-identical, masters and stochastic streams included."""
    kw = dict(lr=3e-3, budget=300, policy="sparse", switch_every=2, **fmt)
    params = _params(BF16)
    opt = NTO(params, **kw)
    for step in range(5):
        _step(opt, params, step)
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]},
               tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    again = [torch.nn.Parameter(t.clone()) for t in ck["params"]]
    opt2 = NTO(again, **kw)
    opt2.load_state_dict(ck["opt"])
    for step in range(5, 10):
        _step(opt, params, step)
        _step(opt2, again, step)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(params, again))
    for a, b in zip(params, again):
        sa, sb = opt.state.get(a, {}), opt2.state.get(b, {})
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor)
                   else sa[k] == sb[k] for k in sa)
    assert ("master" in opt.state[params[0]]) == (not fmt)


def test_sparse_stochastic_rounding_keeps_updates_below_half_an_ulp():
    """stochastic_rounding=True: no masters (16 B per element), and updates far below half
    a bf16 ulp still move the params on average (rounded to nearest they vanish)."""
    moved = {}
    for name, fmt in (("sr", {"stochastic_rounding": True}), ("plain", {"master_weights": False})):
        params = [torch.nn.Parameter(torch.ones(4096, dtype=BF16))]
        opt = NTO(params, lr=1e-4, budget="100%", policy="sparse", **fmt)
        for _ in range(20):
            params[0].grad = torch.ones(4096, dtype=BF16)
            opt.step()
            opt.zero_grad()
        moved[name] = 1.0 - params[0].detach().float().mean().item()
        assert "master" not in opt.state[params[0]]
    assert moved["plain"] == 0.0  # 1e-4 steps from 1.0: a bf16 ulp there is 2**-7
    assert moved["sr"] == pytest.approx(20 * 1e-4, rel=0.2)
