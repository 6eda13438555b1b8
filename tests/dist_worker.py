"""Shared tiny model / data for the HF and distributed tests, and the torchrun worker.

`torchrun --standalone --nproc_per_node 2 tests/dist_worker.py SCENARIO OUT_DIR`
runs SCENARIO ("ddp", "fsdp2" or "all": both in one launch) with gloo on CPU and writes
OUT_DIR/rank{r}.pt ({scenario: results}); the
tests in test_distributed.py compare those files with a one-process run of
`reference_run` (same global batch).
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

VOCAB, SEQ, GLOBAL_BATCH = 128, 16, 4
DATA_VOCAB = 16  # the data uses 16 of the 128 tokens: a fast, visible loss drop
STEPS = 6
POLICY_KW = {
    "block": dict(budget="25%", policy="block", switch_every=2),
    # NTO's own clipping: under FSDP2 the norm is summed over the shards of every rank
    "sample": dict(budget="25%", policy="sample", switch_every=2, seed=3, max_grad_norm=0.3),
    # no moments: a switch every step, each update AdamW's first (formats/none.py)
    "none": dict(budget="25%", policy="sample", switch_every=1, seed=3, state_dtype="none"),
}
# DDP only: at 8% the embedding and the head (4,096 elements each, 9% of the model) are
# larger than the budget and train a range of rows at a time (FSDP2 refuses that)
DDP_ONLY = {"rows": dict(budget="8%", policy="block", switch_every=2)}
# blockwise quantized moments: under FSDP2 the blocks are each shard's (not one process's), so
# the run is near the one-process run, not equal to it; DCP saves them as rows per shard
QUANT = {dtype: dict(budget="25%", policy="block", switch_every=2, state_dtype=dtype)
         for dtype in ("int8", "int4")}
DDP_POLICIES = {**POLICY_KW, **DDP_ONLY, **QUANT}
FSDP_POLICIES = {**POLICY_KW, **QUANT}
LR = 1e-2
SWAP_CLIP = 0.3  # the swapped FSDP2 run clips with torch (what Trainer does; DTensor-aware)


def tiny_llama(seed: int = 0):
    """The 4-layer Llama of the team brief, initialized from `seed` (45k params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def sequence(i: int) -> torch.Tensor:
    """Sample i: an arithmetic sequence mod DATA_VOCAB (learnable from two previous tokens)."""
    g = torch.Generator().manual_seed(1000 + i)
    start = int(torch.randint(0, DATA_VOCAB, (1,), generator=g))
    stride = int(torch.randint(1, 3, (1,), generator=g))
    return (start + stride * torch.arange(SEQ)) % DATA_VOCAB


class SeqDataset(torch.utils.data.Dataset):
    """Synthetic causal-LM dataset for Trainer: input_ids == labels."""

    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = sequence(i)
        return {"input_ids": x, "labels": x.clone()}


def global_batch(step: int) -> torch.Tensor:
    return torch.stack([sequence(step * GLOBAL_BATCH + j) for j in range(GLOBAL_BATCH)])


def train_steps(model, opt, steps: range, rank: int = 0, world: int = 1, call_train=True,
                micro: int = 1, clip: float | None = None):
    """Plain loop on this rank's rows of each global batch, in `micro` accumulated
    micro-batches (loss / micro); returns losses and active sets."""
    from nto_ext.distributed import nto_of

    losses, active = [], []
    per = GLOBAL_BATCH // world
    for step in steps:
        rows = global_batch(step)[rank * per:(rank + 1) * per]
        if call_train:
            opt.train()
        total = 0.0
        for x in rows.chunk(micro):
            loss = model(input_ids=x, labels=x).loss
            (loss / micro if micro > 1 else loss).backward()
            total += loss.item() / micro
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
        active.append(list(nto_of(opt).active()))
    return losses, active


def reference_run(policy: str, steps: int = STEPS, micro: int = 1,
                  clip: float | None = None) -> dict:
    """One process, the whole global batch: what DDP / FSDP2 must reproduce. With micro=2
    the batch is taken as two accumulated halves (loss / 2 each), which is exactly the sum
    DDP and FSDP2 form from two ranks' gradients: bit-identical results expected."""
    from nto_ext import NTO

    model = tiny_llama()
    opt = NTO(model.named_parameters(), lr=LR, **DDP_POLICIES[policy])
    losses, active = train_steps(model, opt, range(steps), micro=micro, clip=clip)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "losses": losses, "active": active, "last_grad_norm": opt.last_grad_norm,
            "split": sorted(opt.table.infos[i].name for i in opt.policy.split)}


# ----------------------------------------------------------------------------- scenarios


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def scenario_ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nto_ext import NTO
    from nto_ext.distributed import check_ddp

    out = {}
    for policy in DDP_POLICIES:
        model = tiny_llama()
        # NTO first (it never touches requires_grad here), then wrap: DDP must see every
        # param as trainable, NTO freezes the inactive ones lazily on its first step.
        opt = NTO(model.named_parameters(), lr=LR, **DDP_POLICIES[policy])
        ddp = DDP(model, find_unused_parameters=True)
        info = check_ddp(ddp, opt)  # and tell NTO the DDP module (memory_report)
        # block: first backward before any train()/step() (hooks drop inactive grads);
        # sample: opt.train() before every forward, as Trainer does.
        losses, active = train_steps(ddp, opt, range(STEPS), rank, world,
                                     call_train=(policy == "sample"))
        out[policy] = {"params": {n: _full(p) for n, p in model.named_parameters()},
                       "losses": losses, "active": active, "ddp": info,
                       "last_grad_norm": opt.last_grad_norm,
                       "report": opt.memory_report()}
    try:
        check_ddp(DDP(tiny_llama()))  # find_unused_parameters=False must be refused
        out["refused"] = None
    except ValueError as e:
        out["refused"] = str(e)
    out["trainer"] = _trainer_ddp(rank)
    return out


