"""CUDA kernels: agreement with the CPU kernels and the reference for every op and dtype,
sizes 0, 1, odd, 4097, 65537 and past 2**31 elements, bad inputs raising the CPU's errors,
and the no-host-sync contract. Marked `gpu` (run with `pytest -m gpu`; skipped without CUDA).

Equality rules: masked_adamw_ with host step counts is bit-exact against the CPU kernel
(same csrc/adamw_math.h, every op IEEE-rounded on both); with device step counts the bias
corrections come from the GPU's double pow (within an ulp of the CPU's), so tolerances are
tight but not zero. select_topk, remap_state, gather_accumulate_ and param_stats' counts are
exact; param_stats' sumsq agrees with float64 to summation-order rounding (the CPU op's to 1e-5:
fp32 lanes).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nto_ext import _reference, ops

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (0, 1, 3, 4097, 65537)
INT32_MAX = 2**31 - 1
# Version-dependent exact comparisons: csrc/adamw_math.h reproduces the rounding of torch's
# own ops as measured on torch 2.13 (the pinned version). Against torch's ops (the reference,
# torch.optim) results are bit-exact on that version only; on another torch (a GPU machine's
# preinstalled one) they are compared within tolerance and a warning says so. Comparisons of
# the CUDA kernels with the CPU kernels (the same csrc/adamw_math.h) stay exact everywhere.
MEASURED_TORCH = "2.13"
SAME_TORCH = torch.__version__.split("+")[0].rsplit(".", 1)[0] == MEASURED_TORCH


def _exact_vs_torch() -> bool:
    """Whether a comparison with torch's own ops may demand bit equality (see SAME_TORCH)."""
    if not SAME_TORCH:
        warnings.warn(f"torch {torch.__version__} is not the measured {MEASURED_TORCH}: "
                      "comparing with torch's ops within tolerance, not bit for bit",
                      stacklevel=2)
    return SAME_TORCH



# --------------------------------------------------------------------------- helpers


def _cuda_op(name: str):
    """torch.ops.nto.<name>, asserting CUDA tensors run the compiled kernels (without them
    the dispatcher would run the reference on CUDA tensors, which tests nothing here)."""
    assert ops.has_cuda_kernels(), (f"nto::{name} has no CUDA kernel: build with "
                                    "NTO_EXT_BUILD=cuda pip install --no-build-isolation -e .")
    return getattr(torch.ops.nto, name)


def _cpu_or_reference(name: str):
    """torch.ops.nto.<name> for CPU tensors: the CPU kernel when built, else the reference."""
    ops.backend()
    return getattr(torch.ops.nto, name)


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _sorted_positions(n: int, density: float, dtype: torch.dtype, gen: torch.Generator):
    keep = torch.rand(n, generator=gen) < density
    return torch.nonzero(keep).view(-1).to(dtype)


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0]


# ------------------------------------------------------------------------- backend


def test_backend_is_cuda_ext():
    assert ops.backend() == "cuda-ext"
    for name in ops.SCHEMAS:
        _cuda_op(name)


# --------------------------------------------------------------------- param_stats


def _stats_inputs(dtype, gen):
    ts = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    special = torch.tensor([0.0, -0.0, 1e-40, -3e-39, float("inf"), -float("inf"), 2.5, -7.0])
    ts.append(special.to(dtype))
    nan = torch.randn(1000, generator=gen)
    nan[17] = float("nan")
    ts.append(nan.to(dtype))
    ts.append(torch.randn(3 * (1 << 17) + 5, generator=gen).to(dtype))  # several partials
    return ts


@pytest.mark.parametrize("dtype", FLOATS)
def test_param_stats_agrees(dtype):
    gen = torch.Generator().manual_seed(1)
    ts = _stats_inputs(dtype, gen)
    got = [x.cpu() for x in _cuda_op("param_stats")(_to(ts, DEV))]
    for want, rtol in ((_cpu_or_reference("param_stats")(ts), 1e-5),
                       (_reference.param_stats(ts), 1e-12)):
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=0, equal_nan=True)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got[3], want[3])


