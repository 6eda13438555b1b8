"""End-to-end benchmark (issue 8): NTO against full AdamW, BAdam, LISA, 8-bit AdamW and LoRA
on real pretrained models and real data, each run in its own child process.

    python bench/e2e.py --task sentiment --seeds 0 1 2 --steps 150 --out docs/results
    python bench/e2e.py --task lm --seeds 0 1 2 --steps 60 --out docs/results
    python bench/e2e.py --list                       # the configurations and what they mean

Tasks (DESIGN.md, "Models and data"): `sentiment` = all-MiniLM-L6-v2 on the tweets corpus
(3-class held-out accuracy; the project's stand-in for Rotten Tomatoes); `lm` = SmolLM2-135M
on BBC News (held-out loss / perplexity). Models, data, the split, tokenization, batches and
evaluation come from nto_ext.data / nto_ext.demo (the same code `nto demo` runs).

Per run it records: training-state bytes (gradients + optimizer state [+ indices]) measured
from real storage after backward and after step, the same function for every optimizer
(unique storages of every param's .grad and every tensor in optimizer.state: for
bitsandbytes that is its uint8 moments, absmax and qmap tensors; for LoRA the adapter grads
and their AdamW state); for NTO additionally `memory_report()["peak_total_bytes"]` (the
peak inside step(), before a switch frees anything) and the larger of the two is used.
Peak process memory is ru_maxrss of the child (one process per run). Step time is forward +
backward + optimizer step (memory sampling outside the timer), mean over steps 2..N.
Writes <out>/e2e_<task>.json, <out>/e2e_<task>.md (table) and <out>/e2e_<task>.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nto_ext import data, demo  # noqa: E402
from nto_ext.budget import storage_bytes  # noqa: E402

log = logging.getLogger("e2e")
MIB = 2.0 ** 20
TASKS = {"sentiment": ("minilm", "tweets", "classify"), "lm": ("smollm2", "bbc", "lm")}
# Learning rates: AdamW / 8-bit AdamW use the demo's measured AdamW rate, NTO-family runs
# (NTO, BAdam, LISA: each block trains only part of the run) the demo's NTO rate, LoRA the
# usual adapter rate (x5-10 of full fine-tuning). Not tuned per configuration.
LR = {"classify": {"full": 1e-4, "nto": 3e-4, "lora": 5e-4},
      "lm": {"full": 5e-5, "nto": 5e-5, "lora": 5e-4}}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype: the weights' dtype


@dataclass
class RunSpec:
    """One configuration of one task and seed, as the child process receives it."""

    task: str
    config: str
    seed: int
    steps: int
    batch_size: int
    max_length: int
    eval_size: int
    switch_every: int
    lisa_layers: int
    lora_match: str
    threads: int
    extra: dict[str, Any] = field(default_factory=dict)


# name -> (family, description); family picks the learning rate and the builder
CONFIGS: dict[str, tuple[str, str]] = {
    "adamw": ("full", "torch.optim.AdamW (foreach), every parameter"),
    "nto-block-25": ("nto", "NTO block, budget 25%, order descending, state dropped"),
    "nto-block-10": ("nto", "NTO block, budget 10%, order descending, state dropped"),
    "nto-block-25-offload": ("nto", "NTO block, budget 25%, order descending, inactive state "
                                    "kept in host memory (state_on_switch='offload')"),
    "nto-block-25-head": ("nto", "NTO block, budget 25%, descending, state dropped, "
                                 "always=(head, other): the new classifier trains every step"),
    "nto-block-25-offload-head": ("nto", "NTO block, budget 25%, descending, offload, "
                                         "always=(head, other)"),
    "nto-sample-25": ("nto", "NTO sample, budget 25%"),
    "nto-sample-10": ("nto", "NTO sample, budget 10%"),
    "nto-sample-30": ("nto", "NTO sample, budget 30%: with a switch every step (moments "
                             "dropped unread), the elements a moment-free format would train "
                             "in the bytes of fp32-state 10% (4 B per element instead of 12)"),
    "nto-sample-10-head": ("nto", "NTO sample, budget 10%, always=(head, other)"),
    "nto-block-10-head": ("nto", "NTO block, budget 10%, descending, state dropped, "
                                 "always=(head, other): the new classifier trains every step"),
    "nto-block-10-importance": ("nto", "NTO block, budget 10%, order importance (ascending, "
                                "each group repeated by its gradient norm), state dropped"),
    "nto-sample-10-importance": ("nto", "NTO sample, budget 10%, order importance"),
    "nto-block-10-plain": ("nto", "NTO block, budget 10%, descending, state dropped; bf16/fp16 "
                           "params updated in place, no fp32 masters (with --dtype bf16)"),
    "nto-block-10-sr": ("nto", "NTO block, budget 10%, descending, state dropped; bf16/fp16 "
                        "params rounded stochastically, no masters (with --dtype bf16)"),
    "nto-block-10-int8": ("nto", "NTO block, descending, state dropped, 8-bit moments "
                          "(state_dtype='int8') within the bytes of nto-block-10 (12 B per "
                          "element at 10%): about 20% of the elements train at once"),
    "nto-sample-10-none": ("nto", "NTO sample, no moments (state_dtype='none', a switch every "
                           "step) within the bytes of nto-sample-10 (3x the elements)"),
    "nto-sample-10-head-none": ("nto", "NTO sample, always=(head, other), no moments (a switch "
                                "every step) within the bytes of nto-sample-10-head"),
    "nto-sample-10-importance-none": ("nto", "nto-sample-10-none with order importance"),
    "nto-block-10-none": ("nto", "NTO block, descending, no moments (state_dtype='none', a "
                          "switch every step) within the bytes of nto-block-10"),
    "nto-sample-60-none-same": ("nto", "NTO sample 60%, no moments, a switch every step (a "
                                "probe: 20% of AdamW's bytes)"),
    "nto-sample-100-none-same": ("nto", "NTO sample 100%, no moments, a switch every step: "
                                 "every weight's update is AdamW's first (a probe)"),
    "nto-block-10-int8-bwd": ("nto", "NTO block, descending, 8-bit moments, step_in_backward "
                              "(gradients used and freed in backward), within the bytes of "
                              "nto-block-10: about 6x the elements"),
    "nto-sample-10-none-bwd": ("nto", "NTO sample, no moments (a switch every step), "
                               "step_in_backward, within the bytes of nto-sample-10: every "
                               "weight (the state is one step count per tensor)"),
    "nto-sample-10-int8": ("nto", "NTO sample, 8-bit moments within the bytes of "
                           "nto-sample-10"),
    "nto-block-10-head-int8": ("nto", "nto-block-10-head with 8-bit moments within its "
                               "bytes (about 2x the elements at once)"),
    "nto-block-10-head-int8-same": ("nto", "nto-block-10-head with 8-bit moments on the same "
                                    "elements (10%: about half its bytes)"),
    "nto-block-20-head": ("nto", "nto-block-10-head at 20%: about the elements that "
                          "nto-block-10-head-int8 trains at once, with fp32 moments (a control)"),
    "nto-sample-10-bf16m": ("nto", "NTO sample, bf16 moments (state_dtype='bf16') within the "
                            "bytes of nto-sample-10 (about 1.5x the elements at once)"),
    "nto-block-10-offload": ("nto", "NTO block, budget 10%, descending, each param's state "
                             "kept on the host between its periods (state_on_switch='offload')"),
    "nto-sample-10-offload": ("nto", "NTO sample, budget 10%, state kept on the host between "
                              "periods"),
    "nto-block-100-int8": ("nto", "NTO block at 100% with 8-bit moments: AdamW with "
                           "blockwise 8-bit moments, NTO's kernel"),
    "nto-block-100-int8-bwd": ("nto", "nto-block-100-int8 with step_in_backward: 8-bit AdamW "
                               "on every weight, no gradient kept"),
    "nto-block-100-int4-bwd": ("nto", "NTO block at 100% with both moments in one byte "
                               "(state_dtype='int4') and step_in_backward: AdamW on every "
                               "weight in less than LoRA r=54's state bytes"),
    "nto-block-100-int4-bwd-noembed": ("nto", "nto-block-100-int4-bwd with the input "
                                       "embedding frozen by the user (BAdam's default; "
                                       "SmolLM2 ties its head to it): every other weight"),
    "nto-block-100-int4-bwd-embedlr10": ("nto", "nto-block-100-int4-bwd with the input "
                                         "embedding (and a head tied to it) in its own "
                                         "param group at a tenth of the learning rate"),
    "nto-sparse-25": ("nto", "NTO sparse, budget 25%"),
    "nto-sparse-10": ("nto", "NTO sparse, budget 10%"),
    "nto-sparse-7.5": ("nto", "NTO sparse, budget 7.5%: 16 B per chosen element, so the "
                              "training-state bytes of block at 10% (0.10x AdamW's)"),
    "nto-sparse-10-int8": ("nto", "NTO sparse, 8-bit moments within the bytes of nto-sparse-10 "
                           "(16 B per chosen element at 10%): about 1.6x the elements"),
    "nto-sparse-10-int8-same": ("nto", "NTO sparse 10% with 8-bit moments: the elements of "
                                "nto-sparse-10 in 63% of its bytes"),
    "nto-sparse-7.5-int8": ("nto", "NTO sparse, 8-bit moments within the bytes of "
                            "nto-sparse-7.5 (= fp32-state block at 10%)"),
    "badam": ("nto", "BAdam = NTO block, one layer per group (budget = largest layer), "
                     "descending, state dropped on switch; embed frozen (BAdam default)"),
    "lisa": ("nto", "LISA = NTO sample, always=(embed, head, other), sample_layers=N "
                    "random layers per period, budget = those blocks + N largest layers"),
    "adamw8bit": ("full", "bitsandbytes AdamW8bit (blockwise 8-bit moments), every param"),
    "torchao-adamw8bit": ("full", "torchao AdamW8bit (optional; skipped when not installed)"),
    "lora": ("lora", "peft LoRA on every linear layer of the encoder/decoder, rank chosen to "
                     "match the trainable-element count of NTO at --lora-match (head trained)"),
}
DEFAULT_CONFIGS = list(CONFIGS)


# ---------------------------------------------------------------------------- memory

def state_tensors(opt) -> list:
    """Every tensor the optimizer keeps in `opt.state`, tensor subclasses unpacked."""
    import torch

    out = []
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                out.extend(_inner_tensors(v))
    return out


def _inner_tensors(t) -> list:
    # torchao's quantized state is a tensor subclass: measure what it holds
    if hasattr(t, "__tensor_flatten__") and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _inner_tensors(getattr(t, n))]
    return [t]


def measure(model, opt) -> dict[str, int]:
    """Gradients + optimizer state from real storage; identical for every optimizer."""
    grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    state = storage_bytes(state_tensors(opt))
    return {"grad_bytes": grads, "state_bytes": state, "total_bytes": grads + state}


# ---------------------------------------------------------------------------- builders

def _units(model) -> dict[str, int]:
    """Elements per NTO block (embed, layer N, head, other), from parameter names."""
    from nto_ext.blocks import block_of

    sizes: dict[str, int] = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        b, _ = block_of(name, i)
        sizes[b] = sizes.get(b, 0) + p.numel()
    return sizes


def _layer_sizes(sizes: dict[str, int]) -> list[int]:
    return sorted((v for k, v in sizes.items() if k not in ("embed", "head", "other")),
                  reverse=True)


def build_optimizer(spec: RunSpec, task: str, model):
    """(optimizer, model, info) for `spec.config`; the model may be wrapped (LoRA)."""
    import torch

    from nto_ext import NTO

    name, family = spec.config, CONFIGS[spec.config][0]
    lr = spec.extra.get("lr", {}).get(family, LR[task][family])
    total = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {"lr": lr, "total_elements": total}
    common = {"lr": lr, "weight_decay": demo.WEIGHT_DECAY, "seed": spec.seed,
              "switch_every": spec.switch_every}
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=demo.WEIGHT_DECAY,
                                 foreach=True), model, info
    if name.startswith("nto-"):
        # nto-POLICY-PCT[-drop|-offload][-head][-importance][-plain|-sr][-noembed|-embedlr10]
        # [-int8|-int4|-bf16m|-none]
        # [-bwd][-same]
        _, policy, pct, *how = name.split("-")
        extra: dict[str, Any] = {"order": "descending"} if policy == "block" else {}
        for flag, kwargs in (("plain", {"master_weights": False}),  # issue 19's rows
                             ("sr", {"master_weights": False, "stochastic_rounding": True})):
            if flag in how:
                how.remove(flag)
                extra.update(kwargs)
        if "importance" in how:  # more periods where the gradient is large (issue 21)
            how.remove("importance")
            extra["order"] = "importance"
        if "noembed" in how:  # the user freezes the input embedding before NTO (BAdam's
            how.remove("noembed")  # default; SmolLM2's head is the same, tied tensor)
            model.get_input_embeddings().weight.requires_grad_(False)
            info["frozen"] = "input embedding"
        params: Any = model.named_parameters()
        if "embedlr10" in how:  # the input embedding (SmolLM2: the tied head too) in its
            how.remove("embedlr10")  # own param group at a tenth of the learning rate
            emb = model.get_input_embeddings().weight
            named = list(model.named_parameters())
            params = [{"params": [(n, p) for n, p in named if p is not emb]},
                      {"params": [(n, p) for n, p in named if p is emb], "lr": lr / 10}]
            info["embedding_lr"] = lr / 10
        if "head" in how:  # the new task head (and BERT's pooler) train in every period
            how.remove("head")
            extra["always"] = tuple(b for b in ("head", "other") if b in _units(model))
            info["always"] = extra["always"]
        budget = f"{pct}%"
        same = "same" in how  # -same: the fp32 run's elements, fewer bytes
        if same:
            how.remove("same")
        in_bytes = False  # the bytes of fp32 state (gradient kept to step) at pct% hold
        for moments in ("int8", "int4", "bf16m", "none"):  # ~2x (int8) / ~3.9x (int4) /
            if moments in how:  # 1.5x (bf16 moments) / 3x (none) the elements
                how.remove(moments)
                extra["state_dtype"] = moments.removesuffix("m")
                in_bytes = True
        if "bwd" in how:  # step_in_backward: no gradient kept, 1.5x the elements (fp32)
            how.remove("bwd")
            extra["step_in_backward"] = True
            in_bytes = True
        if in_bytes and float(pct) < 100 and not same:
            fp32 = 16 if policy == "sparse" else 12  # B per element with fp32 moments
            budget = f"{round(float(pct) / 100 * total * fp32)}B"
        if how:
            extra["state_on_switch"] = how[0]
        info["budget"] = budget
        return NTO(params, budget=budget, policy=policy, **extra, **common), model, info
    sizes = _units(model)
    layers = _layer_sizes(sizes)
    if name == "badam":
        info["budget"] = layers[0]
        return NTO(model.named_parameters(), budget=layers[0], policy="block",
                   order="descending", state_on_switch="drop", **common), model, info
    if name == "lisa":
        always = tuple(b for b in ("embed", "head", "other") if b in sizes)
        budget = sum(sizes[b] for b in always) + sum(layers[:spec.lisa_layers])
        info.update(budget=budget, always=always, sample_layers=spec.lisa_layers)
        return NTO(model.named_parameters(), budget=budget, policy="sample", always=always,
                   sample_layers=spec.lisa_layers, **common), model, info
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(model.parameters(), lr=lr,
                                   weight_decay=demo.WEIGHT_DECAY), model, info
    if name == "torchao-adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(model.parameters(), lr=lr, weight_decay=demo.WEIGHT_DECAY), model, info
    if name == "lora":
        model, r = _lora(model, task, spec.lora_match, total)
        trainable = [p for p in model.parameters() if p.requires_grad]
        info.update(lora_rank=r, trainable_elements=sum(p.numel() for p in trainable))
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=demo.WEIGHT_DECAY,
                                 foreach=True), model, info
    raise ValueError(f"unknown configuration {name!r}; allowed: {', '.join(CONFIGS)}")


def _lora(model, task: str, match: str, total: int):
    """peft LoRA with the rank whose trainable count is closest to `match` of all elements."""
    import torch
    from peft import LoraConfig, get_peft_model

    if task == "classify":
        targets, save, task_type = ["query", "key", "value", "dense"], ["classifier"], "SEQ_CLS"
    else:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        save, task_type = [], "CAUSAL_LM"
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets)
    saved = sum(p.numel() for n, p in model.named_parameters()
                if any(s in n.split(".") for s in save))
    want = float(match.rstrip("%")) / 100 * total
    r = max(1, round((want - saved) / per_rank))
    cfg = LoraConfig(task_type=task_type, r=r, lora_alpha=2 * r, lora_dropout=0.0,
                     target_modules=targets, modules_to_save=save or None)
    return get_peft_model(model, cfg), r


# ---------------------------------------------------------------------------- one run

def run_one(spec: RunSpec) -> dict:
    """Load, train, evaluate one configuration; meant to run in a fresh process."""
    import torch

    torch.set_num_threads(spec.threads)
    data.offline()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_name, data_name, task = TASKS[spec.task]
    t_start = time.perf_counter()
    source = data.resolve_model(model_name)
    labels = data.TWEET_LABELS if data_name == "tweets" else data.BBC_TOPICS
    num_labels = 0 if task == "lm" else len(labels)
    cfg = demo.DemoConfig(model=model_name, data=data_name, steps=spec.steps,
                          batch_size=spec.batch_size, max_length=spec.max_length,
                          eval_size=spec.eval_size, seed=spec.seed)
    r = demo.Resolved(cfg, task, source, num_labels)
    tokenizer = data.load_tokenizer(source)
    batches, test, majority = _prepared_batches(r, tokenizer, spec)
    torch.manual_seed(spec.seed)  # the new head: same for every configuration of a seed
    model = data.load_model(source, task, num_labels)
    dtype = spec.extra.get("dtype", "fp32")
    if dtype != "fp32":  # the weights as a GPU user loads them (torch_dtype=torch.bfloat16)
        model.to(getattr(torch, DTYPES[dtype]))
    device = torch.device(spec.extra.get("device", "cpu"))
    model.to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, model, info = build_optimizer(spec, task, model)
    rss_loaded = demo.current_rss()
    torch.manual_seed(spec.seed)  # same dropout masks
    out = _train(spec, model, opt, batches, device)
    model.float()  # held-out loss judged in fp32 for every dtype: the weights decide, not the
    # precision of the evaluation (bf16 weights are exact in fp32)
    out.update(demo._evaluate(spec.config, model, test, task, device))
    out.update(info)
    out.update({"config": spec.config, "seed": spec.seed, "task": spec.task,
                "majority_baseline": majority, "rss_after_load": rss_loaded,
                "peak_rss": demo.peak_rss(), "wall_s": time.perf_counter() - t_start,
                "warnings": sorted({str(w.message)[:300] for w in caught})})
    return out


def _prepared_batches(r, tokenizer, spec: RunSpec):
    """(batch iterator, test tensors, majority share) from nto_ext.demo's data path (the
    same examples, batches and tokenization `nto demo` uses); accepts both of its shapes."""
    prepared = demo._prepare(r, tokenizer)
    if len(prepared) == 4:  # (n, take, test, majority): batches tokenized as drawn
        n, take, test, majority = prepared
        return demo._batches(n, take, spec.steps, spec.batch_size, spec.seed), test, majority
    train, test, majority = prepared  # older demo: pre-tokenized train tensors
    return demo._batches(train, spec.steps, spec.batch_size, spec.seed), test, majority


def _train(spec: RunSpec, model, opt, batches, device) -> dict:
    import torch

    is_nto = type(opt).__name__ == "NTO"
    losses, times, opt_times, peak, trainable = [], [], [], {"total_bytes": -1}, 0

    def now() -> float:  # a GPU's queued work is part of the step it belongs to
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    model.train()
    for batch in batches:  # drawn (and tokenized) outside the timer
        batch = {k: v.to(device) for k, v in batch.items()}
        t0 = now()
        loss = model(**batch).loss
        loss.backward()
        t1 = now()
        mem_bwd = measure(model, opt)
        trainable = max(trainable, sum(p.numel() for p in model.parameters()
                                       if p.grad is not None))
        t2 = now()
        opt.step()
        t3 = now()
        for mem in (mem_bwd, measure(model, opt)):
            if mem["total_bytes"] > peak["total_bytes"]:
                peak = mem
        opt.zero_grad(set_to_none=True)
        times.append((t1 - t0) + (t3 - t2))
        opt_times.append(t3 - t2)
        losses.append(float(loss.detach()))
    out = {"losses": losses, "step_times_s": times, "opt_step_times_s": opt_times,
           "training_state": peak, "max_elements_with_grad": trainable}
    state_total = peak["total_bytes"]
    if is_nto:
        rep = opt.memory_report()
        out["nto_memory_report"] = {k: v for k, v in rep.items()
                                    if isinstance(v, (int, float, str))}
        state_total = max(state_total, rep["peak_total_bytes"])
    out["training_state_bytes"] = state_total
    out["mean_step_s"] = statistics.mean(times[1:] or times)
    out["mean_opt_step_s"] = statistics.mean(opt_times[1:] or opt_times)
    tail = max(1, len(losses) // 10)
    out["final_loss"] = sum(losses[-tail:]) / tail
    return out


def _child(spec_path: str, result_path: str) -> None:
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run_one(spec)
    except Exception as e:  # the parent reports it and goes on with the next run
        out = {"error": f"{type(e).__name__}: {e}"[:2000], "config": spec.config,
               "seed": spec.seed, "task": spec.task}
    Path(result_path).write_text(json.dumps(out))


def run_in_child(spec: RunSpec, nice: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="nto-e2e-") as tmp:
        sp, rp = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        sp.write_text(json.dumps(asdict(spec)))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(sp), str(rp)]
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        proc = subprocess.run(cmd)
        if rp.exists():
            return json.loads(rp.read_text())
        return {"error": f"child exited {proc.returncode} without a result",
                "config": spec.config, "seed": spec.seed, "task": spec.task}


# ---------------------------------------------------------------------------- summary

def summarize(runs: list[dict], task: str) -> list[dict]:
    """Mean and spread (min..max over seeds) per configuration, ratios against AdamW."""
    metric = "accuracy" if TASKS[task][2] == "classify" else "eval_loss"
    by: dict[str, list[dict]] = {}
    for r in runs:
        if "error" not in r:
            by.setdefault(r["config"], []).append(r)
    rows = []
    for name in CONFIGS:
        rs = by.get(name)
        if not rs:
            continue
        row = {"config": name, "seeds": [r["seed"] for r in rs], "lr": rs[0]["lr"]}
        for r in rs:  # sparse keeps compact gradients (no .grad) and step_in_backward none
            rep = r.get("nto_memory_report", {})  # after backward: count what NTO trains
            if rep.get("policy") == "sparse" or (rep and not r["max_elements_with_grad"]):
                r["max_elements_with_grad"] = max(r["max_elements_with_grad"],
                                                  rep["trainable_elements"])
        for key in ("training_state_bytes", "peak_rss", "mean_step_s", "mean_opt_step_s",
                    "final_loss", metric, "max_elements_with_grad"):
            vals = [float(r[key]) for r in rs]
            row[key] = statistics.mean(vals)
            row[key + "_spread"] = (max(vals) - min(vals)) / 2 if len(vals) > 1 else None
        if metric == "eval_loss":
            row["perplexity"] = math.exp(min(row["eval_loss"], 50.0))
        rows.append(row)
    base = next((r for r in rows if r["config"] == "adamw"), None)
    for row in rows:
        for key in ("training_state_bytes", "peak_rss", "mean_step_s", "mean_opt_step_s"):
            row[key + "_x_adamw"] = row[key] / base[key] if base and base[key] else None
        if base:
            row[metric + "_minus_adamw"] = row[metric] - base[metric]
    return rows


def _pm(v: float, spread: float | None, fmt: str) -> str:
    s = format(v, fmt)
    return s if spread is None else f"{s} ± {format(spread, fmt)}"


def table(rows: list[dict], task: str) -> str:
    cls = TASKS[task][2] == "classify"
    metric = "held-out acc, %" if cls else "held-out loss (ppl)"
    head = ("| configuration | seeds | lr | elements w/ grad (max; sparse: chosen) "
            "| training state, MiB | x AdamW | peak RSS, MiB | step, ms | x AdamW | opt step, ms "
            "| final train loss "
            f"| {metric} | Δ vs AdamW |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        x, t = (f"{v:.3f}" if v is not None else "-"  # no AdamW row (yet)
                for v in (r["training_state_bytes_x_adamw"], r["mean_step_s_x_adamw"]))
        if cls:
            score = _pm(100 * r["accuracy"], r["accuracy_spread"] and 100 * r["accuracy_spread"],
                        ".1f")
            delta = f"{100 * r['accuracy_minus_adamw']:+.1f} pt" if "accuracy_minus_adamw" in r \
                else "-"
        else:
            score = f"{_pm(r['eval_loss'], r['eval_loss_spread'], '.3f')} ({r['perplexity']:.1f})"
            delta = "-"
            if "eval_loss_minus_adamw" in r:
                base = r["eval_loss"] - r["eval_loss_minus_adamw"]
                delta = f"{100 * r['eval_loss_minus_adamw'] / base:+.1f}%"
        state = _pm(r["training_state_bytes"] / MIB, _div(r["training_state_bytes_spread"]),
                    ".1f")
        lines.append(
            f"| {r['config']} | {len(r['seeds'])} | {r['lr']:g} "
            f"| {r['max_elements_with_grad'] / 1e6:.2f}M "
            f"| {state} "
            f"| {x} | {_pm(r['peak_rss'] / MIB, _div(r['peak_rss_spread']), ',.0f')} "
            f"| {_pm(1e3 * r['mean_step_s'], _mul(r['mean_step_s_spread']), '.0f')} | {t} "
            f"| {1e3 * r['mean_opt_step_s']:.1f} "
            f"| {_pm(r['final_loss'], r['final_loss_spread'], '.3f')} | {score} | {delta} |")
    return "\n".join(lines)


def _div(v: float | None) -> float | None:
    return None if v is None else v / MIB


def _mul(v: float | None) -> float | None:
    return None if v is None else v * 1e3


def plot(runs: list[dict], rows: list[dict], task: str, path: Path) -> None:
    """Training state vs held-out metric (one point per configuration), and loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cls = TASKS[task][2] == "classify"
    metric = "accuracy" if cls else "eval_loss"
    fig, (ax_m, ax_r, ax_l) = plt.subplots(1, 3, figsize=(17, 5.2))
    cmap = plt.get_cmap("tab20")
    colors = {name: cmap(i % 20) for i, name in enumerate(CONFIGS)}
    for row in rows:
        y = 100 * row[metric] if cls else row[metric]
        for ax, key in ((ax_m, "training_state_bytes"), (ax_r, "peak_rss")):
            ax.scatter(row[key] / MIB, y, color=colors[row["config"]], s=60, zorder=3)
            ax.annotate(row["config"], (row[key] / MIB, y), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
    ylab = "held-out accuracy, %" if cls else "held-out loss"
    ax_m.set(xscale="log", xlabel="training state (grads + optimizer state), MiB, measured",
             ylabel=ylab, title="memory vs quality")
    ax_r.set(xlabel="peak process memory (ru_maxrss), MiB", ylabel=ylab,
             title="peak RSS vs quality")
    for name in CONFIGS:
        rs = [r for r in runs if r.get("config") == name and "losses" in r]
        if not rs:
            continue
        n = min(len(r["losses"]) for r in rs)
        mean = [statistics.mean(r["losses"][i] for r in rs) for i in range(n)]
        ax_l.plot(range(1, n + 1), demo._smooth(mean, max(1, n // 10)),
                  color=colors[name], label=name, linewidth=1.6)
    ax_l.set(xlabel="step", ylabel="training loss (moving average, mean over seeds)",
             title="loss curves")
    ax_l.legend(fontsize=7, ncol=2)
    for ax in (ax_m, ax_r, ax_l):
        ax.grid(alpha=0.3)
    model_name, data_name, _ = TASKS[task]
    seeds = sorted({r["seed"] for r in runs if "error" not in r})
    fig.suptitle(f"{model_name} on {data_name}, seeds {seeds}, "
                 f"{rows[0]['seeds'] and len(runs[0].get('losses', []))} steps", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def environment() -> dict:
    import torch
    import transformers

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} logical CPUs"
                       f"{gpu}",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="sentiment")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="NAME",
                   help=f"configurations (default: all): {', '.join(CONFIGS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: sentiment 150, lm 30)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--eval-size", type=int, default=None,
                   help="held-out examples (sentiment) or LM blocks (lm)")
    p.add_argument("--switch-every", type=int, default=None,
                   help="NTO/BAdam/LISA period (default: steps // 8, so ~a full cycle of "
                        "MiniLM's groups fits in the run)")
    p.add_argument("--lisa-layers", type=int, default=1)
    p.add_argument("--lora-match", default="10%",
                   help="LoRA rank is chosen so its trainable count matches this budget")
    p.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    p.add_argument("--nice", type=int, default=10, help="niceness of each child (0: off)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="dtype the model's weights are trained in (evaluation in fp32)")
    p.add_argument("--device", default="cpu",
                   help="where the model trains and is evaluated (cpu, cuda)")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--lr", nargs="+", default=[], metavar="FAMILY=LR",
                   help="override the learning rate of a family (full, nto, lora), e.g. "
                        "nto=1.5e-4; use with --tag so the runs go to their own file")
    p.add_argument("--resume", action="store_true",
                   help="keep runs already in the output JSON, run only the missing ones")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    p.add_argument("--report", action="store_true",
                   help="only rewrite the table and plot from the output JSON")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    if args.list:
        for name, (fam, what) in CONFIGS.items():
            print(f"{name:20s} [{fam}] {what}")
        return 0
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; allowed: {', '.join(CONFIGS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if "torchao-adamw8bit" in args.configs and importlib.util.find_spec("torchao") is None:
        log.warning("torchao is not installed: skipping torchao-adamw8bit")
        args.configs = [c for c in args.configs if c != "torchao-adamw8bit"]
    task = TASKS[args.task][2]
    defaults = demo.TASK_DEFAULTS[task]
    steps = args.steps or defaults["steps"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"e2e_{args.task}{('_' + args.tag) if args.tag else ''}"
    json_path = out_dir / f"{stem}.json"
    runs: list[dict] = []
    if args.report:
        saved = json.loads(json_path.read_text())
        _write(json_path, out_dir / f"{stem}.md", out_dir / f"{stem}.png", saved["runs"],
               args, saved["environment"], saved["command"])
        return 0
    if args.resume and json_path.exists():
        runs = [r for r in json.loads(json_path.read_text())["runs"] if "error" not in r]
    done = {(r["config"], r["seed"]) for r in runs}
    lr_override = {}
    for item in args.lr:
        family, _, value = item.partition("=")
        if family not in LR[TASKS[args.task][2]] or not value:
            raise SystemExit(f"--lr {item!r}; allowed: FAMILY=LR with FAMILY in "
                             f"{', '.join(LR[TASKS[args.task][2]])}")
        lr_override[family] = float(value)
    extra: dict[str, Any] = {"lr": lr_override} if lr_override else {}
    if args.dtype != "fp32":
        extra["dtype"] = args.dtype
    if args.device != "cpu":
        extra["device"] = args.device
    env = environment()
    command = "python bench/e2e.py " + " ".join(sys.argv[1:])
    for seed in args.seeds:
        for name in args.configs:
            if (name, seed) in done:
                continue
            spec = RunSpec(task=args.task, config=name, seed=seed, steps=steps,
                           batch_size=args.batch_size or defaults["batch_size"],
                           max_length=args.max_length or defaults["max_length"],
                           eval_size=args.eval_size or defaults["eval_size"],
                           switch_every=args.switch_every or max(1, steps // 8),
                           lisa_layers=args.lisa_layers, lora_match=args.lora_match,
                           threads=args.threads, extra=extra)
            t0 = time.perf_counter()
            res = run_in_child(spec, args.nice)
            res["spec"] = asdict(spec)
            runs.append(res)
            if "error" in res:
                log.warning("%s seed %d FAILED: %s", name, seed, res["error"])
            else:
                metric = res.get("accuracy", res.get("eval_loss"))
                log.info("%s seed %d: state %.1f MiB, RSS %.0f MiB, step %.0f ms, loss %.3f, "
                         "metric %.4f (%.0f s)", name, seed, res["training_state_bytes"] / MIB,
                         res["peak_rss"] / MIB, 1e3 * res["mean_step_s"], res["final_loss"],
                         metric, time.perf_counter() - t0)
            _write(json_path, out_dir / f"{stem}.md", out_dir / f"{stem}.png", runs,
                   args, env, command)
    return 0


def _write(json_path: Path, md_path: Path, png_path: Path, runs: list[dict],
           args: argparse.Namespace, env: dict, command: str) -> None:
    rows = summarize(runs, args.task)
    json_path.write_text(json.dumps({"environment": env, "command": command,
                                     "summary": rows, "runs": runs}, indent=1) + "\n")
    failed = [f"{r['config']} seed {r['seed']}: {r['error']}" for r in runs if "error" in r]
    md = [f"<!-- generated by: {command} ({env['date_utc']} UTC, {env['machine']}) -->",
          table(rows, args.task), ""]
    md += [f"- not run / failed: {f}" for f in failed]
    md_path.write_text("\n".join(md) + "\n")
    if rows:
        plot(runs, rows, args.task, png_path)


if __name__ == "__main__":
    sys.exit(main())