def _trainer_ddp(rank: int) -> dict:
    """Trainer launched by torchrun (2 processes): accelerate wraps the model in DDP."""
    from transformers import TrainingArguments

    from nto_ext.hf import NTOTrainer

    tmp = tempfile.mkdtemp(prefix=f"nto_tr{rank}_")
    args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=2, max_steps=6,
                             logging_steps=2, learning_rate=LR, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                             ddp_backend="gloo")
    tr = NTOTrainer(model=tiny_llama(), args=args, train_dataset=SeqDataset(),
                    nto_kwargs=dict(budget="25%", policy="block", switch_every=2))
    tr.train()
    return {"params": {n: _full(p) for n, p in tr.model.named_parameters()},
            "log_history": tr.state.log_history,
            "wrapped": type(tr.model_wrapped).__name__}


def _fsdp2_swapped(rank: int, world: int) -> dict:
    """NTO built before fully_shard, then its params swapped for the DTensors, as
    accelerate's FSDP2 prepare does (Accelerator.prepare(model, optimizer)): NTO follows."""
    from torch.distributed.fsdp import fully_shard

    from nto_ext import NTO

    model = tiny_llama()
    opt = NTO(model.named_parameters(), lr=LR, **POLICY_KW["block"])
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    new = dict(model.named_parameters())
    for g in opt.param_groups:
        g["params"] = [new[names[id(p)]] for p in g["params"]]
    losses, active = train_steps(model, opt, range(STEPS), rank, world, clip=SWAP_CLIP)
    return {"params": {n: _full(p) for n, p in model.named_parameters()}, "active": active}


def _fsdp2_grad_scaler(rank: int, world: int, inf_step: int | None) -> dict:
    """POLICY_KW["block"] on FSDP2 under torch's ShardedGradScaler (the AMP recipe); an
    Inf in rank 1's loss at `inf_step`: both ranks must skip that step."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from nto_ext import NTO

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = NTO(model.named_parameters(), lr=LR, **POLICY_KW["block"])
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**16)
    per = GLOBAL_BATCH // world
    for step in range(STEPS):
        x = global_batch(step)[rank * per:(rank + 1) * per]
        loss = model(input_ids=x, labels=x).loss
        if step == inf_step and rank == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return {"params": {n: _full(p) for n, p in model.named_parameters()},
            "steps": opt.step_count, "scale": scaler.get_scale()}


def scenario_fsdp2(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from nto_ext import NTO
    from nto_ext.distributed import load_optimizer_state, save_optimizer_state

    def sharded_model():
        model = tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    out = {"swapped": _fsdp2_swapped(rank, world),
           "scaler": _fsdp2_grad_scaler(rank, world, None),
           "scaler_inf": _fsdp2_grad_scaler(rank, world, 2)}
    ckpt_root = os.environ["NTO_TEST_CKPT"]
    for policy in FSDP_POLICIES:
        model = sharded_model()
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = NTO(model.named_parameters(), lr=LR, **FSDP_POLICIES[policy])
        # save in the middle of a period (switch_every=2): the moments of the active group
        # carry over, so the round trip is tested on real state, not on a fresh switch
        split = 3
        losses, active = train_steps(model, opt, range(split), rank, world)
        # save model + optimizer through DCP, then go on
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )

        path = os.path.join(ckpt_root, policy)
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=path + "/model")
        save_optimizer_state(model, opt, path + "/optim")
        more, active2 = train_steps(model, opt, range(split, STEPS), rank, world)
        # resume: fresh model + NTO, load both, same remaining steps
        model2 = sharded_model()
        opt2 = NTO(model2.named_parameters(), lr=LR, **FSDP_POLICIES[policy])
        msd = {"model": get_model_state_dict(model2)}
        dcp.load(msd, checkpoint_id=path + "/model")
        set_model_state_dict(model2, msd["model"])
        load_optimizer_state(model2, opt2, path + "/optim")
        more2, _ = train_steps(model2, opt2, range(split, STEPS), rank, world)
        out[policy] = {
            "params": {n: _full(p) for n, p in model.named_parameters()},
            "resumed": {n: _full(p) for n, p in model2.named_parameters()},
            "losses": losses + more, "resumed_losses": more2, "active": active + active2,
            "local_numel": sum(p.to_local().numel() for p in model.parameters()),
            "last_grad_norm": opt.last_grad_norm,
            "report": opt.memory_report(), "checkpoint": path + "/optim",
        }
    return out


def main() -> int:
    import torch.distributed as dist

    scenario, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    scenarios = {"ddp": scenario_ddp, "fsdp2": scenario_fsdp2}
    names = list(scenarios) if scenario == "all" else [scenario]
    result = {name: scenarios[name](rank, world) for name in names}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # every rank finishes its collectives before the group goes away (an exit with
    # collectives in flight aborted the process in an earlier probe)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
