"""4-bit moments (issue 21, state_dtype="int4": both moments in one byte per element): the
CPU kernel against its reference bit for bit, the code's layout and error bounds, AdamW
through NTO (also with step_in_backward), the budget invariant, resume in a fresh process,
checkpoints and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from test_int8 import (
    BF16,
    HAS_KERNELS,
    HYPER,
    SIZES,
    _model,
    adamw_after_one_step,
    budget_runs_with_state_dtype,
    check_resume_in_a_fresh_process,
    cpu_variant_outputs,
    needs_kernels,
)
from test_int8 import _train as train
from test_reliability import KINDS, RUN_SETTINGS, budget_runs

from nto_ext import NTO, _reference, ops
from nto_ext.formats.int4 import INT4, dequantize, quantize

KERNEL = torch.ops.nto.masked_adamw_int4_.default


def _state(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A random 4-bit state of n elements: any byte, scales spanning decades."""
    nb = _reference.q4_blocks(n)
    codes = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    sm = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-8, 0, (nb,), generator=gen)
    sw = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-8, 0, (nb,), generator=gen)
    sm[0] = 0.0  # a block that never saw a gradient
    return [codes, sm, sw]


def _run(fn, ps, gs, states, steps, hyper=HYPER):
    """`fn` over the lists ps, gs and states (one [codes, sm, sw] per param), once per
    step count in `steps`; returns the updated copies, flat."""
    ps, states = [p.clone() for p in ps], [[t.clone() for t in st] for st in states]
    for s in steps:
        fn(ps, gs, *([st[k] for st in states] for k in range(3)),
           ops._step_tensors(s, len(ps)), *hyper.values())
    return ps + [t for st in states for t in st]


