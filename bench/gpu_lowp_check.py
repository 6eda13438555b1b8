"""Device check of masked_adamw_lowp_'s CUDA kernel alone, JIT-built from its one .cu in a
minute or two (no full extension build): CUDA == the bit-for-bit spec
(_reference.masked_adamw_lowp_spec, on the CPU) for bf16/fp16, masters (with and without a
period's stochastic end) and stochastic rounding, weight decay and maximize; then the
update's bandwidth against a copy's on 256M elements.

    OUT=/tmp/out TORCH_CUDA_ARCH_LIST=9.0 python bench/gpu_lowp_check.py
    python bench/gpu_lowp_check.py --installed   # after a CUDA build of the package
Exit status 0: every comparison bitwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

INSTALLED = "--installed" in sys.argv  # the installed extension's kernel, no JIT build
if not INSTALLED:
    os.environ["NTO_EXT_BACKEND"] = "reference"  # the schemas only: the .cu below adds CUDA
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.cpp_extension import load  # noqa: E402

from nto_ext import _reference, ops  # noqa: E402
from nto_ext._buildinfo import cuda_args  # noqa: E402

HYPER = (1e-3, 0.9, 0.999, 1e-8)
SIZES = [1, 7, 1000, 65837, 3 * (1 << 20) + 5]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _case(op, dtype: torch.dtype, mode: str, wd: float, maximize: bool) -> bool:
    gen = torch.Generator().manual_seed(1)
    cols: list[list[torch.Tensor]] = [[], [], [], [], []]
    for n in SIZES:
        p32 = torch.randn(n, generator=gen)
        vals = (p32.to(dtype), (torch.randn(n, generator=gen) * 1e-2).to(dtype),
                torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-5,
                p32 + p32 * 1e-4)
        for c, v in zip(cols, vals):
            c.append(v)
    if mode == "stochastic":
        cols[4] = []
    sr = [mode == "stochastic" or (mode == "master_last" and i % 2 == 0)
          for i in range(len(SIZES))]
    keys = [ops._signed64(0x9E3779B97F4A7C15 * (i + 7)) for i in range(len(SIZES))]
    cpu = [[t.clone() for t in c] for c in cols]
    gpu = [[t.cuda() for t in c] for c in cols]
    for s in (1, 2, 3):
        steps = [torch.tensor([float(s)], dtype=torch.float64)] * len(SIZES)
        _reference.masked_adamw_lowp_spec(*cpu, steps, sr, keys, *HYPER, wd, maximize)
        op(*gpu, steps, sr, keys, *HYPER, wd, maximize)
    torch.cuda.synchronize()
    return all(torch.equal(_bits(a), _bits(b)) for ca, cb in zip(cpu, gpu)
               for a, b in zip(ca, cb))


def _ms(fn) -> float:
    """GPU ms per call: bench_cuda's timing (back-to-back calls between CUDA events)."""
    from bench_cuda import timed  # noqa: PLC0415 - this folder, on sys.path as the script's

    return timed(fn, iters=10, rounds=3).ms


def _speed(op) -> dict:
    n, k = 1 << 26, 4
    p = [torch.randn(n, device="cuda").bfloat16() for _ in range(k)]
    g = [(torch.randn(n, device="cuda") * 1e-2).bfloat16() for _ in range(k)]
    m = [torch.zeros(n, device="cuda") for _ in range(k)]
    v = [torch.zeros(n, device="cuda") for _ in range(k)]
    w = [x.float() for x in p]
    steps = [torch.tensor([1.0], dtype=torch.float64)] * k
    keys = list(range(1, k + 1))
    out = {"masters_ms": _ms(lambda: op(p, g, m, v, w, steps, [False] * k, keys, *HYPER,
                                        0.01, False)),
           "stochastic_ms": _ms(lambda: op(p, g, m, v, [], steps, [True] * k, keys, *HYPER,
                                           0.01, False))}
    src = torch.empty(n * k, device="cuda")
    dst = torch.empty_like(src)
    out["copy_ms"] = _ms(lambda: dst.copy_(src))
    el = n * k
    # bytes moved at least: param r+w 4, grad 2, moments r+w 16 (+ master r+w 8)
    out["masters_GBps"] = el * 30 / out["masters_ms"] / 1e6
    out["stochastic_GBps"] = el * 22 / out["stochastic_ms"] / 1e6
    out["copy_GBps"] = el * 8 / out["copy_ms"] / 1e6
    return out


def main() -> int:
    print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(),
          flush=True)
    t0 = time.time()
    if INSTALLED:
        assert ops.backend() == "cuda-ext", ops.backend()
    else:
        load(name="lowp_cuda", sources=["csrc/cuda/masked_adamw_lowp.cu"],
             extra_cuda_cflags=cuda_args(torch.__version__, shell=True),
             is_python_module=False, build_directory=os.environ.get("OUT", "."), verbose=False)
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    op = torch.ops.nto.masked_adamw_lowp_.default
    ok = True
    for dtype in (torch.bfloat16, torch.float16):
        for mode in ("master", "master_last", "stochastic"):
            for wd, maximize in ((0.0, False), (0.1, True)):
                same = _case(op, dtype, mode, wd, maximize)
                ok &= same
                print(dtype, mode, wd, maximize, "bitwise" if same else "DIFFERENT", flush=True)
    print(json.dumps(_speed(op)), flush=True)
    print("ALL BITWISE" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
