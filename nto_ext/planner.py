"""plan(): what would train, and its memory, without allocating a weight.

Works on an `nn.Module` (real or on the meta device), a transformers `PretrainedConfig`
(the model is built on the meta device) or a local HuggingFace folder / .gguf file. It runs
the optimizer's own block discovery and packing (`policies.make_policy`), so the plan is
exactly what `NTO` will do, and prices it with the memory model of `budget.py`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import data
from .blocks import ParamInfo, discover_blocks, first_names, group_label, param_label
from .budget import FLOAT_DTYPES, format_bytes, parse_budget, state_bytes
from .fit import Fit, check_fit_args, find_fit
from .policies import (
    DEFAULT_POLICY,
    ScheduledPolicy,
    SparsePolicy,
    make_policy,
    validate_policy_args,
)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class PlanBlock:
    name: str
    kind: str
    tensors: int
    elements: int
    nto_bytes: int  # training state of this block under the policy's memory model


@dataclass
class PlanGroup:
    label: str
    names: list[str]
    elements: int
    nto_bytes: int  # grad + state bytes while this group trains (always blocks included)


@dataclass
class Plan:
    """The plan of an NTO run. Bytes are device bytes of training state (grad + moments +
    step scalars) per the memory model; weights are resident and outside the budget."""

    policy: str
    budget: str
    budget_kind: str
    budget_amount: int
    dtype: str
    total_elements: int
    total_tensors: int
    weights_bytes: int
    switch_every: int
    cycle_steps: int
    blocks: list[PlanBlock]
    groups: list[PlanGroup]
    always: list[str]
    trainable_elements: int  # elements that train at some point of the schedule
    nto_bytes: int  # peak over the first cycle
    adamw_bytes: int
    adamw8bit_bytes: int
    untrainable: list[dict[str, Any]] = field(default_factory=list)
    # sparse: chosen share of all elements, the dense gradient alive during backward (one
    # tensor at a time: the largest, bytes, outside nto_bytes) and the regrowth share
    density: float | None = None
    transient_bytes: int = 0
    step_in_backward: bool = False  # gradients used and freed in backward (not in nto_bytes)
    regrow_fraction: float | None = None
    dtype_source: str = ""  # where `dtype` came from: "dtype=", "config torch_dtype", ...
    # how the trained params' state is kept (nto_ext/formats): "fp32", "int8", "bf16",
    # "master", "stochastic" (a mixed-dtype model may have two, "/"-joined)
    state_format: str = "fp32"
    fit: Fit | None = None  # plan(..., fit=MEMORY): why this budget was chosen

    @property
    def largest_untrainable(self) -> str | None:
        return self.untrainable[0]["name"] if self.untrainable else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["largest_untrainable"] = self.largest_untrainable
        d["nto_vs_adamw"] = self.nto_bytes / self.adamw_bytes if self.adamw_bytes else None
        return d

    def __str__(self) -> str:
        kind = "elements" if self.budget_kind == "elements" else "bytes"
        amount = (f"{self.budget_amount:,} elements" if kind == "elements"
                  else format_bytes(self.budget_amount))
        lines = [
            f"NTO plan: policy={self.policy}, budget={self.budget} = {amount}, "
            f"dtype {self.dtype}" + (f" ({self.dtype_source})" if self.dtype_source else ""),
            f"model: {self.total_elements:,} elements in {self.total_tensors} tensors, "
            f"weights {format_bytes(self.weights_bytes)} (resident, outside the budget)",
            f"state format: {self.state_format}" + (f" ({_FORMAT_WORDS[self.state_format]})"
                                                   if self.state_format in _FORMAT_WORDS
                                                   else ""),
            "",
            f"{'block':<36} {'kind':<6} {'tensors':>7} {'elements':>13} {'NTO bytes':>12}",
        ]
        for b in self.blocks:
            lines.append(f"{b.name[:36]:<36} {b.kind:<6} {b.tensors:>7} {b.elements:>13,} "
                         f"{format_bytes(b.nto_bytes):>12}")
        if self.policy == "sparse":
            return "\n".join(lines + self._sparse_lines())
        lines += ["", f"schedule: {len(self.groups)} period(s) of {self.switch_every} steps "
                      f"per cycle ({self.cycle_steps} steps)"
                      + (f"; always trained: {', '.join(self.always)}" if self.always else "")]
        lines.append(f"{'period':>6}  {'trains':<44} {'elements':>13} {'NTO bytes':>12}")
        for k, g in enumerate(self.groups[:40]):
            lines.append(f"{k:>6}  {g.label[:44]:<44} "
                         f"{g.elements:>13,} {format_bytes(g.nto_bytes):>12}")
        if len(self.groups) > 40:
            lines.append(f"{'':>6}  ... {len(self.groups) - 40} more periods")
        ratio = self.nto_bytes / self.adamw_bytes if self.adamw_bytes else float("nan")
        transient = ("(one param's gradient in backward, used and freed there)"
                     if self.step_in_backward else
                     "(a dense gradient in backward, reduced to the rows that train)")
        lines += ["", "training state (optimizer state; step in backward: no gradient kept):"
                  if self.step_in_backward else "training state (grad + optimizer state):",
                  f"  NTO ({self.policy}, peak)  {format_bytes(self.nto_bytes):>12}  "
                  f"({ratio:.3f}x AdamW)",
                  *([f"  + transient         {format_bytes(self.transient_bytes):>12}  "
                     f"{transient}"] if self.transient_bytes else []),
                  f"  AdamW (torch)       {format_bytes(self.adamw_bytes):>12}",
                  f"  8-bit AdamW         {format_bytes(self.adamw8bit_bytes):>12}  (approx.)",
                  f"  trainable over a cycle: {self.trainable_elements:,} of "
                  f"{self.total_elements:,} elements"]
        if self.untrainable:
            shown = [f"{u['name']} ({u['elements']:,} elements)" for u in self.untrainable]
            lines.append(f"  cannot train under policy={self.policy} (larger than the budget): "
                         + first_names(shown, 5))
        return "\n".join(lines)

    def _sparse_lines(self) -> list[str]:
        g = self.groups[0]
        regrow = (f"{math.floor((self.regrow_fraction or 0) * g.elements):,} of them "
                  f"(regrow_fraction {self.regrow_fraction:g}) dropped and regrown every "
                  f"{self.switch_every} steps" if g.elements < self.total_elements
                  and self.regrow_fraction else "no regrowth")
        ratio = self.nto_bytes / self.adamw_bytes if self.adamw_bytes else float("nan")
        both = self.nto_bytes + self.transient_bytes
        return ["", f"selection: {g.elements:,} of {self.total_elements:,} elements "
                    f"({self.density or 0:.2%}), the top by gradient score in any tensor; "
                    f"{regrow}",
                "", "training state (compact grad + moments + index; + master for "
                    "bf16/fp16):",
                f"  NTO (sparse)        {format_bytes(self.nto_bytes):>12}  ({ratio:.3f}x AdamW)",
                f"  + transient         {format_bytes(self.transient_bytes):>12}  (one dense "
                "gradient during backward, or a regrowth's copy of one row)",
                f"  = device peak       {format_bytes(both):>12}  (leave room for the transient "
                "in a byte budget)",
                f"  AdamW (torch)       {format_bytes(self.adamw_bytes):>12}",
                f"  8-bit AdamW         {format_bytes(self.adamw8bit_bytes):>12}  (approx.)",
                f"  trainable: any of the {self.total_elements:,} elements"]


def _non_default_nto_args(given: dict[str, Any]) -> dict[str, Any]:
    """The arguments in `given` whose values differ from NTO's defaults (what a fit's
    suggested NTO(...) call must repeat)."""
    import inspect

    from .optimizer import NTO

    defaults = inspect.signature(NTO).parameters
    return {k: v for k, v in given.items()
            if v != (tuple(d) if isinstance(d := defaults[k].default, (list, tuple)) else d)}


def plan(model_or_config: Any, budget: int | float | str | None = None,
         policy: str = DEFAULT_POLICY,
         dtype: torch.dtype | str | None = None, *, fit: int | str | None = None,
         activation_bytes: int | str | None = None, batch_size: int | None = None,
         seq_len: int | None = None, switch_every: int = 50,
         order: str | None = None, seed: int = 0, always: tuple[str, ...] = (),
         sample_layers: int | None = None, task: str | None = None,
         regrow_fraction: float | None = None, master_weights: bool | None = None,
         stochastic_rounding: bool = False, state_dtype: str = "fp32",
         step_in_backward: bool = False) -> Plan:
    """Plan an NTO run without allocating weights.

    model_or_config: an nn.Module (meta or real), a transformers PretrainedConfig, or a
    local path (HF folder with config.json, or a .gguf file) or packaged model name
    (`nto_ext.data.MODELS`). `dtype` overrides the parameters' dtype (e.g. "bfloat16");
    `task` ("lm" / "classify" / "base") picks the head built from a config (default: causal
    LM for decoder configs, sequence classification else).
    Other keyword arguments are NTO's. Raises what NTO(...) would raise for these args.

    Without `dtype`, a module's parameters keep their dtypes, and a config (or folder) is
    planned in the dtype it names (`torch_dtype`, e.g. bfloat16; float32 when it names
    none); `Plan.dtype_source` says which.

    fit="24GiB" (instead of `budget`): plan at the largest element budget whose predicted
    peak (weights + training state + `activation_bytes` when given + a 5% margin) fits that
    memory; `Plan.fit` says what was counted. Activations are not estimated: without
    `activation_bytes` (your measured peak of one forward/backward at `batch_size` x
    `seq_len`) they are reported as unknown and left out. ValueError if nothing fits.
    """
    if (budget is None) == (fit is None):
        raise ValueError(f"plan(): pass exactly one of budget= (what to train) or fit= (a "
                         f"memory to fit in); got budget={budget!r}, fit={fit!r}")
    if fit is None and (activation_bytes, batch_size, seq_len) != (None, None, None):
        raise ValueError("plan(): activation_bytes, batch_size and seq_len apply with fit= "
                         "only; pass fit='24GiB' (a memory) or drop them")
    memory = check_fit_args(fit, activation_bytes, batch_size, seq_len) if fit is not None \
        else None
    validate_policy_args(policy, switch_every=switch_every, order=order, seed=seed,
                         always=always, sample_layers=sample_layers,
                         regrow_fraction=regrow_fraction, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, state_dtype=state_dtype,
                         step_in_backward=step_in_backward)
    want = _parse_dtype(dtype)
    source = "dtype=" if want is not None else ""
    config = _as_config(model_or_config)
    if config is not None and want is None:
        want, source = config_dtype(config)
    model = model_or_config if config is None else data.meta_model(config, task)
    infos = _infos(model, want)
    total = sum(i.numel for i in infos)

    def make(b):
        return make_policy(policy, infos, b, switch_every=switch_every, order=order,
                           seed=seed, always=tuple(always), sample_layers=sample_layers,
                           regrow_fraction=regrow_fraction, master_weights=master_weights,
                           stochastic_rounding=stochastic_rounding, state_dtype=state_dtype,
                           step_in_backward=step_in_backward)

    found = None
    if memory is not None:
        dtypes = sorted({str(i.dtype).removeprefix("torch.") for i in infos})
        given = dict(switch_every=switch_every, order=order, seed=seed, always=tuple(always),
                     sample_layers=sample_layers, regrow_fraction=regrow_fraction,
                     master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                     state_dtype=state_dtype, step_in_backward=step_in_backward)
        found = find_fit(infos, policy, make, memory[0], memory[1], memory[2],
                         "/".join(dtypes), batch_size, seq_len,
                         nto_kwargs=_non_default_nto_args(given))
        budget = found.budget_elements
    pol = make(parse_budget(budget, total))
    if isinstance(pol, SparsePolicy):
        p = _build_sparse_plan(pol, infos, want)
    else:
        assert isinstance(pol, ScheduledPolicy)
        p = _build_plan(pol, infos, want)
    p.dtype_source = source
    p.fit = found
    return p


def config_dtype(config: Any) -> tuple[torch.dtype, str]:
    """(dtype, where it came from) of a transformers config: its `torch_dtype` (`dtype` in
    newer transformers) when it is one NTO trains, float32 when it names none or "auto".
    A dtype NTO cannot train (float64, int8, ...) is refused with what to pass instead."""
    # `dtype` in transformers >= 4.56, where reading `torch_dtype` warns; `torch_dtype` before
    named = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if named is None or named == "auto":
        return torch.float32, "float32: the config names no torch_dtype"
    text = str(named).removeprefix("torch.")
    if text not in _DTYPES:
        raise ValueError(f"the model config says torch_dtype={text!r}, which NTO does not "
                         "train; allowed: float32, bfloat16, float16; pass the dtype to plan "
                         "for (--dtype / dtype=)")
    return _DTYPES[text], "the config's torch_dtype"


_FORMAT_WORDS = {"fp32": "fp32 moments, 8 B per element", "int8": "8-bit moments in blocks "
                 "of 256, 2.03 B per element", "int4": "both moments in one byte, blocks of 64, "
                 "1.13 B per element", "bf16": "bf16 moments, 4 B per element",
                 "master": "fp32 moments and an fp32 master, 12 B per element",
                 "stochastic": "fp32 moments, stochastic rounding, 8 B per element"}


def _plan_fields(pol: ScheduledPolicy | SparsePolicy, infos: list[ParamInfo],
                 want: torch.dtype | None) -> dict[str, Any]:
    """What every policy's Plan says alike: the budget, dtype, sizes and AdamW's state."""
    dtypes = sorted({str(i.dtype).removeprefix("torch.") for i in infos})
    formats = sorted({pol.state_format(i.dtype).name for i in infos if i.trainable})
    return dict(
        state_format="/".join(formats) or "fp32",
        policy=pol.name, budget=pol.budget.text, budget_kind=pol.budget.kind,
        budget_amount=pol.budget.amount,
        dtype=str(want).removeprefix("torch.") if want else "/".join(dtypes),
        total_elements=sum(i.numel for i in infos), total_tensors=len(infos),
        weights_bytes=sum(i.numel * i.dtype.itemsize for i in infos),
        switch_every=pol.switch_every,
        adamw_bytes=sum(state_bytes("adamw", i.numel, i.dtype) for i in infos),
        adamw8bit_bytes=sum(state_bytes("adamw8bit", i.numel, i.dtype) for i in infos))


def _elems(infos: list[ParamInfo], params) -> int:
    return sum(infos[i].numel for i in params)


def _build_plan(pol: ScheduledPolicy, infos: list[ParamInfo], want: torch.dtype | None) -> Plan:
    def nto(params) -> int:
        return sum(pol.state_bytes(infos[i].numel, infos[i].dtype) for i in params)

    blocks = [PlanBlock(b.name, b.kind, len(b.params), _elems(infos, b.params), nto(b.params))
              for b in pol.blocks]
    groups = []
    for period in pol.schedule(0):
        units = pol.always_units + list(period)
        groups.append(PlanGroup(group_label(units, 44), [u.name for u in units],
                                sum(u.elements for u in units), pol.unit_bytes(units)))
    big = sorted(pol.untrainable, key=lambda i: -infos[i].numel)
    return Plan(
        **_plan_fields(pol, infos, want), cycle_steps=pol.cycle_steps(0), blocks=blocks,
        groups=groups, always=[u.name for u in pol.always_units],
        trainable_elements=_elems(infos, pol.trainable), nto_bytes=max(g.nto_bytes for g in groups),
        transient_bytes=pol.transient_grad_bytes(),
        step_in_backward=pol.cfg.step_in_backward,
        untrainable=[{"name": param_label(infos[i].name, i), "elements": infos[i].numel,
                      "nto_bytes": nto((i,))} for i in big])


def _build_sparse_plan(pol: SparsePolicy, infos: list[ParamInfo],
                       want: torch.dtype | None) -> Plan:
    """K elements anywhere: device state 16 B per chosen element (20 with a bf16/fp16
    element's fp32 master, 12 with bf16 moments; K is priced at the costliest, as the
    policy sizes it) plus,
    during backward, one dense gradient at a time (the largest tensor's, in its dtype)."""
    blocks = [PlanBlock(b.name, b.kind, len(b.params), _elems(infos, b.params),
                        pol.state_bytes(_elems(infos, b.params), infos[b.params[0]].dtype))
              for b in discover_blocks(infos)]
    k = pol.k
    nto = pol.state_bytes(k, pol.costliest_dtype())
    total = _elems(infos, range(len(infos)))
    return Plan(
        **_plan_fields(pol, infos, want), cycle_steps=pol.switch_every, blocks=blocks,
        groups=[PlanGroup(f"top {k:,} elements by gradient score", [], k, nto)], always=[],
        trainable_elements=total, nto_bytes=nto,
        density=k / total if total else None,
        transient_bytes=pol.transient_bound(), regrow_fraction=pol.regrow_fraction)


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r}; allowed: None (the model's), torch.float32, "
                     "torch.bfloat16, torch.float16 or their names")


def _infos(model: torch.nn.Module, want: torch.dtype | None) -> list[ParamInfo]:
    infos = [ParamInfo(n, tuple(p.shape), want or p.dtype)
             for n, p in model.named_parameters() if p.is_floating_point()]
    if not infos:
        raise ValueError(f"{type(model).__name__} has no floating-point parameters to plan")
    return infos


def _as_config(obj: Any) -> Any:
    """The transformers config `obj` is or names; None for an nn.Module."""
    if isinstance(obj, torch.nn.Module):
        return None
    if isinstance(obj, (str, os.PathLike)):  # config.json is checked before transformers
        return data.load_config(data.resolve_model(os.fspath(obj)))
    try:
        from transformers import PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a demo extra
        PretrainedConfig = ()  # type: ignore[assignment]
    if PretrainedConfig and isinstance(obj, PretrainedConfig):
        return obj
    raise TypeError(f"plan() got {type(obj).__name__}; allowed: an nn.Module, a transformers "
                    "PretrainedConfig, a local HF model folder / .gguf file path, or a packaged "
                    "model name")
