"""8-bit moments under policy="sparse" (issue 20): the indexed masked_adamw_int8_ against
its reference bit for bit, compact 8-bit state through drops and regrowths (requantized per
cohort), the budget in bytes, resume, checkpoints and AdamW import."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from test_int8 import (
    HAS_KERNELS,
    HYPER,
    _model,
    _normal,
    _state,
    _steps,
    adamw_after_one_step,
    cpu_variant_outputs,
    needs_kernels,
)
from tiny import batch, tiny_llama

from nto_ext import NTO, _reference, ops
from nto_ext.formats.int8 import dequantize_roots, quantize, quantize_roots

BF16 = torch.bfloat16
SCALES = ("exp_avg_scale", "exp_avg_sq_scale")
Q8 = ("exp_avg", "exp_avg_sq", *SCALES)


def _positions(numel: int, n: int, seed: int, dtype=torch.int32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:n].sort().values.to(dtype)


def _run_indexed(fn, p, g, idx, state, steps):
    p, state = p.clone(), [t.clone() for t in state]
    for s in steps:
        fn([p], [g], [state[0]], [state[1]], [state[2]], [state[3]], [idx],
           ops._step_tensors(s, 1), *HYPER.values())
    return [p, *state]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.is_floating_point else t


# ------------------------------------------------------------------- the indexed kernel


@needs_kernels
@pytest.mark.parametrize("dtype,gdtype", [(torch.float32, torch.float32), (BF16, BF16),
                                          (BF16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("numel,n", [(10, 1), (600, 255), (600, 257), (5000, 4096 + 33),
                                     (70000, 65536 + 300)])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_indexed_kernel_equals_reference_bitwise(numel, n, dtype, gdtype, idx_dtype):
    """Params at sorted positions, compact grads and moments (blocks over the positions'
    order, partial last blocks, past one work item): the kernel gives the reference's bits;
    elements not indexed are not written."""
    gen = torch.Generator().manual_seed(n)
    p = _normal(numel, numel).to(dtype)
    g = (_normal(n, n) * torch.logspace(-4, 0, n)).to(gdtype)
    idx = _positions(numel, n, n, idx_dtype)
    state = _state(n, gen)
    got = _run_indexed(torch.ops.nto.masked_adamw_int8_.default, p, g, idx, state, (1, 2, 9))
    want = _run_indexed(_reference.masked_adamw_int8_, p, g, idx, state, (1, 2, 9))
    for a, b in zip(got, want):
        assert torch.equal(_bits(a), _bits(b))
    untouched = torch.ones(numel, dtype=torch.bool)
    untouched[idx.long()] = False
    assert torch.equal(_bits(got[0][untouched]), _bits(p[untouched]))
    assert n == 1 or not torch.equal(got[0][~untouched], p[~untouched])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_indexed_kernel_on_runs_of_positions_equals_reference(dtype):
    """Blocks whose 256 positions are consecutive are updated in place (no gather): runs
    aligned and not aligned with the blocks, runs broken by one gap, and a last partial
    block."""
    numel = 20000
    runs = [torch.arange(100, 100 + 1024), torch.arange(1200, 1200 + 300),
            torch.arange(2000, 2000 + 256), torch.arange(2257, 2257 + 600),  # gap at 2256
            torch.arange(5000, 5000 + 777)]
    idx = torch.cat(runs).to(torch.int32)
    n = idx.numel()
    gen = torch.Generator().manual_seed(3)
    p = _normal(numel, 4).to(dtype)
    g = _normal(n, 5) * 1e-2
    state = _state(n, gen)
    got = _run_indexed(torch.ops.nto.masked_adamw_int8_.default, p, g, idx, state, (1, 4))
    want = _run_indexed(_reference.masked_adamw_int8_, p, g, idx, state, (1, 4))
    for a, b in zip(got, want):
        assert torch.equal(_bits(a), _bits(b))


VARIANT = r"""
import hashlib, torch
from test_sparse_int8 import _positions, _run_indexed
from test_int8 import _normal, _state
k = torch.ops.nto.masked_adamw_int8_.default
h = hashlib.sha256()
for numel, n in ((600, 257), (70000, 65536 + 300), (9000, 3000)):
    gen = torch.Generator().manual_seed(n)
    p, g, idx = _normal(numel, 1), _normal(n, 2), _positions(numel, n, 3)
    if numel == 9000:  # runs of consecutive positions: blocks updated in place
        idx = torch.cat([torch.arange(7, 1500), torch.arange(3000, 4507)]).to(torch.int32)
    for t in _run_indexed(k, p.to(torch.bfloat16), g, idx, _state(n, gen), (1, 5)):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@needs_kernels
def test_every_cpu_variant_gives_the_same_bits_indexed():
    digests = cpu_variant_outputs(VARIANT)
    assert len(set(digests.values())) == 1, digests


