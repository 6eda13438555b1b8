"""torchrun worker for the scale-out stacks users launch (issue 22), gloo on CPU:

    torchrun --standalone --nproc_per_node 2 tests/stack_worker.py fsdp2 OUT_DIR
    torchrun --standalone --nproc_per_node 4 tests/stack_worker.py hsdp OUT_DIR

"fsdp2": HF Trainer's own FSDP2 mode (NTOTrainer, checkpoint + resume) and accelerate's plain
loop with an FSDP2 plugin; "hsdp": fully_shard on a 2x2 (replicate x shard) device mesh.
Each rank writes OUT_DIR/rank{r}.pt; tests/test_stacks.py checks them.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_worker as W  # noqa: E402

KW = W.POLICY_KW["block"]
SPLIT = 3  # checkpoint in the middle of a period (switch_every=2): moments carry over


def fsdp_on_cpu() -> None:
    """accelerate enters its FSDP mode only on accelerators: on CPU (MULTI_CPU) it drops the
    FSDP plugin and wraps the model in DDP. Set the state as accelerate sets it on GPUs
    (distributed_type FSDP and the plugin), so Trainer and Accelerator run their real FSDP2
    code (fully_shard in prepare, the param swap, save_fsdp_model, ...) over gloo."""
    import accelerate.state as S
    from accelerate.utils import DistributedType

    init = S.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # later AcceleratorState() calls copy PartialState's MULTI_CPU back: set it again
        plugin = fsdp_plugin or self.__dict__.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    S.AcceleratorState.__init__ = patched


def _reset_accelerate() -> None:
    """A fresh Accelerator state (Trainer and the accelerate loop each build their own)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def _full_params(model) -> dict[str, torch.Tensor]:
    return {n: W._full(p) for n, p in model.named_parameters()}


def _local_state_bytes(opt) -> dict:
    from nto_ext.distributed import nto_of

    r = nto_of(opt).memory_report()
    return {k: r[k] for k in ("total_bytes", "peak_total_bytes", "budget_bytes",
                              "state_bytes", "grad_bytes")}


# ----------------------------------------------------------------------------- Trainer


