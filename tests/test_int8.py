"""8-bit moments (issue 20, state_dtype="int8"): the fused kernel against its reference bit
for bit, the quantization's error bounds, AdamW through NTO, the budget invariant, resume
in a fresh process, offload, checkpoints and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_reliability as rel
import torch
from hypothesis import given

from nto_ext import NTO, _reference, ops
from nto_ext.formats.int8 import INT8, dequantize, quantize

ROOT = Path(__file__).resolve().parents[1]
HAS_KERNELS = ops.backend() != "reference"
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="compiled extension not loaded")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# whole blocks, partial ones, below and past a vector width, past one work item (65536)
SIZES = [1, 7, 17, 255, 256, 257, 1000, 4096 + 33, 65536 + 300]
BF16 = torch.bfloat16


def _state(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A random 8-bit state of n elements: any levels (but -128), scales spanning decades.
    (Uniform draws only: torch's randn differs between CPU capabilities.)"""
    nb = _reference.q8_blocks(n)
    qm = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
    qw = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    sm = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-8, 0, (nb,), generator=gen)
    sw = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-8, 0, (nb,), generator=gen)
    sm[0] = 0.0  # a block that never saw a gradient
    return [qm, qw, sm, sw]


def _normal(n: int, seed: int) -> torch.Tensor:
    """n standard normal fp32 numbers, the same under every CPU capability."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32))


def _run(fn, p, g, state, steps, hyper=HYPER):
    p, state = p.clone(), [t.clone() for t in state]
    for s in steps:
        fn([p], [g], [state[0]], [state[1]], [state[2]], [state[3]], [None],
           ops._step_tensors(s, 1), *hyper.values())
    return [p, *state]


@needs_kernels
@pytest.mark.parametrize("dtype,gdtype", [(torch.float32, torch.float32), (BF16, BF16),
                                          (BF16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("n", SIZES)
def test_kernel_equals_reference_bitwise(n, dtype, gdtype):
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen).to(dtype)
    g = (torch.randn(n, generator=gen) * torch.logspace(-4, 0, n)).to(gdtype)
    state = _state(n, gen)
    kernel = torch.ops.nto.masked_adamw_int8_.default
    for hyper in (HYPER, dict(lr=3e-4, beta1=0.3, beta2=0.9, eps=0.0, weight_decay=0.0)):
        want = _run(_reference.masked_adamw_int8_, p, g, state, (1, 2, 9), hyper)
        got = _run(kernel, p, g, state, (1, 2, 9), hyper)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (a.dtype, n)


@needs_kernels
def test_nonfinite_values_are_quantized_alike():
    """NaN / Inf gradients (nonfinite='propagate'): scales become NaN or Inf and levels 0
    in the kernel exactly as in the reference (NaN payloads and signs aside)."""
    n = 600
    g = torch.randn(n)
    g[3], g[300], g[301] = float("nan"), float("inf"), -float("inf")
    state = _state(n, torch.Generator().manual_seed(1))
    want = _run(_reference.masked_adamw_int8_, torch.randn(n), g, state, (1, 2))
    got = _run(torch.ops.nto.masked_adamw_int8_.default, want[0] * 0 + 1, g, state, (1, 2))
    want = _run(_reference.masked_adamw_int8_, want[0] * 0 + 1, g, state, (1, 2))
    assert got[0].isnan().any() and got[3].isnan().any()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


VARIANT = r"""
import hashlib, torch
from test_int8 import SIZES, _normal, _run, _state
k = torch.ops.nto.masked_adamw_int8_.default
h = hashlib.sha256()
for n in SIZES:
    gen = torch.Generator().manual_seed(n)
    p, g = _normal(n, n), _normal(n, n + 1)
    out = _run(k, p.to(torch.bfloat16), g, _state(n, gen), (1, 5))
    for t in out + _run(k, p, g, _state(n, gen), (2,)):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@needs_kernels
