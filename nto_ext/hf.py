"""HuggingFace Trainer integration: the optimizer factory, NTOTrainer / its mixin, the
logging callback and the gradient-checkpointing hooks.

Three ways to use NTO with `transformers.Trainer` (all keep Trainer's decay / no-decay
param groups and take lr, betas, eps, weight decay from `TrainingArguments` unless given):

    Trainer(..., optimizer_cls_and_kwargs=nto_optimizer(model, args, budget="10%"),
            callbacks=[NTOCallback()])
    class MyTrainer(NTOTrainerMixin, Trainer): ...      # or NTOTrainer(..., nto_kwargs={...})
    Trainer(..., optimizers=(NTO(model.named_parameters(), ...), None))   # one process

DDP under Trainer needs `ddp_find_unused_parameters=True` (checked before training).
Trainer's FSDP2 mode (`fsdp=True`, `fsdp_config={"version": 2}`, or `accelerate launch` with
an FSDP2 config) works with `NTOTrainer` / `NTOTrainerMixin`, which save and load NTO's state
through DCP in NTO's own layout (`optimizer_nto/` in each checkpoint): torch's
`get_optimizer_state_dict`, which Trainer uses otherwise, cannot hold it. FSDP1 and DeepSpeed
ZeRO are refused with an error naming the alternatives. The torch-only helpers
(`check_ddp`, `ddp_bucket_bytes`, `save_optimizer_state` / `load_optimizer_state` for
FSDP2, `nto_of`) live in `nto_ext.distributed` and are re-exported here.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME

from .blocks import first_names
from .distributed import (
    check_ddp,
    ddp_bucket_bytes,
    load_optimizer_state,
    nto_of,
    save_optimizer_state,
    track_ddp,
)
from .optimizer import NTO
from .policies import DEFAULT_POLICY, policy_class

log = logging.getLogger(__name__)

__all__ = [
    "NTOCallback", "NTOTrainer", "NTOTrainerMixin", "TrainerNTO", "check_ddp",
    "check_trainer_args", "ddp_bucket_bytes", "enable_checkpoint_input_grads",
    "load_optimizer_state", "nto_metrics", "nto_of", "nto_optimizer", "save_optimizer_state",
    "track_ddp",
]

_DEEPSPEED_MSG = (
    "nto_ext.NTO does not support DeepSpeed ({what}): ZeRO partitions and owns the optimizer "
    "state and gradients, so NTO's budget and active set would be silently wrong. Use torch "
    "DDP (Trainer under torchrun, or accelerate without a DeepSpeed config) for models that "
    "fit one device, or FSDP2 (`torch.distributed.fsdp.fully_shard` on the model, then NTO) "
    "to shard weights (with Trainer: NTOTrainer and fsdp_config={{'version': 2}}); remove the "
    "`deepspeed` argument / accelerate DeepSpeed plugin to go on."
)
# where NTOTrainerMixin puts NTO's optimizer state in a checkpoint under FSDP2 (a DCP folder)
NTO_OPTIMIZER_DIR = "optimizer_nto"


# ----------------------------------------------------------------------------- helpers


def _refuse_deepspeed(args: Any) -> None:
    """Raise RuntimeError if DeepSpeed is enabled through `args` or accelerate. (Trainer's
    `is_deepspeed_enabled` needs no look of its own: accelerate sets ACCELERATE_USE_DEEPSPEED
    whenever it is given a DeepSpeed plugin, and Trainer gives it one from args.deepspeed.)"""
    why = None
    if args is not None and (getattr(args, "deepspeed", None)
                             or getattr(args, "hf_deepspeed_config", None) is not None):
        why = "TrainingArguments.deepspeed is set"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        why = "ACCELERATE_USE_DEEPSPEED is set"
    if why:
        raise RuntimeError(_DEEPSPEED_MSG.format(what=why))


def _ddp_find_unused(args: Any, model: nn.Module | None) -> bool:
    """find_unused_parameters as Trainer will pass it to DDP (trainer.py, accelerator args)."""
    explicit = getattr(args, "ddp_find_unused_parameters", None)
    if explicit is not None:
        return bool(explicit)
    ckpt = bool(getattr(args, "activation_checkpointing", False)
                or getattr(args, "gradient_checkpointing", False))
    if model is not None:
        ckpt = ckpt or _checkpointing_on(model)
    from transformers import PreTrainedModel

    return not ckpt if isinstance(model, PreTrainedModel) else True


def _is_ddp_run(args: Any) -> bool:
    """Trainer will wrap the model in torch DDP (several processes, no FSDP; DeepSpeed was
    refused before)."""
    from transformers.training_args import ParallelMode

    if getattr(args, "parallel_mode", None) != ParallelMode.DISTRIBUTED:
        return False
    return not getattr(args, "fsdp", None)


def _fsdp_version(args: Any) -> int | None:
    """The FSDP version Trainer will run (from `fsdp` / `fsdp_config`, or accelerate's
    environment as `accelerate launch` sets it), None without FSDP."""
    cfg = (getattr(args, "fsdp_config", None) or {}) if args is not None else {}
    if isinstance(cfg, dict) and cfg.get("xla"):
        return 1  # torch_xla's FSDP: wraps like FSDP1
    if args is not None and getattr(args, "fsdp", None):
        plugin = getattr(args, "fsdp_plugin_args", None) or {}
        # transformers' own default: FSDP2 from version 5 on, FSDP1 before
        default = 2 if int(transformers.__version__.split(".")[0]) >= 5 else 1
        return int(plugin.get("fsdp_version", cfg.get("version", default)))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def _check_fsdp(args: Any, fsdp_checkpoints: bool) -> None:
    version = _fsdp_version(args)
    if version is None:
        return
    if version != 2:
        raise ValueError(
            f"NTO does not support FSDP version {version} (FlatParameter / XLA wrapping hides "
            "the parameters NTO switches between). Use FSDP2: fsdp=True with "
            "fsdp_config={'version': 2} in TrainingArguments, or fsdp_version: 2 in the "
            "accelerate config.")
    if not fsdp_checkpoints:
        raise ValueError(
            "Trainer's FSDP2 mode saves optimizer checkpoints through torch's "
            "get_optimizer_state_dict, which cannot hold NTO's state (one rank's shard, no "
            "schedule position). Use nto_ext.hf.NTOTrainer(..., nto_kwargs={...}) or "
            "class MyTrainer(NTOTrainerMixin, Trainer) (also for TRL's SFTTrainer): they save "
            "NTO's state through DCP in its own layout.")


def check_trainer_args(args: Any, model: nn.Module | None = None,
                       fsdp_checkpoints: bool = False) -> None:
    """Raise before training if `args` (TrainingArguments, or None) or the environment ask
    for something NTO cannot do correctly: DeepSpeed, FSDP1, FSDP2 without NTOTrainerMixin's
    checkpoints (`fsdp_checkpoints`), or DDP settings that hang or break."""
    _refuse_deepspeed(args)
    _check_fsdp(args, fsdp_checkpoints)
    if args is None or not _is_ddp_run(args):
        return
    if getattr(args, "ddp_static_graph", None):
        raise ValueError(
            "NTO changes which parameters receive gradients when the active set switches, but "
            "ddp_static_graph=True tells DDP the set never changes. Set ddp_static_graph=False "
            "(and ddp_find_unused_parameters=True) in TrainingArguments.")
    if not _ddp_find_unused(args, model):
        raise ValueError(
            "NTO under DDP needs find_unused_parameters=True: inactive parameters stop "
            "producing gradients after the model is wrapped, and without it DDP waits for them "
            "(reduction never finishes). Trainer turns it off when activation checkpointing is "
            "on; pass ddp_find_unused_parameters=True to TrainingArguments (with the default "
            "non-reentrant checkpointing this is safe).")


# ----------------------------------------------------------------------------- factory


class TrainerNTO(NTO):
    """NTO as Trainer builds it: `TrainerNTO(groups, param_names=..., **nto_kwargs)`.

    Trainer calls `optimizer_cls(groups, **kwargs)` with its decay / no-decay groups of bare
    parameters; `param_names` (id(param) -> name, made by `nto_optimizer`) gives them back
    their names so blocks follow the model's layers. A parameter missing from the map is
    named `param<k>` (it joins the `other` block) and reported in one warning. Build it with
    `nto_optimizer`, which checks TrainingArguments (DeepSpeed, FSDP, DDP) before Trainer
    builds it. `fsdp_checkpoints=True` (set by NTOTrainerMixin, which saves NTO's state
    itself) lets accelerate's FSDP2 prepare swap the params for their DTensors.
    """

    # Trainer clips model.parameters()' grads between backward and step: a tensor training a
    # range of rows keeps its dense grad until step, so the clip sees it (policies/dense.py)
    fold_rows_at_step = True

    def __init__(self, params: Iterable[Any], *, param_names: Mapping[int, str],
                 nto_model: nn.Module | None = None, checkpoint_inputs: bool = True,
                 fsdp_checkpoints: bool = False, **kwargs: Any) -> None:
        groups = _name_groups(params, param_names)
        _warn_frozen(nto_model, groups)
        super().__init__(groups, **kwargs)
        self._built_with = [id(p) for g in self.param_groups for p in g["params"]]
        self._fsdp_checkpoints = fsdp_checkpoints
        if nto_model is not None and checkpoint_inputs and _checkpointing_on(nto_model):
            enable_checkpoint_input_grads(nto_model)

    def _check_params_kept(self) -> None:
        # Trainer's FSDP2 mode: accelerate's prepare swaps the params for DTensors. NTO
        # follows them, but plain Trainer then checkpoints through torch's
        # get/set_optimizer_state_dict, which would save one rank's shard of NTO's moments
        # for all ranks (plain local tensors) and cannot load a changing active set
        # (docs/hf_notes.md N3); NTOTrainerMixin saves through DCP instead. (A backstop:
        # check_trainer_args refuses this from TrainingArguments before training.)
        if self._fsdp_checkpoints:
            return
        now = [id(p) for g in self.param_groups for p in g["params"]]
        if now != self._built_with:
            raise RuntimeError(
                "the parameters in the optimizer's param_groups were replaced after NTO was "
                "built: this is Trainer's FSDP2 mode (accelerate's prepare shards them), whose "
                "optimizer checkpoints cannot hold NTO's state correctly. Use "
                "nto_ext.hf.NTOTrainer or class MyTrainer(NTOTrainerMixin, Trainer) instead of "
                "optimizer_cls_and_kwargs=nto_optimizer(...): they checkpoint NTO through DCP "
                "(README, Multi-GPU).")

    def train(self) -> None:
        self._check_params_kept()
        super().train()

    def step(self, closure: Any = None) -> Any:
        self._check_params_kept()
        return super().step(closure)


def _name_groups(params: Iterable[Any], names: Mapping[int, str]) -> list[dict[str, Any]]:
    """Trainer's groups (dicts of bare params, or a list of params) -> groups of (name, p)."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out, unnamed = [], []
    for g in groups:
        named = []
        for p in g["params"]:
            if isinstance(p, tuple):
                named.append(p)
                continue
            name = names.get(id(p))
            if name is None:
                unnamed.append(tuple(p.shape))
                name = f"param{len(unnamed) - 1}"
            named.append((name, p))
        out.append({**g, "params": named})
    if unnamed:
        log.warning("nto_ext: %d parameters given to the optimizer are not parameters of the "
                    "model passed to nto_optimizer (shapes %s); they are named param<k> and "
                    "train in the 'other' block",
                    len(unnamed), unnamed[:4])
    return out


