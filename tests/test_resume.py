"""Exact resume: save model + optimizer at step k, load both in a FRESH process with
torch.load(weights_only=True), continue; the final params are bit-identical to an
uninterrupted run, for every policy and state_on_switch mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import (
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_llama,
    train_step,
)

from nto_ext import NTO

STEPS = 24
# (NTO arguments, checkpoint step). switch_every=2 with k=7: mid-period; k=6: right after
# a switch. Offload runs span more than one cycle, so state offloaded before the
# checkpoint comes back after it.
CASES = {
    "block-drop": ({"policy": "block", "state_on_switch": "drop", "budget": "10%",
                    "switch_every": 2}, 7),
    "block-drop-at-switch": ({"policy": "block", "state_on_switch": "drop", "budget": "25%",
                              "switch_every": 2, "order": "random"}, 6),
    "block-offload": ({"policy": "block", "state_on_switch": "offload", "budget": "60KiB",
                       "switch_every": 1, "order": "random", "seed": 5}, 9),
    "sample-drop": ({"policy": "sample", "state_on_switch": "drop", "budget": "30%",
                     "switch_every": 2, "always": ["embed"]}, 7),
    "sample-offload": ({"policy": "sample", "state_on_switch": "offload", "budget": "15%",
                       "switch_every": 1, "seed": 11}, 9),
    "sample-lisa-offload": ({"policy": "sample", "state_on_switch": "offload",
                             "budget": "60%", "switch_every": 2,
                             "always": ["embed", "head", "other"], "sample_layers": 1}, 5),
    # sparse: k=7 between regrowths; k=6 right after the drop that precedes a regrowth
    # (the checkpoint holds K - R elements, step 6 scores and regrows in the new process)
    "sparse-mid": ({"policy": "sparse", "budget": "10%", "switch_every": 3}, 7),
    "sparse-before-regrowth": ({"policy": "sparse", "budget": "2%", "switch_every": 2,
                                "max_grad_norm": 1.0, "regrow_fraction": 0.25}, 6),
    # bf16 weights (`_dtype`, not an NTO argument): fp32 masters offloaded and restored
    # across the checkpoint; stochastic rounding keyed on the step (issue 19)
    "block-bf16-masters-offload": ({"policy": "block", "state_on_switch": "offload",
                                    "budget": "20%", "switch_every": 2, "_dtype": "bfloat16"},
                                   7),
    "sample-bf16-stochastic": ({"policy": "sample", "budget": "30%", "switch_every": 2,
                                "stochastic_rounding": True, "_dtype": "bfloat16"}, 7),
}

CHILD = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[3]))  # as the parent: matmul sums depend on it
from tiny import tiny_llama, train_step
from nto_ext import NTO
work = sys.argv[2]
cases = json.loads(open(f"{work}/cases.json").read())
for name, (kwargs, k, steps) in cases.items():
    ckpt = torch.load(f"{work}/{name}.pt", weights_only=True)
    dtype = getattr(torch, kwargs.pop("_dtype", "float32"))
    model = tiny_llama(seed=1234, dtype=dtype)  # other weights: the checkpoint restores them
    model.load_state_dict(ckpt["model"])
    opt = NTO(model.named_parameters(), lr=1e-2, **kwargs)
    opt.load_state_dict(ckpt["opt"])
    for step in range(k, steps):
        train_step(model, opt, step)
    torch.save({"params": [p.detach() for p in model.parameters()],
                "report": opt.memory_report()}, f"{work}/{name}.final.pt")
"""


def _run(kwargs, steps, model=None, opt=None, start=0):
    if model is None:
        kwargs = dict(kwargs)
        model = tiny_llama(dtype=getattr(torch, kwargs.pop("_dtype", "float32")))
        opt = NTO(model.named_parameters(), lr=1e-2, **kwargs)
    for step in range(start, steps):
        train_step(model, opt, step)
    return model, opt


def test_fresh_process_resume_is_bit_identical(tmp_path: Path):
    expected, cases = {}, {}
    for name, (kwargs, k) in CASES.items():
        model, opt = _run(kwargs, STEPS)
        expected[name] = ([p.detach().clone() for p in model.parameters()],
                          opt.memory_report())
        model, opt = _run(kwargs, k)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()},
                   tmp_path / f"{name}.pt")
        cases[name] = (kwargs, k, STEPS)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(tmp_path),
                    str(torch.get_num_threads())], check=True, timeout=600, env=env)
    for name in CASES:
        final = torch.load(tmp_path / f"{name}.final.pt", weights_only=True)
        want, want_report = expected[name]
        for i, (a, b) in enumerate(zip(want, final["params"])):
            assert torch.equal(a, b), f"{name}: param {i} differs after resume"
        got = final["report"]
        for key in ("state_bytes", "offload_bytes", "step", "trainable_elements"):
            assert got[key] == want_report[key], (name, key)


def test_in_process_resume_midway_equals_uninterrupted():
    kwargs = {"policy": "sample", "state_on_switch": "offload", "budget": "20%",
              "switch_every": 1}
    model, opt = _run(kwargs, 10)
    want = [p.detach().clone() for p in model.parameters()]
    m2, o2 = _run(kwargs, 4)
    sd = o2.state_dict()
    m3 = tiny_llama(seed=9)
    m3.load_state_dict(m2.state_dict())
    o3 = NTO(m3.named_parameters(), lr=1e-2, **kwargs)
    o3.load_state_dict(sd)
    _run(kwargs, 10, m3, o3, start=4)
    assert all(torch.equal(a, b) for a, b in zip(want, m3.parameters()))


@pytest.mark.parametrize("policy", ["block", "sample", "sparse"])
def test_resume_keeps_skipped_steps_and_schedule(policy):
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="20%", policy=policy, switch_every=1)
    train_step(model, opt, 0)
    opt.skipped_steps = 3
    sd = opt.state_dict()
    fresh = NTO(tiny_llama().named_parameters(), budget="20%", policy=policy, switch_every=1)
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 3 and fresh.step_count == 1
    assert fresh.active_blocks() == opt.active_blocks()
