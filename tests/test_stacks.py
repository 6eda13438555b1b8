"""The scale-out stacks users launch (issue 22), 2 and 4 ranks with gloo on CPU:
HF Trainer's own FSDP2 mode with NTOTrainer (train, checkpoint, resume bit-identical),
accelerate's loop with an FSDP2 plugin (nto_ext's DCP save / load), and HSDP on a 2x2
(replicate x shard) device mesh (same budget, active sets, skip decisions and params on
every rank). Workers: tests/stack_worker.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dist_worker as W  # noqa: E402
import stack_worker as SW  # noqa: E402

ATOL, RTOL = 1e-4, 1e-4  # as test_distributed.py: reduction order only


def _launch(scenario: str, nproc: int, out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(HERE / "stack_worker.py"), scenario, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (
        f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[n], b[n]) for n in a)


def _close(got: dict, want: dict) -> None:
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=n: f"{n}: {m}")


def _within_share(report: dict, shards: int) -> None:
    """A rank's measured training state (peak inside step) fits its share of the budget:
    NTO plans the budget over whole params, FSDP gives each rank 1/shards of each."""
    assert 0 < report["peak_total_bytes"] <= report["budget_bytes"] / shards


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, the whole global batch of every step (dist_worker.reference_run)."""
    return W.reference_run("block")


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> list[dict]:
    return _launch("fsdp2", 2, tmp_path_factory.mktemp("fsdp2"))


def test_trainer_fsdp2_trains_and_resumes_bit_identical(fsdp2):
    t0, t1 = (r["trainer"] for r in fsdp2)
    # Trainer's real FSDP2 path: accelerate sharded the model and swapped NTO's params
    assert t0["wrapped"].startswith("FSDP") and t0["param_type"] == "DTensor"
    assert "optimizer_nto" in t0["checkpoint"] and "pytorch_model_fsdp_0" in t0["checkpoint"]
    assert _equal(t0["params"], t1["params"])
    logs = [h for h in t0["log_history"] if "loss" in h]
    assert len(logs) == W.STEPS and logs[-1]["loss"] < logs[0]["loss"]
    assert len({h["nto/active"] for h in logs}) > 1, "the run must cross a switch"
    assert all("nto/state_bytes" in h for h in logs)
    for t in (t0, t1):
        # resumed from checkpoint-3 (mid-period: moments carry over) = uninterrupted
        assert _equal(t["resumed"], t["params"])
        resumed = [h["loss"] for h in t["resumed_history"] if "loss" in h]
        assert resumed[SW.SPLIT:] == [h["loss"] for h in logs][SW.SPLIT:]
        # control: the same resume without NTO's state does not reproduce the run
        assert not _equal(t["control"], t["params"])
        _within_share(t["report"], 2)


def test_trainer_fsdp2_full_state_dict_resumes_bit_identical(fsdp2):
    """fsdp_config state_dict_type FULL_STATE_DICT: the model's checkpoint is one gathered
    file, NTO's state still DCP shards (optimizer_nto/); resumed = uninterrupted."""
    t0, t1 = (r["trainer_full"] for r in fsdp2)
    assert "optimizer_nto" in t0["checkpoint"]
    assert not any(n.startswith("pytorch_model_fsdp_0") for n in t0["checkpoint"])
    assert _equal(t0["params"], t1["params"])
    assert _equal(t0["params"], fsdp2[0]["trainer"]["params"])  # the model's format only
    for t in (t0, t1):
        assert _equal(t["resumed"], t["params"])
        _within_share(t["report"], 2)


def test_accelerate_fsdp2_loop(fsdp2, reference):
    a0, a1 = (r["accelerate"] for r in fsdp2)
    assert a0["param_type"] == "DTensor"
    assert _equal(a0["params"], a1["params"])
    _close(a0["params"], reference["params"])  # one process, same batches
    for a in (a0, a1):
        assert _equal(a["resumed"], a["params"])
        assert a["resumed_losses"] == a["losses"][SW.SPLIT:]
        _within_share(a["report"], 2)


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory) -> list[dict]:
    return _launch("hsdp", 4, tmp_path_factory.mktemp("hsdp"))


def test_hsdp_2x2_matches_one_process(hsdp, reference):
    runs = [r["block"] for r in hsdp]
    assert runs[0]["placements"] == ["R", "S(0)"]  # replicate x shard
    ref = reference
    for r in runs:
        assert r["active"] == ref["active"]
        assert r["budget_bytes"] == runs[0]["budget_bytes"]
        assert _equal(r["params"], runs[0]["params"])
        _within_share(r, 2)  # two shards per replica
    _close(runs[0]["params"], ref["params"])
    total = sum(p.numel() for p in ref["params"].values())
    assert runs[0]["local_numel"] * 2 == total


def test_hsdp_skip_decision_and_norm_agree(hsdp):
    """A NaN on one rank of one replica: all 4 ranks skip the step and stay identical."""
    runs = [r["nan"] for r in hsdp]
    assert all(r["skipped"] == [0, 0, 1, 1, 1, 1] for r in runs)
    assert len({r["last_grad_norm"] for r in runs}) == 1
    for r in runs:
        assert r["active"] == runs[0]["active"]
        assert _equal(r["params"], runs[0]["params"])
