"""PyTorch Lightning (DDP and FSDP2 strategies, 2 ranks on gloo) and TRL's SFTTrainer with
NTO (issue 22).

Both packages are optional: these tests skip when they are not installed. To run them:
`pip install --no-deps pytorch-lightning lightning-utilities torchmetrics` (Lightning) and
`pip install trl datasets` (TRL), in the venv that has torch pinned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lightning_worker as LW  # noqa: E402


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _lightning(tmp_path, mode: str) -> tuple[dict, dict]:
    pytest.importorskip("pytorch_lightning")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(HERE / "lightning_worker.py"), str(tmp_path), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stderr[-6000:]}"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["step"] == 2 * LW.EPOCH_STEPS and r0["ckpts"][0].startswith("epoch=0")
    assert _equal(r0["params"], r1["params"])
    for r in (r0, r1):
        # Lightning's checkpoint after epoch 1, resumed: bit-identical
        assert _equal(r["resumed"], r["params"]) and r["resumed_step"] == r["step"]
    return r0, r1


@pytest.mark.distributed
def test_lightning_ddp_checkpoint_resume(tmp_path):
    r0, r1 = _lightning(tmp_path, "ddp")
    assert r0["wrapped"] == "DistributedDataParallel"
    for r in (r0, r1):
        assert r["report"]["peak_total_bytes"] <= r["report"]["budget_bytes"]


@pytest.mark.distributed
def test_lightning_fsdp2_checkpoint_resume(tmp_path):
    """NTOModelParallelStrategy: the model sharded in configure_model, NTO over the shards,
    NTO's state in Lightning's distributed checkpoint (its moments and NTO's own entry),
    resumed bit-identically; each rank holds its share of the budget."""
    r0, r1 = _lightning(tmp_path, "fsdp2")
    keys = r0["saved_keys"]
    assert any(k.startswith("optimizer_0.state.") and k.endswith(".exp_avg") for k in keys)
    assert any(k.startswith("optimizer_0.nto.") for k in keys)
    for r in (r0, r1):
        assert 0 < r["report"]["peak_total_bytes"] <= r["report"]["budget_bytes"] / 2


def test_lightning_fsdp2_refuses_single_file_checkpoints():
    pytest.importorskip("pytorch_lightning")
    from nto_ext.lightning import NTOModelParallelStrategy

    with pytest.raises(ValueError, match="save_distributed_checkpoint=False.*allowed"):
        NTOModelParallelStrategy(save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False"):
        NTOModelParallelStrategy("auto", "auto", False)  # the same, by position
    assert NTOModelParallelStrategy()._save_distributed_checkpoint


@pytest.mark.slow
def test_trl_sft_trainer_smollm2(tmp_path):
    """A few SFTTrainer steps on the packaged SmolLM2-135M with NTOTrainerMixin (slow: a
    135M model on CPU, minutes on 2 cores)."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    from nto_ext import data
    from nto_ext.distributed import nto_of
    from nto_ext.hf import NTOTrainerMixin

    class NTOSFTTrainer(NTOTrainerMixin, SFTTrainer):
        pass

    src = data.resolve_model("smollm2")
    tok = data.load_tokenizer(src)
    torch.manual_seed(0)
    model = data.load_model(src, "lm")
    texts = [f"Question: what is {a} plus {a}? Answer: {2 * a}." for a in range(16)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                     learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
                     save_strategy="no", max_length=32, disable_tqdm=True, seed=0)
    tr = NTOSFTTrainer(model=model, args=args, processing_class=tok,
                       train_dataset=datasets.Dataset.from_dict({"text": texts}),
                       nto_kwargs={"budget": "5%", "switch_every": 2})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.train()
    opt = nto_of(tr.optimizer)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("nto/state_bytes" in h for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    trained = {opt.param_groups[g]["param_names"][j] for g in range(len(opt.param_groups))
               for j in range(len(opt.param_groups[g]["params"]))}
    assert changed and set(changed) <= trained
    report = opt.memory_report()
    assert report["peak_total_bytes"] <= report["budget_bytes"]
    assert report["trainable_elements"] < 0.06 * sum(p.numel() for p in model.parameters())
