"""CUDA masked_adamw_int8_ against the reference (on the CPU) bit for bit, on a GPU build
(NTO_EXT_BUILD=cuda pip install --no-build-isolation --no-deps -e .), then
   python bench/gpu_int8_check.py
Sizes: partial blocks, whole blocks, several work items; fp32 and bf16 params; two steps."""

from __future__ import annotations

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


def run(fn, dev, p, g, st, steps):
    p, st = p.clone().to(dev), [t.clone().to(dev) for t in st]
    g = g.to(dev)
    for s in steps:
        fn([p], [g], [st[0]], [st[1]], [st[2]], [st[3]], ops._step_tensors(s, 1),
           1e-2, 0.9, 0.999, 1e-8, 0.1)
    return [t.cpu() for t in (p, *st)]


def main() -> int:
    bad = 0
    for n in (1, 7, 255, 256, 257, 4129, 65836, 1 << 20):
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(n)
            p = torch.randn(n, generator=gen).to(dtype)
            g = (torch.randn(n, generator=gen) * 1e-3).to(dtype)
            st = state(n, gen)
            k = torch.ops.nto.masked_adamw_int8_.default
            got = run(k, "cuda", p, g, st, (1, 5))
            for name, fn in (("CPU kernel", k), ("reference", _reference.masked_adamw_int8_)):
                want = run(fn, "cpu", p, g, st, (1, 5))
                diff = [key for key, a, b in zip(("p", "qm", "qw", "sm", "sw"), got, want)
                        if not torch.equal(a.view(torch.uint8), b.view(torch.uint8))]
                bad += bool(diff)
                print(f"n={n} {dtype} CUDA vs {name}: "
                      f"{'bit-exact' if not diff else 'DIFFERENT in ' + ', '.join(diff)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