def test_every_cpu_variant_gives_the_same_bits():
    """The portable, AVX2 and AVX-512 builds (those the CPU runs) give the same bits,
    whatever the vector width; the best of them equals the reference (above; torch's own
    portable ops round lerp / addcmul differently, so the reference is compared under the
    CPU's own capability only)."""
    digests = cpu_variant_outputs(VARIANT)
    assert len(set(digests.values())) == 1, digests


def cpu_variant_outputs(script: str) -> dict[str, str]:
    """What `script` prints under each CPU capability this machine runs (portable, AVX2,
    AVX-512: ATEN_CPU_CAPABILITY picks our kernels' variant too), in fresh processes."""
    best = torch.backends.cpu.get_cpu_capability().lower()
    caps = ("default", "avx2", "avx512")
    caps = caps[:caps.index(best) + 1] if best in caps else ("default",)
    out = {}
    for cap in caps:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap,
                   PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[cap] = r.stdout.strip()
    return out


@needs_kernels
def test_threads_do_not_change_bits():
    n = 3 * 65536 + 5
    gen = torch.Generator().manual_seed(0)
    p, g, state = torch.randn(n, generator=gen), torch.randn(n, generator=gen), _state(n, gen)
    k = torch.ops.nto.masked_adamw_int8_.default
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(k, p, g, state, (3,))
        torch.set_num_threads(2)
        two = _run(k, p, g, state, (3,))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ error bounds


def test_quantization_error_is_bounded_per_element():
    """Round trip of fp32 moments: |m - m'| <= sqrt(|m| s) + s/4 with s = max|m| / 127^2
    per block (a half level of the square-root map), the same for w = sqrt(v) with 255
    (or s, where a positive w below half a level is kept at level 1); zero stays zero, a
    positive v stays positive, and re-quantizing is exact."""
    gen = torch.Generator().manual_seed(0)
    n = 5000
    m = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 1, (n,), generator=gen)
    v = (torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 1, (n,), generator=gen)) ** 2
    m[:100], v[:100] = 0.0, 0.0
    st = quantize(m, v)
    m2, v2 = dequantize(st)
    slack = 1 + 1e-5
    for x, y, levels in ((m, m2, 127), (v.sqrt(), v2.sqrt(), 255)):
        blocks = _reference.q8_blocks(n)
        s = torch.zeros(blocks * 256)
        s[:n] = x.abs()
        s = (s.view(blocks, 256).amax(1) / levels**2).repeat_interleave(256)[:n]
        bound = ((x.abs() * s).sqrt() + s / 4) * slack + 1e-30
        if levels == 255:
            bound = torch.maximum(bound, s * slack)
        assert ((x - y).abs() <= bound).all()
    assert (m2[:100] == 0).all() and (v2[:100] == 0).all()
    assert ((v > 0) <= (v2 > 0)).all()
    again = quantize(*dequantize(st))
    assert all(torch.equal(again[k], st[k]) for k in st)


def test_levels_round_half_up_by_exact_thresholds():
    """A level is sqrt(|x| / scale) rounded half up, decided exactly: at y = (k - 1/2)^2
    the level is k, one fp32 step below it k - 1; elsewhere floor(sqrt(y) + 1/2) in float64,
    at most top; NaN -> 0, inf -> top."""
    top = 255
    k = torch.arange(1, top + 1, dtype=torch.float32)
    ties = (k - 0.5) ** 2
    below = torch.nextafter(ties, torch.zeros(()))
    rand = torch.rand(top * 4, generator=torch.Generator().manual_seed(0)) * 70000
    special = torch.tensor([0.0, 1e-45, 0.2499, float("inf"), float("nan")])
    y = torch.cat([ties, below, rand, special])
    pad = (-y.numel()) % 256
    x = torch.cat([y, torch.zeros(pad)]).view(-1, 256)
    got = _reference._levels(x, torch.ones(x.shape[0]), top).reshape(-1)[:y.numel()]
    want = torch.floor(y.double().sqrt() + 0.5).clamp(max=top).float()
    want = torch.where(y.isnan(), torch.zeros_like(want), want)
    assert torch.equal(got[:top], k) and torch.equal(got[top:2 * top], k - 1)
    assert torch.equal(got, want)