@pytest.mark.parametrize("dtype", FLOATS)
def test_param_stats_without_histogram(dtype):
    ts = _to(_stats_inputs(dtype, torch.Generator().manual_seed(1)), DEV)
    full = _cuda_op("param_stats")(ts)
    fast = _cuda_op("param_stats")(ts, False)
    assert fast[3].shape == (len(ts), 0)
    for a, b in zip(full[:3], fast[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_param_stats_many_tensors_and_mixed_dtypes():
    gen = torch.Generator().manual_seed(2)
    ts = [torch.randn(int(n), generator=gen).to(FLOATS[i % 3])
          for i, n in enumerate(torch.randint(0, 3000, (300,), generator=gen))]
    got = [x.cpu() for x in _cuda_op("param_stats")(_to(ts, DEV))]
    want = _reference.param_stats(ts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=0, equal_nan=True)
    assert torch.equal(got[2], want[2])


def test_param_stats_is_deterministic():
    x = [torch.randn(5_000_003, device=DEV), torch.randn(77, device=DEV)]
    a = _cuda_op("param_stats")(x)
    for _ in range(3):
        b = _cuda_op("param_stats")(x)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


# ------------------------------------------------------------------- masked_adamw_

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _adamw_case(sizes, pdtype, gdtype, kind, idx_dtype, gen, offset=0):
    """CPU inputs: kind 'dense' | 'compact' | 'dense_grad' (indexed); steps are set by
    _step_list. offset=1 makes params unaligned views."""
    params, grads, ms, vs, idx, steps = [], [], [], [], [], []
    for n in sizes:
        base = torch.randn(n + offset, generator=gen).to(pdtype)
        p = base[offset:]
        if kind == "dense":
            pos, length = None, n
        else:
            pos = _sorted_positions(n, 0.3, idx_dtype, gen)
            length = pos.numel()
        g_len = n if kind in ("dense", "dense_grad") else length
        grads.append(torch.randn(g_len, generator=gen).to(gdtype))
        params.append(p)
        ms.append(torch.randn(length, generator=gen) * 0.1)
        vs.append(torch.rand(length, generator=gen) * 0.01)
        idx.append(pos)
        steps.append(7)
    return params, grads, ms, vs, idx, steps


def _step_list(steps, step_kind, device):
    """step_kind 'int' | 'cpu' | 'cuda' | 'cuda_f32': one count (7) per tensor."""
    if step_kind == "int":
        return ops._step_tensors(7, len(steps))
    if step_kind == "cpu":
        return [torch.tensor([7.0], dtype=torch.float64) for _ in steps]
    if step_kind == "cuda":
        return [torch.tensor([7], dtype=torch.int64, device=device) for _ in steps]
    assert step_kind == "cuda_f32", step_kind
    return [torch.tensor([7.0], dtype=torch.float32, device=device) for _ in steps]


def _run_adamw(op, case, device, step_kind):
    params, grads, ms, vs, idx, steps = (_to([t.clone() if isinstance(t, torch.Tensor) else t
                                              for t in lst], device) for lst in case)
    op(params, grads, ms, vs, idx, _step_list(steps, step_kind, device), *HYPER.values())
    return [t.cpu() for t in params], [t.cpu() for t in ms], [t.cpu() for t in vs]


def _assert_same(got, want, exact: bool, dtype):
    tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    for g_list, w_list in zip(got, want):
        for g, w in zip(g_list, w_list):
            if exact:
                assert torch.equal(g, w), (g - w).abs().max()
            else:
                torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * 1e-3)


CASES = [(p, g) for p in FLOATS for g in {p, torch.float32}]


@pytest.mark.parametrize("pdtype,gdtype", CASES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", ["dense", "compact", "dense_grad"])
def test_masked_adamw_agrees_with_cpu_and_reference(pdtype, gdtype, kind):
    gen = torch.Generator().manual_seed(3)
    for idx_dtype in (torch.int32, torch.int64) if kind != "dense" else (None,):
        for offset in (0, 1):
            case = _adamw_case(SIZES + (1 << 20 | 7,), pdtype, gdtype, kind, idx_dtype, gen,
                               offset)
            got = _run_adamw(_cuda_op("masked_adamw_"), case, DEV, "int")
            want_cpu = _run_adamw(_cpu_or_reference("masked_adamw_"), case, "cpu", "int")
            _assert_same(got, want_cpu, exact=True, dtype=pdtype)
            want_ref = _run_adamw(_reference.masked_adamw_, case, "cpu", "int")
            _assert_same(got, want_ref, exact=pdtype == torch.float32 and _exact_vs_torch(),
                         dtype=pdtype)


@pytest.mark.parametrize("step_kind", ["cpu", "cuda", "cuda_f32"])
@pytest.mark.parametrize("kind", ["dense", "compact"])
def test_masked_adamw_step_kinds(step_kind, kind):
    gen = torch.Generator().manual_seed(4)
    for pdtype in FLOATS:
        case = _adamw_case((1, 4097, 65537), pdtype, pdtype, kind, torch.int32, gen)
        got = _run_adamw(_cuda_op("masked_adamw_"), case, DEV, step_kind)
        want = _run_adamw(_cpu_or_reference("masked_adamw_"), case, "cpu", "cpu")
        _assert_same(got, want, exact=step_kind == "cpu", dtype=pdtype)


def test_masked_adamw_many_tensors_one_call():
    # more tensors than one launch's table holds (32 dense / 24 indexed): several launches
    gen = torch.Generator().manual_seed(5)
    sizes = [int(n) for n in torch.randint(0, 5000, (100,), generator=gen)]
    for kind in ("dense", "compact"):
        case = _adamw_case(sizes, torch.bfloat16, torch.float32, kind, torch.int64, gen)
        got = _run_adamw(_cuda_op("masked_adamw_"), case, DEV, "int")
        want = _run_adamw(_cpu_or_reference("masked_adamw_"), case, "cpu", "int")
        _assert_same(got, want, exact=True, dtype=torch.bfloat16)


def test_masked_adamw_untouched_elements_stay_bit_identical():
    gen = torch.Generator().manual_seed(6)
    p = torch.randn(100_003, generator=gen).half().to(DEV)
    before = p.clone()
    idx = _sorted_positions(p.numel(), 0.1, torch.int32, gen).to(DEV)
    g, m, v = (torch.randn(idx.numel(), device=DEV) for _ in range(3))
    _cuda_op("masked_adamw_")([p], [g], [m], [v.abs()], [idx], ops._step_tensors(1, 1),
                              *HYPER.values())
    mask = torch.ones(p.numel(), dtype=torch.bool, device=DEV)
    mask[idx.long()] = False
    assert torch.equal(p[mask].view(torch.int16), before[mask].view(torch.int16))
    assert not torch.equal(p[~mask], before[~mask])


def test_masked_adamw_matches_torch_fused_adamw():
    gen = torch.Generator().manual_seed(7)
    ps = [torch.randn(n, generator=gen).to(DEV) for n in (1, 4097, 65537)]
    ref = [p.clone().requires_grad_() for p in ps]
    opt = torch.optim.AdamW(ref, fused=True, lr=HYPER["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.1)
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for step in range(1, 4):
        grads = [torch.randn(p.numel(), generator=gen).to(DEV) for p in ps]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        ops.masked_adamw_(ps, grads, ms, vs, [None] * 3, step, **HYPER)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-7)


def test_masked_adamw_device_steps_below_one_leave_memory_untouched():
    # documented difference from the CPU: device step counts are not read on the host
    p = torch.randn(5000, device=DEV)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    before = p.clone()
    _cuda_op("masked_adamw_")([p], [torch.ones_like(p)], [m], [v], [None],
                              [torch.zeros(1, device=DEV)], *HYPER.values())
    assert torch.equal(p, before) and not m.any()
    idx = torch.arange(0, 5000, 2, dtype=torch.int32, device=DEV)
    m2, v2 = torch.zeros(idx.numel(), device=DEV), torch.zeros(idx.numel(), device=DEV)
    ones = torch.ones(idx.numel(), device=DEV)
    _cuda_op("masked_adamw_")([p, p.clone()], [ones, ones], [m2, m2.clone()], [v2, v2.clone()],
                              [idx, idx], [torch.zeros(1, dtype=torch.int32, device=DEV),
                                           torch.ones(1, dtype=torch.int32, device=DEV)],
                              *HYPER.values())
    assert not m2.any() and torch.equal(p, before)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_masked_adamw_hot_path_has_no_host_sync(state_dtype):
    p = torch.randn(70_000, device=DEV)
    idx = torch.arange(0, 70_000, 7, dtype=torch.int32, device=DEV)
    g = torch.zeros(idx.numel(), device=DEV)
    m, v = (torch.zeros(idx.numel(), dtype=state_dtype, device=DEV) for _ in range(2))
    step = torch.ones(1, device=DEV)
    args = ([p], [g], [m], [v], [idx])
    _cuda_op("masked_adamw_")(*args, [step], *HYPER.values())  # first sight: checks indices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step.add_(1)
            _cuda_op("masked_adamw_")(*args, [step], *HYPER.values())
            _cuda_op("gather_accumulate_")([p], [idx], [g])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_masked_adamw_under_cuda_graph_replay(state_dtype):
    gen = torch.Generator().manual_seed(8)
    p = torch.randn(10_000, generator=gen).to(DEV)
    idx = torch.arange(0, 10_000, 3, dtype=torch.int64, device=DEV)
    g = torch.randn(idx.numel(), generator=gen).to(DEV)
    m, v = (torch.zeros_like(g, dtype=state_dtype) for _ in range(2))
    step = torch.ones(1, device=DEV)
    eager = [t.clone() for t in (p, m, v)]
    op = _cuda_op("masked_adamw_")
    op([eager[0]], [g], [eager[1]], [eager[2]], [idx], [step.clone()], *HYPER.values())
    op([p.clone()], [g], [m.clone()], [v.clone()], [idx], [step], *HYPER.values())  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture fails on any host sync
        op([p], [g], [m], [v], [idx], [step], *HYPER.values())
    graph.replay()
    for a, b in zip((p, m, v), eager):
        assert torch.equal(a, b)
    for _ in range(2):
        step.add_(1)
        graph.replay()
        op([eager[0]], [g], [eager[1]], [eager[2]], [idx], [step.clone()], *HYPER.values())
    for a, b in zip((p, m, v), eager):
        assert torch.equal(a, b)



def _cohort_args(base_idx, p, g, m, v, step):
    """masked_adamw_ arguments as the sparse policy builds them every step: fresh slices of
    one index, grad and state tensor per cohort, the param repeated once per cohort."""
    cuts = (0, 300, base_idx.numel())
    sl = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
    return ([p] * len(sl), [g[c] for c in sl], [m[c] for c in sl], [v[c] for c in sl],
            [base_idx[c] for c in sl], [step] * len(sl))


def test_fresh_slices_of_checked_indices_need_no_host_sync():
    """Issue 20: the index-check cache is keyed on the memory, not the tensor object, so the
    sparse policy's per-call slices are checked once (the sync) and never again."""
    p = torch.randn(50_000, device=DEV)
    idx = torch.arange(0, 50_000, 9, dtype=torch.int32, device=DEV)
    g, m, v = (torch.zeros(idx.numel(), device=DEV) for _ in range(3))
    step = torch.ones(1, device=DEV)
    op, gather = _cuda_op("masked_adamw_"), _cuda_op("gather_accumulate_")
    op(*_cohort_args(idx, p, g, m, v, step), *HYPER.values())
    gather([p, p], [idx[:300], idx[300:]], [g[:300], g[300:]])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step.add_(1)
            op(*_cohort_args(idx, p, g, m, v, step), *HYPER.values())
            gather([p, p], [idx[:300], idx[300:]], [g[:300], g[300:]])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    idx[5] += 1  # a torch write: the version moves, the next call checks (and syncs) again
    with pytest.raises(RuntimeError, match="synchroniz"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            gather([p, p], [idx[:300], idx[300:]], [g[:300], g[300:]])
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_of_sparse_style_calls_after_a_warm_up():
    gen = torch.Generator().manual_seed(9)
    p = torch.randn(20_000, generator=gen).to(DEV)
    idx = torch.arange(0, 20_000, 5, dtype=torch.int64, device=DEV)
    g = torch.randn(idx.numel(), generator=gen).to(DEV)
    m, v = torch.zeros_like(g), torch.zeros_like(g)
    step = torch.ones(1, device=DEV)
    op = _cuda_op("masked_adamw_")
    eager = [t.clone() for t in (p, m, v)]
    op(*_cohort_args(idx, eager[0], g, eager[1], eager[2], step.clone()), *HYPER.values())
    op(*_cohort_args(idx, p.clone(), g, m.clone(), v.clone(), step), *HYPER.values())  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # new slice objects: the cache must still hit
        op(*_cohort_args(idx, p, g, m, v, step), *HYPER.values())
    graph.replay()
    for a, b in zip((p, m, v), eager):
        assert torch.equal(a, b)
    fresh = torch.arange(1, 20_000, 5, dtype=torch.int64, device=DEV)  # never checked
    with pytest.raises(RuntimeError, match=r"captured into a CUDA graph; run the same call once"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            op(*_cohort_args(fresh, p, g, m, v, step), *HYPER.values())


def test_overlapping_arguments_raise_the_cpu_errors():
    def cases(d):
        a = _adamw_args(d)
        a["exp_avg_sqs"] = a["exp_avgs"]
        b = _adamw_args(d)
        b["grads"] = [b["params"][0]]  # a dense grad that is the param itself
        return [a, b]
    for cpu, dev in zip(cases("cpu"), cases(DEV)):
        want = _error_of(lambda cpu=cpu: _cpu_or_reference("masked_adamw_")(*cpu.values()))
        got = _error_of(lambda dev=dev: _cuda_op("masked_adamw_")(*dev.values()))
        assert got[0] is ValueError and got == want and "share memory" in got[1], (got, want)
    c = torch.zeros(4, device=DEV)
    got = _error_of(lambda: _cuda_op("gather_accumulate_")(
        [torch.ones(8, device=DEV)] * 2, [torch.tensor([1, 2], device=DEV)] * 2, [c[:2], c[1:3]]))
    assert got[0] is ValueError and "compact[0] and compact[1] share memory" in got[1]


def test_every_op_once_small():
    """One small call of every kernel variant (dense / indexed, compact / dense grad, int32 /
    int64 positions, each dtype, unaligned tails, device steps), checked against the CPU:
    the subset bench/gpu_check.sh runs under compute-sanitizer memcheck and racecheck."""
    gen = torch.Generator().manual_seed(10)
    sizes = (1, 3, 4097, 65537 + 2)
    for pdtype in FLOATS:
        for kind, idx_dtype in (("dense", None), ("compact", torch.int32),
                                ("dense_grad", torch.int64)):
            case = _adamw_case(sizes, pdtype, torch.float32, kind, idx_dtype, gen, offset=1)
            got = _run_adamw(_cuda_op("masked_adamw_"), case, DEV, "int")
            want = _run_adamw(_cpu_or_reference("masked_adamw_"), case, "cpu", "int")
            _assert_same(got, want, exact=True, dtype=pdtype)
            _run_adamw(_cuda_op("masked_adamw_"), case, DEV, "cuda")
        ts = [torch.randn(n, generator=gen).to(pdtype) for n in sizes]
        stats = _cuda_op("param_stats")(_to(ts, DEV))
        assert torch.equal(stats[3].cpu(), _cpu_or_reference("param_stats")(ts)[3])
        k = sum(sizes) // 10
        got = _cuda_op("select_topk")(_to(ts, DEV), k)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, _reference.select_topk(ts, k)))
        idx = [_sorted_positions(n, 0.3, torch.int32, gen) for n in sizes]
        new = [_sorted_positions(n, 0.3, torch.int64, gen) for n in sizes]
        states = [torch.randn(2, i.numel(), generator=gen).to(pdtype) for i in idx]
        got = _cuda_op("remap_state")(_to(idx, DEV), _to(new, DEV), _to(states, DEV))
        want = _reference.remap_state(idx, new, states)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
        compact = [torch.zeros(i.numel(), device=DEV) for i in idx]
        _cuda_op("gather_accumulate_")(_to(ts, DEV), _to(idx, DEV), compact)
        want = [torch.zeros(i.numel()) for i in idx]
        _reference.gather_accumulate_(ts, idx, want)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(compact, want))
        if pdtype != torch.float32:
            cols, sr, keys = _lowp_case(sizes, pdtype, "master_last", gen)
            got = _run_lowp(_cuda_op("masked_adamw_lowp_"), DEV, cols, sr, keys, 0.1, False)
            want = _run_lowp(_cpu_or_reference("masked_adamw_lowp_"), "cpu", cols, sr, keys,
                             0.1, False)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        for gdtype in (pdtype,) if pdtype == torch.float32 else (pdtype, torch.float32):
            ps, gs = _first_case(sizes, pdtype, gdtype, gen)
            got = _run_first(_cuda_op("adamw_first_step_"), DEV, ps, gs, FIRST_HYPER[0], "p")
            want = _run_first(_cpu_or_reference("adamw_first_step_"), "cpu", ps, gs,
                              FIRST_HYPER[0])
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        p = ts[-1]
        g = torch.randn(p.numel(), generator=gen).to(pdtype)
        st = _q8_state(p.numel(), gen)
        got = _run_int8(_cuda_op("masked_adamw_int8_"), DEV, p, g, st, (1, 2))
        want = _run_int8(_cpu_or_reference("masked_adamw_int8_"), "cpu", p, g, st, (1, 2))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    torch.cuda.synchronize()


# ------------------------------------------------- masked_adamw_int8_ / masked_adamw_lowp_

Q8_SIZES = (1, 7, 255, 256, 257, 4129, 65536 + 300)


def _q8_state(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A random 8-bit state (tests/test_int8.py's): any levels, scales spanning decades."""
    nb = _reference.q8_blocks(n)
    sm = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-8, 0, (nb,), generator=gen)
    sw = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-8, 0, (nb,), generator=gen)
    sm[0] = 0.0
    return [torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8),
            torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8), sm, sw]


