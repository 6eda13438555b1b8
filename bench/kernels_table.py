"""Runs bench/bench_ops.py (pytest-benchmark) and writes docs/results/kernels.md: each op's
time next to the torch op it replaces (measured in the same run), its ratio and target, and
its speed as GB/s of the bytes it must move and as a fraction of the measured copy bandwidth.

    python bench/kernels_table.py [--json existing.json] [--out docs/results/kernels.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python bench/kernels_table.py"

# (our benchmark name, target as text, ratio limit, "le" (ours/torch <= limit) or "speedup")
TARGETS = {
    "masked_adamw_ dense float32": ("<= 1.0x fused AdamW", 1.0, "le"),
    "masked_adamw_ dense bfloat16": ("<= 1.0x fused AdamW", 1.0, "le"),
    # state_dtype="none": p read + written, g read: 3 of fused AdamW's 7 passes (0.43x)
    "adamw_first_step_ float32": ("<= 0.5x fused AdamW", 0.5, "le"),
    "adamw_first_step_ bfloat16": ("<= 0.5x fused AdamW", 0.5, "le"),
    "masked_adamw_ indexed 10% fp32, uniformly random": ("<= 0.25x fused AdamW (full step)",
                                                          0.25, "le"),
    "masked_adamw_ indexed 10% fp32, in runs of 256": ("<= 0.25x fused AdamW (full step)",
                                                       0.25, "le"),
    "masked_adamw_ indexed 10% fp32, top 10% |g| of SmolLM2-135M": (
        "<= 0.25x fused AdamW (full step)", 0.25, "le"),
    "masked_adamw_int8_ indexed 10% fp32, uniformly random": (
        "<= 1.3x the fp32-moment indexed step", 1.3, "le"),
    "masked_adamw_int8_ indexed 10% fp32, in runs of 256": (
        "<= 1.3x the fp32-moment indexed step", 1.3, "le"),
    "param_stats (sumsq + absmax + histogram)": ("<= 1.0x _foreach_norm", 1.0, "le"),
    "param_stats, histogram=False (sumsq + absmax)": ("<= 1.0x _foreach_norm", 1.0, "le"),
    "select_topk (10%)": (">= 3x faster than torch.topk", 3.0, "speedup"),
}


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, ATen CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, {platform.system()} "
            f"{platform.release()}")


def _run_bench(json_path: Path, cpu_time: bool = False) -> None:
    """All threads, wall clock; or (cpu_time) one thread, timed by process CPU time, which
    a shared machine's other jobs disturb far less."""
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "bench_ops.py"), "-q",
           "-p", "no:cacheprovider", "--benchmark-only", f"--benchmark-json={json_path}",
           "-o", "addopts="]
    env = dict(os.environ)
    if cpu_time:
        cmd.append("--benchmark-timer=time.process_time")
        env["NTO_BENCH_THREADS"] = "1"
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def _ratio(name: str, t: float, pair_t: float) -> tuple[str, bool]:
    _, limit, kind = TARGETS.get(name, ("", 1.0, "le"))
    r = t / pair_t
    if kind == "speedup":
        return f"{1 / r:.2f}x faster", 1 / r >= limit
    return f"{r:.2f}x", r <= limit


def _rows(data: dict, cpu: dict | None) -> tuple[list[str], float]:
    by_name = {b["extra_info"]["name"]: b for b in data["benchmarks"]}
    cpu_by = {b["extra_info"]["name"]: b for b in cpu["benchmarks"]} if cpu else {}
    copy = by_name["copy (clone) fp32"]
    copy_bw = copy["extra_info"]["bytes"] / copy["stats"]["median"] / 1e9
    rows = []
    for name, b in by_name.items():
        info, t = b["extra_info"], b["stats"]["median"]
        gbs = info["bytes"] / t / 1e9
        pair_name = info.get("pair", "")
        ratio = cpu_ratio = target = verdict = ""
        cpu_ms = f"{cpu_by[name]['stats']['median'] * 1e3:.1f}" if name in cpu_by else ""
        if pair_name in by_name:
            target = TARGETS.get(name, ("",))[0]
            ratio, ok = _ratio(name, t, by_name[pair_name]["stats"]["median"])
            oks = [ok]
            if name in cpu_by and pair_name in cpu_by:
                cpu_ratio, ok1 = _ratio(name, cpu_by[name]["stats"]["median"],
                                        cpu_by[pair_name]["stats"]["median"])
                oks.append(ok1)
            verdict = "met" if all(oks) else ("met in one timing" if any(oks) else "**missed**")
        label = name.replace("|", "\\|")
        rows.append(f"| {label} | {t * 1e3:.1f} | {cpu_ms} | {info['elements'] / 1e6:.1f} M | "
                    f"{gbs:.1f} | {gbs / copy_bw:.2f} | {ratio} | {cpu_ratio} | {target} | "
                    f"{verdict} |")
    return rows, copy_bw