def test_small_values_keep_precision_a_linear_map_would_lose():
    """In a block whose largest |m| is 1, an m of 1e-3 keeps ~15% precision (a linear
    8-bit map rounds it to 0)."""
    m = torch.full((256,), 1e-3)
    m[0] = 1.0
    m2, _ = dequantize(quantize(m, torch.ones(256)))
    assert ((m2[1:] - 1e-3).abs() <= 0.15e-3).all()


def _train(state_dtype: str, steps: int, seed: int = 0, **kw):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (48,), (300,), (17, 5)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = NTO(params, lr=1e-3, budget="100%", state_dtype=state_dtype, **kw)
    start = [p.detach().clone() for p in params]
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:  # gradients spanning four decades inside each tensor
            scale = torch.logspace(-4, 0, p.numel()).view(p.shape)
            p.grad = torch.randn(p.shape, generator=g) * scale
        opt.step()
        opt.zero_grad()
    return params, start, opt


def test_int8_adamw_stays_close_to_fp32_adamw():
    """10 steps: the param change with 8-bit moments is within 10% of fp32 AdamW's
    (relative L2 over all params) and no element moves more than 2x AdamW's lr step
    further than AdamW moved it."""
    ref, start, _ = _train("fp32", 10)
    got, _, _ = _train("int8", 10)
    d_ref = torch.cat([(p - s).view(-1) for p, s in zip(ref, start)])
    d_got = torch.cat([(p.detach() - s).view(-1) for p, s in zip(got, start)])
    rel_err = ((d_got - d_ref).norm() / d_ref.norm()).item()
    assert rel_err < 0.10, rel_err
    assert (d_got - d_ref).abs().max().item() < 2 * 10 * 1e-3
    assert rel_err > 0  # it is quantized


# --------------------------------------------------------------------- memory and budget


def test_memory_report_and_model_count_the_8bit_state():
    params, _, opt = _train("int8", 1)
    rep = opt.memory_report()
    numels = [p.numel() for p in params]
    blocks = sum(_reference.q8_blocks(n) for n in numels)
    assert rep["state_bytes"] == 2 * sum(numels) + 8 * blocks + 4 * len(numels)
    assert rep["state_bytes"] == sum(opt.policy.state_bytes(n, torch.float32)
                                     - 4 * n for n in numels)
    assert opt.policy.bytes_per_element(torch.float32) == 4 + 2 + 8 / 256
    assert rep["total_bytes"] <= rep["budget_bytes"]