def _warn_frozen(model: nn.Module | None, groups: list[dict[str, Any]]) -> None:
    """Trainer leaves out params with requires_grad=False; say so (an earlier NTO on the
    same model object leaves its inactive params that way)."""
    if model is None:
        return
    given = {id(p) for g in groups for _, p in g["params"]}
    frozen = [n for n, p in model.named_parameters() if id(p) not in given
              and not p.requires_grad]
    if frozen:
        log.warning("nto_ext: %d parameters have requires_grad=False and Trainer does not "
                    "give them to the optimizer, so NTO will never train them (first: %s). "
                    "If an earlier NTO froze them, set requires_grad=True on the model first.",
                    len(frozen), frozen[0])


def nto_optimizer(model: nn.Module, args: Any = None, **nto_kwargs: Any
                  ) -> tuple[type[TrainerNTO], dict[str, Any]]:
    """`(cls, kwargs)` for `Trainer(..., optimizer_cls_and_kwargs=...)`.

    lr, betas, eps and weight_decay come from `args` (TrainingArguments) unless given in
    `nto_kwargs`; Trainer's no-decay group keeps weight_decay 0. Other keyword arguments go
    to `NTO` (budget, policy, switch_every, ...). For the sparse policy, `max_grad_norm`
    defaults to `args.max_grad_norm` (its compact gradients are invisible to Trainer's
    clipping). `checkpoint_inputs=False` leaves gradient checkpointing's input handling as
    transformers set it (see `enable_checkpoint_input_grads`).
    Raises at once if `args` enable DeepSpeed, FSDP (Trainer's FSDP2 mode needs
    `NTOTrainer` / `NTOTrainerMixin` for its checkpoints), or DDP settings NTO cannot work
    with (the one check of the factory and mixin paths: TrainerNTO is built from what this
    returns).
    """
    return _trainer_optimizer(model, args, False, nto_kwargs)


