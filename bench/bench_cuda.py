"""CUDA kernel benchmarks, each measured against a yardstick taken in the same run.

  python bench/bench_cuda.py --out DIR      (DIR defaults to $OUT, else out/gpu_check)

Yardsticks: the device's copy bandwidth (`x.clone()` of a 1 GiB tensor: bytes read +
written per second) and the torch op a user would otherwise call. Reported:
  - dense masked_adamw_ (fp32 and bf16 params): GB/s moved (params, grads, both moments
    read; params and moments written) as a fraction of copy bandwidth, and the speedup over
    torch.optim.AdamW(fused=True).step() on the same tensors;
  - indexed masked_adamw_ at 10% density (sorted random positions, compact fp32 grad and
    state): time as a fraction of the full fused step; runs of 256 positions for contrast;
  - param_stats vs torch._foreach_norm; select_topk (10% and 1%) vs torch.topk on the
    concatenated |x| (and on cat + abs + topk, what a user would write).
Targets (issue 9): dense fp32 >= 0.85 of copy bandwidth and >= 1.0x fused AdamW; indexed at
10% <= 0.25x of the fused step. GPU times: back-to-back calls between two CUDA events, no
sync per call (see `timed`); host microseconds per call reported beside them.
Writes bench_cuda.json and bench_cuda.md; exit status 0 (targets are reported, not enforced:
gpu_check.sh decides).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from nto_ext import ops

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
DEV = "cuda"  # --device cpu: a dry run of this script's plumbing (small sizes, no GPU)
TARGETS = {  # name: (comparison, bound)
    "dense_fp32_fraction_of_copy": (">=", 0.85),
    "dense_fp32_speedup_vs_fused": (">=", 1.0),
    "indexed10_fp32_time_vs_fused": ("<=", 0.25),
}


class Timing(NamedTuple):
    ms: float  # GPU time per call: back-to-back calls between two events (throughput)
    host_us: float  # host time per call: issuing it (checks, grouping, launches), no waiting


def timed(fn, iters: int = 20, warmup: int = 3, rounds: int = 5) -> Timing:
    """Medians over `rounds` of: `iters` calls of fn() back to back between two CUDA events,
    with no sync between calls (so the GPU time is not inflated by launch latency and host
    work overlaps the kernels, as in training), divided by iters; and the host time to issue
    them (perf_counter around the loop, before the end event is waited on). A host time near
    the GPU time means the op is host-bound at that size. On --device cpu both are the wall
    time per call."""
    for _ in range(warmup):
        fn()
    gpu, host = [], []
    for _ in range(rounds):
        if DEV == "cpu":
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            wall = (time.perf_counter() - t0) / iters
            gpu.append(wall * 1e3)
            host.append(wall * 1e6)
            continue
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host.append((time.perf_counter() - t0) / iters * 1e6)
        b.record()
        b.synchronize()
        gpu.append(a.elapsed_time(b) / iters)
    return Timing(statistics.median(gpu), statistics.median(host))


def copy_bandwidth(nbytes: int) -> float:
    """GB/s of x.clone(): 2 * nbytes moved per call."""
    x = torch.empty(nbytes // 4, device=DEV)
    ms = timed(lambda: x.clone(), iters=30).ms
    return 2 * nbytes / ms / 1e6


def model_sizes(total: int) -> list[int]:
    """A transformer-like mix: large matrices plus small vectors (norms, biases)."""
    big = [total // 48] * 32 + [total // 96] * 32
    small = [4096, 1024, 3] * 16
    return big + small


def make_params(sizes, dtype, gen_seed=0):
    g = torch.Generator(device=DEV).manual_seed(gen_seed)
    return [torch.randn(n, device=DEV, dtype=torch.float32, generator=g).to(dtype)
            for n in sizes]


def bench_dense(sizes, dtype, copy_gbs):
    params = make_params(sizes, dtype)
    grads = [torch.randn_like(p) for p in params]
    ms = [torch.zeros(p.numel(), device=DEV) for p in params]
    vs = [torch.zeros(p.numel(), device=DEV) for p in params]
    n = sum(sizes)
    step = [1]

    def ours():
        ops.masked_adamw_(params, grads, ms, vs, [None] * len(params), step[0], lr=LR,
                          beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD)
        step[0] += 1

    t_ours, host_us = timed(ours)
    esize = torch.tensor([], dtype=dtype).element_size()
    nbytes = n * (2 * esize + esize + 8 + 8)  # p r/w, g r, m r/w, v r/w
    ref = [p.clone().requires_grad_() for p in params]
    for r, g in zip(ref, grads):
        r.grad = g
    opt = torch.optim.AdamW(ref, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    t_fused, fused_host_us = timed(opt.step)
    del opt, ref
    out = {
        "elements": n, "tensors": len(sizes), "ms": t_ours, "fused_ms": t_fused,
        "host_us": host_us, "fused_host_us": fused_host_us,
        "gbs": nbytes / t_ours / 1e6, "fraction_of_copy": nbytes / t_ours / 1e6 / copy_gbs,
        "speedup_vs_fused": t_fused / t_ours,
    }
    return out, (params, grads, t_fused)


def bench_indexed(params, t_fused, density=0.1, runs=False):
    g = torch.Generator(device=DEV).manual_seed(1)
    idx = []
    for p in params:
        n = p.numel()
        if runs:  # runs of 256 consecutive positions
            starts = torch.randperm(max(n // 256, 1), device=DEV, generator=g)
            starts = starts[: max(int(n * density) // 256, 1)].sort().values * 256
            pos = (starts[:, None] + torch.arange(256, device=DEV)).view(-1)
            pos = pos[pos < n]
        else:
            pos = torch.randperm(n, device=DEV, generator=g)[: max(int(n * density), 1)]
            pos = pos.sort().values
        idx.append(pos.to(torch.int32))
    grads = [torch.randn(i.numel(), device=DEV) for i in idx]
    ms = [torch.zeros(i.numel(), device=DEV) for i in idx]
    vs = [torch.zeros(i.numel(), device=DEV) for i in idx]
    step = [1]

    def ours():
        ops.masked_adamw_(params, grads, ms, vs, idx, step[0], lr=LR, beta1=BETAS[0],
                          beta2=BETAS[1], eps=EPS, weight_decay=WD)
        step[0] += 1

    ours()  # the first call checks the index tensors (cached afterwards)
    t, host_us = timed(ours)
    return {"density": density, "runs_of_256": runs, "ms": t, "host_us": host_us,
            "time_vs_fused": t / t_fused, "elements": sum(i.numel() for i in idx)}


def bench_stats(params, copy_gbs):
    nbytes = sum(p.numel() * p.element_size() for p in params)
    t, host_us = timed(lambda: ops.param_stats(params))
    t_norm = timed(lambda: torch._foreach_norm(params)).ms
    return {"ms": t, "host_us": host_us, "foreach_norm_ms": t_norm, "gbs": nbytes / t / 1e6,
            "fraction_of_copy": nbytes / t / 1e6 / copy_gbs, "speedup_vs_foreach_norm":
            t_norm / t}


def bench_topk(params, frac):
    total = sum(p.numel() for p in params)
    k = max(int(total * frac), 1)
    t, host_us = timed(lambda: ops.select_topk(params, k), iters=5, warmup=1, rounds=3)
    flat = [torch.cat([p.reshape(-1) for p in params]).abs()]
    t_topk = timed(lambda: torch.topk(flat[0], k, sorted=False), iters=3, warmup=1,
                   rounds=3).ms
    flat.clear()  # free the copy before the next measure
    t_full = timed(lambda: torch.topk(torch.cat([p.reshape(-1) for p in params]).abs(), k,
                                      sorted=False), iters=3, warmup=1, rounds=3).ms
    return {"k": k, "fraction": frac, "ms": t, "host_us": host_us, "topk_ms": t_topk,
            "cat_abs_topk_ms": t_full,
            "speedup_vs_topk": t_topk / t, "speedup_vs_cat_abs_topk": t_full / t}


def check_targets(res) -> dict:
    values = {
        "dense_fp32_fraction_of_copy": res["dense_fp32"]["fraction_of_copy"],
        "dense_fp32_speedup_vs_fused": res["dense_fp32"]["speedup_vs_fused"],
        "indexed10_fp32_time_vs_fused": res["indexed10_fp32"]["time_vs_fused"],
    }
    out = {}
    for name, (cmp, bound) in TARGETS.items():
        v = values[name]
        out[name] = {"value": v, "target": f"{cmp} {bound}",
                     "met": v >= bound if cmp == ">=" else v <= bound}
    return out


def markdown(res) -> str:
    env, d = res["env"], res
    lines = [
        f"# CUDA kernel benchmarks ({env['date']})", "",
        f"Device: {env['device']} ({env['memory_gib']:.0f} GiB), torch {env['torch']} "
        f"(CUDA {env['cuda']}), backend {env['backend']}. Command: `{env['command']}`.", "",
        f"Copy bandwidth (clone of 1 GiB): **{d['copy_gbs']:.0f} GB/s**.", "",
        "GPU times: back-to-back calls between CUDA events (no sync per call), medians of 5 "
        "rounds; host: microseconds per call to issue it (yardstick's in brackets).", "",
        "| measure | ours | host us/call | yardstick | ratio |", "|---|---|---|---|---|",
    ]
    for key, label in (("dense_fp32", "dense AdamW fp32"), ("dense_bf16", "dense AdamW bf16")):
        r = d[key]
        lines.append(f"| {label}, {r['elements'] / 1e6:.1f}M el. in {r['tensors']} tensors | "
                     f"{r['ms']:.3f} ms, {r['gbs']:.0f} GB/s ({r['fraction_of_copy']:.2f} of "
                     f"copy) | {r['host_us']:.0f} ({r['fused_host_us']:.0f}) | fused AdamW "
                     f"{r['fused_ms']:.3f} ms | "
                     f"{r['speedup_vs_fused']:.2f}x faster |")
    for key, label in (("indexed10_fp32", "indexed 10% (random)"),
                       ("indexed10_fp32_runs", "indexed 10% (runs of 256)")):
        r = d[key]
        lines.append(f"| {label} | {r['ms']:.3f} ms | {r['host_us']:.0f} | fused full step "
                     f"{d['dense_fp32']['fused_ms']:.3f} ms | {r['time_vs_fused']:.3f}x the time |")
    r = d["param_stats"]
    lines.append(f"| param_stats | {r['ms']:.3f} ms, {r['gbs']:.0f} GB/s | {r['host_us']:.0f} | "
                 f"_foreach_norm "
                 f"{r['foreach_norm_ms']:.3f} ms | {r['speedup_vs_foreach_norm']:.2f}x faster |")
    for key in ("topk10", "topk1"):
        r = d[key]
        lines.append(f"| select_topk {r['fraction']:.0%} (k={r['k']}) | {r['ms']:.2f} ms | "
                     f"{r['host_us']:.0f} | "
                     f"torch.topk {r['topk_ms']:.2f} ms (cat+abs+topk {r['cat_abs_topk_ms']:.2f})"
                     f" | {r['speedup_vs_topk']:.2f}x ({r['speedup_vs_cat_abs_topk']:.2f}x) |")
    lines += ["", "| target | value | bound | met |", "|---|---|---|---|"]
    for name, t in d["targets"].items():
        lines.append(f"| {name} | {t['value']:.3f} | {t['target']} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/gpu_check")
    ap.add_argument("--elements", type=int, default=1 << 28,
                    help="parameter elements of the benchmark model (default 2**28)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of the script itself (use a small --elements)")
    args = ap.parse_args(argv)
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: no CUDA device", file=sys.stderr)
        return 2
    if DEV == "cuda" and ops.backend() != "cuda-ext":
        print(f"bench_cuda: backend is {ops.backend()}, not cuda-ext: build with "
              "NTO_EXT_BUILD=cuda pip install --no-build-isolation -e .", file=sys.stderr)
        return 2
    if DEV == "cuda":
        free = torch.cuda.mem_get_info()[0]
        total = min(args.elements, free // 48)  # ours + fused state + topk copies fit
        props = torch.cuda.get_device_properties(0)
        name, mem = props.name, props.total_memory
    else:
        total, name, mem = args.elements, platform.processor() or "cpu", 0
    res = {"env": {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name, "memory_gib": mem / 2**30,
        "torch": torch.__version__, "cuda": torch.version.cuda, "backend": ops.backend(),
        "python": platform.python_version(), "command": " ".join(["python"] + sys.argv),
    }}
    res["copy_gbs"] = copy_bandwidth(1 << 30 if DEV == "cuda" else 1 << 24)
    print(f"copy bandwidth {res['copy_gbs']:.0f} GB/s", flush=True)
    sizes = model_sizes(total)
    res["dense_fp32"], (params, _, t_fused) = bench_dense(sizes, torch.float32, res["copy_gbs"])
    print("dense fp32", res["dense_fp32"], flush=True)
    res["indexed10_fp32"] = bench_indexed(params, t_fused)
    res["indexed10_fp32_runs"] = bench_indexed(params, t_fused, runs=True)
    print("indexed", res["indexed10_fp32"], res["indexed10_fp32_runs"], flush=True)
    res["param_stats"] = bench_stats(params, res["copy_gbs"])
    print("param_stats", res["param_stats"], flush=True)
    res["topk10"] = bench_topk(params, 0.10)
    res["topk1"] = bench_topk(params, 0.01)
    print("select_topk", res["topk10"], res["topk1"], flush=True)
    del params
    if DEV == "cuda":
        torch.cuda.empty_cache()
    res["dense_bf16"], _ = bench_dense(sizes, torch.bfloat16, res["copy_gbs"])
    print("dense bf16", res["dense_bf16"], flush=True)
    res["targets"] = check_targets(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cuda.json").write_text(json.dumps(res, indent=2))
    (out / "bench_cuda.md").write_text(markdown(res))
    print(markdown(res))
    met = all(t["met"] for t in res["targets"].values())
    print(f"bench_cuda: targets {'met' if met else 'NOT all met'}; wrote {out}/bench_cuda.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
