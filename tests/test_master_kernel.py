"""The fused bf16/fp16 update (ops.masked_adamw_lowp_, issue 19): the kernel against its
reference bit for bit (master and stochastic-rounding mode, bf16 and fp16), against the
unfused path formats/master.py ran before it (the fp32 kernel on fp32 copies, then the
rounding), thread independence, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_int8 import cpu_variant_outputs

from nto_ext import _reference, ops
from nto_ext.formats.master import stochastic_round, stream_key

ROOT = Path(__file__).resolve().parents[1]
HAS_KERNELS = ops.backend() != "reference"
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="compiled extension not loaded")
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
# below and past a vector width, odd, past one work item (65536 elements)
SIZES = [1, 7, 17, 1000, 65536 + 301]
LOWP = [torch.bfloat16, torch.float16]


def _normal(n: int, seed: int) -> torch.Tensor:
    """n standard normal fp32 numbers, the same under every CPU capability."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32))


def _entry(n: int, dtype: torch.dtype, seed: int, master: bool) -> dict:
    """One param's tensors: a param, its grad (small: updates below half an ulp happen),
    warm moments, and a master a little off the param (as after earlier steps)."""
    p32 = _normal(n, seed)
    p = p32.to(dtype)
    return {"p": p, "g": (_normal(n, seed + 1) * 1e-2).to(dtype),
            "m": _normal(n, seed + 2) * 1e-3, "v": _normal(n, seed + 3).abs() * 1e-5,
            "master": p.float() + p32 * 1e-4 if master else None}


def _run(fn, entries: list[dict], steps: list[int], stochastic: list[bool], keys: list[int],
         wd: float, maximize: bool) -> list[dict]:
    """`fn` (an op taking the schema's arguments) on clones of `entries`, step by step."""
    out = [{k: (v.clone() if v is not None else None) for k, v in e.items()} for e in entries]
    masters = [e["master"] for e in out] if out[0]["master"] is not None else []
    for s in steps:
        fn([e["p"] for e in out], [e["g"] for e in out], [e["m"] for e in out],
           [e["v"] for e in out], masters, ops._step_tensors(s, len(out)), stochastic,
           [ops._signed64(k) for k in keys], *HYPER.values(), wd, maximize)
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b):
        for k in x:
            if x[k] is None:
                continue
            bits = (lambda t: t.view(torch.int16) if t.element_size() == 2  # noqa: E731
                    else t.view(torch.int32))
            assert torch.equal(bits(x[k]), bits(y[k])), k


KERNEL = torch.ops.nto.masked_adamw_lowp_.default


@needs_kernels
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("mode", ["master", "master_last", "stochastic"])
@pytest.mark.parametrize("wd,maximize", [(0.0, False), (0.1, False), (0.1, True)])
def test_kernel_equals_its_spec_bitwise(dtype, mode, wd, maximize):
    """Against the reference with the kernels' correctly rounded root, every bit of params,
    masters and moments; against the op's reference (torch's root, as masked_adamw_'s)
    the moments bit for bit and the master within a rounding of the root."""
    master = mode != "stochastic"
    entries = [_entry(n, dtype, 10 * i, master) for i, n in enumerate(SIZES)]
    n = len(entries)
    # master_last: the period ends for some params (rounded stochastically), not others
    sr = [True] * n if mode == "stochastic" else [mode == "master_last" and i % 2 == 0
                                                  for i in range(n)]
    keys = [stream_key(5, 9, i) for i in range(n)]
    want = _run(_reference.masked_adamw_lowp_spec, entries, [1, 2, 3], sr, keys, wd, maximize)
    got = _run(KERNEL, entries, [1, 2, 3], sr, keys, wd, maximize)
    _same(got, want)
    assert any(not torch.equal(e["p"], w["p"]) for e, w in zip(entries, want))  # it moved
    near = _run(_reference.masked_adamw_lowp_, entries, [1], sr, keys, wd, maximize)
    once = _run(KERNEL, entries, [1], sr, keys, wd, maximize)
    for a, b in zip(once, near):
        assert torch.equal(a["m"], b["m"]) and torch.equal(a["v"], b["v"])
        if master:
            torch.testing.assert_close(a["master"], b["master"], rtol=3e-7, atol=1e-12)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_op_equals_the_unfused_path_it_replaces(dtype, stochastic, maximize):
    """What formats/master.py did before the fused op: masked_adamw_ (fp32) on the master
    or an fp32 copy of the param with an fp32 copy of the grad (negated for maximize), then
    the param rounded to nearest or by stochastic_round(seed, step, index): same bits."""
    seed, step, wd = 3, 11, 0.05
    for master in (True, False) if not stochastic else (False,):
        entries = [_entry(n, dtype, 7 * i + 1, master) for i, n in enumerate(SIZES[:4])]
        keys = [stream_key(seed, step, i) for i in range(len(entries))]
        sr = [stochastic] * len(entries)
        got = _run(torch.ops.nto.masked_adamw_lowp_, entries, [4], sr, keys, wd, maximize)
        for i, (e, fused) in enumerate(zip(entries, got)):
            value = e["master"].clone() if master else e["p"].float()
            g = e["g"].float()
            g = -g if maximize else g
            m, v = e["m"].clone(), e["v"].clone()
            ops.masked_adamw_([value], [g], [m], [v], [None], 4, weight_decay=wd, **HYPER)
            p = (stochastic_round(value, dtype, seed, step, i) if stochastic
                 else value.to(dtype))
            assert torch.equal(fused["p"].view(torch.int16), p.view(torch.int16)), i
            assert torch.equal(fused["m"], m) and torch.equal(fused["v"], v)
            if master:
                assert torch.equal(fused["master"], value)