@pytest.mark.parametrize("budget", ["64KiB", "5%"])
def test_a_byte_budget_trains_about_twice_the_elements(budget):
    """At the same bytes (a byte budget, or the bytes fp32 state takes at a share),
    8-bit moments train ~12/6.03 = 1.99x the elements."""
    model = [torch.nn.Parameter(torch.zeros(256, 256)) for _ in range(24)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = NTO([(f"layers.{i}.w", p) for i, p in enumerate(model)], budget=budget)
        nbytes = f"{fp32.budget_bytes()}B"
        int8 = NTO([(f"layers.{i}.w", p) for i, p in enumerate(model)], budget=nbytes,
                   state_dtype="int8")
    ratio = int8.budget_elements() / fp32.budget_elements()
    assert 1.95 < ratio < 2.0, ratio
    trained = int8.memory_report()["trainable_elements"] / fp32.memory_report()[
        "trainable_elements"]
    assert trained >= 1.5, trained


@pytest.mark.parametrize("kind", rel.KINDS)
@pytest.mark.parametrize("policy", ["block", "sample", "sparse"])
@rel.RUN_SETTINGS
@given(run=rel.budget_runs(widths=(1, 8)))
def test_budget_invariant_with_8bit_state(policy, kind, run):
    """test_reliability's invariant (measured storage within the budget at every point)
    with state_dtype="int8", fp32 params and a bf16/fp32 mix (no masters), whole tensors
    and ranges of rows."""
    budget_runs_with_state_dtype("int8", policy, kind, run)


def budget_runs_with_state_dtype(state_dtype: str, policy: str, kind: str, run: dict) -> None:
    """test_reliability's budget run with `state_dtype` moments: fp32 params, then a
    bf16/fp32 mix updated in place (no masters)."""
    torch.set_num_threads(1)
    for name, dtype, fmt in ((f"{state_dtype}-moments", torch.float32, {}),  # own keys:
                             (f"{state_dtype}-moments-mixed", None,  # rel's stay as they are
                              {"master_weights": False})):
        rel.DTYPES[name] = dtype
        rel.FORMAT_ARGS[name] = {"state_dtype": state_dtype, **fmt}
        try:
            rel._budget_run(policy, kind, name, run)
        finally:
            del rel.DTYPES[name], rel.FORMAT_ARGS[name]


# ------------------------------------------------------------------- resume and offload


def _model(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(f"layers.{i}.w{j}", torch.nn.Parameter(torch.randn(s, generator=gen)))
            for i in range(4) for j, s in enumerate([(40, 30), (30,), (700,)])]


def _steps(opt, named, start, stop):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
        opt.zero_grad()


KW = dict(lr=1e-2, budget="40%", switch_every=2, state_dtype="int8", state_on_switch="offload")
RESUME = r"""
import json, sys, torch
from test_int8 import _model, _steps
from nto_ext import NTO
named = _model()
sd = torch.load(sys.argv[1], weights_only=True)
for (_, p), w in zip(named, sd["params"]):
    p.data.copy_(w)
opt = NTO(named, **json.loads(sys.argv[3]))
opt.load_state_dict(sd["opt"])
_steps(opt, named, 7, 15)
torch.save({"params": [p.detach() for _, p in named], "opt": opt.state_dict()}, sys.argv[2])
"""


def check_resume_in_a_fresh_process(tmp_path, kw: dict, offloads: bool = True) -> NTO:
    """7 steps, a checkpoint (weights_only-loadable), 8 more steps in a new process ==
    15 steps in one run: params and every state tensor, dtypes included. Returns the
    optimizer of the single run."""
    named = _model()
    opt = NTO(named, **kw)
    _steps(opt, named, 0, 7)
    assert opt.offloaded or not offloads, "the schedule must have offloaded by step 7"
    torch.save({"params": [p.detach().clone() for _, p in named], "opt": opt.state_dict()},
               tmp_path / "a.pt")
    _steps(opt, named, 7, 15)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    r = subprocess.run([sys.executable, "-c", RESUME, str(tmp_path / "a.pt"),
                        str(tmp_path / "b.pt"), json.dumps(kw)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    other = torch.load(tmp_path / "b.pt", weights_only=True)
    for (_, p), q in zip(named, other["params"]):
        assert torch.equal(p.detach(), q)
    mine, theirs = opt.state_dict(), other["opt"]
    assert mine["nto"] == theirs["nto"]
    assert mine["state"].keys() == theirs["state"].keys()
    for k, st in mine["state"].items():
        for key, v in st.items():
            assert v.dtype == theirs["state"][k][key].dtype
            assert torch.equal(v, theirs["state"][k][key]), (k, key)
    return opt


def test_resume_in_a_fresh_process_is_bit_exact(tmp_path):
    check_resume_in_a_fresh_process(tmp_path, KW)


def test_offload_round_trip_keeps_the_8bit_state():
    """A param's 8-bit state is parked on the host when its period ends and comes back
    unchanged (dtypes and bits) when it trains again."""
    named = _model()
    opt = NTO(named, **KW)
    seen: dict[int, dict] = {}
    checked = 0
    for step in range(12):
        _steps(opt, named, step, step + 1)
        for i, st in opt.offloaded.items():
            seen[i] = {k: v.clone() for k, v in st.items()}
            assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
        for i in list(seen):
            p = opt.table.params[i]
            if i not in opt.offloaded and opt.state.get(p):
                if int(opt.state[p]["step"]) == int(seen[i]["step"]):  # not updated yet
                    for k, v in seen[i].items():
                        assert torch.equal(opt.state[p][k], v), (i, k)
                    checked += 1
                del seen[i]
    assert checked >= 2


def adamw_after_one_step(named) -> torch.optim.AdamW:
    """torch AdamW over `named` after one step with random grads (state to import)."""
    adamw = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    for _, p in named:
        p.grad = torch.randn(p.shape)
    adamw.step()
    return adamw


def test_torch_adamw_state_imports_quantized():
    named = _model()
    adamw = adamw_after_one_step(named)
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype="int8")
    opt.load_state_dict(adamw.state_dict())
    for _, p in named:
        want = quantize(adamw.state[p]["exp_avg"], adamw.state[p]["exp_avg_sq"])
        assert all(torch.equal(opt.state[p][k], v) for k, v in want.items())
        assert float(opt.state[p]["step"]) == 1.0


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,err,msg", [
    ({"state_dtype": "fp16"}, ValueError,
     r"state_dtype='fp16'; allowed: 'fp32', 'int8', 'int4', 'bf16'"),
    ({"state_dtype": 8}, ValueError, r"state_dtype=8; allowed"),
    ({"state_dtype": "int8", "stochastic_rounding": True}, ValueError, "allowed: one of them"),
    ({"state_dtype": "int8", "master_weights": True}, ValueError, "allowed: one of them"),
    ({"state_dtype": "int8"}, ValueError, "pass master_weights=False"),  # bf16 params
])
def test_bad_arguments_are_refused_before_anything_changes(kw, err, msg):
    params = [torch.nn.Parameter(torch.zeros(300, dtype=BF16)) for _ in range(2)]
    with pytest.raises(err, match=msg):
        NTO(params, budget="100%", **kw)
    assert all(not p._post_accumulate_grad_hooks for p in params)