@needs_kernels
@pytest.mark.parametrize("dtype,gdtype", [(torch.float32, torch.float32), (BF16, BF16),
                                          (BF16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("n", SIZES)
def test_kernel_equals_reference_bitwise(n, dtype, gdtype):
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen).to(dtype)
    g = (torch.randn(n, generator=gen) * torch.logspace(-4, 0, n)).to(gdtype)
    state = _state(n, gen)
    for hyper in (HYPER, dict(lr=3e-4, beta1=0.3, beta2=0.9, eps=0.0, weight_decay=0.0)):
        want = _run(_reference.masked_adamw_int4_, [p], [g], [state], (1, 2, 9), hyper)
        got = _run(KERNEL, [p], [g], [state], (1, 2, 9), hyper)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (a.dtype, n)


@needs_kernels
def test_a_list_of_params_with_their_own_steps_equals_the_reference():
    """Several params in one call (work items of several tensors, one step count each)."""
    gen = torch.Generator().manual_seed(0)
    sizes = (5, 65536 + 129, 300)
    ps = [torch.randn(n, generator=gen) for n in sizes]
    gs = [torch.randn(n, generator=gen) for n in sizes]
    states = [_state(n, gen) for n in sizes]
    steps = [torch.tensor([float(s)], dtype=torch.float64) for s in (1, 7, 30)]
    outs = []
    for fn in (_reference.masked_adamw_int4_, KERNEL):
        ps2, st2 = [p.clone() for p in ps], [[t.clone() for t in st] for st in states]
        fn(ps2, gs, *([st[k] for st in st2] for k in range(3)), steps, *HYPER.values())
        outs.append(ps2 + [t for st in st2 for t in st])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@needs_kernels
def test_nonfinite_values_are_quantized_alike():
    """NaN / Inf gradients (nonfinite='propagate'): scales become NaN or Inf and levels 0
    in the kernel exactly as in the reference."""
    n = 600
    g = torch.randn(n)
    g[3], g[300], g[301] = float("nan"), float("inf"), -float("inf")
    state = _state(n, torch.Generator().manual_seed(1))
    got = _run(KERNEL, [torch.ones(n)], [g], [state], (1, 2))
    want = _run(_reference.masked_adamw_int4_, [torch.ones(n)], [g], [state], (1, 2))
    assert got[0].isnan().any() and got[2].isnan().any()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


VARIANT = r"""
import hashlib, torch
from test_int4 import KERNEL, _run, _state
from test_int8 import SIZES, _normal
h = hashlib.sha256()
for n in SIZES:
    gen = torch.Generator().manual_seed(n)
    p, g = _normal(n, n), _normal(n, n + 1)
    out = _run(KERNEL, [p.to(torch.bfloat16)], [g], [_state(n, gen)], (1, 5))
    for t in out + _run(KERNEL, [p], [g], [_state(n, gen)], (2,)):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@needs_kernels
def test_every_cpu_variant_gives_the_same_bits():
    """The portable, AVX2 and AVX-512 builds of the block loop (those this CPU runs) give
    the same bits; the best of them equals the reference (above)."""
    digests = cpu_variant_outputs(VARIANT)
    assert len(set(digests.values())) == 1, digests


@needs_kernels
def test_threads_do_not_change_bits():
    n = 3 * 65536 + 5
    gen = torch.Generator().manual_seed(0)
    p, g, state = torch.randn(n, generator=gen), torch.randn(n, generator=gen), _state(n, gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(KERNEL, [p], [g], [state], (3,))
        torch.set_num_threads(2)
        two = _run(KERNEL, [p], [g], [state], (3,))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the code and its error


def test_zero_moments_are_the_zero_byte_and_every_byte_decodes():
    """A fresh state (zeros) is zero moments; the 256 bytes decode to |qm| = byte >> 4,
    qw = (byte >> 1) & 7 and qm's sign in bit 0, and re-encode to themselves (but a sign
    on level 0, which the map never makes)."""
    codes = torch.arange(256, dtype=torch.uint8)
    m, w = _reference.dequantize_q4_roots(codes, torch.ones(4), torch.ones(4))
    b = torch.arange(256)
    mag = (b >> 4).float()
    assert torch.equal(m.reshape(-1), torch.where(b % 2 == 1, -mag, mag) * mag)
    assert torch.equal(w.reshape(-1), (((b >> 1) & 7) ** 2).float())
    # each block of 64 led by the largest levels (255), so re-encoding keeps its scales
    both = torch.cat([torch.cat([torch.tensor([255]), b[63 * k:63 * (k + 1)]])
                      for k in range(5)])  # 4 whole blocks and one of 5
    nb = _reference.q4_blocks(both.numel())
    st = {"moments": both.to(torch.uint8), "exp_avg_scale": torch.ones(nb),
          "exp_avg_sq_scale": torch.ones(nb)}
    again = quantize(*dequantize(st))["moments"].long()
    made = (both >> 4 > 0) | (both % 2 == 0)  # -0 is not made: it encodes as +0
    assert torch.equal(again[made], both[made]) and (again[~made] == both[~made] - 1).all()
    zero = INT4.new_state(torch.zeros(300))
    assert [torch.count_nonzero(v).item() for v in dequantize(zero)] == [0, 0]


def test_quantization_error_is_bounded_per_element():
    """Round trip of fp32 moments: |m - m'| <= sqrt(|m| s) + s/4 with s = max|m| / 15^2 per
    block of 64 (half a level of the square-root map), the same for w = sqrt(v) with 7
    levels (or s, where a positive w below half a level is kept at level 1); zero stays
    zero, a positive v stays positive, and re-quantizing is exact."""
    gen = torch.Generator().manual_seed(0)
    n = 5000
    m = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 1, (n,), generator=gen)
    v = (torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 1, (n,), generator=gen)) ** 2
    m[:100], v[:100] = 0.0, 0.0
    st = quantize(m, v)
    m2, v2 = dequantize(st)
    slack = 1 + 1e-5
    block = _reference.Q4_BLOCK
    for x, y, levels in ((m, m2, 15), (v.sqrt(), v2.sqrt(), 7)):
        nb = _reference.q4_blocks(n)
        s = torch.zeros(nb * block)
        s[:n] = x.abs()
        s = (s.view(nb, block).amax(1) / levels**2).repeat_interleave(block)[:n]
        bound = ((x.abs() * s).sqrt() + s / 4) * slack + 1e-30
        if levels == 7:
            bound = torch.maximum(bound, s * slack)
        assert ((x - y).abs() <= bound).all()
    assert (m2[:100] == 0).all() and (v2[:100] == 0).all()
    assert ((v > 0) <= (v2 > 0)).all()
    again = quantize(*dequantize(st))
    assert all(torch.equal(again[k], st[k]) for k in st)


def test_int4_adamw_stays_close_to_fp32_adamw():
    """10 steps on gradients spanning four decades: the param change with 4-bit moments is
    within 25% of fp32 AdamW's (relative L2; int8: 10%) and no element moves more than 2x
    AdamW's lr step further than AdamW moved it."""
    ref, start, _ = train("fp32", 10)
    got, _, _ = train("int4", 10)
    d_ref = torch.cat([(p - s).view(-1) for p, s in zip(ref, start)])
    d_got = torch.cat([(p.detach() - s).view(-1) for p, s in zip(got, start)])
    rel_err = ((d_got - d_ref).norm() / d_ref.norm()).item()
    assert 0 < rel_err < 0.25, rel_err
    assert (d_got - d_ref).abs().max().item() < 2 * 10 * 1e-3


# --------------------------------------------------------------------- memory and budget


def test_memory_report_and_plan_count_the_4bit_state():
    params, _, opt = train("int4", 1)
    rep = opt.memory_report()
    numels = [p.numel() for p in params]
    blocks = sum(_reference.q4_blocks(n) for n in numels)
    assert rep["state_bytes"] == sum(numels) + 8 * blocks + 4 * len(numels)
    assert opt.policy.bytes_per_element(torch.float32) == 4 + 1 + 8 / 64
    assert INT4.state_bytes(65) == 65 + 16 and math.isclose(INT4.element_bytes, 1.125)
    assert rep["total_bytes"] <= rep["budget_bytes"]


def test_a_byte_budget_in_backward_trains_about_twice_int8s_elements():
    """With step_in_backward the budget holds the moments only: 2.03 / 1.125 = 1.8x the
    elements of 8-bit moments at the same bytes."""
    model = [torch.nn.Parameter(torch.zeros(256, 256)) for _ in range(24)]
    counts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sd in ("int8", "int4"):
            opt = NTO([(f"layers.{i}.w", p) for i, p in enumerate(model)], budget="200KiB",
                      state_dtype=sd, step_in_backward=True)
            counts[sd] = opt.budget_elements()
    assert 1.75 < counts["int4"] / counts["int8"] < 1.85, counts


def test_step_in_backward_equals_backward_then_step():
    """The update in the gradient hook is the update step() makes, bit for bit."""
    out = []
    for bwd in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(),
                                    torch.nn.Linear(300, 3))
        opt = NTO(model.named_parameters(), lr=1e-2, budget="100%", state_dtype="int4",
                  step_in_backward=bwd)
        x = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        out.append((list(model.parameters()), opt.state_dict()["state"]))
    for a, b in zip(out[0][0], out[1][0]):
        assert torch.equal(a, b)
    for k, st in out[0][1].items():
        assert all(torch.equal(v, out[1][1][k][key]) for key, v in st.items())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["block", "sample"])
