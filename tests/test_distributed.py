"""DDP and FSDP2 with 2 ranks (gloo on CPU, launched by torchrun): NTO's active sets agree on
every rank, parameters match a one-process run with the same global batch, and optimizer
state round-trips through torch.distributed.checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
sys.path.insert(0, str(HERE))

import dist_worker as W  # noqa: E402

# DDP averages two half-batch gradients, one process takes the mean over the whole batch:
# equal up to fp32 rounding, which Adam's normalization can grow where a gradient is near 0
# (a wrong reduction moves elements by ~lr = 1e-2).
ATOL, RTOL = 1e-4, 1e-4


def _launch(scenario: str, tmp_path: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", NTO_TEST_CKPT=str(tmp_path / "ckpt"),
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(WORKER), scenario, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (
        f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
        f"--- stderr\n{proc.stderr[-6000:]}")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def references() -> dict:
    """Per policy: one process on the whole global batch ("full") and on its two halves
    accumulated ("halves", the same sum DDP / FSDP2 reduce: bit-identical)."""
    return {policy: {"full": W.reference_run(policy), "halves": W.reference_run(policy, micro=2)}
            for policy in W.DDP_POLICIES}


def _assert_params(got: dict, want: dict, exact: bool = False) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=RTOL,
                                       msg=lambda m, n=name: f"{n}: {m}")


def _assert_near_full(policy: str, got: dict, want: dict) -> None:
    """Against the one-process run on the whole batch. Without moments (state_dtype="none")
    each update is ~lr * sign(g): an element whose gradient is ~0 may flip sign between the
    two sums' roundings and move 2 lr apart, so a few such elements are allowed there (the
    halves, the same sum, are compared bit for bit)."""
    if W.DDP_POLICIES[policy].get("state_dtype") not in ("none", *W.QUANT):
        _assert_params(got, want)
        return
    _assert_few_far(got, want, 1e-3)


def _assert_few_far(got: dict, want: dict, share: float) -> None:
    far = sum(int(((got[n] - want[n]).abs() > ATOL + RTOL * want[n].abs()).sum()) for n in want)
    assert far <= share * sum(t.numel() for t in want.values()), far


def _clipped(policy: str) -> bool:
    return W.POLICY_KW[policy].get("max_grad_norm") is not None


def _switched(active: list) -> bool:
    return len({tuple(a) for a in active}) > 1


@pytest.fixture(scope="module")
def all_results(tmp_path_factory) -> list[dict]:
    """One torchrun launch for every scenario (process start-up is most of the cost)."""
    return _launch("all", tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def ddp_results(all_results) -> list[dict]:
    return [r["ddp"] for r in all_results]


@pytest.mark.parametrize("policy", list(W.DDP_POLICIES))
def test_ddp_matches_one_process(ddp_results, references, policy):
    """"rows": tensors larger than the budget train a range of rows at a time; their dense
    gradients are averaged by DDP after NTO's hook, so NTO reduces them at step()."""
    r0, r1 = (r[policy] for r in ddp_results)
    ref = references[policy]["full"]
    assert _switched(ref["active"]), "the run must cross a switch of the active set"
    if policy in W.DDP_ONLY:
        assert ref["split"] == ["lm_head.weight", "model.embed_tokens.weight"]
        assert any("model.embed_tokens.weight" in a for a in ref["active"])
    assert r0["active"] == r1["active"] == ref["active"]
    _assert_params(r0["params"], r1["params"], exact=True)  # same bits on both ranks
    _assert_near_full(policy, r0["params"], ref["params"])
    _assert_params(r0["params"], references[policy]["halves"]["params"], exact=True)
    # DDP's buckets cover the whole model (all params required grad when it was wrapped)
    total = sum(p.numel() * p.element_size() for p in ref["params"].values())
    assert r0["ddp"]["bucket_bytes"] == total  # 4x the 25% NTO trains
    # told the DDP module, NTO's memory report has the buckets next to its own state
    assert r0["report"]["ddp_bucket_bytes"] == total
    assert r0["report"]["total_bytes"] < total
    assert r0["ddp"]["find_unused_parameters"] is True


def test_ddp_misconfiguration_refused(ddp_results):
    msg = ddp_results[0]["refused"]
    assert msg is not None and "find_unused_parameters=True" in msg