def _trainer_optimizer(model: nn.Module, args: Any, fsdp_checkpoints: bool,
                       nto_kwargs: Mapping[str, Any]) -> tuple[type[TrainerNTO], dict[str, Any]]:
    check_trainer_args(args, model, fsdp_checkpoints)
    kwargs = dict(nto_kwargs)
    if args is not None:
        kwargs.setdefault("lr", args.learning_rate)
        kwargs.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        kwargs.setdefault("eps", args.adam_epsilon)
        kwargs.setdefault("weight_decay", args.weight_decay)
        # a policy with compact gradients frees the dense ones in backward: Trainer's own
        # clipping sees none, so NTO clips (as NTO's docstring says)
        if policy_class(kwargs.get("policy", DEFAULT_POLICY)).compact_grads \
                and args.max_grad_norm:
            kwargs.setdefault("max_grad_norm", args.max_grad_norm)
        if kwargs.get("step_in_backward"):
            _check_step_in_backward_args(args)
    names = {id(p): n for n, p in model.named_parameters()}
    # not "params" / "model": Trainer treats those keys as replacements for its groups
    kwargs.update(param_names=names, nto_model=model, fsdp_checkpoints=fsdp_checkpoints)
    return TrainerNTO, kwargs


def _check_step_in_backward_args(args: Any) -> None:
    """What Trainer does between backward and step() that step_in_backward (each param
    updated in backward) would make silently wrong."""
    bad = [(f"gradient_accumulation_steps={args.gradient_accumulation_steps}",
            "gradient_accumulation_steps=1 (each backward updates the params)")
           if args.gradient_accumulation_steps > 1 else None,
           (f"max_grad_norm={args.max_grad_norm}", "max_grad_norm=0 (Trainer would clip "
            "gradients that are already used and freed)") if args.max_grad_norm else None,
           ("fp16=True", "bf16=True or fp32 (fp16's loss scaler unscales the gradients "
            "after backward)") if args.fp16 else None]
    for given, allowed in filter(None, bad):
        raise ValueError(f"TrainingArguments {given} with step_in_backward=True; allowed: "
                         f"{allowed}")