@needs_kernels
@pytest.mark.parametrize("dtype", LOWP)
def test_stochastic_rounding_edge_values_equal_the_spec(dtype):
    """Masters at a period's end with lr 0: the param is the master rounded stochastically,
    so arbitrary fp32 values reach the rounding: NaN, +-Inf, values that round to Inf,
    the largest finite, exact ties, subnormals, +-0 and ordinary numbers, against the
    spec bit for bit (bf16 has its own branch-free rounding on bit patterns)."""
    finfo = torch.finfo(dtype)
    edge = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38,
                         float(finfo.max), -float(finfo.max), 0.0, -0.0, 1e-40, -1e-40,
                         1.0 + 2.0**-8, 1.0 + 2.0**-9, -(1.0 + 2.0**-9), 2.0**-133,
                         float(finfo.tiny), 65504.0, 65520.0, -65520.0])
    x = torch.cat([edge, torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))])
    x = torch.cat([x, x.nextafter(torch.tensor(float("inf")))])
    n = x.numel()
    results = []
    for fn in (KERNEL, _reference.masked_adamw_lowp_spec):
        p, master = x.to(dtype), x.clone()
        fn([p], [torch.zeros(n, dtype=dtype)], [torch.zeros(n)], [torch.zeros(n)], [master],
           ops._step_tensors(1, 1), [True], [ops._signed64(stream_key(2, 3, 0))],
           *dict(HYPER, lr=0.0).values(), 0.0, False)
        results.append(p)
    got, want = results
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)  # a NaN's payload is not specified (c10: 0x7FC0)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


