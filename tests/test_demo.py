"""`nto demo`: the real run end to end (tiny), and its parts on synthetic results."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nto_ext import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _nto(*args, timeout=300):
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)  # the demo must set it itself
    return subprocess.run([sys.executable, "-m", "nto_ext", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_demo_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = _nto("demo", "--steps", "3", "--batch-size", "4", "--eval-size", "16",
             "--max-length", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    res = json.loads((out / demo.RESULTS_FILE).read_text())
    png = (out / demo.PLOT_FILE).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000

    cfg, runs, summ = res["config"], res["runs"], res["summary"]
    assert (cfg["model"], cfg["data"], cfg["task"], cfg["steps"]) == ("minilm", "tweets",
                                                                      "classify", 3)
    nto, adamw = runs["nto"], runs["adamw"]
    # AdamW keeps an fp32 gradient and two fp32 moments for each of MiniLM's 22.7M weights
    n = adamw["trainable_elements"]
    assert n == 22_714_371
    assert adamw["training_state"]["grad_bytes"] == 4 * n
    assert 8 * n <= adamw["training_state"]["state_bytes"] <= 8 * n + 4 * 200
    # NTO: measured, non-zero, below AdamW's and within its budget
    ts = nto["training_state"]
    assert 0 < ts["total_bytes"] < adamw["training_state"]["total_bytes"]
    assert summ["budget_bytes"] and ts["total_bytes"] <= summ["budget_bytes"]
    assert summ["within_budget"] is True
    for run in (nto, adamw):
        assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
        assert 0.0 <= run["accuracy"] <= 1.0 and run["eval_size"] == 16
        assert run["peak_rss"] > 100 * 2**20 and run["mean_step_s"] > 0
    # same seed, same data, same head: the first forward is identical
    assert nto["losses"][0] == pytest.approx(adamw["losses"][0], abs=1e-6)
    # the table is printed with both columns
    assert "training state" in r.stdout and "AdamW (torch)" in r.stdout
    assert "held-out accuracy" in r.stdout


def _fake_results(task="classify"):
    def run(state, rss, losses, acc):
        r = {"losses": losses, "step_times_s": [0.2] * len(losses),
             "training_state": {"grad_bytes": state // 3, "state_bytes": state - state // 3,
                                "index_bytes": 0, "total_bytes": state},
             "peak_rss": rss, "eval_size": 100, "accuracy": acc,
             "eval_loss": 2.0 + acc, "perplexity": math.exp(2.0 + acc)}
        demo._summarize_run(r)
        return r

    return {"config": {"model": "minilm", "data": "tweets", "task": task, "budget": "10%",
                       "policy": "block", "order": "descending", "steps": 20,
                       "batch_size": 16, "seed": 0, "lr_nto": 3e-4, "lr_adamw": 1e-4},
            "runs": {"nto": run(30 * 2**20, 900 * 2**20, [1.1 - i / 40 for i in range(20)], 0.6),
                     "adamw": run(260 * 2**20, 1200 * 2**20, [1.1 - i / 30 for i in range(20)],
                                  0.7)},
            "summary": {"budget_bytes": 32 * 2**20, "within_budget": True,
                        "state_ratio": 30 / 260}}


@pytest.mark.parametrize("task", ["classify", "lm"])
def test_table_and_plot_from_results(tmp_path, task):
    res = _fake_results(task)
    table = demo.format_table(res)
    assert "30.0" in table and "260.0" in table and "1,200.0" in table
    assert ("60.00%" in table) if task == "classify" else ("perplexity" in table)
    assert "11.5% of AdamW's" in table and "within the budget of 32.0 MiB" in table
    demo.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


def test_adamw_memory_matches_its_state():
    m = torch.nn.Linear(10, 5)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 10)).sum().backward()
    opt.step()
    mem = demo.adamw_memory(m, opt)
    assert mem["grad_bytes"] == 55 * 4
    assert mem["state_bytes"] == 2 * 55 * 4 + 2 * 4  # two moments + one fp32 step per tensor


def test_batches_are_seeded_and_cover_an_epoch():
    def draw(seed):
        return [b.tolist() for b in demo._batches(10, lambda idx: idx, 5, 4, seed=seed)]

    a = draw(3)
    assert a == draw(3) and a != draw(4)
    assert sorted(sum(a, [])[:10]) == list(range(10))  # the first epoch sees each once
    assert all(len(b) == 4 for b in a)


def test_smooth_is_a_trailing_mean():
    assert demo._smooth([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_parse_budget():
    assert demo.parse_budget("10%") == "10%"
    assert demo.parse_budget("2000") == 2000 and demo.parse_budget("0.1") == 0.1
    assert demo.parse_budget("1.5GiB") == "1.5GiB"


def test_order_applies_to_the_block_policy_only():
    cfg = demo.DemoConfig(policy="block", order="descending", switch_every=20, seed=1)
    assert demo.nto_kwargs(cfg) == {"policy": "block", "switch_every": 20, "seed": 1,
                                    "order": "descending"}
    cfg.policy = "sample"
    assert "order" not in demo.nto_kwargs(cfg)