# ----------------------------------------------------------------------------- metrics


def nto_metrics(optimizer: Any) -> dict[str, float | int | str]:
    """What NTOCallback logs: `nto/<key>` numbers from `memory_report()` (bytes, elements),
    density (trainable / all elements), skipped steps, the last step's L2 norm of the
    active gradients before clipping (`nto/grad_norm`, when NTO measured it: a non-finite
    check or max_grad_norm) and `nto/active` (a short string)."""
    opt = nto_of(optimizer)
    out: dict[str, float | int | str] = {}
    report = opt.memory_report()
    for k, v in report.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[f"nto/{k}"] = v
    total = _total_elements(opt)
    trainable = report.get("trainable_elements")
    if isinstance(trainable, (int, float)) and total:
        out["nto/density"] = float(trainable) / total
    skipped = getattr(opt, "skipped_steps", None)
    if isinstance(skipped, int):
        out["nto/skipped_steps"] = skipped
    norm = getattr(opt, "last_grad_norm", None)
    if isinstance(norm, float):  # measured when NTO checks or clips: under policy="sparse"
        out["nto/grad_norm"] = norm  # Trainer's own grad_norm sees no (freed) dense grads
    active = list(opt.active())
    out["nto/active"] = first_names(active, 3)
    return out


def _total_elements(opt: NTO) -> int:
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def _add_numbers(logs: dict[str, Any], metrics: Mapping[str, Any]) -> None:
    """The numeric metrics into Trainer's `logs` (reporting callbacks take numbers only)."""
    logs.update({k: v for k, v in metrics.items() if not isinstance(v, str)})


