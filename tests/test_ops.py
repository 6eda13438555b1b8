"""The fused ops: compiled CPU kernels vs the reference (the executable spec) vs float64 math
vs torch.optim.AdamW; determinism across thread counts; bad input named by list position."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nto_ext import _reference, ops

HAS_KERNELS = ops.backend() != "reference"
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="compiled extension not loaded")
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
SIZES = [0, 1, 2, 7, 31, 33, 4097, 65537]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _kernel(name: str):
    return getattr(torch.ops.nto, name)


def _impls():
    """(label, callables by op name): the compiled ops and the reference."""
    out = [("reference", {n: getattr(_reference, n) for n in
                          ("masked_adamw_", "select_topk", "remap_state", "gather_accumulate_",
                           "param_stats")})]
    if HAS_KERNELS:
        out.append(("kernel", {n: _kernel(n) for n in out[0][1]}))
    return out


def _tol(dtype: torch.dtype) -> dict:
    """5x torch.testing's default tolerance for this dtype."""
    rtol, atol = {torch.float32: (1.3e-6, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                  torch.float16: (1e-3, 1e-5)}[dtype]
    return dict(rtol=5 * rtol, atol=5 * atol)


def _steps(n: int, step: int) -> list[torch.Tensor]:
    return ops._step_tensors(step, n)


# ---------------------------------------------------------------------------- masked_adamw_


def _adamw64(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """AdamW in float64 on float64 copies; step is a number or a 1-element tensor."""
    p, g, m, v = (t.double().clone() for t in (p, g, m, v))
    p *= 1 - lr * weight_decay
    m += (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    s = step.double() if isinstance(step, torch.Tensor) else torch.tensor(float(step)).double()
    bc1, bc2 = 1 - beta1**s, 1 - beta2**s
    p -= lr / bc1 * m / (v.sqrt() / bc2.sqrt() + eps)
    return p, m, v


@st.composite
def adamw_case(draw):
    n = draw(st.sampled_from(SIZES) | st.integers(0, 300))
    dtype = draw(st.sampled_from(DTYPES))
    indexed = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(dtype)
    idx = None
    length = n
    if indexed:
        keep = torch.rand(n, generator=gen) < draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
        idx = torch.nonzero(keep).view(-1).to(draw(st.sampled_from([torch.int32, torch.int64])))
        length = idx.numel()
    grad_dense = indexed and draw(st.booleans())
    # fp32 params (a bf16 model's masters) also take bf16/fp16 grads
    gdtype = draw(st.sampled_from(DTYPES if dtype == torch.float32 else [dtype, torch.float32]))
    g = torch.randn(n if (grad_dense or not indexed) else length, generator=gen).to(gdtype)
    m = torch.randn(length, generator=gen) * 0.1
    v = torch.rand(length, generator=gen) * 0.01
    step = draw(st.integers(1, 1000))
    if draw(st.booleans()):  # a 1-element tensor of another dtype than ops' float64
        step = torch.tensor([step], dtype=draw(st.sampled_from([torch.int32, torch.float32])))
    return p, g, m, v, idx, step


@needs_kernels
@SETTINGS
@given(adamw_case())
def test_masked_adamw_agrees_with_float64(case):
    p, g, m, v, idx, step = case
    steps = [step] if isinstance(step, torch.Tensor) else _steps(1, step)
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    _kernel("masked_adamw_")([p], [g], [m], [v], [idx], steps, *HYPER.values())
    # the float64 oracle starts from the same (widened) values the kernel started from
    pos = slice(None) if idx is None else idx.long()
    gsel = g if (idx is None or g.numel() == idx.numel()) else g[idx.long()]
    p64, m64, v64 = _adamw64(p0[pos].float(), gsel.float(), m0, v0, step, **HYPER)
    torch.testing.assert_close(p[pos].double(), p64, **_tol(p.dtype))
    torch.testing.assert_close(m.double(), m64, **_tol(torch.float32))
    torch.testing.assert_close(v.double(), v64, **_tol(torch.float32))
    if idx is not None:  # untouched elements stay bit-identical
        rest = torch.ones(p.numel(), dtype=torch.bool)
        rest[idx.long()] = False
        assert torch.equal(p[rest], p0[rest])


@needs_kernels
@SETTINGS
@given(adamw_case())
def test_masked_adamw_kernel_matches_reference(case):
    p, g, m, v, idx, step = case
    steps = [step] if isinstance(step, torch.Tensor) else _steps(1, step)
    a = [p.clone(), m.clone(), v.clone()]
    b = [p.clone(), m.clone(), v.clone()]
    _kernel("masked_adamw_")([a[0]], [g], [a[1]], [a[2]], [idx], steps, *HYPER.values())
    _reference.masked_adamw_([b[0]], [g], [b[1]], [b[2]], [idx], steps, *HYPER.values())
    # m and v bit for bit; p within one rounding (torch's sqrt is MKL's, not correctly rounded)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[0].float(), b[0].float(), **_tol(p.dtype))


@needs_kernels
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("indexed", [False, True])
def test_masked_adamw_fp32_param_low_precision_grad_is_the_widened_grad(gdtype, indexed):
    """An fp32 master updated from the model's bf16/fp16 grad read in place: bit for bit the
    update from that grad widened to fp32 (what formats/master.py relied on a copy for)."""
    gen = torch.Generator().manual_seed(5)
    n = 1000  # full vector blocks and a tail
    p, m = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.1
    v = torch.rand(n, generator=gen) * 0.01
    g = torch.randn(n, generator=gen).to(gdtype)
    idx = torch.arange(0, n, 3) if indexed else None
    runs = []
    for grad in (g, g.float()):
        t = [p.clone(), m.clone(), v.clone()]
        if indexed:
            t[1], t[2] = t[1][: idx.numel()].clone(), t[2][: idx.numel()].clone()
        _kernel("masked_adamw_")([t[0]], [grad], [t[1]], [t[2]], [idx], _steps(1, 7),
                                 *HYPER.values())
        runs.append(t)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # the 8-bit op reads its grads only in the param's dtype or fp32
    q = [torch.zeros(n, dtype=torch.int8), torch.zeros(n, dtype=torch.uint8),
         torch.ones(4), torch.ones(4)]
    for op in (_kernel("masked_adamw_int8_"), _reference.masked_adamw_int8_):
        with pytest.raises(TypeError, match=r"masked_adamw_int8_: grads\[0\] has dtype "
                                            r"torch.bfloat16 but params\[0\] has torch.float32"):
            op([p.clone()], [g.bfloat16()], [q[0]], [q[1]], [q[2]], [q[3]], [None], _steps(1, 7),
               *HYPER.values())
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.float16 but params\[0\] "
                                        r"has torch.bfloat16; allowed: torch.bfloat16 or "
                                        r"torch.float32"):
        _kernel("masked_adamw_")([p.bfloat16()], [g.half()], [m], [v], [None], _steps(1, 7),
                                 *HYPER.values())


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 33, 4097, 65537 + 31])
def test_index_path_with_every_index_equals_dense_path(dtype, n):
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    m, v = torch.randn(n, generator=gen), torch.rand(n, generator=gen)
    dense = [p.clone(), m.clone(), v.clone()]
    _kernel("masked_adamw_")([dense[0]], [g], [dense[1]], [dense[2]], [None], _steps(1, 3),
                             *HYPER.values())
    for idx_dtype in (torch.int32, torch.int64):
        idx = torch.arange(n, dtype=idx_dtype)
        for steps in (_steps(1, 3), [torch.tensor([3], dtype=torch.int32)]):
            got = [p.clone(), m.clone(), v.clone()]
            _kernel("masked_adamw_")([got[0]], [g], [got[1]], [got[2]], [idx], steps,
                                     *HYPER.values())
            for x, y in zip(got, dense):
                assert torch.equal(x, y)