def _op_args(n=300, **over):
    nb = _reference.q8_blocks(n)
    a = dict(params=[torch.zeros(n)], grads=[torch.zeros(n)],
             exp_avgs=[torch.zeros(n, dtype=torch.int8)],
             exp_avg_sqs=[torch.zeros(n, dtype=torch.uint8)], exp_avg_scales=[torch.zeros(nb)],
             exp_avg_sq_scales=[torch.zeros(nb)], indices=[None], steps=ops._step_tensors(1, 1),
             **HYPER)
    a.update(over)
    return list(a.values())


@pytest.mark.parametrize("over,err,msg", [
    ({"exp_avgs": [torch.zeros(300)]}, TypeError, r"exp_avgs\[0\] has dtype torch.float32; "
     "allowed: torch.int8"),
    ({"exp_avg_sqs": [torch.zeros(300, dtype=torch.int8)]}, TypeError, "allowed: torch.uint8"),
    ({"exp_avg_scales": [torch.zeros(1)]}, ValueError, r"exp_avg_scales\[0\] has 1 elements; "
     r"allowed: 2 \(params\[0\] has 300 elements, 2 blocks of 256\)"),
    ({"grads": [torch.zeros(299)]}, ValueError, r"grads\[0\] has 299 elements"),
    ({"steps": ops._step_tensors(0, 1)}, ValueError, "step counts start at 1"),
    ({"lr": -1.0}, ValueError, r"masked_adamw_int8_: lr=-1(\.0)? is not allowed"),
    ({"exp_avg_sq_scales": []}, ValueError, "got 1 params but 0 exp_avg_sq_scales"),
])
def test_bad_op_input_is_named_alike_by_kernel_and_reference(over, err, msg):
    impls = [_reference.masked_adamw_int8_]
    if HAS_KERNELS:
        impls.append(torch.ops.nto.masked_adamw_int8_.default)
    for fn in impls:
        args = _op_args(**over)
        before = [t.clone() for t in args[0] + args[2]]
        with pytest.raises(err, match=msg):
            fn(*args)
        assert all(torch.equal(a, b) for a, b in zip(args[0] + args[2], before))


