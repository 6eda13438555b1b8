"""The bf16 update's cost (issue 19): the fused `ops.masked_adamw_lowp_` with fp32 masters
and with stochastic rounding, against the plain bf16 in-place step and the fp32 step on the
same elements, and against the unfused path formats/master.py ran before the fused op
(fp32 copies of the grads (and, stochastic, of the params), the fp32 kernel, the rounding
in PyTorch). Op level: no optimizer around it.

Run:   python bench/bench_lowp_update.py [--elements N] [--rounds R]
       (pytest-benchmark on this file, one thread unless NTO_LOWP_THREADS; prints a table
       with each time as a fraction of the plain bf16 step and of the fp32 step)
or:    python -m pytest bench/bench_lowp_update.py --benchmark-json=out.json
Not part of the test suite (pytest's testpaths is tests/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nto_ext import ops  # noqa: E402
from nto_ext.formats.master import stochastic_round, stream_key  # noqa: E402

ELEMENTS = int(os.environ.get("NTO_LOWP_ELEMENTS", str(4 << 20)))
ROUNDS = int(os.environ.get("NTO_LOWP_ROUNDS", "7"))
torch.set_num_threads(int(os.environ.get("NTO_LOWP_THREADS", "1")))
HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
# the elements split as a model's: one large matrix, a few smaller ones, a vector
SPLIT = (0.5, 0.2, 0.2, 0.0999, 0.0001)


def _tensors(dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    sizes = [max(1, int(ELEMENTS * f)) for f in SPLIT]
    p32 = [torch.randn(n, generator=gen) for n in sizes]
    return {"p": [p.to(dtype) for p in p32],
            "g": [(torch.randn(n, generator=gen) * 1e-2).to(dtype) for n in sizes],
            "m": [torch.zeros(n) for n in sizes], "v": [torch.zeros(n) for n in sizes],
            "master": [p.clone() for p in p32]}


def _plain(t: dict, step: int) -> None:  # bf16 (or fp32) params updated in place
    ops.masked_adamw_(t["p"], t["g"], t["m"], t["v"], [None] * len(t["p"]), step, **HYPER)


def _fused(t: dict, step: int, masters: bool) -> None:
    n = len(t["p"])
    ops.masked_adamw_lowp_(t["p"], t["g"], t["m"], t["v"], t["master"] if masters else [],
                           step, stochastic=[not masters] * n,
                           keys=[stream_key(0, step, i) for i in range(n)], **HYPER)


def _unfused(t: dict, step: int, masters: bool) -> None:
    """formats/master.py before the fused op (batches of the largest tensor's elements
    at most; here each tensor alone, which moves the same bytes)."""
    for i, (p, g, m, v) in enumerate(zip(t["p"], t["g"], t["m"], t["v"])):
        value = t["master"][i] if masters else p.float()
        ops.masked_adamw_([value], [g.float()], [m], [v], [None], step, **HYPER)
        p.copy_(value if masters else stochastic_round(value, p.dtype, 0, step, i).view(p.shape))


CASES = {
    "fp32 step": (torch.float32, _plain),
    "bf16 plain": (torch.bfloat16, _plain),
    "bf16 masters fused": (torch.bfloat16, lambda t, s: _fused(t, s, True)),
    "bf16 stochastic fused": (torch.bfloat16, lambda t, s: _fused(t, s, False)),
    "bf16 masters unfused (before)": (torch.bfloat16, lambda t, s: _unfused(t, s, True)),
    "bf16 stochastic unfused (before)": (torch.bfloat16, lambda t, s: _unfused(t, s, False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lowp_update(benchmark, case):
    dtype, fn = CASES[case]
    t = _tensors(dtype)
    count = iter(range(1, 10**9))
    benchmark.extra_info.update(name=case, elements=sum(p.numel() for p in t["p"]),
                                threads=torch.get_num_threads())
    benchmark.pedantic(lambda: fn(t, next(count)), rounds=ROUNDS, warmup_rounds=1)


def table(bench_json: dict) -> str:
    rows = {b["extra_info"]["name"]: b["stats"]["median"] for b in bench_json["benchmarks"]}
    plain, fp32 = rows["bf16 plain"], rows["fp32 step"]
    lines = ["| step | median, ms | x bf16 plain | x fp32 step |", "|---|---|---|---|"]
    for name, med in rows.items():
        lines.append(f"| {name} | {1e3 * med:.2f} | {med / plain:.2f} | {med / fp32:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=ELEMENTS)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lowp.json"
        env = dict(os.environ, NTO_LOWP_ELEMENTS=str(args.elements),
                   NTO_LOWP_ROUNDS=str(args.rounds))
        rc = subprocess.call([sys.executable, "-m", "pytest", __file__, "-q", "-p",
                              "no:cacheprovider", f"--benchmark-json={out}"], env=env)
        if rc == 0:
            print(table(json.loads(out.read_text())))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