def write_table(data: dict, out: Path, cpu: dict | None = None) -> None:
    rows, copy_bw = _rows(data, cpu)
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_ops import transformer_shapes

    shapes = transformer_shapes()
    numel = sum(math.prod(s) for s in shapes)
    info = data["benchmarks"][0]["extra_info"]
    text = [
        "# Fused CPU kernels: speed",
        "",
        f"Measured {datetime.date.today().isoformat()} with `{COMMAND}` "
        "(pytest-benchmark, median of 5 rounds after one warm-up). Two runs: all threads "
        f"({info['threads']}) timed by the wall clock, and one thread timed by process CPU "
        "time; each ratio compares two ops of the same run.",
        "",
        f"Machine: {_machine()}. Kernel variant: nto_ext backend `{info['backend']}`.",
        "",
        f"Tensors: the {len(shapes)} parameter tensors of a 6-layer d=768 decoder with a 32k "
        f"vocabulary and untied head ({numel / 1e6:.1f} M elements). GB/s counts the bytes "
        "each op must move at least (AdamW fp32: 28 B/element; bf16 params: 22 B; indexed: "
        "32 B per updated element; param_stats and top-k: one read of 4 B/element), at the "
        "wall-clock median; 'of copy' divides it by the copy bandwidth measured in the same "
        f"run ({copy_bw:.1f} GB/s, counting read + write).",
        "",
        "| op | wall ms | 1-thread CPU ms | elements | GB/s | of copy | ratio (wall) | "
        "ratio (1-thread CPU) | target | |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The machine is shared (2 cores, other jobs running): wall-clock times vary between "
        "runs by tens of percent, and torch's fused AdamW, which opens one parallel region "
        "per tensor, loses more to descheduled threads than our single region over all "
        "tensors does; the single-thread CPU-time ratios are the steadier comparison.",
        "",
        "Notes:",
        "",
        "- AdamW runs the AVX-512 variant of the inner loop here (AVX2 and portable variants "
        "are built too and chosen at run time); dense fp32 is at the memory bound: about as "
        "fast as torch's fused step on one thread.",
        "- Indexed AdamW at 10% *uniformly random* positions touches ~81% of the param's "
        "64-byte lines (1 - 0.9^16), so its memory traffic cannot fall to 10% of the dense "
        "step's: at best (0.815 x 8 B of param lines read and written + 0.1 x 24 B of "
        "compact grad, moments and index) / 28 B = 0.32x, and scattered lines stream slower "
        "than whole ones. In runs (rows, blocks) the lines touched follow the budget. The "
        "sparse policy's real positions lie in between: SmolLM2-135M's top 10% by |g| "
        "(one batch) touch 47.6% of the lines (its MLP matrices get 20-50% of their elements "
        "and nearly every line, the embedding 0.8%), a floor of (0.476 x 8 + 2.4) / 28 = "
        "0.22x; MiniLM's touch 31%. "
        "Tried without gain (session 3, 1 thread, 56.6M elements): AVX-512 gather/scatter "
        "instead of scalar loads and stores (28.5 vs 26.7 ms), software prefetch 2 to 32 "
        "blocks ahead or every 2nd/4th position (within noise or slower; none: +40%).",
        "- param_stats does the norm's one read plus a double-precision-flushed sum, an "
        "abs-max and a 256-bin exponent histogram (counted mostly in vector registers). "
        "With histogram=False (what NTO's step uses for its norm and non-finite check) it "
        "gives the same sumsq and abs-max bits in one plain read.",
        "- select_topk makes four passes over the values (two radix histograms, a count, a "
        "compaction) and never sorts or copies them.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + _kept_sections(out))


def _kept_sections(out: Path) -> str:
    """The file's own `## ` sections after the generated table and notes (measurements of
    other benchmarks, written by hand): kept when the table is regenerated."""
    old = out.read_text() if out.exists() else ""
    at = old.find("\n## ")
    return old[at:] if at >= 0 else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="use this pytest-benchmark JSON instead of running")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "kernels.md")
    args = ap.parse_args(argv)
    cpu = None
    if args.json is None:
        with tempfile.TemporaryDirectory() as d:
            path, cpu_path = Path(d) / "bench.json", Path(d) / "bench_cpu.json"
            _run_bench(path)
            _run_bench(cpu_path, cpu_time=True)
            data, cpu = json.loads(path.read_text()), json.loads(cpu_path.read_text())
    else:
        data = json.loads(args.json.read_text())
    write_table(data, args.out, cpu)
    print(args.out.read_text())  # noqa: T201 - a script's report, not the library
    return 0


if __name__ == "__main__":
    sys.exit(main())