@RUN_SETTINGS
@given(run=budget_runs(widths=(1, 8)))
def test_budget_invariant_with_4bit_state(policy, kind, run):
    """test_reliability's invariant (measured storage within the budget at every point)
    with state_dtype="int4", fp32 params and a bf16/fp32 mix (no masters), whole tensors
    and ranges of rows."""
    budget_runs_with_state_dtype("int4", policy, kind, run)


# ------------------------------------------------------------------- resume and offload


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    check_resume_in_a_fresh_process(tmp_path, dict(lr=1e-2, budget="40%", switch_every=2,
                                                   state_dtype="int4",
                                                   state_on_switch="offload"))


def test_torch_adamw_state_imports_quantized():
    named = _model()
    adamw = adamw_after_one_step(named)
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype="int4")
    opt.load_state_dict(adamw.state_dict())
    for _, p in named:
        want = quantize(adamw.state[p]["exp_avg"], adamw.state[p]["exp_avg_sq"])
        assert all(torch.equal(opt.state[p][k], v) for k, v in want.items())
        assert float(opt.state[p]["step"]) == 1.0


# ------------------------------------------------------------------------- bad input


def test_sparse_refuses_int4_and_bf16_needs_no_masters():
    params = [torch.nn.Parameter(torch.zeros(300)) for _ in range(2)]
    with pytest.raises(ValueError, match="state_dtype='int4' with policy='sparse'; allowed "
                                         "here: 'fp32', 'int8' or 'bf16'"):
        NTO(params, budget="10%", policy="sparse", state_dtype="int4")
    low = [torch.nn.Parameter(torch.zeros(300, dtype=BF16)) for _ in range(2)]
    with pytest.raises(ValueError, match="pass master_weights=False"):
        NTO(low, budget="100%", state_dtype="int4")
    assert all(not p._post_accumulate_grad_hooks for p in params + low)