def _bad_indexed_args(idx, g_len=3):
    n = 3
    return ([torch.zeros(10)], [torch.ones(g_len)], [torch.zeros(n, dtype=torch.int8)],
            [torch.zeros(n, dtype=torch.uint8)], [torch.zeros(1)], [torch.zeros(1)], [idx],
            ops._step_tensors(1, 1), *HYPER.values())


@pytest.mark.parametrize("idx,g_len,err,msg", [
    (torch.tensor([1, 5, 10], dtype=torch.int32), 3, IndexError,
     r"masked_adamw_int8_: indices\[0\]\[2\] = 10 is out of range for params\[0\] with 10 "
     r"elements; allowed: 0..9"),
    (torch.tensor([1, 5, 5], dtype=torch.int32), 3, ValueError,
     r"indices\[0\]\[2\] = 5 follows 5; indices must be sorted ascending and unique"),
    (torch.tensor([1, 5, 7], dtype=torch.int32), 10, ValueError,
     r"grads\[0\] has 10 elements; allowed: 3 \(indices\[0\] holds 3 elements, 1 blocks"),
    (torch.tensor([1.0, 5.0, 7.0]), 3, TypeError, r"indices\[0\]"),
])
def test_bad_indexed_input_is_named_alike_by_kernel_and_reference(idx, g_len, err, msg):
    impls = [_reference.masked_adamw_int8_]
    if HAS_KERNELS:
        impls.append(torch.ops.nto.masked_adamw_int8_.default)
    for fn in impls:
        args = _bad_indexed_args(idx, g_len)
        with pytest.raises(err, match=msg):
            fn(*args)
        assert not args[0][0].any() and not args[2][0].any()  # nothing written


# ------------------------------------------------------------------- NTO(policy="sparse")


def _sparse(named, **kw):
    return NTO(named, **{"lr": 1e-2, "budget": "20%", "policy": "sparse", "switch_every": 3,
                         "state_dtype": "int8", **kw})


def _check_layout(opt) -> int:
    """Every compact 8-bit state: int8/uint8 rows of one value per chosen element, fp32
    scales of each cohort's blocks; returns the chosen count."""
    chosen = 0
    for st in opt.state.values():
        if not st:
            continue
        n = st["indices"].numel()
        assert (st["exp_avg"].dtype, st["exp_avg_sq"].dtype) == (torch.int8, torch.uint8)
        assert st["exp_avg"].shape == st["exp_avg_sq"].shape == (n,) == (sum(st["sizes"]),)
        blocks = sum(_reference.q8_blocks(s) for s in st["sizes"])
        assert all(st[k].shape == (blocks,) and st[k].dtype == torch.float32 for k in SCALES)
        chosen += n
    return chosen