def test_trainer_ddp(ddp_results):
    t0, t1 = (r["trainer"] for r in ddp_results)
    assert t0["wrapped"] == "DistributedDataParallel"
    _assert_params(t0["params"], t1["params"], exact=True)
    logs = [h for h in t0["log_history"] if "loss" in h]
    assert logs and all("nto/state_bytes" in h and "nto/ddp_bucket_bytes" in h for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.fixture(scope="module")
def fsdp_results(all_results) -> list[dict]:
    return [r["fsdp2"] for r in all_results]


@pytest.mark.parametrize("policy", list(W.POLICY_KW))
def test_fsdp2_matches_one_process(fsdp_results, references, policy):
    r0, r1 = (r[policy] for r in fsdp_results)
    ref = references[policy]["full"]
    assert r0["active"] == r1["active"] == ref["active"]
    _assert_params(r0["params"], r1["params"], exact=True)
    _assert_near_full(policy, r0["params"], ref["params"])
    # bit-identical unless clipping: FSDP2 sums the squared norm shard by shard, in another
    # order than one process, so the clip coefficient may differ in its last bits
    clipped = _clipped(policy)
    _assert_params(r0["params"], references[policy]["halves"]["params"], exact=not clipped)
    if clipped:  # NTO's max_grad_norm: one norm over all shards, the same on every rank
        assert r0["last_grad_norm"] == r1["last_grad_norm"]
        want = references[policy]["halves"]["last_grad_norm"]
        assert r0["last_grad_norm"] == pytest.approx(want, rel=1e-5)
    # each rank holds half of every parameter (FSDP2 shards dim 0; tiny pads aside)
    total = sum(p.numel() for p in ref["params"].values())
    assert r0["local_numel"] + r1["local_numel"] == total


@pytest.mark.parametrize("policy", list(W.QUANT))
def test_fsdp2_quantized_state(fsdp_results, references, policy):
    """8- and 4-bit moments on FSDP2 shards: every rank agrees; the blocks are the shards'
    (a norm weight of 32 elements is one block in one process, two halves here), so the run
    is near the one-process run, not equal to it."""
    r0, r1 = (r[policy] for r in fsdp_results)
    ref = references[policy]["full"]
    assert _switched(ref["active"])
    assert r0["active"] == r1["active"] == ref["active"]
    _assert_params(r0["params"], r1["params"], exact=True)
    _assert_few_far(r0["params"], ref["params"], 1e-2)
    halves = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]  # each rank's mean
    assert halves == pytest.approx(ref["losses"], rel=1e-3)
    # saved as one row per shard (DCP would write a plain tensor once, from one rank)
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(r0["checkpoint"]).read_metadata().state_dict_metadata
    rows = [k for k in meta if k.endswith(".rows_per_shard")]
    assert rows and all(meta[k].size[0] == 2 for k in rows)


@pytest.mark.parametrize("policy", list(W.QUANT))
def test_fsdp2_quantized_checkpoint_refused_on_other_sharding(fsdp_results, policy):
    """The quantized state saved on 2 shards, loaded by one unsharded process: refused by
    name before anything is loaded (the blocks belong to their shard)."""
    from nto_ext import NTO
    from nto_ext.distributed import load_optimizer_state

    model = W.tiny_llama()
    opt = NTO(model.named_parameters(), lr=W.LR, **W.QUANT[policy])
    before = opt.state_dict()
    with pytest.raises(ValueError, match="saved on 2 FSDP2 shards; this run has not sharded"):
        load_optimizer_state(model, opt, fsdp_results[0][policy]["checkpoint"])
    assert opt.state_dict()["nto"] == before["nto"] and not opt.state


@pytest.mark.parametrize("policy", list(W.FSDP_POLICIES))
def test_fsdp2_dcp_roundtrip(fsdp_results, policy):
    for r in fsdp_results:
        res = r[policy]
        _assert_params(res["resumed"], res["params"], exact=True)
        assert res["resumed_losses"] == res["losses"][-len(res["resumed_losses"]):]


def test_fsdp2_params_swapped_after_construction(fsdp_results):
    """NTO built over the plain model, then fully_shard and the optimizer's params swapped
    for the DTensors (accelerate's FSDP2 prepare): NTO follows them."""
    ref = W.reference_run("block", clip=W.SWAP_CLIP)
    r0, r1 = (r["swapped"] for r in fsdp_results)
    assert r0["active"] == r1["active"] == ref["active"]
    _assert_params(r0["params"], r1["params"], exact=True)
    _assert_params(r0["params"], ref["params"])


def test_fsdp2_grad_scaler(fsdp_results):
    """torch's ShardedGradScaler on FSDP2 shards: scaled by a power of two, the run is the
    unscaled one bit for bit; an overflow on one rank is skipped on both (the scaler agrees
    across ranks in its own unscale_, which NTO leaves to it under FSDP2)."""
    for r in fsdp_results:
        _assert_params(r["scaler"]["params"], r["block"]["params"], exact=True)
        assert r["scaler"]["steps"] == W.STEPS
        assert r["scaler_inf"]["steps"] == W.STEPS - 1  # the scaler did not step NTO
        assert r["scaler_inf"]["scale"] == 2.0**15
    _assert_params(fsdp_results[0]["scaler_inf"]["params"],
                   fsdp_results[1]["scaler_inf"]["params"], exact=True)