@needs_kernels
def test_untouched_elements_and_lists_of_mixed_tensors():
    gen = torch.Generator().manual_seed(1)
    ps = [torch.randn(5000, generator=gen), torch.randn(70, 70, generator=gen).bfloat16(),
          torch.randn(0), torch.randn(65537, generator=gen).half()]
    idx = [torch.tensor([0, 17, 4999]), None, None, torch.arange(3, 65537, 11, dtype=torch.int32)]
    lengths = [3, 4900, 0, idx[3].numel()]
    gs = [torch.randn(5000), torch.randn(70, 70).bfloat16(), torch.randn(0),
          torch.randn(lengths[3])]
    ms = [torch.zeros(n) for n in lengths]
    vs = [torch.zeros(n) for n in lengths]
    before = [p.clone() for p in ps]
    ops.masked_adamw_(ps, gs, ms, vs, idx, [1, 2, 3, 4], **HYPER)
    for p, b, i in zip(ps, before, idx):
        if i is None:
            assert not torch.equal(p, b) or p.numel() == 0
            continue
        rest = torch.ones(p.numel(), dtype=torch.bool)
        rest[i.long()] = False
        assert torch.equal(p.view(-1)[rest], b.view(-1)[rest])
        assert not torch.equal(p.view(-1)[i.long()], b.view(-1)[i.long()])