def _run_int8(op, device, p, g, st, steps, indices=None):
    """indices: None (dense) or the positions in p that g and st follow (compact)."""
    p, g, st = p.clone().to(device), g.to(device), [t.clone().to(device) for t in st]
    idx = None if indices is None else indices.to(device)
    for s in steps:
        op([p], [g], [st[0]], [st[1]], [st[2]], [st[3]], [idx], ops._step_tensors(s, 1),
           1e-2, 0.9, 0.999, 1e-8, 0.1)
    return [t.cpu() for t in (p, *st)]


@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32),
                                           (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16)])
def test_masked_adamw_int4_agrees_with_cpu(pdtype, gdtype):
    """The 4-bit format's CUDA kernel == the CPU kernel bit for bit, two steps, whole and
    partial blocks of 64, any byte and scales spanning decades."""
    for n in Q8_SIZES:
        gen = torch.Generator().manual_seed(n)
        p = torch.randn(n, generator=gen).to(pdtype)
        g = (torch.randn(n, generator=gen) * 1e-3).to(gdtype)
        nb = _reference.q4_blocks(n)
        st = [torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8),
              torch.rand(nb, generator=gen) * 1e-4, torch.rand(nb, generator=gen) * 1e-6]
        runs = []
        for op, device in ((_cuda_op("masked_adamw_int4_"), DEV),
                           (_cpu_or_reference("masked_adamw_int4_"), "cpu")):
            q, h, s = p.clone().to(device), g.to(device), [t.clone().to(device) for t in st]
            for step in (1, 5):
                op([q], [h], [s[0]], [s[1]], [s[2]], ops._step_tensors(step, 1),
                   1e-2, 0.9, 0.999, 1e-8, 0.1)
            runs.append([t.cpu() for t in (q, *s)])
        where = _first_difference(*runs, ("param", "moments", "exp_avg_scale",
                                          "exp_avg_sq_scale"))
        assert not where, f"n={n}: {where}"


