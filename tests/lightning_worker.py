"""torchrun worker: PyTorch Lightning with NTO (issue 22), gloo on CPU.

    torchrun --standalone --nproc_per_node 2 tests/lightning_worker.py OUT_DIR [ddp|fsdp2]

DDP strategy, or FSDP2 (nto_ext.lightning.NTOModelParallelStrategy, the model sharded in
`configure_model`), `configure_optimizers` returning NTO: 2 epochs of 3 steps, Lightning's
own checkpoint after epoch 1; a fresh module resumed from it (`fit(ckpt_path=...)`) must
end bit-identical to the uninterrupted run. Writes OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_worker as W  # noqa: E402

EPOCH_STEPS = 3  # 2 epochs: 6 steps crossing switches (switch_every=2)


def _module(mode: str):
    import pytorch_lightning as pl

    from nto_ext import NTO

    class TinyLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = W.tiny_llama()

        if mode == "fsdp2":
            def configure_model(self) -> None:  # shard first; NTO is built over the shards
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for layer in self.model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x = batch["input_ids"]
            self.wrapped = type(self.trainer.strategy.model).__name__  # during training
            loss = self.model(input_ids=x, labels=x).loss
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return NTO(self.named_parameters(), lr=W.LR, **W.POLICY_KW["block"])

    return TinyLM()


def _trainer(root: str, epochs: int, mode: str):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import DDPStrategy

    from nto_ext.lightning import NTOModelParallelStrategy

    strategy = (NTOModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
                if mode == "fsdp2" else
                DDPStrategy(find_unused_parameters=True, process_group_backend="gloo"))
    ckpt = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_top_k=-1,
                           every_n_epochs=1, save_on_train_epoch_end=True)
    return pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt],
        strategy=strategy)


def _loader():
    # per rank 2 rows x 3 steps = 12 samples; no shuffling: the same batches on resume
    return torch.utils.data.DataLoader(W.SeqDataset(2 * 2 * EPOCH_STEPS), batch_size=2)


def _params(module) -> dict[str, torch.Tensor]:
    """Whole params (FSDP2's DTensors gathered)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.model.named_parameters()}


def main() -> int:
    import pytorch_lightning as pl

    from nto_ext.distributed import nto_of

    out, mode = sys.argv[1], (sys.argv[2:] or ["ddp"])[0]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    full = _module(mode)
    trainer = _trainer(out, 2, mode)
    trainer.fit(full, _loader())
    opt = nto_of(trainer.optimizers[0])
    res = {"params": _params(full), "step": opt.step_count, "wrapped": full.wrapped,
           "report": opt.memory_report(),
           "ckpts": sorted(os.listdir(os.path.join(out, "ckpt")))}
    first = os.path.join(out, "ckpt", res["ckpts"][0])
    if os.path.isdir(first):  # a distributed checkpoint: which of NTO's entries it holds
        import torch.distributed.checkpoint as dcp

        res["saved_keys"] = sorted(dcp.FileSystemReader(first).read_metadata()
                                   .state_dict_metadata)
    resumed = _module(mode)
    trainer2 = _trainer(os.path.join(out, "resumed"), 2, mode)
    trainer2.fit(resumed, _loader(), ckpt_path=first)
    res["resumed"] = _params(resumed)
    res["resumed_step"] = nto_of(trainer2.optimizers[0]).step_count
    torch.save(res, os.path.join(out, f"rank{trainer.global_rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
