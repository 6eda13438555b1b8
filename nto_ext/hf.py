"""HuggingFace Trainer integration and the helpers multi-process training needs.

Three ways to use NTO with `transformers.Trainer` (all keep Trainer's decay / no-decay
param groups and take lr, betas, eps, weight decay from `TrainingArguments` unless given):

    Trainer(..., optimizer_cls_and_kwargs=nto_optimizer(model, args, budget="10%"),
            callbacks=[NTOCallback()])
    class MyTrainer(NTOTrainerMixin, Trainer): ...      # or NTOTrainer(..., nto_kwargs={...})
    Trainer(..., optimizers=(NTO(model.named_parameters(), ...), None))   # one process

Distributed: DDP needs `find_unused_parameters=True` (inactive params stop producing
gradients after the model was wrapped); `check_ddp` says so, `ddp_bucket_bytes` measures
the reducer's buckets (gradient memory DDP allocates for every param, active or not).
FSDP2 (`fully_shard`) works on local shards; save and load NTO's state with
`save_optimizer_state` / `load_optimizer_state` (torch.distributed.checkpoint).
DeepSpeed ZeRO is refused with an error naming the alternatives.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .optimizer import NTO

log = logging.getLogger(__name__)

__all__ = [
    "NTOCallback", "NTOTrainer", "NTOTrainerMixin", "TrainerNTO", "check_ddp",
    "ddp_bucket_bytes", "enable_checkpoint_input_grads", "load_optimizer_state", "nto_metrics",
    "nto_of", "nto_optimizer", "save_optimizer_state",
]

_DEEPSPEED_MSG = (
    "nto_ext.NTO does not support DeepSpeed ({what}): ZeRO partitions and owns the optimizer "
    "state and gradients, so NTO's budget and active set would be silently wrong. Use torch "
    "DDP (Trainer under torchrun, or accelerate without a DeepSpeed config) for models that "
    "fit one device, or FSDP2 (`torch.distributed.fsdp.fully_shard` on the model, then NTO) "
    "to shard weights; remove the `deepspeed` argument / accelerate DeepSpeed plugin to go on."
)


# ----------------------------------------------------------------------------- helpers


def nto_of(optimizer: Any) -> NTO:
    """The NTO inside `optimizer` (itself, or behind accelerate's AcceleratedOptimizer and
    similar wrappers that keep the wrapped one in `.optimizer`)."""
    seen = optimizer
    for _ in range(8):
        if isinstance(seen, NTO):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise TypeError(f"expected an nto_ext.NTO (or a wrapper with .optimizer), got "
                    f"{type(optimizer).__name__}; build it with nto_ext.hf.nto_optimizer(...)")


def _deepspeed_active(args: Any = None) -> str | None:
    """Why DeepSpeed looks enabled, or None."""
    if args is not None and (getattr(args, "deepspeed", None)
                             or getattr(args, "hf_deepspeed_config", None) is not None):
        return "TrainingArguments.deepspeed is set"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        return "ACCELERATE_USE_DEEPSPEED is set"
    return None


def check_not_deepspeed(args: Any = None) -> None:
    """Raise RuntimeError if DeepSpeed is enabled through `args` or accelerate."""
    why = _deepspeed_active(args)
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
    """Trainer will wrap the model in torch DDP (several processes, no FSDP/DeepSpeed)."""
    from transformers.training_args import ParallelMode

    if getattr(args, "parallel_mode", None) != ParallelMode.DISTRIBUTED:
        return False
    return not getattr(args, "fsdp", None) and not _deepspeed_active(args)


def check_trainer_args(args: Any, model: nn.Module | None = None) -> None:
    """Raise before training if `args` ask for something NTO cannot do correctly."""
    check_not_deepspeed(args)
    if not _is_ddp_run(args):
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
    their names so blocks follow the model's layers. A parameter missing from the map keeps
    no name (it becomes its own block) and is named in one warning.
    """

    def __init__(self, params: Iterable[Any], *, param_names: Mapping[int, str],
                 trainer_args: Any = None, nto_model: nn.Module | None = None,
                 checkpoint_inputs: bool = True, **kwargs: Any) -> None:
        check_not_deepspeed(trainer_args)
        if trainer_args is not None:
            check_trainer_args(trainer_args, nto_model)
        groups = _name_groups(params, param_names)
        _warn_frozen(nto_model, groups)
        super().__init__(groups, **kwargs)
        self._built_with = [id(p) for g in self.param_groups for p in g["params"]]
        if nto_model is not None and checkpoint_inputs and _checkpointing_on(nto_model):
            enable_checkpoint_input_grads(nto_model)

    def _check_params_kept(self) -> None:
        # Trainer's FSDP2 mode: accelerate's prepare swaps the params for DTensors. NTO
        # follows them, but Trainer then checkpoints through torch's
        # get/set_optimizer_state_dict, which would save one rank's shard of NTO's moments
        # for all ranks (plain local tensors) and cannot load a changing active set
        # (docs/hf_notes.md N3).
        now = [id(p) for g in self.param_groups for p in g["params"]]
        if now != self._built_with:
            raise RuntimeError(
                "the parameters in the optimizer's param_groups were replaced after NTO was "
                "built: this is Trainer's FSDP2 mode (accelerate's prepare shards them), whose "
                "optimizer checkpoints cannot hold NTO's state correctly. Use DDP with Trainer "
                "(torchrun without fsdp), or shard the model with "
                "torch.distributed.fsdp.fully_shard in your own loop, build NTO after it and "
                "checkpoint with nto_ext.hf.save_optimizer_state (README, Multi-GPU).")

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
                    "model passed to nto_optimizer (shapes %s); they form one block each",
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
    Raises at once if `args` enable DeepSpeed, or DDP settings NTO cannot work with.
    """
    check_not_deepspeed(args)
    if args is not None:
        check_trainer_args(args, model)
    kwargs = dict(nto_kwargs)
    if args is not None:
        kwargs.setdefault("lr", args.learning_rate)
        kwargs.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        kwargs.setdefault("eps", args.adam_epsilon)
        kwargs.setdefault("weight_decay", args.weight_decay)
        if kwargs.get("policy") == "sparse" and args.max_grad_norm:
            kwargs.setdefault("max_grad_norm", args.max_grad_norm)
    names = {id(p): n for n, p in model.named_parameters()}
    # not "params" / "model": Trainer treats those keys as replacements for its groups
    kwargs.update(param_names=names, trainer_args=args, nto_model=model)
    return TrainerNTO, kwargs


# ----------------------------------------------------------------------------- metrics


def nto_metrics(optimizer: Any) -> dict[str, float | int | str]:
    """What NTOCallback logs: `nto/<key>` numbers from `memory_report()` (bytes, elements),
    density (trainable / all elements), skipped steps, and `nto/active` (a short string)."""
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
    active = list(opt.active())
    out["nto/active"] = _short(active)
    return out


def _total_elements(opt: NTO) -> int:
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def _short(names: list[str], limit: int = 3) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} (+{len(names) - limit})"


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
        check_trainer_args(args, model)
        self._opt = optimizer
        if optimizer is not None:
            opt = nto_of(optimizer)
            log.info("nto_ext: training %s", _short(list(opt.active())))

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = optimizer if optimizer is not None else self._opt
        if opt is None or logs is None:
            return
        metrics = nto_metrics(opt)
        numbers = {k: v for k, v in metrics.items() if not isinstance(v, str)}
        if any(k.startswith("nto/") for k in logs):
            return  # NTOTrainerMixin.log already added them
        logs.update(numbers)
        # Trainer appended {**logs, "step": ...} to log_history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


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
            if getattr(self, "is_deepspeed_enabled", False):
                raise RuntimeError(_DEEPSPEED_MSG.format(what="Trainer.is_deepspeed_enabled"))
            self.optimizer_cls_and_kwargs = nto_optimizer(
                self.model if model is None else model, self.args, **self.nto_kwargs)
        return super().create_optimizer(model)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        metrics: dict[str, Any] = {}
        if (isinstance(_maybe_nto(self.optimizer), NTO)
                and not any(k.startswith("eval_") for k in logs)):
            metrics = nto_metrics(self.optimizer)
            ddp = self.model_wrapped
            if isinstance(ddp, nn.parallel.DistributedDataParallel):
                metrics["nto/ddp_bucket_bytes"] = ddp_bucket_bytes(ddp)
            # numbers for every callback (TensorBoard, W&B take only numbers) ...
            logs.update({k: v for k, v in metrics.items() if not isinstance(v, str)})
        super().log(logs, *args, **kwargs)
        history = self.state.log_history
        if metrics and history and history[-1].get("step") == self.state.global_step:
            history[-1].update(metrics)  # ... and the active set's name in log_history


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


# ----------------------------------------------------------------------------- DDP


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    raise TypeError(f"expected a torch DistributedDataParallel module, got "
                    f"{type(model).__name__}")


def ddp_bucket_bytes(model: nn.Module) -> int:
    """Bytes of DDP's gradient reduction buckets (measured: the reducer's bucket sizes).

    DDP allocates buckets for every parameter that required grad when it was wrapped, so
    these bytes cover the whole model even when NTO trains a small part; they are outside
    NTO's budget (FSDP2 reduces per parameter and shards instead).
    """
    data = _ddp(model)._get_ddp_logging_data()
    sizes = str(data.get("bucket_sizes", "") or "")
    return sum(int(s) for s in sizes.split(",") if s.strip())


def check_ddp(model: nn.Module) -> dict[str, Any]:
    """Check that a DDP-wrapped model works with NTO; return its settings and bucket bytes.

    Raises ValueError if `find_unused_parameters` is False or `static_graph` is on.
    """
    ddp = _ddp(model)
    info = {
        "find_unused_parameters": bool(ddp.find_unused_parameters),
        "static_graph": bool(getattr(ddp, "static_graph", False)),
        "gradient_as_bucket_view": bool(ddp.gradient_as_bucket_view),
        "bucket_bytes": ddp_bucket_bytes(ddp),
    }
    if not info["find_unused_parameters"] or info["static_graph"]:
        raise ValueError(
            f"NTO under DDP needs DistributedDataParallel(model, find_unused_parameters=True) "
            f"and no static_graph (got find_unused_parameters={info['find_unused_parameters']}, "
            f"static_graph={info['static_graph']}): the parameters that receive gradients "
            "change when NTO switches its active set.")
    return info


# ----------------------------------------------------------------------------- FSDP2 / DCP
#
# torch's get_optimizer_state_dict / set_optimizer_state_dict assume a static optimizer: when
# the state is empty they run a fake step (lr=0, zero grads), which would advance NTO's
# schedule, and loading builds its template from the *current* optimizer, whose active set
# (hence its state entries) differs from the saved one; they also keep only "state" and
# "param_groups", dropping NTO's schedule position. So these helpers write the same layout
# (state keyed by parameter FQN, FSDP2 state as DTensors sharded like their params, groups
# with FQNs) plus NTO's own entry, with plain dcp.save / dcp.load, and build the load template
# from the checkpoint's metadata. DCP reshards DTensors: another world size can load it.

_OPT_KEY = "optimizer"


def _param_fqns(model: nn.Module, opt: NTO) -> tuple[list[torch.Tensor], list[str]]:
    """NTO's params in state_dict index order, and their names in `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"{len(missing)} of the optimizer's {len(params)} parameters are not "
                         f"parameters of the given model (first: index {missing[0]}); pass "
                         "the model the optimizer was built on (after fully_shard)")
    return params, [names[id(p)] for p in params]


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _shard_like(v: Any, p: torch.Tensor) -> Any:
    """A local state tensor of a DTensor param, as a DTensor sharded like the param."""
    if not (_is_dtensor(p) and isinstance(v, torch.Tensor) and v.dim() > 0
            and tuple(v.shape) == tuple(p.to_local().shape)):
        return v
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def save_optimizer_state(model: nn.Module, optimizer: Any, path: str) -> None:
    """Save NTO's state to the directory `path` with torch.distributed.checkpoint.

    Every rank calls it. Under FSDP2 each rank writes its shards of the moments; in one
    process (or DDP) it works the same. Load with `load_optimizer_state`.
    """
    import torch.distributed.checkpoint as dcp

    opt = nto_of(optimizer)
    params, fqns = _param_fqns(model, opt)
    sd = opt.state_dict()
    extra = [k for k in sd["state"] if not isinstance(k, int)]
    if extra:  # keys a user or hook put in opt.state: DCP keys the state by param name
        log.warning("nto_ext: save_optimizer_state leaves out non-param keys of opt.state: %s",
                    extra[:4])
    state = {fqns[i]: {k: _shard_like(v, params[i]) for k, v in st.items()}
             for i, st in sd["state"].items() if isinstance(i, int)}
    groups = [{**g, "params": [fqns[j] for j in g["params"]]} for g in sd["param_groups"]]
    dcp.save({_OPT_KEY: {"state": state, "param_groups": groups, "nto": sd["nto"]}},
             checkpoint_id=path)