def _first_difference(got: list[torch.Tensor], want: list[torch.Tensor], names) -> str:
    """'' if every tensor is bitwise equal, else where the first one differs and the values
    (hex), to tell a rounding difference from a logic one."""
    for name, a, b in zip(names, got, want):
        ai, bi = a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        if torch.equal(ai, bi):
            continue
        diff = torch.nonzero(a.view(-1).view(torch.uint8).view(a.numel(), -1)
                             .ne(b.view(-1).view(torch.uint8).view(b.numel(), -1)).any(1))
        i = int(diff[0])
        return (f"{name} differs at {diff.numel()} of {a.numel()} elements, first [{i}]: "
                f"cuda {a.view(-1)[i].item()!r} vs cpu {b.view(-1)[i].item()!r}")
    return ""


@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32),
                                           (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16)])
@pytest.mark.parametrize("steps", [(1,), (1, 5)])
def test_masked_adamw_int8_agrees_with_cpu(pdtype, gdtype, steps):
    """CUDA == the CPU kernel bit for bit (same csrc/adamw_math.h), one and two steps."""
    for n in Q8_SIZES:
        gen = torch.Generator().manual_seed(n)
        p = torch.randn(n, generator=gen).to(pdtype)
        g = (torch.randn(n, generator=gen) * 1e-3).to(gdtype)
        st = _q8_state(n, gen)
        got = _run_int8(_cuda_op("masked_adamw_int8_"), DEV, p, g, st, steps)
        want = _run_int8(_cpu_or_reference("masked_adamw_int8_"), "cpu", p, g, st, steps)
        where = _first_difference(got, want, ("param", "exp_avg", "exp_avg_sq",
                                              "exp_avg_scale", "exp_avg_sq_scale"))
        assert not where, f"n={n}: {where}"


@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32),
                                           (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16)])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("steps", [(1,), (1, 5)])
def test_masked_adamw_int8_indexed_agrees_with_cpu(pdtype, gdtype, idx_dtype, steps):
    """Indexed (policy="sparse": sorted unique positions in a bigger param, compact grad and
    state): CUDA == the CPU kernel bit for bit, and the params at no position untouched."""
    for n in Q8_SIZES:
        gen = torch.Generator().manual_seed(n)
        numel = 2 * n + 37
        pos = torch.randperm(numel, generator=gen)[:n].sort().values.to(idx_dtype)
        p = torch.randn(numel, generator=gen).to(pdtype)
        g = (torch.randn(n, generator=gen) * 1e-3).to(gdtype)
        st = _q8_state(n, gen)
        got = _run_int8(_cuda_op("masked_adamw_int8_"), DEV, p, g, st, steps, pos)
        want = _run_int8(_cpu_or_reference("masked_adamw_int8_"), "cpu", p, g, st, steps, pos)
        where = _first_difference(got, want, ("param", "exp_avg", "exp_avg_sq",
                                              "exp_avg_scale", "exp_avg_sq_scale"))
        assert not where, f"n={n} {idx_dtype}: {where}"
        rest = torch.ones(numel, dtype=torch.bool)
        rest[pos.long()] = False
        assert torch.equal(got[0][rest], p[rest]), f"n={n}: an element at no position changed"