def test_sparse_trains_with_8bit_compact_state_within_the_byte_budget():
    """Through scoring, drops and regrowths: the state stays 8-bit with per-cohort blocks,
    measured bytes (2 per element + 8 per block + the index) within the budget after every
    step (the grads here are written by hand, all at once: peaks inside backward are
    checked below and in test_int8's budget invariant), and a byte budget chooses ~1.6x the
    elements of fp32 moments (10.03 B each instead of 16)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = _sparse(_model(), budget="24KiB")
        fp32 = _sparse(_model(), budget="24KiB", state_dtype="fp32")
    assert int8.policy.bytes_per_element(torch.float32) == 4 + 2 + 8 / 256 + 4
    assert int8.policy.k == (24576 - 8 * 12) // (10 + 8 / 256)
    assert 1.55 < int8.policy.k / fp32.policy.k < 1.6
    a, b = _model(), _model()
    int8, fp32 = _sparse(a, budget="24KiB"), _sparse(b, budget="24KiB", state_dtype="fp32")
    for step in range(12):  # regrowths at 3, 6, 9
        _steps(int8, a, step, step + 1)
        _steps(fp32, b, step, step + 1)
        chosen = _check_layout(int8)
        rep = int8.memory_report()
        assert rep["total_bytes"] <= rep["budget_bytes"] == 24576  # peaks: the tiny Llama
        assert rep["trainable_elements"] == chosen
        blocks = sum(st[SCALES[0]].numel() for st in int8.state.values() if st)
        assert rep["state_bytes"] == 2 * chosen + 8 * blocks
        assert rep["index_bytes"] == 4 * chosen
        if (step + 1) % 3:  # not right after a drop: close to K (partial blocks aside)
            assert int8.policy.k - 2 * 12 <= chosen <= int8.policy.k
    cohorts = sum(len(st["sizes"]) for st in int8.state.values() if st)
    assert cohorts > len([st for st in int8.state.values() if st])  # regrowths made cohorts
    moved = [(p - q).detach().abs().max() for (_, p), (_, q) in zip(a, _model())]
    assert sum(float(m) > 0 for m in moved) >= 6


def test_sparse_8bit_loss_tracks_fp32_moments_on_a_tiny_llama():
    losses = {}
    for sd in ("int8", "fp32"):
        torch.manual_seed(0)
        model = tiny_llama()
        opt = NTO(model.named_parameters(), lr=1e-2, budget="10%", policy="sparse",
                  switch_every=3, state_dtype=sd)
        for step in range(12):
            x = batch(step)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert opt.memory_report()["peak_total_bytes"] <= opt.budget_bytes()
        x = batch(100)
        with torch.no_grad():
            losses[sd] = float(model(input_ids=x, labels=x).loss)
    assert abs(losses["int8"] - losses["fp32"]) < 0.01 * losses["fp32"], losses


def test_sparse_at_100_percent_equals_block_at_100_percent_bit_for_bit():
    """Every element chosen: one cohort per param at positions 0..n-1, so the blocks are
    the dense layout's and the indexed kernel gives the dense kernel's bits."""
    a, b = _model(), _model()
    sparse = _sparse(a, budget="100%")
    block = NTO(b, lr=1e-2, budget="100%", state_dtype="int8")
    _steps(sparse, a, 0, 5)
    _steps(block, b, 0, 5)
    for (_, p), (_, q) in zip(a, b):
        assert torch.equal(p, q)
        s, d = sparse.state[p], block.state[q]
        assert all(torch.equal(s[k], d[k]) for k in Q8)
        assert s["step"] == [5] and float(d["step"]) == 5.0


def test_a_drop_requantizes_each_cohorts_kept_moments():
    """At the drop before a regrowth, each param's kept elements keep their moments as the
    kernel dequantizes them, quantized again in new blocks per cohort: levels and scales of
    the blocks before a cohort's first dropped element unchanged, every kept value within
    the map's error of its old value, grown elements zero."""
    named = _model()
    opt = _sparse(named)
    seen = {}
    advance = opt.updater.advance

    def spy(step):
        before = {p: copy.deepcopy(st) for p, st in opt.state.items() if st}
        advance(step)
        if step and opt.policy.is_scoring(step):  # a drop before this regrowth
            seen[step] = (before, {p: copy.deepcopy(st) for p, st in opt.state.items() if st})

    opt.updater.advance = spy
    _steps(opt, named, 0, 7)
    checked = 0
    assert sorted(seen) == [3, 6]
    for before, after in seen.values():
        for p, old in before.items():
            new = after.get(p)
            if new is None:
                continue
            start, sa, parts = 0, 0, []
            for n in old["sizes"]:
                nb = _reference.q8_blocks(n)
                q = {k: old[k][start:start + n] for k in ("exp_avg", "exp_avg_sq")}
                q.update({k: old[k][sa:sa + nb] for k in SCALES})
                m, w = dequantize_roots(q)
                keep = torch.isin(old["indices"][start:start + n], new["indices"])
                if keep.any():
                    parts.append(quantize_roots(m[keep], w[keep]))
                    head = int(keep.logical_not().nonzero()[0]) if not keep.all() else n
                    mine = {k: new[k][sum(x["exp_avg"].numel() for x in parts[:-1]):][:head]
                            for k in ("exp_avg", "exp_avg_sq")}
                    assert torch.equal(mine["exp_avg"], q["exp_avg"][:head])
                    m2, w2 = dequantize_roots(parts[-1])
                    tol = 2 * m.abs().max() / 127 + 1e-30  # a level step at the top
                    assert (m2 - m[keep]).abs().max() <= tol
                    assert (w2 - w[keep]).abs().max() <= 2 * w.max() / 255 + 1e-30
                start, sa = start + n, sa + nb
            for k in Q8:
                assert torch.equal(new[k], torch.cat([x[k] for x in parts])), k
            checked += 1
    assert checked >= 3


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_across_a_regrowth_is_bit_exact():
    named = _model()
    opt = _sparse(named)
    _steps(opt, named, 0, 5)
    sd = _roundtrip(opt.state_dict())  # weights_only-loadable
    params = [p.detach().clone() for _, p in named]
    _steps(opt, named, 5, 11)  # drops and regrowths at 6 and 9
    other = _model()
    for (_, p), w in zip(other, params):
        p.data.copy_(w)
    opt2 = _sparse(other)
    opt2.load_state_dict(sd)
    _steps(opt2, other, 5, 11)
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(named, other))
    for (_, p), (_, q) in zip(named, other):
        a, b = opt.state.get(p), opt2.state.get(q)
        assert bool(a) == bool(b)
        if a:
            assert all(torch.equal(a[k], b[k]) for k in ("indices", *Q8))
            assert (a["step"], a["sizes"]) == (b["step"], b["sizes"])


