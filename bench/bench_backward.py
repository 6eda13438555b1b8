"""A training step with the update in backward (`step_in_backward=True`) against the
usual backward-then-step, and against what a PyTorch user writes for it otherwise: the
tutorial's "optimizer step in backward" (one `torch.optim.AdamW` per param, stepped in
its post-accumulate-grad hook).

Run:   python bench/bench_backward.py [--rounds N] [--out DIR]
       (pytest-benchmark on this file; writes DIR/bench_backward.json and .md with each time
       as a fraction of torch AdamW's fused backward-then-step)
Not part of the test suite (pytest's testpaths is tests/).

What is timed: forward, backward and the optimizer (step() and zero_grad) of a 4-layer
Llama (d=512, vocabulary 8k, 14.7M params) on 4 x 128 tokens, every param trained
(budget 100%), so the update work is the same in every row and what differs is where it
runs and how many kernel calls it takes (one per param in backward, one batch at step()).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_step import run_suite, suite_parser  # noqa: E402

from nto_ext import NTO  # noqa: E402

ROUNDS = int(os.environ.get("NTO_BWD_ROUNDS", "5"))
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8,
                                   vocab_size=8192)
    return transformers.LlamaForCausalLM(cfg)


def _tutorial(model):
    """PyTorch's recipe: an optimizer per param, stepped and zeroed in its hook."""
    opts = {p: torch.optim.AdamW([p], foreach=False, **HYPER) for p in model.parameters()}

    def hook(p):
        opts[p].step()
        opts[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return None


OPTIMIZERS = {
    "adamw-fused": lambda m: torch.optim.AdamW(m.parameters(), fused=True, **HYPER),
    "adamw-in-backward (tutorial)": _tutorial,
    "nto": lambda m: NTO(m.named_parameters(), budget="100%", **HYPER),
    "nto step_in_backward": lambda m: NTO(m.named_parameters(), budget="100%",
                                          step_in_backward=True, **HYPER),
    "nto step_in_backward, no moments": lambda m: NTO(
        m.named_parameters(), budget="100%", switch_every=1, state_dtype="none",
        step_in_backward=True, **HYPER),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_train_step(benchmark, name):
    torch.set_num_threads(int(os.environ.get("NTO_BWD_THREADS", torch.get_num_threads())))
    model = _model()
    opt = OPTIMIZERS[name](model)
    x = torch.randint(0, 8192, (4, 128), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=x, labels=x).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()

    benchmark.group = "train step"
    benchmark.extra_info["name"] = name
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def table(bench_json: dict) -> str:
    rows = {b["extra_info"]["name"]: b["stats"]["median"] for b in bench_json["benchmarks"]}
    base = rows.get("adamw-fused", float("nan"))
    tut = rows.get("adamw-in-backward (tutorial)", float("nan"))
    lines = ["| forward + backward + optimizer | median, ms | x AdamW fused | x tutorial |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {1e3 * t:.0f} | {t / base:.3f} | {t / tut:.3f} |" for n, t in rows.items()]
    return "\n".join(lines)


def main() -> int:
    a = suite_parser(__doc__.split("\n\n")[0], ROUNDS).parse_args()
    env = {**os.environ, "NTO_BWD_ROUNDS": str(a.rounds)}
    if a.threads:
        env["NTO_BWD_THREADS"] = str(a.threads)
    return run_suite(Path(__file__), Path(a.out) / "bench_backward", env, table)


if __name__ == "__main__":
    sys.exit(main())