@pytest.mark.parametrize("shifted", ["p", "g", "exp_avg", "exp_avg_sq"])
def test_masked_adamw_int8_unaligned_tensors_take_the_scalar_path(shifted):
    """A tensor at an odd offset (a view into a bigger one) cannot take the 16-/8-byte vector
    loads: the kernel's host check sends it to the scalar variant, with the same bits (the
    emulator runs on x86, where a misaligned vector load works: only a GPU shows this)."""
    n = 4129
    gen = torch.Generator().manual_seed(1)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
    st = _q8_state(n, gen)
    want = _run_int8(_cpu_or_reference("masked_adamw_int8_"), "cpu", p, g, st, (1, 2))
    dev = {"p": p, "g": g, "exp_avg": st[0], "exp_avg_sq": st[1]}
    dev = {k: v.to(DEV) for k, v in dev.items()}
    big = torch.zeros(n + 1, dtype=dev[shifted].dtype, device=DEV)
    big[1:].copy_(dev[shifted])
    dev[shifted] = big[1:]
    sc = [t.clone().to(DEV) for t in st[2:]]
    for s in (1, 2):
        _cuda_op("masked_adamw_int8_")([dev["p"]], [dev["g"]], [dev["exp_avg"]],
                                       [dev["exp_avg_sq"]], [sc[0]], [sc[1]], [None],
                                       ops._step_tensors(s, 1), 1e-2, 0.9, 0.999, 1e-8, 0.1)
    got = [t.cpu() for t in (dev["p"], dev["exp_avg"], dev["exp_avg_sq"], *sc)]
    where = _first_difference(got, want, ("param", "exp_avg", "exp_avg_sq", "exp_avg_scale",
                                          "exp_avg_sq_scale"))
    assert not where, where


def _at_odd_offset(t: torch.Tensor) -> torch.Tensor:
    """A copy of t viewed one element into a bigger tensor: no vector load is aligned."""
    big = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    big[1:].copy_(t)
    return big[1:]


@pytest.mark.parametrize("pdtype", FLOATS)
@pytest.mark.parametrize("kind", ["dense", "compact", "dense_grad"])
def test_masked_adamw_bf16_moments_agree_with_cpu(pdtype, kind):
    """state_dtype="bf16": the moments are widened, updated in fp32 and rounded to nearest
    even once. CUDA == the CPU kernel bit for bit, dense and indexed (int32 / int64
    positions), host and device steps, with the largest tensor's moments at an odd element
    offset (the scalar path) and tails of every length mod 4."""
    gdtypes = FLOATS if pdtype == torch.float32 else (pdtype, torch.float32)
    for gdtype, idx_dtype in zip(gdtypes, (torch.int32, torch.int64, torch.int32)):
        gen = torch.Generator().manual_seed(11)
        case = list(_adamw_case((0, 1, 33, 4097, 65538, 65540), pdtype, gdtype, kind,
                                idx_dtype, gen))
        case[2] = [m.to(torch.bfloat16) for m in case[2]]
        case[3] = [v.to(torch.bfloat16) for v in case[3]]

        def run(op, device, step_kind, case=case):
            p, g, m, v, idx, steps = (_to([t.clone() if isinstance(t, torch.Tensor) else t
                                           for t in lst], device) for lst in case)
            m[-1], v[-1] = _at_odd_offset(m[-1]), _at_odd_offset(v[-1])
            op(p, g, m, v, idx, _step_list(steps, step_kind, device), *HYPER.values())
            return [t.cpu() for t in p + m + v]

        want = run(_cpu_or_reference("masked_adamw_"), "cpu", "cpu")
        n = len(case[0])
        names = ([f"param[{i}]" for i in range(n)] + [f"exp_avg[{i}]" for i in range(n)]
                 + [f"exp_avg_sq[{i}]" for i in range(n)])
        for step_kind in ("int", "cuda"):
            got = run(_cuda_op("masked_adamw_"), DEV, step_kind)
            assert all(t.dtype == w.dtype for t, w in zip(got, want))
            where = _first_difference(got, want, names)
            assert not where, f"{gdtype} {idx_dtype} {step_kind}: {where}"


def _lowp_case(n_list, dtype, mode, gen):
    cols: list[list[torch.Tensor]] = [[], [], [], [], []]
    for n in n_list:
        p32 = torch.randn(n, generator=gen)
        for c, v in zip(cols, (p32.to(dtype), (torch.randn(n, generator=gen) * 1e-2).to(dtype),
                               torch.randn(n, generator=gen) * 1e-3,
                               torch.rand(n, generator=gen) * 1e-5, p32 + p32 * 1e-4)):
            c.append(v)
    if mode == "stochastic":
        cols[4] = []
    sr = [mode == "stochastic" or (mode == "master_last" and i % 2 == 0)
          for i in range(len(n_list))]
    keys = [ops._signed64(0x9E3779B97F4A7C15 * (i + 7)) for i in range(len(n_list))]
    return cols, sr, keys


def _run_lowp(op, device, cols, sr, keys, wd, maximize):
    cols = [[t.clone().to(device) for t in c] for c in cols]
    for s in (1, 2, 3):
        op(*cols, ops._step_tensors(s, len(cols[0])), sr, keys, 1e-3, 0.9, 0.999, 1e-8, wd,
           maximize)
    return [t.cpu() for c in cols for t in c]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("mode", ["master", "master_last", "stochastic"])
@pytest.mark.parametrize("wd,maximize", [(0.0, False), (0.1, True)])
def test_masked_adamw_lowp_agrees_with_cpu_and_spec(dtype, mode, wd, maximize):
    """CUDA == the CPU kernel == the bit-for-bit spec (masters, a period's stochastic end,
    stochastic rounding: the same (key, step, element) stream on both), three steps."""
    cols, sr, keys = _lowp_case([1, 7, 1000, 65837, (1 << 20) + 5], dtype, mode,
                                torch.Generator().manual_seed(1))
    got = _run_lowp(_cuda_op("masked_adamw_lowp_"), DEV, cols, sr, keys, wd, maximize)
    names = [f"{k}[{i}]" for k in ("param", "grad", "exp_avg", "exp_avg_sq", "master")
             for i in range(len(cols[0]) if cols[4] or k != "master" else 0)]
    want = _run_lowp(_cpu_or_reference("masked_adamw_lowp_"), "cpu", cols, sr, keys, wd,
                     maximize)
    assert not (where := _first_difference(got, want, names)), where
    spec = _run_lowp(_reference.masked_adamw_lowp_spec, "cpu", cols, sr, keys, wd, maximize)
    assert not (where := _first_difference(got, spec, names)), where


# ------------------------------------------------------------------ adamw_first_step_

FIRST_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
               (torch.float16, torch.float32)]
# w = 1 - beta1 below 0.5, above it and at it (torch's lerp switches formula at 0.5)
FIRST_HYPER = [(1e-2, 0.9, 0.999, 1e-8, 0.1), (3e-3, 0.3, 0.95, 1e-6, 0.0),
               (1e-3, 0.5, 0.99, 1e-3, 0.5)]


