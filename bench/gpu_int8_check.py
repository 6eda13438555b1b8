"""CUDA masked_adamw_int8_ against the reference (on the CPU) bit for bit, on a GPU build
(NTO_EXT_BUILD=cuda pip install --no-build-isolation --no-deps -e .), then
   python bench/gpu_int8_check.py
Sizes: partial blocks, whole blocks, several work items; fp32 and bf16 params; two steps;
dense, and at sorted positions (policy="sparse": a param 3x the positions, so the blocks
mix runs and scattered positions). Then the step's time against the fp32-state step on the
same 268M fp32 elements (issue 20's <= 1.3x), dense and at 10% random positions, with the
bytes each must move and a copy's bandwidth in the same run."""

from __future__ import annotations

import json
import sys

import torch

from nto_ext import _reference, ops


def state(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    nb = _reference.q8_blocks(n)
    qm = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
    qw = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    sm = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-8, 0, (nb,), generator=gen)
    sw = torch.rand(nb, generator=gen) * 10.0 ** torch.randint(-8, 0, (nb,), generator=gen)
    sm[0] = 0.0
    return [qm, qw, sm, sw]


def run(fn, dev, p, g, st, steps, idx=None):
    p, st = p.clone().to(dev), [t.clone().to(dev) for t in st]
    g = g.to(dev)
    at = None if idx is None else idx.to(dev)
    for s in steps:
        fn([p], [g], [st[0]], [st[1]], [st[2]], [st[3]], [at], ops._step_tensors(s, 1),
           1e-2, 0.9, 0.999, 1e-8, 0.1)
    return [t.cpu() for t in (p, *st)]


def _ms(fn) -> float:
    """GPU ms per call: bench_cuda's timing (back-to-back calls between CUDA events)."""
    from bench_cuda import timed  # noqa: PLC0415 - this folder, on sys.path as the script's

    return timed(fn, iters=10, rounds=3).ms


def speed() -> dict:
    n, k = 1 << 26, 4
    p = [torch.randn(n, device="cuda") for _ in range(k)]
    g = [torch.randn(n, device="cuda") * 1e-3 for _ in range(k)]
    m = [torch.zeros(n, device="cuda") for _ in range(k)]
    v = [torch.zeros(n, device="cuda") for _ in range(k)]
    nb = _reference.q8_blocks(n)
    qm = [torch.zeros(n, dtype=torch.int8, device="cuda") for _ in range(k)]
    qw = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(k)]
    sm = [torch.zeros(nb, device="cuda") for _ in range(k)]
    sw = [torch.zeros(nb, device="cuda") for _ in range(k)]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    out = {"elements": n * k,
           "fp32_ms": _ms(lambda: ops.masked_adamw_(p, g, m, v, [None] * k, 1, **hyper)),
           "int8_ms": _ms(lambda: ops.masked_adamw_int8_(p, g, qm, qw, sm, sw, 1, **hyper))}
    src = torch.empty(n * k, device="cuda")
    dst = torch.empty_like(src)
    out["copy_ms"] = _ms(lambda: dst.copy_(src))
    el = n * k  # bytes: param r+w 8, grad 4, + moments r+w 16 (fp32) / 4 + scales (int8)
    out["fp32_GBps"] = el * 28 / out["fp32_ms"] / 1e6
    out["int8_GBps"] = el * (12 + 4 * 1.0157) / out["int8_ms"] / 1e6
    out["copy_GBps"] = el * 8 / out["copy_ms"] / 1e6
    out["int8_over_fp32"] = out["int8_ms"] / out["fp32_ms"]
    # policy="sparse": 10% of each tensor at random positions, compact grads and state
    idx = [torch.randperm(n, device="cuda")[:n // 10].sort().values.int() for _ in range(k)]
    c = n // 10
    gc = [x[:c] for x in g]
    mc, vc = [x[:c] for x in m], [x[:c] for x in v]
    qmc, qwc = [x[:c] for x in qm], [x[:c] for x in qw]
    smc = [x[:_reference.q8_blocks(c)] for x in sm]
    swc = [x[:_reference.q8_blocks(c)] for x in sw]
    out["indexed_fp32_ms"] = _ms(lambda: ops.masked_adamw_(p, gc, mc, vc, idx, 1, **hyper))
    out["indexed_int8_ms"] = _ms(lambda: ops.masked_adamw_int8_(p, gc, qmc, qwc, smc, swc, 1,
                                                                **hyper, indices=idx))
    out["indexed_int8_over_fp32"] = out["indexed_int8_ms"] / out["indexed_fp32_ms"]
    return out


def main() -> int:
    # Load the kernels first: torch.ops.nto.* without them runs the reference, on CUDA
    # tensors too (torch's CUDA ops round differently: a first run here blamed the kernel).
    assert ops.backend() == "cuda-ext", f"backend {ops.backend()}: build with CUDA first"
    bad = 0
    for n in (1, 7, 255, 256, 257, 4129, 65836, 1 << 20):
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(n)
            p = torch.randn(n, generator=gen).to(dtype)
            g = (torch.randn(n, generator=gen) * 1e-3).to(dtype)
            st = state(n, gen)
            k = torch.ops.nto.masked_adamw_int8_.default
            for idx in (None, torch.randperm(3 * n, generator=gen)[:n].sort().values.int()):
                big = p if idx is None else torch.randn(3 * n, generator=gen).to(dtype)
                got = run(k, "cuda", big, g, st, (1, 5), idx)
                for name, fn in (("CPU kernel", k),
                                 ("reference", _reference.masked_adamw_int8_)):
                    want = run(fn, "cpu", big, g, st, (1, 5), idx)
                    diff = [key for key, a, b in zip(("p", "qm", "qw", "sm", "sw"), got, want)
                            if not torch.equal(a.view(torch.uint8), b.view(torch.uint8))]
                    bad += bool(diff)
                    print(f"n={n} {dtype} {'dense' if idx is None else 'indexed'} CUDA vs "
                          f"{name}: "
                          f"{'bit-exact' if not diff else 'DIFFERENT in ' + ', '.join(diff)}")
    print(json.dumps(speed()), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