def _add_to_history(state: Any, metrics: Mapping[str, Any]) -> None:
    """All metrics (the active set's name too) into this step's entry of log_history."""
    history = state.log_history
    if metrics and history and history[-1].get("step") == state.global_step:
        history[-1].update(metrics)


class NTOCallback(TrainerCallback):
    """Adds NTO's measured numbers to Trainer's logs at every logging step.

    Keys: `nto/grad_bytes`, `nto/state_bytes`, ... (everything numeric in
    `memory_report()`), `nto/density`, `nto/skipped_steps`, and the string `nto/active`
    (in `trainer.state.log_history` only: TensorBoard and W&B take numbers). Reporting
    callbacks that run after this one get the numbers too; Trainer runs user callbacks
    after its reporting ones, so for TensorBoard / W&B use `NTOTrainerMixin` (it adds them
    before any callback runs) or `trainer.callback_handler.callbacks.insert(0, NTOCallback())`.
    It also checks at train start that DeepSpeed is off and DDP can work.
    """

    def __init__(self) -> None:
        self._opt: Any = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not isinstance(_maybe_nto(optimizer), TrainerNTO):  # else nto_optimizer checked
            check_trainer_args(args, model)
        self._opt = optimizer
        if optimizer is not None:
            opt = nto_of(optimizer)
            log.info("nto_ext: training %s", first_names(list(opt.active()), 3))

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = optimizer if optimizer is not None else self._opt
        if opt is None or logs is None:
            return
        if any(k.startswith("nto/") for k in logs):
            return  # NTOTrainerMixin.log already added them
        metrics = nto_metrics(opt)
        _add_numbers(logs, metrics)
        _add_to_history(state, metrics)  # Trainer appended this step's logs before on_log


# ----------------------------------------------------------------------------- mixin


class NTOTrainerMixin:
    """`class MyTrainer(NTOTrainerMixin, Trainer)`: builds NTO in `create_optimizer` (from
    `self.nto_kwargs`, Trainer's param groups and `self.args`) and adds NTO's numbers to
    every `log()` call, so log_history and all reporting callbacks get them."""

    nto_kwargs: dict[str, Any] = {}

    def __init__(self, *args: Any, nto_kwargs: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if nto_kwargs is not None:
            self.nto_kwargs = dict(nto_kwargs)

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None:
            self.optimizer_cls_and_kwargs = _trainer_optimizer(
                self.model if model is None else model, self.args, True, self.nto_kwargs)
        return super().create_optimizer(model)

    def _nto_fsdp(self) -> bool:
        """FSDP2 with NTO: the optimizer state goes through DCP in NTO's own layout."""
        return bool(getattr(self, "is_fsdp_enabled", False)) and \
            _maybe_nto(self.optimizer) is not None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._nto_fsdp():
            return super()._save_optimizer_and_scheduler(output_dir)
        # what Trainer's FSDP branch does, with NTO's optimizer layout: the (sharded) model
        # checkpoint is written here too, through the functions Trainer itself calls
        import transformers.trainer as hf_trainer

        hf_trainer.save_fsdp_model(self.accelerator.state.fsdp_plugin, self.accelerator,
                                   self.model, output_dir, **hf_trainer.get_fsdp_ckpt_kwargs())
        save_optimizer_state(self.model, self.optimizer,
                             os.path.join(output_dir, NTO_OPTIMIZER_DIR))  # every rank
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._nto_fsdp():
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, NTO_OPTIMIZER_DIR)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"resuming Trainer's FSDP2 mode with NTO from {checkpoint!r}, which has no "
                f"{NTO_OPTIMIZER_DIR}/ folder (NTOTrainerMixin writes NTO's state there; this "
                "checkpoint was saved by another optimizer or trainer). Resume from a "
                "checkpoint NTOTrainer saved, or start without resume_from_checkpoint.")
        load_optimizer_state(self.model, self.optimizer, path)
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        metrics: dict[str, Any] = {}
        if (isinstance(_maybe_nto(self.optimizer), NTO)
                and not any(k.startswith("eval_") for k in logs)):
            ddp = self.model_wrapped
            if isinstance(ddp, nn.parallel.DistributedDataParallel):
                track_ddp(self.optimizer, ddp)  # memory_report: ddp_bucket_bytes
            metrics = nto_metrics(self.optimizer)
            _add_numbers(logs, metrics)  # before any callback runs (TensorBoard, W&B, ...)
        super().log(logs, *args, **kwargs)
        _add_to_history(self.state, metrics)