def _state_template(model: nn.Module, metadata: Any, params: list[torch.Tensor],
                    fqns: list[str]) -> dict[str, dict[str, Any]]:
    """{fqn: {key: empty tensor}} for every state tensor the checkpoint holds; moments of
    DTensor params are DTensors sharded like the param here (DCP reads the right slice)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    by_fqn = dict(zip(fqns, params))
    prefix = f"{_OPT_KEY}.state."
    out: dict[str, dict[str, Any]] = {}
    for key, md in metadata.state_dict_metadata.items():
        if not key.startswith(prefix) or not isinstance(md, TensorStorageMetadata):
            continue
        rest = key[len(prefix):]
        fqn = max((f for f in by_fqn if rest.startswith(f + ".")), key=len, default=None)
        if fqn is None:
            raise ValueError(f"the checkpoint holds optimizer state for {rest!r}, which is not "
                             "a parameter of this model; load it into the model it was saved "
                             "from")
        p, size = by_fqn[fqn], tuple(md.size)
        dtype = md.properties.dtype
        if _is_dtensor(p) and size == tuple(p.shape):
            t = torch.empty_like(p, dtype=dtype)
        else:
            t = torch.empty(size, dtype=dtype, device=getattr(p, "_local_tensor", p).device
                            if size else "cpu")
        out.setdefault(fqn, {})[rest[len(fqn) + 1:]] = t
    return out


def load_optimizer_state(model: nn.Module, optimizer: Any, path: str) -> None:
    """Load what `save_optimizer_state` wrote into `optimizer`, an NTO built with the same
    arguments over the same model (sharded the same way or not: DCP reshards)."""
    import torch.distributed.checkpoint as dcp

    opt = nto_of(optimizer)
    params, fqns = _param_fqns(model, opt)
    # 1) NTO's entry and the groups (small, replicated): the template's structure comes
    #    from this optimizer, whose configuration must match anyway.
    mine = opt.state_dict()
    head = {_OPT_KEY: {"nto": mine["nto"], "param_groups": [
        {**g, "params": [fqns[j] for j in g["params"]]} for g in mine["param_groups"]]}}
    dcp.load(head, checkpoint_id=path)
    # 2) the state tensors the checkpoint has (its active set, not this optimizer's)
    reader = dcp.FileSystemReader(path)
    state = _state_template(model, reader.read_metadata(), params, fqns)
    if state:
        dcp.load({_OPT_KEY: {"state": state}}, checkpoint_id=path)
    index = {f: i for i, f in enumerate(fqns)}
    loaded = head[_OPT_KEY]
    sd = {
        "state": {index[f]: {k: v.to_local() if _is_dtensor(v) else v for k, v in st.items()}
                  for f, st in state.items()},
        "param_groups": [{**g, "params": [index[f] for f in g["params"]]}
                         for g in loaded["param_groups"]],
        "nto": loaded["nto"],
    }
    opt.load_state_dict(sd)