def first_values(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 param and grad of an adamw_first_step_ case: signed zeros, a tiny and a large
    grad in front (test_cuda_emu.py uses them too)."""
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-2
    if n >= 6:
        p[:3] = torch.tensor([0.0, -0.0, -0.0])
        g[:6] = torch.tensor([0.0, -0.0, 0.0, 1e-20, -6e4, 3.0])
    return p, g


def _first_case(sizes, pdtype, gdtype, gen):
    """CPU params and grads of adamw_first_step_, signed zeros and extreme grads in front."""
    pairs = [first_values(n, gen) for n in sizes]
    return [p.to(pdtype) for p, _ in pairs], [g.to(gdtype) for _, g in pairs]


def _run_first(op, device, ps, gs, hyper, odd=None):
    """The params after op on `device`; odd = "p" or "g": those at an odd offset."""
    ps = [_at_odd_offset(p.to(device)) if odd == "p" else p.clone().to(device) for p in ps]
    gs = [_at_odd_offset(g.to(device)) if odd == "g" else g.to(device) for g in gs]
    op(ps, gs, *hyper)
    return [p.cpu() for p in ps]


def _first_by_masked_adamw(op, device, ps, gs, hyper):
    """The definition: masked_adamw_ (dense) on zero fp32 moments at step 1."""
    ps = [p.clone().to(device) for p in ps]
    zeros = [torch.zeros(p.numel(), device=device) for p in ps]
    op(ps, _to(gs, device), zeros, [z.clone() for z in zeros], [None] * len(ps),
       ops._step_tensors(1, len(ps)), *hyper)
    return [p.cpu() for p in ps]


def _first_spec(ps, gs, hyper):
    """Bit for bit: masked_adamw_'s reference math on zero moments at step 1 with the
    kernels' correctly rounded root (torch's CPU sqrt is not always)."""
    out = []
    for p, g in zip(ps, gs):
        p32 = p.to(torch.float32, copy=True)
        _reference._adamw_scalar_step(p32, g.float(), torch.zeros(p.numel()),
                                      torch.zeros(p.numel()), 1.0, *hyper,
                                      sqrt=_reference.sqrt_rn)
        out.append(p32.to(p.dtype))
    return out


@pytest.mark.parametrize("pdtype,gdtype", FIRST_PAIRS, ids=lambda d: str(d).split(".")[-1])
def test_adamw_first_step_agrees_with_cpu_and_spec(pdtype, gdtype):
    """CUDA == the CPU kernel == CUDA masked_adamw_ on a fresh fp32 state at step 1 == the
    bit-for-bit spec: aligned and odd-offset params or grads, tails, an empty tensor, several
    chunks, both lerp formulas, with and without weight decay."""
    gen = torch.Generator().manual_seed(13)
    ps, gs = _first_case(SIZES + (6, (1 << 20) + 5), pdtype, gdtype, gen)
    names = [f"param[{i}]" for i in range(len(ps))]
    for hyper in FIRST_HYPER:
        want = _run_first(_cpu_or_reference("adamw_first_step_"), "cpu", ps, gs, hyper)
        others = {"spec": _first_spec(ps, gs, hyper),
                  "cuda masked_adamw_": _first_by_masked_adamw(_cuda_op("masked_adamw_"), DEV,
                                                               ps, gs, hyper)}
        for name, other in others.items():
            assert not (where := _first_difference(other, want, names)), (name, hyper, where)
        for odd in (None, "p", "g"):
            got = _run_first(_cuda_op("adamw_first_step_"), DEV, ps, gs, hyper, odd)
            assert not (where := _first_difference(got, want, names)), (hyper, odd, where)


def test_adamw_first_step_many_tensors_one_call():
    """More tensors than a launch table holds (64), every dtype pair interleaved."""
    gen = torch.Generator().manual_seed(14)
    ps, gs = [], []
    for i, n in enumerate(torch.randint(0, 5000, (150,), generator=gen).tolist()):
        p, g = _first_case([n], *FIRST_PAIRS[i % len(FIRST_PAIRS)], gen)
        ps, gs = ps + p, gs + g
    got = _run_first(_cuda_op("adamw_first_step_"), DEV, ps, gs, FIRST_HYPER[0])
    want = _run_first(_cpu_or_reference("adamw_first_step_"), "cpu", ps, gs, FIRST_HYPER[0])
    assert not (where := _first_difference(got, want, [f"param[{i}]" for i in range(150)])), \
        where


# --------------------------------------------------------------------- select_topk


def _topk_inputs(dtype, gen):
    ts = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    ties = torch.randint(-3, 4, (9000,), generator=gen).to(dtype)  # many exact ties
    ties[::97] = float("nan")
    ts.append(ties)
    ts.append(torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40], dtype=dtype))
    ts.append(torch.randn(1 << 20 | 3, generator=gen).to(dtype))
    return ts


@pytest.mark.parametrize("dtype", FLOATS)
def test_select_topk_agrees(dtype):
    gen = torch.Generator().manual_seed(9)
    ts = _topk_inputs(dtype, gen)
    total = sum(t.numel() for t in ts)
    dev_ts = _to(ts, DEV)
    for k in (0, 1, 2, 17, 4097, total // 10, total // 2, total - 1, total):
        got = [x.cpu() for x in _cuda_op("select_topk")(dev_ts, k)]
        for want in (_cpu_or_reference("select_topk")(ts, k), _reference.select_topk(ts, k)):
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and torch.equal(g, w), (k, g[:10], w[:10])


def test_select_topk_ties_take_the_lowest_positions():
    x = [torch.ones(10, device=DEV), torch.ones(5, device=DEV) * 2, torch.ones(10, device=DEV)]
    got = _cuda_op("select_topk")(x, 8)
    assert got[0].tolist() == [0, 1, 2] and got[1].tolist() == [0, 1, 2, 3, 4]
    assert got[2].tolist() == []
    nan = torch.tensor([float("nan"), 0.0, float("nan")], device=DEV)
    assert _cuda_op("select_topk")([nan], 2)[0].tolist() == [0, 1]


def test_select_topk_mixed_dtypes_and_many_tensors():
    gen = torch.Generator().manual_seed(10)
    ts = [torch.randn(int(n), generator=gen).to(FLOATS[i % 3])
          for i, n in enumerate(torch.randint(0, 2000, (150,), generator=gen))]
    total = sum(t.numel() for t in ts)
    for k in (1, total // 3, total - 5):
        got = _cuda_op("select_topk")(_to(ts, DEV), k)
        want = _reference.select_topk(ts, k)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


# --------------------------------------------------------------------- remap_state


@pytest.mark.parametrize("dtype", FLOATS)
def test_remap_state_agrees(dtype):
    gen = torch.Generator().manual_seed(11)
    olds, news, states = [], [], []
    for i, n in enumerate(SIZES + (200_000,)):
        old = _sorted_positions(n, 0.5, (torch.int32, torch.int64)[i % 2], gen)
        new = _sorted_positions(n, 0.5, (torch.int64, torch.int32)[i % 2], gen)
        lead = [(2,), (), (3, 2)][i % 3]
        olds.append(old)
        news.append(new)
        states.append(torch.randn(*lead, old.numel(), generator=gen).to(dtype))
    got = _cuda_op("remap_state")(_to(olds, DEV), _to(news, DEV), _to(states, DEV))
    for want in (_cpu_or_reference("remap_state")(olds, news, states),
                 _reference.remap_state(olds, news, states)):
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert torch.equal(g.cpu(), w)


# --------------------------------------------------------------- gather_accumulate_


@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_accumulate_agrees(dtype):
    gen = torch.Generator().manual_seed(12)
    dense, idx, compact = [], [], []
    for i, n in enumerate(SIZES + (300_001,)):
        dense.append(torch.randn(n, generator=gen).to(dtype))
        pos = _sorted_positions(n, 0.2, (torch.int32, torch.int64)[i % 2], gen)
        idx.append(pos)
        compact.append(torch.randn(pos.numel(), generator=gen))
    got = [c.clone().to(DEV) for c in compact]
    _cuda_op("gather_accumulate_")(_to(dense, DEV), _to(idx, DEV), got)
    for fn in (_cpu_or_reference("gather_accumulate_"), _reference.gather_accumulate_):
        want = [c.clone() for c in compact]
        fn(dense, idx, want)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


# -------------------------------------------------------------- past 2**31 elements


@pytest.fixture(scope="module")
def big():
    n = 2**31 + 64
    if _free_bytes() < 2 * n * 2 + (2 << 30):
        pytest.skip(f"needs {2 * n * 2 / 2**30:.0f} GiB of free GPU memory")
    x = torch.zeros(n, dtype=torch.bfloat16, device=DEV)
    marks = torch.tensor([3, INT32_MAX, 2**31 + 5, n - 1], device=DEV)
    x[marks] = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16, device=DEV)
    yield x, marks
    del x
    torch.cuda.empty_cache()


def test_big_param_stats(big):
    x, _ = big
    numel, sumsq, absmax, hist = _cuda_op("param_stats")([x])
    assert numel.item() == x.numel() and sumsq.item() == 30.0 and absmax.item() == 4.0
    assert hist[0, 0].item() == x.numel() - 4 and hist.sum().item() == x.numel()


def test_big_select_topk_uses_int64(big):
    x, marks = big
    small = torch.tensor([5.0, 0.5], device=DEV)
    got = _cuda_op("select_topk")([x, small], 5)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.int32
    assert got[0].tolist() == marks.tolist() and got[1].tolist() == [0]
    got = _cuda_op("select_topk")([x, small], 9)  # 3 ties at 0: the lowest positions
    assert got[0].tolist() == [0, 1, 2, 3, INT32_MAX, 2**31 + 5, x.numel() - 1]


def test_big_gather_accumulate_and_indexed_adamw(big):
    x, marks = big
    idx = marks[1:].clone()  # int64 positions past 2**31 - 1
    c = torch.zeros(3, device=DEV)
    _cuda_op("gather_accumulate_")([x], [idx], [c])
    assert c.tolist() == [2.0, 3.0, 4.0]
    p = x.clone()
    g = torch.ones(3, device=DEV)
    m, v = torch.zeros(3, device=DEV), torch.zeros(3, device=DEV)
    _cuda_op("masked_adamw_")([p], [g], [m], [v], [idx], ops._step_tensors(1, 1),
                              *HYPER.values())
    want_p = x[idx].cpu()
    wm, wv = torch.zeros(3), torch.zeros(3)
    _cpu_or_reference("masked_adamw_")([want_p], [torch.ones(3)], [wm], [wv], [None],
                                       ops._step_tensors(1, 1), *HYPER.values())
    assert torch.equal(p[idx].cpu(), want_p) and torch.equal(m.cpu(), wm)
    untouched = torch.tensor([0, 3, 2**31 + 4, x.numel() - 2], device=DEV)
    assert torch.equal(p[untouched], x[untouched])
    del p


def test_big_dense_adamw():
    n = 2**31 + 1000
    need = n * (2 + 2 + 4 + 4) + (1 << 30)
    if _free_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    p = torch.zeros(n, dtype=torch.bfloat16, device=DEV)
    tail = torch.randn(4096, device=DEV)
    p[-4096:] = tail.bfloat16()
    g = torch.ones(n, dtype=torch.bfloat16, device=DEV)
    m = torch.zeros(n, device=DEV)
    v = torch.zeros(n, device=DEV)
    _cuda_op("masked_adamw_")([p], [g], [m], [v], [None], ops._step_tensors(3, 1),
                              *HYPER.values())
    wp, wm, wv = tail.bfloat16().cpu(), torch.zeros(4096), torch.zeros(4096)
    _cpu_or_reference("masked_adamw_")([wp], [torch.ones(4096, dtype=torch.bfloat16)], [wm],
                                       [wv], [None], ops._step_tensors(3, 1), *HYPER.values())
    assert torch.equal(p[-4096:].cpu(), wp) and torch.equal(m[-4096:].cpu(), wm)
    assert torch.equal(v[-4096:].cpu(), wv) and (m[:1000] == m[0]).all()
    del p, g, m, v
    torch.cuda.empty_cache()


def test_big_remap_int64_positions():
    old = torch.tensor([0, 2**40, 2**41], device=DEV)
    new = torch.tensor([5, 2**40, 2**41, 2**42], device=DEV)
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=DEV)
    got = _cuda_op("remap_state")([old], [new], [s])[0]
    assert got.tolist() == [[0.0, 2.0, 3.0, 0.0], [0.0, 5.0, 6.0, 0.0]]


# ---------------------------------------------------------------------- bad inputs


def _adamw_args(device, **change):
    p = torch.randn(10, device=device)
    a = dict(params=[p], grads=[torch.randn(10, device=device)],
             exp_avgs=[torch.zeros(4, device=device)], exp_avg_sqs=[torch.zeros(4, device=device)],
             indices=[torch.tensor([1, 3, 5, 9], dtype=torch.int32, device=device)],
             steps=ops._step_tensors(1, 1), **HYPER)
    for k, fn in change.items():
        a[k] = fn(a[k], device)
    return a


BAD_ADAMW = {
    "lr": dict(lr=lambda v, d: -1.0),
    "beta2": dict(beta2=lambda v, d: 1.0),
    "param dtype": dict(params=lambda v, d: [v[0].double()]),
    "grad dtype": dict(grads=lambda v, d: [v[0].double()]),  # fp32 takes bf16/fp16 grads
    "lengths": dict(grads=lambda v, d: v * 2),
    "state length": dict(exp_avgs=lambda v, d: [torch.zeros(5, device=d)]),
    "grad length": dict(grads=lambda v, d: [torch.zeros(7, device=d)]),
    "non-contiguous": dict(params=lambda v, d: [torch.randn(20, device=d)[::2]]),
    "index dtype": dict(indices=lambda v, d: [v[0].short()]),
    "index 2-D": dict(indices=lambda v, d: [v[0].view(2, 2)]),
    "index range": dict(indices=lambda v, d: [torch.tensor([1, 3, 5, 10], dtype=torch.int32,
                                                           device=d)]),
    "index negative": dict(indices=lambda v, d: [torch.tensor([-1, 3, 5, 9], device=d)]),
    "index order": dict(indices=lambda v, d: [torch.tensor([1, 5, 3, 9], device=d)]),
    "index dup": dict(indices=lambda v, d: [torch.tensor([1, 3, 3, 9], device=d)]),
    "step zero": dict(steps=lambda v, d: [torch.tensor([0.0], dtype=torch.float64)]),
    "step nan": dict(steps=lambda v, d: [torch.tensor([float("nan")])]),
    "step shape": dict(steps=lambda v, d: [torch.ones(3, dtype=torch.int32, device=d)]),
    "step dtype": dict(steps=lambda v, d: [torch.tensor([True], device=d)]),
}


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared below
        return type(e), str(e).split("\n")[0]
    return None, None


@pytest.mark.parametrize("case", list(BAD_ADAMW))
def test_masked_adamw_bad_inputs_raise_the_cpu_errors(case):
    cpu = _adamw_args("cpu", **BAD_ADAMW[case])
    dev = _adamw_args(DEV, **BAD_ADAMW[case])
    before = [t.clone() for t in dev["params"] + dev["exp_avgs"]]
    want = _error_of(lambda: _cpu_or_reference("masked_adamw_")(*cpu.values()))
    got = _error_of(lambda: _cuda_op("masked_adamw_")(*dev.values()))
    assert want[0] is not None
    assert got[0] is want[0], (got, want)
    assert got[1] == want[1].replace("cpu", str(DEV) + ":0") or got[1] == want[1], (got, want)
    after = dev["params"] + dev["exp_avgs"]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "memory touched before error"


def test_mixed_devices_are_named():
    a = _adamw_args(DEV)
    a["grads"] = [a["grads"][0].cpu()]
    with pytest.raises(ValueError, match=r"grads\[0\] is on cpu but the first tensor is on cuda"):
        _cuda_op("masked_adamw_")(*a.values())


def test_index_cache_sees_in_place_changes_and_new_tensors():
    a = _adamw_args(DEV)
    op = _cuda_op("masked_adamw_")
    op(*a.values())
    a["indices"][0][3] = 10  # in place: the version counter moves, the check runs again
    with pytest.raises(IndexError, match=r"indices\[0\]\[3\] = 10 is out of range"):
        op(*a.values())
    for _ in range(5):  # a freed index tensor's successor is checked, even at the same address
        a = _adamw_args(DEV)
        op(*a.values())
        a["indices"].clear()  # freed first; the list keeps its place among the arguments
        a["indices"].append(torch.tensor([1, 3, 5, 11], dtype=torch.int32, device=DEV))
        with pytest.raises(IndexError):
            op(*a.values())


BAD_OTHER = {
    "stats dtype": ("param_stats", lambda d: ([torch.ones(3, dtype=torch.int32, device=d)],)),
    "topk k": ("select_topk", lambda d: ([torch.ones(3, device=d)], 4)),
    "topk negative k": ("select_topk", lambda d: ([torch.ones(3, device=d)], -1)),
    "topk dtype": ("select_topk", lambda d: ([torch.ones(3, dtype=torch.float64, device=d)], 1)),
    "remap shape": ("remap_state", lambda d: ([torch.arange(3, device=d)],
                                              [torch.arange(2, device=d)],
                                              [torch.zeros(2, 4, device=d)])),
    "remap negative": ("remap_state", lambda d: ([torch.arange(3, device=d)],
                                                 [torch.tensor([-2, 1], device=d)],
                                                 [torch.zeros(2, 3, device=d)])),
    "remap order": ("remap_state", lambda d: ([torch.tensor([0, 2, 1], device=d)],
                                              [torch.tensor([1], device=d)],
                                              [torch.zeros(3, device=d)])),
    "gather range": ("gather_accumulate_", lambda d: ([torch.ones(4, device=d)],
                                                      [torch.tensor([1, 4], device=d)],
                                                      [torch.zeros(2, device=d)])),
    "gather compact dtype": ("gather_accumulate_", lambda d: ([torch.ones(4, device=d)],
                                                              [torch.tensor([1, 2], device=d)],
                                                              [torch.zeros(2, device=d).half()])),
    "gather lengths": ("gather_accumulate_", lambda d: ([torch.ones(4, device=d)] * 2,
                                                        [torch.tensor([1, 2], device=d)],
                                                        [torch.zeros(2, device=d)])),
    "first grad dtype": ("adamw_first_step_", lambda d: (
        [torch.ones(4, device=d).bfloat16()], [torch.ones(4, device=d).half()], *FIRST_HYPER[0])),
    "first fp32 param, bf16 grad": ("adamw_first_step_", lambda d: (
        [torch.ones(4, device=d)], [torch.ones(4, device=d).bfloat16()], *FIRST_HYPER[0])),
    "first grad length": ("adamw_first_step_", lambda d: (
        [torch.ones(4, device=d)], [torch.ones(5, device=d)], *FIRST_HYPER[0])),
    "first lengths": ("adamw_first_step_", lambda d: (
        [torch.ones(4, device=d)] * 2, [torch.ones(4, device=d)], *FIRST_HYPER[0])),
    "first non-contiguous": ("adamw_first_step_", lambda d: (
        [torch.ones(8, device=d)[::2]], [torch.ones(4, device=d)], *FIRST_HYPER[0])),
    "first beta1": ("adamw_first_step_", lambda d: (
        [torch.ones(4, device=d)], [torch.ones(4, device=d)], 1e-3, 1.5, 0.999, 1e-8, 0.0)),
    "first shared memory": ("adamw_first_step_", lambda d: (
        lambda p: ([p], [p[:]], *FIRST_HYPER[0]))(torch.ones(4, device=d))),
}


@pytest.mark.parametrize("case", list(BAD_OTHER))
def test_other_ops_bad_inputs_raise_the_cpu_errors(case):
    name, make = BAD_OTHER[case]
    want = _error_of(lambda: _cpu_or_reference(name)(*make("cpu")))
    got = _error_of(lambda: _cuda_op(name)(*make(DEV)))
    assert want[0] is not None and got[0] is want[0], (got, want)
    assert got[1] == want[1], (got, want)


# ----------------------------------------------------------------- hypothesis checks


def test_hypothesis_topk_and_adamw_agree_with_reference():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
                      dtype=st.sampled_from(FLOATS), frac=st.floats(0, 1),
                      levels=st.integers(1, 50), seed=st.integers(0, 2**31))
    def check(sizes, dtype, frac, levels, seed):
        gen = torch.Generator().manual_seed(seed)
        ts = [(torch.randint(-levels, levels + 1, (n,), generator=gen) / levels).to(dtype)
              for n in sizes]
        k = int(frac * sum(sizes))
        got = _cuda_op("select_topk")(_to(ts, DEV), k)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, _reference.select_topk(ts, k)))
        case = _adamw_case(sizes, dtype, dtype, "compact", torch.int64, gen)
        a = _run_adamw(_cuda_op("masked_adamw_"), case, DEV, "int")
        b = _run_adamw(_cpu_or_reference("masked_adamw_"), case, "cpu", "int")
        _assert_same(a, b, exact=True, dtype=dtype)

    check()