VARIANT = r"""
import hashlib, torch
from test_master_kernel import KERNEL, SIZES, _entry, _run
from nto_ext.formats.master import stream_key
h = hashlib.sha256()
for dtype in (torch.bfloat16, torch.float16):
    for master in (True, False):
        entries = [_entry(n, dtype, 3 * i, master) for i, n in enumerate(SIZES)]
        sr = [not master or i % 2 == 1 for i in range(len(SIZES))]
        keys = [stream_key(1, 2, i) for i in range(len(SIZES))]
        for e in _run(KERNEL, entries, [1, 2], sr, keys, 0.1, master):
            for t in e.values():
                if t is not None:
                    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@needs_kernels
def test_every_cpu_variant_gives_the_same_bits():
    """The portable, AVX2 and AVX-512 builds of the block loop (those this CPU runs) give
    the same bits, whatever the vector width (the spec test above runs the best one)."""
    digests = cpu_variant_outputs(VARIANT)
    assert len(set(digests.values())) == 1, digests


@needs_kernels
def test_threads_do_not_change_bits():
    entries = [_entry(3 * 65536 + 5, torch.bfloat16, 1, False)]
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_run(KERNEL, entries, [2], [True], [stream_key(0, 1, 0)], 0.1, False))
    finally:
        torch.set_num_threads(before)
    _same(outs[0], outs[1])


def _args(n: int = 10, **over) -> list:
    """Valid arguments of the op (master mode), with `over` replacing some."""
    a = {"params": [torch.zeros(n, dtype=torch.bfloat16)],
         "grads": [torch.ones(n, dtype=torch.bfloat16)], "exp_avgs": [torch.zeros(n)],
         "exp_avg_sqs": [torch.zeros(n)], "masters": [torch.zeros(n)],
         "steps": ops._step_tensors(1, 1), "stochastic": [False], "keys": [0]}
    a.update(over)
    return [*a.values(), *HYPER.values(), 0.0, False]


BAD = [
    ({"params": [torch.zeros(10)]}, TypeError,
     r"params\[0\] has dtype torch.float32; allowed: torch.bfloat16, torch.float16"),
    ({"grads": [torch.ones(10)]}, TypeError,
     r"grads\[0\] has dtype torch.float32; allowed: torch.bfloat16, torch.float16"),
    ({"grads": [torch.ones(10, dtype=torch.float16)]}, TypeError,
     r"grads\[0\] has dtype torch.float16 but params\[0\] has torch.bfloat16; allowed: "
     "torch.bfloat16"),
    ({"exp_avgs": [torch.zeros(10, dtype=torch.bfloat16)]}, TypeError,
     r"exp_avgs\[0\] has dtype torch.bfloat16; allowed: torch.float32"),
    ({"masters": [torch.zeros(10, dtype=torch.float64)]}, TypeError,
     r"masters\[0\] has dtype torch.float64; allowed: torch.float32"),
    ({"exp_avg_sqs": [torch.zeros(9)]}, ValueError,
     r"exp_avg_sqs\[0\] has 9 elements; allowed: 10 \(params\[0\] has 10\)"),
    ({"masters": [torch.zeros(11)]}, ValueError, r"masters\[0\] has 11 elements; allowed: 10"),
    ({"masters": [torch.zeros(10), torch.zeros(10)]}, ValueError,
     "got 1 params but 2 masters; allowed: one master per param, or none"),
    ({"keys": []}, ValueError, "got 1 params but 0 keys"),
    ({"stochastic": [True, False]}, ValueError, "got 1 params but 2 stochastic"),
    ({"steps": ops._step_tensors(0, 1)}, ValueError, r"steps\[0\] holds a step count of 0"),
    ({"params": [torch.zeros(20, dtype=torch.bfloat16)[::2]]}, ValueError,
     r"params\[0\] is not contiguous"),
]


@pytest.mark.parametrize("over,err,msg", BAD)
def test_bad_input_is_refused_before_anything_changes(over, err, msg):
    impls = [_reference.masked_adamw_lowp_]
    if HAS_KERNELS:
        impls.append(KERNEL)
    for fn in impls:
        args = _args(**over)
        before = [t.clone() for t in args[0] + args[2] + args[4]]
        with pytest.raises(err, match=msg):
            fn(*args)
        assert all(torch.equal(a, b) for a, b in zip(args[0] + args[2] + args[4], before))


@needs_kernels
@pytest.mark.parametrize("over,msg", [
    (lambda a: {"grads": [a["params"][0]]}, r"params\[0\] and grads\[0\] share memory"),
    (lambda a: {"masters": [a["exp_avgs"][0]]}, r"exp_avgs\[0\] and masters\[0\] share memory"),
])
def test_overlapping_memory_is_refused_by_the_kernel(over, msg):
    base = {"params": [torch.zeros(10, dtype=torch.bfloat16)], "exp_avgs": [torch.zeros(10)]}
    args = _args(**base, **over(base))
    with pytest.raises(ValueError, match=msg):
        KERNEL(*args)


def test_fake_tensors_trace_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = _args()
        ops.masked_adamw_lowp_(*a[:6], stochastic=a[6], keys=a[7], weight_decay=0.0, **HYPER)
        with pytest.raises(TypeError, match="allowed: torch.bfloat16, torch.float16"):
            a = _args(params=[torch.zeros(10)])
            ops.masked_adamw_lowp_(*a[:6], stochastic=a[6], keys=a[7], weight_decay=0.0,
                                   **HYPER)


def test_keys_past_2_63_reach_the_stream_unchanged():
    key = (1 << 64) - 5  # high bit set: passed to the schema's int64 as a negative number
    x = torch.full((64,), 1.0 + 2.0**-10)  # between two bf16 values: rounding draws
    want = _reference.stochastic_round(x, torch.bfloat16, key)
    assert 0 < int((want != x.to(torch.bfloat16)).sum()) < 64  # both neighbours drawn
    p = torch.ones(64, dtype=torch.bfloat16)
    m, v = torch.zeros(64), torch.zeros(64)
    # lr 0: the value stays x (the master); only the rounding acts
    ops.masked_adamw_lowp_([p], [torch.zeros_like(p)], [m], [v], [x.clone()], 1,
                           stochastic=[True], keys=[key], lr=0.0, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.0)
    assert torch.equal(p.view(torch.int16), want.view(torch.int16))