def _saved(steps=4):
    named = _model()
    opt = _sparse(named)
    _steps(opt, named, 0, steps)
    sd = copy.deepcopy(opt.state_dict())
    return sd, next(k for k, st in sd["state"].items() if st)


@pytest.mark.parametrize("edit,msg", [
    (lambda st: st.update(exp_avg_scale=-st["exp_avg_scale"] - 1), "negative or non-finite"),
    (lambda st: st.update(exp_avg_sq_scale=st["exp_avg_sq_scale"][:-1]),
     r"exp_avg_sq_scale is a torch.float32 tensor of shape .*; expected a contiguous float32 "
     r"tensor of \d+ elements"),
    (lambda st: st["exp_avg"].__setitem__(0, -128), "exp_avg holds -128"),
    (lambda st: st.update(exp_avg=st["exp_avg"].float()), "expected a contiguous torch.int8"),
    (lambda st: st.pop("exp_avg_scale"), "exp_avg_scale is NoneType"),
])
def test_corrupted_checkpoints_are_refused_with_no_change(edit, msg):
    sd, k = _saved()
    edit(sd["state"][k])
    named = _model()
    opt = _sparse(named)
    _steps(opt, named, 0, 2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=msg):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for key, st in before["state"].items():
        assert all(torch.equal(v, after["state"][key][n]) if isinstance(v, torch.Tensor)
                   else v == after["state"][key][n] for n, v in st.items())


@pytest.mark.parametrize("saved,loaded", [("int8", "fp32"), ("fp32", "int8"), ("bf16", "int8")])
def test_checkpoint_needs_the_same_state_dtype(saved, loaded):
    named = _model()
    opt = _sparse(named, state_dtype=saved)
    _steps(opt, named, 0, 2)
    with pytest.raises(ValueError, match="state_dtype: saved"):
        _sparse(_model(), state_dtype=loaded).load_state_dict(opt.state_dict())


def test_scales_in_an_fp32_state_are_refused():
    """A crafted checkpoint (the config says fp32 moments) holding 8-bit scales."""
    named = _model()
    opt = _sparse(named, state_dtype="fp32")
    _steps(opt, named, 0, 2)
    sd = copy.deepcopy(opt.state_dict())
    k = next(k for k, st in sd["state"].items() if st)
    sd["state"][k]["exp_avg_scale"] = torch.zeros(1)
    with pytest.raises(ValueError, match="8-bit moment scales, but this run keeps "
                                         "state_dtype='fp32'"):
        _sparse(_model(), state_dtype="fp32").load_state_dict(sd)


def test_torch_adamw_state_imports_quantized_at_100_percent():
    named = _model()
    adamw = adamw_after_one_step(named)
    opt = _sparse(named, budget="100%")
    opt.load_state_dict(adamw.state_dict())
    for _, p in named:
        want = quantize(adamw.state[p]["exp_avg"], adamw.state[p]["exp_avg_sq"])
        assert all(torch.equal(opt.state[p][k], v) for k, v in want.items())
        assert opt.state[p]["step"] == [1]


def test_bf16_params_need_master_weights_false_and_train_in_place():
    named = [(n, torch.nn.Parameter(p.detach().to(BF16))) for n, p in _model()]
    with pytest.raises(ValueError, match="pass master_weights=False"):
        _sparse(named)
    opt = _sparse(named, master_weights=False)
    before = [p.detach().clone() for _, p in named]
    _steps(opt, named, 0, 7)
    assert all(p.dtype == BF16 for _, p in named)
    assert any(not torch.equal(p, b) for (_, p), b in zip(named, before))
    assert opt.memory_report()["total_bytes"] <= opt.budget_bytes()
    assert all(torch.isfinite(p.detach()).all() for _, p in named)


def test_requantizing_a_large_cohort_in_windows_equals_one_pass():
    """A cohort past several dequantization windows (kept elements straddling them):
    the windowed requantization equals quantizing all kept values at once."""
    from nto_ext.policies import sparse

    n = 3 * sparse._WINDOW + 1000
    gen = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-8, 0, (n,), generator=gen)  # decades apart
    q = quantize(_normal(n, 1) * scale, torch.rand(n, generator=gen) * scale**2)
    keep = torch.rand(n, generator=gen) > 0.3
    keep[:5000] = True  # the leading blocks stay: their levels and scales come back
    opt = _sparse(_model())
    got = opt.updater._requantize(q, keep)
    m, w = dequantize_roots(q)
    want = quantize_roots(m[keep], w[keep])
    assert all(torch.equal(got[k], want[k]) for k in Q8)
    for k in Q8:  # the 19 whole blocks before the first drop
        head = 19 if k in SCALES else 19 * 256
        assert torch.equal(got[k][:head], q[k][:head])
