"""Hash what NTO does, so a refactor can prove it changed nothing (issue 18).

Trains a tiny seeded Llama (tests/tiny.py) for `--steps` steps under every policy x budget
kind (elements, %, bytes) x dtype (fp32, bf16) x state_on_switch, with two param groups,
gradient clipping on some runs, and a state_dict round trip in the middle; hashes the
params, the per-param optimizer state (tensors and Python values), memory_report()'s
numbers and active() after every few steps. Only the public API is used, so the same
script runs on the code before and after a change:

    python bench/behaviour_hash.py > before.txt   # on the old commit
    python bench/behaviour_hash.py > after.txt    # on the new one
    diff before.txt after.txt                     # empty: bit-identical behaviour
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import batch, tiny_llama  # noqa: E402

from nto_ext import NTO  # noqa: E402

BUDGETS = {"elements": 12_000, "percent": "30%", "bytes": "150KiB"}
REPORT_KEYS = ("grad_bytes", "state_bytes", "index_bytes", "offload_bytes", "total_bytes",
               "peak_total_bytes", "budget_bytes", "budget_elements", "trainable_elements",
               "trainable_tensors", "skipped_steps", "step", "adamw_bytes")


def _feed(h: Any, v: object) -> None:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(str(k).encode())
            _feed(h, v[k])
    elif isinstance(v, (list, tuple)):
        for x in v:
            _feed(h, x)
    else:
        h.update(repr(v).encode())


def _digest(v: object) -> str:
    h = hashlib.sha256()
    _feed(h, v)
    return h.hexdigest()[:16]


def run(policy: str, kind: str, dtype: torch.dtype, on_switch: str, steps: int,
        plain: bool = False, stochastic: bool = False) -> str:
    model = tiny_llama(0, dtype)
    named = list(model.named_parameters())
    groups = [{"params": [x for x in named if x[1].dim() >= 2]},
              {"params": [x for x in named if x[1].dim() < 2], "weight_decay": 0.0,
               "lr": 3e-3}]
    kw = {"switch_every": 3, "state_on_switch": on_switch, "seed": 7}
    if policy == "sparse":
        kw["regrow_fraction"] = 0.2
    if plain and dtype != torch.float32:
        kw["master_weights"] = False  # bf16 updated in place, as before issue 19
    if stochastic and dtype != torch.float32:
        kw["stochastic_rounding"] = True  # and master_weights False (implied)
    opt = NTO(groups, lr=1e-3, budget=BUDGETS[kind], policy=policy,
              max_grad_norm=1.0 if kind == "percent" else None, **kw)
    trace = []
    for step in range(steps):
        x = batch(step)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == steps // 2:  # a checkpoint round trip mid-run changes nothing
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt.load_state_dict(torch.load(buf, weights_only=True))
        if step % 3 == 2:
            rep = opt.memory_report()
            trace.append(([rep[k] for k in REPORT_KEYS], opt.active(), opt.last_grad_norm))
    state = {i: opt.state[p] for i, (_, p) in enumerate(named) if p in opt.state}
    return " ".join((_digest([p for _, p in named]), _digest(state), _digest(trace),
                     _digest(opt.state_dict()["nto"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--plain-bf16", action="store_true",
                    help="bf16 params without fp32 master weights (the default before issue "
                         "19): compares with hashes taken before it")
    ap.add_argument("--stochastic-rounding", action="store_true",
                    help="bf16 params with stochastic rounding instead of fp32 masters")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for policy in ("block", "sample", "sparse"):
        for kind in BUDGETS:
            for dtype in (torch.float32, torch.bfloat16):
                for on_switch in (("drop",) if policy == "sparse" else ("drop", "offload")):
                    out = run(policy, kind, dtype, on_switch, args.steps, args.plain_bf16,
                              args.stochastic_rounding)
                    print(f"{policy:6} {kind:8} {str(dtype)[6:]:8} {on_switch:7} {out}",
                          flush=True)


if __name__ == "__main__":
    main()