def test_fake_tensors_trace_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ops.masked_adamw_int8_(*_op_args()[:6], 1, **HYPER)
        with pytest.raises(TypeError, match="allowed: torch.int8"):
            ops.masked_adamw_int8_(*_op_args(exp_avgs=[torch.zeros(300)])[:6], 1, **HYPER)


@pytest.mark.parametrize("state_dtype,edit,msg", [
    ("int8", lambda st: st.update(exp_avg_scale=-st["exp_avg_scale"] - 1),
     "negative or non-finite"),
    ("int8", lambda st: st["exp_avg"].fill_(-128), "exp_avg holds -128"),
    ("int8", lambda st: st.update(exp_avg_sq=st["exp_avg_sq"].float()),
     "expected contiguous torch.uint8"),
    ("int8", lambda st: st.update(exp_avg_sq_scale=st["exp_avg_sq_scale"][:1]), r"shape \(1,\)"),
    ("int8", lambda st: st.update(extra=torch.zeros(3)), "unexpected entry 'extra'"),
    ("int4", lambda st: st.update(exp_avg_scale=-st["exp_avg_scale"] - 1),
     "negative or non-finite"),
    ("int4", lambda st: st.update(moments=st["moments"].to(torch.int8)),
     "expected contiguous torch.uint8"),
    ("int4", lambda st: st.update(exp_avg_sq_scale=st["exp_avg_sq_scale"][:1]), r"shape \(1,\)"),
    ("int4", lambda st: st.update(exp_avg=torch.zeros(3)), "unexpected entry 'exp_avg'"),
])
def test_corrupted_checkpoints_are_refused_with_no_change(state_dtype, edit, msg):
    named = _model()
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype=state_dtype)
    _steps(opt, named, 0, 2)
    sd = opt.state_dict()
    edit(sd["state"][0])
    before = opt.state_dict()
    with pytest.raises(ValueError, match=msg):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["nto"] == before["nto"]
    assert all(torch.equal(after["state"][0][k], before["state"][0][k])
               for k in before["state"][0])


@pytest.mark.parametrize("saved,loaded", [("int8", "fp32"), ("fp32", "int8"), ("int4", "int8"),
                                          ("int8", "int4")])
def test_checkpoint_needs_the_same_state_dtype(saved, loaded):
    named = _model()
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype=saved)
    _steps(opt, named, 0, 1)
    other = NTO(_model(), lr=1e-2, budget="100%", state_dtype=loaded)
    with pytest.raises(ValueError, match="state_dtype: saved"):
        other.load_state_dict(opt.state_dict())


def test_state_entries_edited_by_hand_are_refused_at_step():
    named = _model()
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype="int8")
    _steps(opt, named, 0, 1)
    p = named[0][1]
    opt.state[p]["exp_avg_scale"] = torch.zeros(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="exp_avg_scale is a torch.float32 tensor of shape"):
        _steps(opt, named, 1, 2)
    assert torch.equal(p.detach(), before)


def test_plan_knows_the_8bit_cost():
    from nto_ext.planner import plan

    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    fp32 = plan(model, "1MiB")
    int8 = plan(model, "1MiB", state_dtype="int8")
    assert int8.budget_amount == fp32.budget_amount
    assert max(g.elements for g in int8.groups) > 1.5 * max(g.elements for g in fp32.groups)
    assert INT8.state_bytes(257) == 2 * 257 + 16
    assert math.isclose(INT8.element_bytes, 2.03125)


def test_nonfinite_scales_load_only_under_propagate():
    named = _model()
    opt = NTO(named, lr=1e-2, budget="100%", state_dtype="int8")
    _steps(opt, named, 0, 1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_scale"][0] = float("nan")
    with pytest.raises(ValueError, match="negative or non-finite"):
        NTO(_model(), lr=1e-2, budget="100%", state_dtype="int8").load_state_dict(sd)
    other = NTO(_model(), lr=1e-2, budget="100%", state_dtype="int8", nonfinite="propagate")
    other.load_state_dict(sd)
    p = other.table.params[0]
    assert other.state[p]["exp_avg_scale"][0].isnan()