@pytest.mark.parametrize("beta1", [0.9, 0.3])  # lerp switches formula at weight 0.5
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_adamw_follows_torch_adamw_for_50_steps(beta1, weight_decay):
    torch.manual_seed(0)
    shapes = [(64, 33), (4097,), (1,), (3, 5, 7)]
    ps = [torch.randn(s) for s in shapes]
    ref = [p.clone().requires_grad_() for p in ps]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(beta1, 0.999), eps=1e-8,
                            weight_decay=weight_decay, foreach=False)
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for step in range(1, 51):
        gs = [torch.randn_like(p) for p in ps]
        for r, g in zip(ref, gs):
            r.grad = g.clone()
        opt.step()
        ops.masked_adamw_(ps, gs, ms, vs, [None] * len(ps), step, lr=1e-2, beta1=beta1,
                          beta2=0.999, eps=1e-8, weight_decay=weight_decay)
    for p, r, m, v in zip(ps, ref, ms, vs):
        assert (p - r.detach()).abs().max() <= 1e-6
        torch.testing.assert_close(m, opt.state[r]["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, opt.state[r]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_steps_forms_are_equivalent():
    p = torch.randn(100)
    args = lambda: ([p.clone()], [torch.ones(100)], [torch.zeros(100)], [torch.zeros(100)],
                    [None])
    outs = []
    for steps in (5, [5], [torch.tensor(5.0)], [torch.tensor([5], dtype=torch.int64)],
                  [torch.tensor([5], dtype=torch.int32)]):
        a = args()
        ops.masked_adamw_(*a, steps, **HYPER)
        outs.append(a[0][0])
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


# ------------------------------------------------------------------------------ select_topk


def _topk_oracle(tensors, k):
    """First k of a stable descending sort by |x| over the concatenation, NaN last."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)
    a = flat.abs().double()
    a = torch.where(torch.isnan(a), torch.full_like(a, -1.0), a)  # NaN below every number
    order = torch.sort(-a, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, start = [], 0
    for t in tensors:
        out.append(torch.nonzero(chosen[start:start + t.numel()]).view(-1))
        start += t.numel()
    return out


_special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, float("nan"), float("inf"),
                            -float("inf"), 1e-40, 65504.0])


@st.composite
def topk_case(draw):
    tensors = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.sampled_from(SIZES) | st.integers(0, 200))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**16))
        gen = torch.Generator().manual_seed(seed)
        kind = draw(st.sampled_from(["randn", "ties", "special"]))
        if kind == "randn":
            t = torch.randn(n, generator=gen)
        elif kind == "ties":
            t = torch.randint(-3, 4, (n,), generator=gen).float()
        else:
            vals = torch.tensor(draw(st.lists(_special, min_size=1, max_size=10)))
            t = vals[torch.randint(0, len(vals), (n,), generator=gen)]
        tensors.append(t.to(dtype))
    total = sum(t.numel() for t in tensors)
    k = draw(st.sampled_from([0, 1, total // 10, total // 2, total]) | st.integers(0, total))
    return tensors, min(k, total)


@SETTINGS
@given(topk_case())
def test_select_topk_is_first_k_of_stable_sort(case):
    tensors, k = case
    want = _topk_oracle(tensors, k)
    for label, impl in _impls():
        got = impl["select_topk"](tensors, k)
        assert len(got) == len(tensors), label
        for g, w in zip(got, want):
            assert g.dtype == torch.int32, label
            assert torch.equal(g.long(), w), label


def test_wrappers_accept_empty_lists():
    # the dispatcher cannot route an empty tensor list: ops.py answers them itself
    assert ops.select_topk([], 0) == [] and ops.remap_state([], [], []) == []
    ops.masked_adamw_([], [], [], [], [], 1, **HYPER)
    ops.gather_accumulate_([], [], [])
    assert ops.param_stats([])[3].shape == (0, 256)
    assert ops.param_stats([], histogram=False)[3].shape == (0, 0)
    with pytest.raises(TypeError, match=r"histogram='no'; allowed: True or False"):
        ops.param_stats([torch.zeros(2)], histogram="no")


def test_select_topk_k_zero_and_all():
    ts = [torch.randn(10), torch.randn(3).half()]
    for _, impl in _impls():
        assert [g.numel() for g in impl["select_topk"](ts, 0)] == [0, 0]
        assert [g.tolist() for g in impl["select_topk"](ts, 13)] == [list(range(10)), [0, 1, 2]]
    assert ops.select_topk([], 0) == [] and _reference.select_topk([], 0) == []


# ------------------------------------------------------------------------------ remap_state


@st.composite
def remap_case(draw):
    n = draw(st.sampled_from(SIZES) | st.integers(0, 300))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    old = torch.nonzero(torch.rand(n, generator=gen) < draw(st.floats(0, 1))).view(-1)
    new = torch.nonzero(torch.rand(n, generator=gen) < draw(st.floats(0, 1))).view(-1)
    old = old.to(draw(st.sampled_from([torch.int32, torch.int64])))
    new = new.to(draw(st.sampled_from([torch.int32, torch.int64])))
    lead = draw(st.sampled_from([(), (2,), (2, 3)]))
    dtype = draw(st.sampled_from(DTYPES))
    return old, new, torch.randn(*lead, old.numel(), generator=gen).to(dtype)


@SETTINGS
@given(st.lists(remap_case(), min_size=1, max_size=3))
def test_remap_state_kernel_matches_reference_and_definition(cases):
    old, new, states = [c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases]
    want = _reference.remap_state(old, new, states)
    for o, nw, s, w in zip(old, new, states, want):  # the definition, by dictionary
        pos = {int(x): j for j, x in enumerate(o)}
        for j, x in enumerate(nw.tolist()):
            col = w[..., j]
            assert torch.equal(col, s[..., pos[x]] if x in pos else torch.zeros_like(col))
    for label, impl in _impls():
        got = impl["remap_state"](old, new, states)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, label
            assert torch.equal(g, w), label


# ------------------------------------------------------------------------ gather_accumulate_


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(SIZES) | st.integers(0, 300), st.sampled_from(DTYPES),
                          st.integers(0, 2**16)), min_size=1, max_size=3))
def test_gather_accumulate_matches_reference(specs):
    dense, idx, compact = [], [], []
    for n, dtype, seed in specs:
        gen = torch.Generator().manual_seed(seed)
        dense.append(torch.randn(n, generator=gen).to(dtype))
        i = torch.nonzero(torch.rand(n, generator=gen) < 0.3).view(-1)
        idx.append(i.to(torch.int32) if seed % 2 else i)
        compact.append(torch.randn(i.numel(), generator=gen))
    want = [c.clone() for c in compact]
    for w, d, i in zip(want, dense, idx):  # the definition
        w += d[i.long()].float()
    for label, impl in _impls():
        got = [c.clone() for c in compact]
        impl["gather_accumulate_"](dense, idx, got)
        for g, w in zip(got, want):
            assert torch.equal(g, w), label


# ------------------------------------------------------------------------------ param_stats

# sumsq is accumulated in 32 fp32 lanes, each flushed into double after <= 260 squares: a
# worst-case relative error of 260 * 2^-24 ~ 1.6e-5; measured <= ~1e-6 on random and
# structured data (fp32 and bf16, see vec_kernels_impl.h). 1e-5 still catches a missing or
# doubled block in tensors of a few thousand elements.
SUMSQ_RTOL = 1e-5


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(SIZES) | st.integers(0, 300), st.sampled_from(DTYPES),
                          st.integers(0, 2**16), st.booleans()), min_size=1, max_size=3))
def test_param_stats_agrees_with_float64(specs):
    ts = []
    for n, dtype, seed, special in specs:
        t = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
        if special and n >= 4:
            t[:4] = torch.tensor([0.0, 1e-40, float("inf"), -2.0])
        ts.append(t.to(dtype))
    for label, impl in _impls():
        numel, sumsq, absmax, hist = impl["param_stats"](ts)
        for i, t in enumerate(ts):
            x = t.double().view(-1)
            assert numel[i] == t.numel() and hist[i].sum() == t.numel(), label
            torch.testing.assert_close(sumsq[i], x.square().sum(), rtol=SUMSQ_RTOL, atol=0)
            assert absmax[i] == (x.abs().max().float() if t.numel() else 0.0), label
            e = (t.float().view(-1).view(torch.int32) >> 23) & 0xFF
            assert torch.equal(hist[i], torch.bincount(e.long(), minlength=256)), label


def test_param_stats_special_values_spread_through_large_tensors():
    # past the first 128 elements of a chunk the exponent histogram is counted in vector
    # registers over a 16-exponent window; zeros, subnormals, inf, NaN and outliers fall
    # outside it and must still be counted exactly
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200_003, generator=gen) * 0.02
    specials = torch.tensor([0.0, -0.0, 1e-40, float("inf"), -float("inf"), 3e38, 1e-30])
    pos = torch.randint(0, x.numel(), (5000,), generator=gen)
    x[pos] = specials[torch.randint(0, len(specials), (5000,), generator=gen)]
    ts = [x, x.bfloat16(), x.half()]
    with_nan = x.clone()
    with_nan[150_000] = float("nan")
    ts.append(with_nan)
    for label, impl in _impls():
        numel, sumsq, absmax, hist = impl["param_stats"](ts)
        for i, t in enumerate(ts):
            e = (t.float().view(-1).view(torch.int32) >> 23) & 0xFF
            assert torch.equal(hist[i], torch.bincount(e.long(), minlength=256)), label
            torch.testing.assert_close(absmax[i], t.float().abs().max(), rtol=0, atol=0,
                                       equal_nan=True)
            if i < 3:
                torch.testing.assert_close(sumsq[i], t.double().square().sum(),
                                           rtol=SUMSQ_RTOL, atol=0)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(SIZES + [32 * 300 + 17, 32 * 260 * 4 + 5])
                          | st.integers(0, 300), st.sampled_from(DTYPES),
                          st.integers(0, 2**16),
                          st.sampled_from(["plain", "nan", "inf", "huge", "tiny", "zero"])),
                min_size=1, max_size=3))
def test_param_stats_without_histogram_gives_the_same_bits(specs):
    """histogram=False (the optimizer's norm and non-finite check) skips the histogram and
    keeps numel, sumsq and absmax bit-identical to histogram=True: NaN and inf, values whose
    squares leave fp32's range (the double-precision rescan), zeros, sizes across the
    kernel's flush points (the 4-block prefix, then every 256 blocks of 32)."""
    ts = []
    for n, dtype, seed, kind in specs:
        t = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        if n and kind in ("nan", "inf"):
            t[seed % n] = float(kind)
        scale = {"huge": 6e4 if dtype == torch.float16 else 1e30,
                 "tiny": 1e-6 if dtype == torch.float16 else 1e-30, "zero": 0.0}
        ts.append((t * scale.get(kind, 1.0)).to(dtype))
    for label, impl in _impls():
        full = impl["param_stats"](ts)
        fast = impl["param_stats"](ts, False)
        assert fast[3].shape == (len(ts), 0) and fast[3].dtype == torch.int64, label
        for a, b in zip(full[:3], fast[:3]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), label
        assert torch.equal(torch.isnan(full[2]), torch.isnan(fast[2])), label


# ------------------------------------------------------------------------- determinism


def _all_ops_outputs():
    # numpy draws the inputs: torch's randn differs between CPU capabilities
    rng = np.random.default_rng(7)
    randn = lambda n: torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
    big = [randn(300_001), randn(70_000).bfloat16()]
    idx = [torch.arange(0, 300_001, 3), None]
    lengths = [idx[0].numel(), 70_000]
    ps = [b.clone() for b in big]
    ms = [randn(n) for n in lengths]
    vs = [randn(n).abs() for n in lengths]
    gs = [randn(300_001), randn(70_000)]
    ops.masked_adamw_(ps, gs, ms, vs, idx, 7, **HYPER)
    compact = [torch.zeros(lengths[0])]
    ops.gather_accumulate_([gs[0]], [idx[0]], compact)
    top = ops.select_topk(big, 37_000)
    stats = ops.param_stats(big) + ops.param_stats(big, histogram=False)[:3]
    remap = ops.remap_state([idx[0]], [torch.arange(0, 300_001, 2)], [torch.stack([ms[0], vs[0]])])
    return ps + ms + vs + compact + top + list(stats) + remap


@needs_kernels
def test_results_identical_with_1_and_2_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_ops_outputs()
        torch.set_num_threads(2)
        two = _all_ops_outputs()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_kernels
def test_cpu_capability_variants_agree():
    """The AVX-512 / AVX2 / portable builds of the inner loops give the same bits."""
    code = ("import hashlib, torch, tests.test_ops as t\n"
            "h = hashlib.sha256()\n"
            "for x in t._all_ops_outputs(): h.update(x.contiguous().view(torch.uint8).numpy()"
            ".tobytes())\n"
            "print(h.hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for cap in ("default", "avx2", "avx512"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=root, env=dict(os.environ, ATEN_CPU_CAPABILITY=cap), timeout=300)
        assert r.returncode == 0, r.stderr
        digests.add(r.stdout.strip())
    assert len(digests) == 1


# ---------------------------------------------------------------------------- bad input


def _adamw_args(**over):
    n = 10
    a = dict(params=[torch.zeros(n), torch.zeros(n)], grads=[torch.zeros(n), torch.zeros(n)],
             exp_avgs=[torch.zeros(n), torch.zeros(3)],
             exp_avg_sqs=[torch.zeros(n), torch.zeros(3)],
             indices=[None, torch.tensor([1, 4, 9])], steps=_steps(2, 1))
    a.update(over)
    return a


def _call_adamw(impl, a, **hyper):
    h = dict(HYPER, **hyper)
    impl["masked_adamw_"](a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["indices"],
                          a["steps"], h["lr"], h["beta1"], h["beta2"], h["eps"],
                          h["weight_decay"])


BAD_ADAMW = [
    (dict(grads=[torch.zeros(10)]), ValueError, "got 2 params but 1 grads"),
    (dict(params=[torch.zeros(10), torch.zeros(10, dtype=torch.float64)]), TypeError,
     r"params\[1\] has dtype torch.float64"),
    (dict(params=[torch.zeros(10), torch.zeros(10).bfloat16()],
          grads=[torch.zeros(10), torch.zeros(10).half()]), TypeError,
     r"grads\[1\] has dtype torch.float16 but params\[1\] has torch.bfloat16"),
    (dict(exp_avgs=[torch.zeros(10), torch.zeros(3).half()]), TypeError,
     r"exp_avgs\[1\] has dtype torch.float16; allowed: torch.float32 or torch.bfloat16"),
    (dict(exp_avgs=[torch.zeros(10), torch.zeros(3).bfloat16()]), TypeError,
     r"exp_avgs\[1\] has dtype torch.bfloat16 but exp_avg_sqs\[1\] has torch.float32; "
     "allowed: both moments of one dtype"),
    (dict(params=[torch.zeros(10), torch.zeros(20)[::2]]), ValueError,
     r"params\[1\] is not contiguous"),
    (dict(exp_avg_sqs=[torch.zeros(10), torch.zeros(4)]), ValueError,
     r"exp_avg_sqs\[1\] has 4 elements but len\(indices\[1\]\) is 3"),
    (dict(exp_avgs=[torch.zeros(9), torch.zeros(3)]), ValueError,
     r"exp_avgs\[0\] has 9 elements but params\[0\].numel\(\) is 10"),
    (dict(grads=[torch.zeros(10), torch.zeros(5)]), ValueError,
     r"grads\[1\] has 5 elements; allowed: 3 \(compact\) or 10"),
    (dict(indices=[None, torch.tensor([1, 4, 10])]), IndexError,
     r"indices\[1\]\[2\] = 10 is out of range for params\[1\] with 10 elements; allowed: 0..9"),
    (dict(indices=[None, torch.tensor([-1, 4, 9])]), IndexError, r"indices\[1\]\[0\] = -1"),
    (dict(indices=[None, torch.tensor([4, 1, 9])]), ValueError,
     r"indices\[1\]\[1\] = 1 follows 4; indices must be sorted ascending and unique"),
    (dict(indices=[None, torch.tensor([1, 4, 4])]), ValueError, r"indices\[1\]\[2\] = 4 follows 4"),
    (dict(indices=[None, torch.tensor([1.0, 4, 9])]), TypeError,
     r"indices\[1\] has dtype torch.float32; allowed: torch.int32, torch.int64"),
    (dict(indices=[None, torch.tensor([[1, 4, 9]])]), ValueError, r"indices\[1\] has 2 dimensions"),
    (dict(steps=[torch.tensor([1.0]), torch.tensor([0.0])]), ValueError,
     r"steps\[1\] holds a step count of 0"),
    (dict(steps=[torch.tensor([1.0]), torch.tensor([1, 0, 2], dtype=torch.int32)]), ValueError,
     r"^masked_adamw_: steps\[1\] has 3 elements; allowed: one step count per tensor "
     r"\(a 1-element tensor or a number\)"),
    (dict(steps=[torch.zeros(10, dtype=torch.int32), torch.tensor([1.0])]), ValueError,
     r"steps\[0\] has 10 elements; allowed: one step count per tensor"),
    (dict(steps=[torch.tensor([1.0]), torch.tensor([], dtype=torch.int64)]), ValueError,
     r"steps\[1\] has 0 elements"),
    (dict(steps=[torch.tensor([1.0]), torch.tensor([True])]), TypeError,
     r"steps\[1\] has dtype torch.bool; allowed: torch.float64, torch.float32, "
     r"torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, "
     r"torch.uint8 \(or a number\); convert it with .to\(torch.float64\)"),
    # issue 17 item 13: was '"nto_step" not implemented for 'UInt64'' from the kernel
    (dict(steps=[torch.tensor([1], dtype=torch.uint64), torch.tensor([1.0])]), TypeError,
     r"^masked_adamw_: steps\[0\] has dtype torch.uint64; allowed: torch.float64, .*"
     r"torch.uint8 \(or a number\)"),
]


@pytest.mark.parametrize("over,exc,msg", BAD_ADAMW)
def test_masked_adamw_bad_input_names_position_and_touches_nothing(over, exc, msg):
    for label, impl in _impls():
        a = _adamw_args(**over)
        for t in a["params"]:
            t.fill_(1.0)
        snapshot = [t.clone() for t in a["params"] + a["exp_avgs"] + a["exp_avg_sqs"]]
        with pytest.raises(exc, match=msg):
            _call_adamw(impl, a)
        after = a["params"] + a["exp_avgs"] + a["exp_avg_sqs"]
        assert all(torch.equal(x, y) for x, y in zip(after, snapshot)), label


@pytest.mark.parametrize("hyper,msg", [(dict(lr=-1.0), "lr=-1"), (dict(beta1=1.0), "beta1=1"),
                                       (dict(beta2=float("nan")), "beta2=nan"),
                                       (dict(eps=-1e-8), "eps="),
                                       (dict(weight_decay=-0.1), "weight_decay=")])
def test_masked_adamw_bad_hyper_parameters(hyper, msg):
    for _, impl in _impls():
        with pytest.raises(ValueError, match=msg):
            _call_adamw(impl, _adamw_args(), **hyper)


def test_device_mismatch_is_named():
    # no second device here: the reference's check (the kernels' is the same code path in
    # csrc/checks.h) against a meta tensor
    a = _adamw_args(grads=[torch.zeros(10), torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match=r"grads\[1\] is on meta but the first tensor is on cpu"):
        _call_adamw(dict(_impls())["reference"], a)


def test_error_messages_are_the_same_in_kernel_and_reference():
    if not HAS_KERNELS:
        pytest.skip("compiled extension not loaded")
    impls = dict(_impls())
    for over, exc, _ in BAD_ADAMW:
        msgs = []
        for impl in impls.values():
            with pytest.raises(exc) as e:
                _call_adamw(impl, _adamw_args(**over))
            msgs.append(str(e.value).splitlines()[0])
        assert msgs[0] == msgs[1]


def test_other_ops_bad_input():
    for label, impl in _impls():
        with pytest.raises(ValueError, match=r"select_topk: k=5 is out of range; allowed: 0..4"):
            impl["select_topk"]([torch.zeros(4)], 5)
        with pytest.raises(ValueError, match="k=-1"):
            impl["select_topk"]([torch.zeros(4)], -1)
        with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.int64"):
            impl["select_topk"]([torch.zeros(4), torch.zeros(4, dtype=torch.long)], 1)
        with pytest.raises(ValueError, match=r"tensors\[0\] is not contiguous"):
            impl["param_stats"]([torch.zeros(4, 4).t()])
        c = torch.zeros(2)
        with pytest.raises(IndexError, match=r"\[0\]\[1\] = 5 is out of range for dense\[0\]"):
            impl["gather_accumulate_"]([torch.ones(5)], [torch.tensor([1, 5])], [c])
        assert torch.equal(c, torch.zeros(2)), label
        with pytest.raises(ValueError, match=r"compact\[0\] has 3 elements but len\(indices"):
            impl["gather_accumulate_"]([torch.ones(5)], [torch.tensor([1, 2])], [torch.zeros(3)])
        with pytest.raises(ValueError, match=r"got 1 dense but 2 indices"):
            impl["gather_accumulate_"]([torch.ones(5)], [torch.tensor([1])] * 2, [c])
        old, new = torch.tensor([1, 3]), torch.tensor([2, 3])
        with pytest.raises(ValueError, match=r"states\[0\] has shape \(2, 3\); its last dimension"):
            impl["remap_state"]([old], [new], [torch.zeros(2, 3)])
        with pytest.raises(ValueError, match=r"new_indices\[0\]\[1\] = 2 follows 3"):
            impl["remap_state"]([old], [torch.tensor([3, 2])], [torch.zeros(2)])
        with pytest.raises(IndexError, match=r"old_indices\[0\]\[0\] = -1 is negative"):
            impl["remap_state"]([torch.tensor([-1, 3])], [new], [torch.zeros(2)])


# ------------------------------------------------------------------------------- tracing


@needs_kernels
def test_fake_implementations_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()):
        out = torch.ops.nto.remap_state([torch.zeros(3, dtype=torch.long)],
                                        [torch.zeros(5, dtype=torch.long)], [torch.zeros(2, 3)])
        assert out[0].shape == (2, 5)
        stats = torch.ops.nto.param_stats([torch.zeros(4), torch.zeros(2)])
        assert stats[3].shape == (2, 256)
        assert torch.ops.nto.param_stats([torch.zeros(4)], False)[3].shape == (1, 0)
        top = torch.ops.nto.select_topk([torch.zeros(4)], 2)
        assert top[0].dtype == torch.int32 and top[0].dim() == 1


@needs_kernels
def test_fake_implementations_check_arguments():
    """A bad call fails while tracing (meta or fake tensors) as it would when run; contents
    (index order and range) cannot be checked there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta = {"device": "meta"}
    idx = torch.zeros(3, dtype=torch.int32, **meta)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has 2 elements but len\(indices\[0\]\)"):
        torch.ops.nto.masked_adamw_([torch.zeros(8, **meta)], [torch.zeros(3, **meta)],
                                    [torch.zeros(2, **meta)], [torch.zeros(3, **meta)], [idx],
                                    [torch.ones(1, dtype=torch.float64)], 1e-3, 0.9, 0.999,
                                    1e-8, 0.0)
    with pytest.raises(ValueError, match=r"compact\[0\] has 4 elements"):
        torch.ops.nto.gather_accumulate_([torch.zeros(8, **meta)], [idx], [torch.zeros(4, **meta)])
    with pytest.raises(ValueError, match=r"k=9 is out of range"):
        torch.ops.nto.select_topk([torch.zeros(4, **meta)], 9)
    with FakeTensorMode():
        with pytest.raises(ValueError, match=r"last dimension \(3\) must equal"):
            torch.ops.nto.remap_state([torch.zeros(2, dtype=torch.long)],
                                      [torch.zeros(5, dtype=torch.long)], [torch.zeros(3)])
        with pytest.raises(TypeError, match=r"tensors\[1\]"):
            torch.ops.nto.param_stats([torch.zeros(4), torch.zeros(2, dtype=torch.int64)])
    # unsorted indices on meta: metadata is fine, contents unknown -> no error
    torch.ops.nto.gather_accumulate_([torch.zeros(8, **meta)], [idx], [torch.zeros(3, **meta)])


def test_steps_argument_errors():
    with pytest.raises(TypeError, match=r"steps\[0\] is str"):
        ops._step_tensors(["1"], 1)
    with pytest.raises(ValueError, match="steps is a tensor of 3 elements"):
        ops._step_tensors(torch.ones(3), 3)
    assert math.isclose(float(ops._step_tensors(4, 2)[1]), 4.0)