def _maybe_nto(optimizer: Any) -> NTO | None:
    try:
        return nto_of(optimizer)
    except TypeError:
        return None


class NTOTrainer(NTOTrainerMixin, Trainer):
    """`transformers.Trainer` with NTO: `NTOTrainer(..., nto_kwargs={"budget": "10%"})`."""


# ----------------------------------------------------------------------------- checkpointing


def _checkpointing_on(model: nn.Module) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (now a deprecated alias that warns)
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _uses_reentrant(module: nn.Module) -> bool:
    fn = getattr(module, "_gradient_checkpointing_func", None)
    if isinstance(fn, functools.partial):
        # torch.utils.checkpoint's default (use_reentrant=None) is reentrant
        return fn.keywords.get("use_reentrant", None) is not False
    return True


def _input_grad_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Make the checkpointed layer's first positional input require grad when the layer has
    a trainable parameter and nothing below produced a graph (reentrant checkpointing
    otherwise returns an output without grad: the layer silently does not train, or the
    loss has no grad_fn: "element 0 of tensors does not require grad")."""
    if not (getattr(module, "gradient_checkpointing", False) and module.training
            and torch.is_grad_enabled()):
        return None
    if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
        return None
    if args[0].requires_grad or not any(p.requires_grad for p in module.parameters()):
        return None
    return (args[0].detach().requires_grad_(True), *args[1:]), kwargs


class _Handles:
    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def enable_checkpoint_input_grads(model: nn.Module, replace_input_require_grads: bool = True
                                  ) -> _Handles:
    """Gradient checkpointing with layers NTO has frozen, at the cost of trainable layers only.

    Registers a forward pre-hook on each checkpointed layer (transformers'
    `GradientCheckpointingLayer`) using reentrant checkpointing: when the layer has a
    trainable parameter and its input does not require grad, the input is made to require
    grad. With `replace_input_require_grads`, transformers' `enable_input_require_grads`
    hook (embedding outputs always require grad, so backward runs through every frozen
    layer: about 2x backward) is removed. Models without `GradientCheckpointingLayer`
    (older transformers) fall back to `model.enable_input_require_grads()`.
    Returns an object with `.remove()`.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: checkpointing lives in the parent's loop
        GradientCheckpointingLayer = None
    layers = [] if GradientCheckpointingLayer is None else [
        m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        if hasattr(model, "enable_input_require_grads"):
            log.warning("nto_ext: no GradientCheckpointingLayer in %s; falling back to "
                        "enable_input_require_grads (backward also runs through frozen "
                        "layers)", type(model).__name__)
            model.enable_input_require_grads()
        return _Handles([])
    if getattr(model, "_nto_ckpt_handles", None) is not None:
        return model._nto_ckpt_handles
    handles = [m.register_forward_pre_hook(_input_grad_pre_hook, with_kwargs=True)
               for m in layers if _uses_reentrant(m)]
    if replace_input_require_grads and (getattr(model, "_require_grads_hooks", None)
                                        or getattr(model, "_require_grads_hook", None)):
        model.disable_input_require_grads()
    out = _Handles(handles)
    model._nto_ckpt_handles = out
    log.info("nto_ext: gradient checkpointing input grads on %d layers", len(handles))
    return out
