"""NTO inside transformers.Trainer on a tiny Llama from config (CPU, no hub)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.training_args import ParallelMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker as W  # noqa: E402

from nto_ext import NTO  # noqa: E402
from nto_ext.hf import (  # noqa: E402
    NTOCallback,
    NTOTrainer,
    TrainerNTO,
    check_trainer_args,
    enable_checkpoint_input_grads,
    nto_of,
    nto_optimizer,
)

POLICIES = ["block", "sample", "sparse"]


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                logging_steps=3, learning_rate=1e-2, weight_decay=0.01, report_to="none",
                use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _policy_kwargs(policy: str) -> dict:
    return dict(budget="25%", policy=policy, switch_every=3)


def _skip_if_missing(policy: str) -> None:
    try:
        NTO(W.tiny_llama().named_parameters(), **_policy_kwargs(policy))
    except (ValueError, NotImplementedError) as e:
        if policy == "sparse":
            pytest.skip(f"policy 'sparse' not available yet: {e}")
        raise


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("policy", POLICIES)
def test_trainer_factory(tmp_path, policy):
    _skip_if_missing(policy)
    model = W.tiny_llama()
    args = _args(tmp_path)
    tr = Trainer(model=model, args=args, train_dataset=W.SeqDataset(),
                 optimizer_cls_and_kwargs=nto_optimizer(model, args, **_policy_kwargs(policy)),
                 callbacks=[NTOCallback()])
    tr.train()
    opt = nto_of(tr.optimizer)
    assert isinstance(opt, TrainerNTO) and tr.optimizer is not opt  # AcceleratedOptimizer
    # Trainer's decay / no-decay groups, hyper-parameters from TrainingArguments
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["initial_lr"] == 1e-2 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)
    losses = _losses(tr)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.15, losses
    logs = [h for h in tr.state.log_history if "loss" in h]
    for h in logs:
        for key in ("nto/grad_bytes", "nto/state_bytes", "nto/trainable_elements",
                    "nto/density", "nto/active"):
            assert key in h, (key, h)
        assert h["nto/trainable_elements"] <= h["nto/budget_elements"]
        assert 0 < h["nto/density"] <= 0.25
        # the active grads' norm as NTO measured it (sparse frees the dense grads in its
        # hooks: Trainer's own grad_norm sees none there)
        assert 0 < h["nto/grad_norm"] < float("inf"), h
    if policy != "sparse":  # blocks follow the model's layer names, and they switch
        assert len({h["nto/active"] for h in logs}) > 1
        assert any("layers" in h["nto/active"] for h in logs)


def test_optimizers_tuple_and_mixin(tmp_path):
    model = W.tiny_llama()
    opt = NTO(model.named_parameters(), lr=1e-2, **_policy_kwargs("block"))
    tr = Trainer(model=model, args=_args(tmp_path), train_dataset=W.SeqDataset(),
                 optimizers=(opt, None), callbacks=[NTOCallback()])
    tr.train()
    assert nto_of(tr.optimizer) is opt
    a = _losses(tr)
    seen = []

    class Reporter(TrainerCallback):  # stands for TensorBoard / W&B: numbers only
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    tr2 = NTOTrainer(model=W.tiny_llama(), args=_args(tmp_path), train_dataset=W.SeqDataset(),
                     nto_kwargs=_policy_kwargs("block"), callbacks=[Reporter()])
    tr2.train()
    metrics = tr2.evaluate(eval_dataset=W.SeqDataset(8))  # calls optimizer.eval()
    assert "eval_loss" in metrics and not any(k.startswith("nto/") for k in metrics)
    b = _losses(tr2)
    assert a[-1] < a[0] - 0.15 and b[-1] < b[0] - 0.15
    # the mixin adds the numbers in log(): every log entry and every callback has them
    assert all("nto/state_bytes" in h and "nto/active" in h
               for h in tr2.state.log_history if "loss" in h)
    assert seen and all("nto/trainable_elements" in h for h in seen if "eval_loss" not in h)
    assert not any(isinstance(v, str) for h in seen for v in h.values())


@pytest.mark.parametrize("policy,extra", [("block", {}), ("sample", {}),
                                          ("block", {"budget": "8%", "order": "descending"}),
                                          ("sparse", {"state_dtype": "int8"})])
def test_resume_bit_identical(tmp_path, policy, extra):
    """Accumulation 4, clipping at 1.0, cosine schedule, checkpoint at step 3 of 6, in the
    middle of a period (switch_every=2): moments, schedule position and data order resume
    (sparse with 8-bit moments: across a drop and regrowth at step 4; block at 8%, descending:
    steps 2-3 train a range of the head's rows, whose compact gradient Trainer's
    model.zero_grad() cannot clear)."""
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=6,
              max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=1,
              save_strategy="steps", save_steps=3, logging_steps=1)

    def run(out, resume=None):
        model = W.tiny_llama()
        args = _args(out, **kw)
        tr = Trainer(model=model, args=args, train_dataset=W.SeqDataset(),
                     optimizer_cls_and_kwargs=nto_optimizer(
                         model, args, **dict(_policy_kwargs(policy), switch_every=2,
                                             **extra)),
                     callbacks=[NTOCallback()])
        tr.train(resume_from_checkpoint=resume)
        return tr

    full = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists()
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # plain tensors and ints
    resumed = run(tmp_path / "b", resume=str(ckpt))
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    a = [h for h in full.state.log_history if "loss" in h and h["step"] > 3]
    b = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    assert len(a) == len(b) == 3
    assert [h["nto/active"] for h in a] == [h["nto/active"] for h in b]
    moved = "nto/trainable_elements" if policy == "sparse" else "nto/active"  # a drop
    assert len({h[moved] for h in full.state.log_history if "loss" in h}) > 1


def test_accumulation_matches_big_batch(tmp_path):
    """4 micro-batches of 2 == one batch of 8 (mean losses of equal-length rows)."""
    def run(bs, ga):
        model = W.tiny_llama()
        args = _args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     max_steps=4, max_grad_norm=1.0)
        tr = Trainer(model=model, args=args, train_dataset=W.SeqDataset(),
                     optimizer_cls_and_kwargs=nto_optimizer(model, args, **_policy_kwargs("block")))
        tr.train()
        return dict(model.named_parameters())

    a, b = run(2, 4), run(8, 1)
    # Equal up to fp32 summation order; Adam's update has size ~lr wherever the gradient is
    # non-zero, so a micro-batch lost or counted twice would move many elements by ~1e-2.
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-4, rtol=1e-4)


def test_bf16_autocast(tmp_path):
    model = W.tiny_llama()
    args = _args(tmp_path, bf16=True, max_steps=6)
    tr = Trainer(model=model, args=args, train_dataset=W.SeqDataset(),
                 optimizer_cls_and_kwargs=nto_optimizer(model, args, **_policy_kwargs("block")),
                 callbacks=[NTOCallback()])
    tr.train()
    losses = _losses(tr)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_frozen_layers(tmp_path, reentrant):
    """Checkpointed layers train when what is below them is frozen, and the run equals one
    without checkpointing."""
    def run(ckpt):
        model = W.tiny_llama()
        args = _args(tmp_path, max_steps=6, activation_checkpointing=ckpt,
                     activation_checkpointing_kwargs={"use_reentrant": reentrant})
        tr = Trainer(model=model, args=args, train_dataset=W.SeqDataset(),
                     optimizer_cls_and_kwargs=nto_optimizer(
                         model, args, budget="22%", policy="block", switch_every=2,
                         order="descending"))
        tr.train()
        return model

    plain, ckpt = run(False), run(True)
    assert not hasattr(ckpt, "_require_grads_hook") or ckpt._require_grads_hook is None
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # layers trained while everything below them was frozen (descending order)
    moved = [n for (n, p), q in zip(W.tiny_llama().named_parameters(), ckpt.parameters())
             if not torch.equal(p, q)]
    assert any("layers." in n for n in moved), moved


def test_checkpoint_input_grads_unit():
    """The failure it fixes: reentrant checkpointing, only layer 2 trains, frozen head."""
    model = W.tiny_llama()
    model.train()
    x = W.global_batch(0)
    for n, p in model.named_parameters():
        p.requires_grad_("layers.2." in n)
    model(input_ids=x, labels=x).loss.backward()
    ref = model.model.layers[2].mlp.down_proj.weight.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    with pytest.raises(RuntimeError, match="does not require grad"):
        model(input_ids=x, labels=x).loss.backward()
    handles = enable_checkpoint_input_grads(model)
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight.grad, ref)
    assert model.model.layers[0].mlp.down_proj.weight.grad is None
    handles.remove()


def test_deepspeed_refused(tmp_path, monkeypatch):
    model = W.tiny_llama()
    fake = types.SimpleNamespace(deepspeed="ds_config.json", learning_rate=1e-3)
    with pytest.raises(RuntimeError, match="DeepSpeed.*FSDP2.*NTOTrainer"):
        nto_optimizer(model, fake)
    args = _args(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch --use_deepspeed
    with pytest.raises(RuntimeError, match="DDP"):
        nto_optimizer(model, args)


def test_fsdp_args_checked(tmp_path, monkeypatch):
    """Trainer's FSDP2 mode needs NTOTrainer / the mixin (its checkpoints carry NTO's state);
    the factory path and FSDP1 are refused before training, naming what to use."""
    model = W.tiny_llama()
    fsdp2 = types.SimpleNamespace(fsdp=True, fsdp_config={"version": 2},
                                  fsdp_plugin_args={"fsdp_version": 2}, learning_rate=1e-3)
    with pytest.raises(ValueError, match="NTOTrainer.*NTOTrainerMixin"):
        nto_optimizer(model, fsdp2)
    check_trainer_args(fsdp2, model, fsdp_checkpoints=True)  # what the mixin passes
    fsdp1 = types.SimpleNamespace(fsdp=True, fsdp_config={"version": 1},
                                  fsdp_plugin_args={"fsdp_version": 1})
    with pytest.raises(ValueError, match="FSDP version 1.*'version': 2"):
        check_trainer_args(fsdp1, model, fsdp_checkpoints=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch, FSDP1 config
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1"):
        nto_optimizer(model, _args(tmp_path))
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="NTOTrainer"):
        nto_optimizer(model, _args(tmp_path))


def test_ddp_settings_checked():
    model = W.tiny_llama()
    ddp = dict(parallel_mode=ParallelMode.DISTRIBUTED, fsdp=None, deepspeed=None)
    bad = types.SimpleNamespace(ddp_find_unused_parameters=False, **ddp)
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        check_trainer_args(bad, model)
    ckpt = types.SimpleNamespace(ddp_find_unused_parameters=None, gradient_checkpointing=True,
                                 **ddp)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=True"):
        check_trainer_args(ckpt, model)
    static = types.SimpleNamespace(ddp_find_unused_parameters=True, ddp_static_graph=True, **ddp)
    with pytest.raises(ValueError, match="static_graph"):
        check_trainer_args(static, model)
    check_trainer_args(types.SimpleNamespace(ddp_find_unused_parameters=None, **ddp), model)


def test_nto_of_rejects_other_optimizers():
    with pytest.raises(TypeError, match="nto_optimizer"):
        nto_of(torch.optim.SGD(W.tiny_llama().parameters(), lr=0.1))


def test_replaced_params_refused(tmp_path):
    """accelerate's FSDP2 prepare swaps the params in param_groups: a clear error, not a
    KeyError deep inside NTO (docs/hf_notes.md N2)."""
    model = W.tiny_llama()
    cls, kw = nto_optimizer(model, _args(tmp_path), budget="25%")
    opt = cls([p for p in model.parameters()], **kw)
    opt.param_groups[0]["params"] = [torch.nn.Parameter(p.detach().clone())
                                     for p in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match="replaced after NTO was built"):
        opt.train()


def test_frozen_params_named(tmp_path, caplog):
    model = W.tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    args = _args(tmp_path, max_steps=1)
    tr = Trainer(model=model, args=args, train_dataset=W.SeqDataset(),
                 optimizer_cls_and_kwargs=nto_optimizer(model, args, budget="25%"))
    with caplog.at_level("WARNING", logger="nto_ext.hf"):
        tr.train()
    assert "model.embed_tokens.weight" in caplog.text
    assert "model.embed_tokens.weight" not in nto_of(tr.optimizer).param_groups[0]["param_names"]


def test_distributed_helpers_reexported():
    """User code and older READMEs import the torch-only helpers from nto_ext.hf: the same
    objects as nto_ext.distributed's (one implementation)."""
    import nto_ext.distributed as dist
    import nto_ext.hf as hf

    legacy = ("check_ddp", "ddp_bucket_bytes", "load_optimizer_state", "nto_of",
              "save_optimizer_state", "track_ddp")  # what nto_ext.hf had before the split
    for name in legacy:
        assert name in dist.__all__, name
        assert getattr(hf, name) is getattr(dist, name), name
        assert name in hf.__all__, name


def test_trainer_args_checked_once(tmp_path, monkeypatch):
    """Factory path: nto_optimizer checks TrainingArguments (DeepSpeed, DDP) once; neither
    TrainerNTO nor the callback repeats it. A bare NTO with the callback is checked there."""
    import nto_ext.hf as hf

    calls = []
    real = hf.check_trainer_args
    monkeypatch.setattr(hf, "check_trainer_args", lambda *a: calls.append(a) or real(*a))
    model = W.tiny_llama()
    args = _args(tmp_path, max_steps=1)
    tr = Trainer(model=model, args=args, train_dataset=W.SeqDataset(),
                 optimizer_cls_and_kwargs=nto_optimizer(model, args, budget="25%"),
                 callbacks=[NTOCallback()])
    tr.train()
    assert len(calls) == 1
    bare = NTO(model.named_parameters(), budget="25%")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        NTOCallback().on_train_begin(args, None, None, model=model, optimizer=bare)
    assert len(calls) == 2