def _op_args(n=300, **over):
    nb = _reference.q4_blocks(n)
    a = dict(params=[torch.zeros(n)], grads=[torch.zeros(n)],
             codes=[torch.zeros(n, dtype=torch.uint8)], exp_avg_scales=[torch.zeros(nb)],
             exp_avg_sq_scales=[torch.zeros(nb)], steps=ops._step_tensors(1, 1), **HYPER)
    a.update(over)
    return list(a.values())


@pytest.mark.parametrize("over,err,msg", [
    ({"codes": [torch.zeros(300, dtype=torch.int8)]}, TypeError, r"codes\[0\] has dtype "
     "torch.int8; allowed: torch.uint8"),
    ({"exp_avg_scales": [torch.zeros(2)]}, ValueError, r"exp_avg_scales\[0\] has 2 elements; "
     r"allowed: 5 \(params\[0\] has 300 elements, 5 blocks of 64\)"),
    ({"grads": [torch.zeros(299)]}, ValueError, r"grads\[0\] has 299 elements"),
    ({"grads": [torch.zeros(300, dtype=BF16)]}, TypeError, r"grads\[0\] has dtype "
     "torch.bfloat16 but params"),
    ({"steps": ops._step_tensors(0, 1)}, ValueError, "step counts start at 1"),
    ({"lr": -1.0}, ValueError, r"masked_adamw_int4_: lr=-1(\.0)? is not allowed"),
    ({"exp_avg_sq_scales": []}, ValueError, "got 1 params but 0 exp_avg_sq_scales"),
])
def test_bad_op_input_is_named_alike_by_kernel_and_reference(over, err, msg):
    impls = [_reference.masked_adamw_int4_] + ([KERNEL] if HAS_KERNELS else [])
    for fn in impls:
        args = _op_args(**over)
        before = [t.clone() for t in args[0] + args[2]]
        with pytest.raises(err, match=msg):
            fn(*args)
        assert all(torch.equal(a, b) for a, b in zip(args[0] + args[2], before))


@needs_kernels
def test_overlapping_arguments_are_refused_by_the_kernel():
    buf = torch.zeros(300)
    args = _op_args(grads=[buf], params=[buf])
    with pytest.raises(ValueError, match="overlap"):
        KERNEL(*args)


def test_fake_tensors_trace_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ops.masked_adamw_int4_(*_op_args()[:5], 1, **HYPER)
        with pytest.raises(TypeError, match="allowed: torch.uint8"):
            ops.masked_adamw_int4_(*_op_args(codes=[torch.zeros(300)])[:5], 1, **HYPER)