def _trainer(out: str, trainer_cls=None, state_dict_type: str = "SHARDED_STATE_DICT"):
    from transformers import TrainingArguments

    from nto_ext.hf import NTOTrainer

    _reset_accelerate()
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=2, max_steps=W.STEPS, logging_steps=1,
        learning_rate=W.LR, report_to="none", use_cpu=True, save_strategy="steps",
        save_steps=SPLIT, disable_tqdm=True, seed=0, ddp_backend="gloo", fsdp=True,
        fsdp_config={"version": 2, "state_dict_type": state_dict_type,
                     "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    cls = trainer_cls or NTOTrainer
    return cls(model=W.tiny_llama(), args=args, train_dataset=W.SeqDataset(),
               nto_kwargs=KW)


def trainer_fsdp2(rank: int, out: str, state_dict_type: str = "SHARDED_STATE_DICT",
                  control: bool = True) -> dict:
    """Trainer's FSDP2 mode: 6 steps saving at step 3; a fresh NTOTrainer resumed from
    checkpoint-3; and a control resumed without NTO's state (must differ). The model's
    checkpoint as `state_dict_type` says (NTO's state is DCP-sharded either way)."""
    from nto_ext.hf import NTOTrainer

    class NoOptimizerResume(NTOTrainer):
        def _load_optimizer_and_scheduler(self, checkpoint):
            return None

    root = os.path.join(out, "trainer", state_dict_type)
    tr = _trainer(root, state_dict_type=state_dict_type)
    tr.train()
    res = {"params": _full_params(tr.model), "log_history": tr.state.log_history,
           "wrapped": type(tr.model_wrapped).__name__,
           "param_type": type(next(tr.model.parameters())).__name__,
           "checkpoint": sorted(os.listdir(os.path.join(root, f"checkpoint-{SPLIT}"))),
           "report": _local_state_bytes(tr.optimizer)}
    ckpt = os.path.join(root, f"checkpoint-{SPLIT}")
    tr2 = _trainer(os.path.join(root, "resumed"), state_dict_type=state_dict_type)
    tr2.train(resume_from_checkpoint=ckpt)
    res["resumed"] = _full_params(tr2.model)
    res["resumed_history"] = tr2.state.log_history
    if not control:
        return res
    tr3 = _trainer(os.path.join(root, "control"), NoOptimizerResume, state_dict_type)
    tr3.train(resume_from_checkpoint=ckpt)
    res["control"] = _full_params(tr3.model)
    return res


# ----------------------------------------------------------------------------- accelerate


def _accelerate_model(acc):
    """A fresh model and NTO (built before prepare, as accelerate's examples do), prepared."""
    from nto_ext import NTO

    model = W.tiny_llama()
    opt = NTO(model.named_parameters(), lr=W.LR, **KW)
    model, opt = acc.prepare(model, opt)
    return model, opt


def _accelerate_steps(acc, model, opt, steps: range, rank: int, world: int) -> list[float]:
    per = W.GLOBAL_BATCH // world
    losses = []
    for step in steps:
        x = W.global_batch(step)[rank * per:(rank + 1) * per]
        opt.train()
        loss = model(input_ids=x, labels=x).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def accelerate_fsdp2(rank: int, world: int, out: str) -> dict:
    """accelerate's loop with an FSDP2 plugin: train, save (accelerate's save_fsdp_model +
    nto_ext's save_optimizer_state), go on; a fresh model + NTO resumed from it."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, load_fsdp_model, save_fsdp_model

    from nto_ext.distributed import load_optimizer_state, save_optimizer_state

    _reset_accelerate()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="SHARDED_STATE_DICT")
    acc = Accelerator(fsdp_plugin=plugin, cpu=True)  # cpu: the gloo test; GPUs: leave out
    path = os.path.join(out, "accelerate")
    model, opt = _accelerate_model(acc)
    losses = _accelerate_steps(acc, model, opt, range(SPLIT), rank, world)
    save_fsdp_model(plugin, acc, model, path)
    save_optimizer_state(model, opt, os.path.join(path, "optimizer_nto"))
    losses += _accelerate_steps(acc, model, opt, range(SPLIT, W.STEPS), rank, world)
    model2, opt2 = _accelerate_model(acc)
    load_fsdp_model(plugin, acc, model2, path)
    load_optimizer_state(model2, opt2, os.path.join(path, "optimizer_nto"))
    more = _accelerate_steps(acc, model2, opt2, range(SPLIT, W.STEPS), rank, world)
    return {"params": _full_params(model), "resumed": _full_params(model2),
            "losses": losses, "resumed_losses": more,
            "param_type": type(next(model.parameters())).__name__,
            "report": _local_state_bytes(opt)}


def scenario_fsdp2(rank: int, world: int, out: str) -> dict:
    fsdp_on_cpu()
    return {"trainer": trainer_fsdp2(rank, out),
            "trainer_full": trainer_fsdp2(rank, out, "FULL_STATE_DICT", control=False),
            "accelerate": accelerate_fsdp2(rank, world, out)}


# ----------------------------------------------------------------------------- HSDP


def _hsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = W.tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _hsdp_run(mesh, policy: str, rank: int, world: int, nan_at: int | None = None) -> dict:
    """Train `policy` on the 2x2 mesh; with `nan_at`, the last rank alone puts a NaN into
    one element of its local gradient shard at that step (after FSDP's reduction, as a
    fault on one replica would): every rank must skip that step."""
    from nto_ext import NTO

    model = _hsdp_model(mesh)
    opt = NTO(model.named_parameters(), lr=W.LR, **W.POLICY_KW[policy])
    per = W.GLOBAL_BATCH // world
    active, skipped, peak = [], [], 0
    for step in range(W.STEPS):
        x = W.global_batch(step)[rank * per:(rank + 1) * per]
        opt.train()
        model(input_ids=x, labels=x).loss.backward()
        if step == nan_at and rank == world - 1:
            g = next(p.grad for p in model.parameters() if p.grad is not None
                     and p.grad.to_local().numel())
            g.to_local().view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad()
        peak = max(peak, opt.memory_report()["peak_total_bytes"])
        active.append(list(opt.active()))
        skipped.append(opt.skipped_steps)
    return {"params": _full_params(model), "active": active, "skipped": skipped,
            "budget_bytes": opt.budget_bytes(), "peak_total_bytes": peak,
            "last_grad_norm": opt.last_grad_norm,
            "local_numel": sum(p.to_local().numel() for p in model.parameters()),
            "placements": [str(pl) for pl in next(model.parameters()).placements]}


def scenario_hsdp(rank: int, world: int, out: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    assert world == 4, "HSDP runs as 2 replicas x 2 shards: --nproc_per_node 4"
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    # sample clips with NTO's max_grad_norm: the norm too must agree across the mesh
    return {"block": _hsdp_run(mesh, "block", rank, world),
            "nan": _hsdp_run(mesh, "sample", rank, world, nan_at=2)}


def main() -> int:
    import torch.distributed as dist

    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"fsdp2": scenario_fsdp2, "hsdp": scenario_hsdp}[scenario](rank, world, out)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
