"""The `nto demo` run: NTO against torch.optim.AdamW on a packaged model and dataset.

Both optimizers see the same seed, model initialization, batches, dropout and steps. Each
one runs in its own freshly spawned process, so the process-wide, monotone peak RSS
(`ru_maxrss`) belongs to that optimizer alone. Training-state memory is measured from real
storage at every step (gradients + optimizer state [+ NTO's indices]), never estimated:
`NTO.memory_report()` for NTO, unique tensor storages of `.grad` and `optimizer.state` for
AdamW. Results go to `<out>/results.json` and `<out>/nto_demo.png`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import data
from .budget import storage_bytes
from .policies import POLICIES as _REGISTRY
from .policies.block import BlockConfig

log = logging.getLogger(__name__)

POLICIES = tuple(_REGISTRY)  # the policy names, in the registry's order
OPTIMIZERS = ("nto", "adamw")
WEIGHT_DECAY = 0.01
# per task: steps, batch size, max length (tokens), eval size (examples / LM blocks), and
# each optimizer's learning rate. Measured on the classification task (150 steps of 16,
# seed 0, 1000 held-out tweets), accuracy at lr 1e-4 / 3e-4: AdamW 73.8% / 64.9%; NTO 10%
# block, switch_every 50: ascending 63.0% / -, descending 67.4% / 73.7%; switch_every 20:
# ascending - / 68.3%, descending - / 73.9%. NTO trains each block for only
# `switch_every` steps, so it takes the larger step (as BAdam does); descending trains the
# new head and the top layers first (at 60 steps, switch_every 7 gave NTO only 65.6%: the
# new head needs more than a few steps in a row); 20 steps x 7 groups visit every block
# within 150. The default run takes about 2 minutes on 2 idle cores.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classify": {"steps": 150, "batch_size": 16, "max_length": 64, "eval_size": 1000,
                 "switch_every": 20, "lr_nto": 3e-4, "lr_adamw": 1e-4},
    "lm": {"steps": 30, "batch_size": 4, "max_length": 128, "eval_size": 32,
           "switch_every": 3, "lr_nto": 5e-5, "lr_adamw": 5e-5},
}
ORDERS = BlockConfig.ORDERS
DEFAULT_DATA = {"minilm": "tweets", "smollm2": "bbc"}
RESULTS_FILE = "results.json"
PLOT_FILE = "nto_demo.png"
MIB = 2.0 ** 20


class RunFailed(RuntimeError):
    """A training child process failed (its own messages are on stderr above)."""


@dataclass
class DemoConfig:
    """What `nto demo` runs; None fields take the task's default (TASK_DEFAULTS)."""

    model: str = "minilm"
    data: str | None = None
    steps: int | None = None
    budget: str | int | float = "10%"
    policy: str = "block"
    switch_every: int | None = None
    order: str | None = None  # block only; None: "descending" (the new head and the top
    # layers first: best measured here)
    batch_size: int | None = None
    lr: float | None = None          # both optimizers; None: lr_nto / lr_adamw
    lr_nto: float | None = None
    lr_adamw: float | None = None
    max_length: int | None = None
    eval_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    out: str = "nto-demo-out"


@dataclass
class Resolved:
    """A validated DemoConfig: every field filled in, the model located, the task known."""

    cfg: DemoConfig
    task: str            # "classify" or "lm"
    source: data.ModelSource
    num_labels: int


# ---------------------------------------------------------------------------- validation

def parse_budget(text: str | int | float) -> str | int | float:
    """A command-line budget as NTO takes it: int elements, float fraction, or a string
    ("10%", "1.5GiB") that NTO parses itself."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


# Upper bounds of the size arguments, checked before anything is allocated: far above any
# sensible demo run, far below what would exhaust memory (a batch of 10**9 rows, say).
LIMITS: dict[str, int] = {"steps": 10**6, "batch_size": 4096, "max_length": 2**16,
                          "eval_size": 10**6, "switch_every": 10**9}
DEFAULT_ORDER = "descending"


def _positive(name: str, value: Any, kind: type = int) -> None:
    hi = LIMITS.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                              or value <= 0 or (hi is not None and value > hi)):
        allowed = f"in [1, {hi:,}]" if hi is not None else "> 0"
        raise ValueError(f"--{name.replace('_', '-')} must be a positive {kind.__name__} "
                         f"{allowed}, got {value!r}")


def check_device(device: str) -> None:
    """Reject a device torch cannot parse or this machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device torch knows; use cpu or "
                         "cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this torch has no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: the demo runs on cpu or cuda")
    count = torch.cuda.device_count() if dev.type == "cuda" else 1
    if dev.index is not None and dev.index >= count:
        have = "cpu (or cpu:0)" if dev.type == "cpu" else \
            f"cuda:0 to cuda:{count - 1} ({count} device{'s' if count > 1 else ''})"
        raise ValueError(f"--device {device!r}: no such device on this machine; use {have}")


def resolve(cfg: DemoConfig) -> Resolved:
    """Validate everything that can be checked without loading weights; fill defaults.

    Raises ValueError (or data.MissingPackageError, or NotImplementedError for a policy
    not built yet) with a one-line message.
    """
    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown policy {cfg.policy!r}; allowed: {', '.join(POLICIES)}")
    if cfg.order is not None and cfg.order not in ORDERS:
        raise ValueError(f"unknown order {cfg.order!r}; allowed: {', '.join(ORDERS)}")
    if cfg.order is not None and cfg.policy != "block":
        raise ValueError(f"--order {cfg.order} applies to --policy block only (--policy "
                         f"{cfg.policy} chooses what trains by itself); drop --order")
    for name in ("steps", "batch_size", "max_length", "eval_size", "switch_every"):
        _positive(name, getattr(cfg, name))
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) \
            or not 0 <= cfg.seed < 2**63:
        raise ValueError(f"--seed must be an int in [0, 2**63), got {cfg.seed!r}")
    for name in ("lr", "lr_nto", "lr_adamw"):
        lr = getattr(cfg, name)
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr)
                                   and lr > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {lr!r}")
    data_name = cfg.data or DEFAULT_DATA.get(cfg.model, "tweets")
    if data_name not in data.DATASETS:
        raise ValueError(f"unknown dataset {data_name!r}; allowed: {', '.join(data.DATASETS)}")
    check_device(cfg.device)
    source = data.resolve_model(cfg.model)
    data.check_weights(source)
    data.locate(data_name)  # missing dataset package: say so before loading the model
    config = data.load_config(source)
    causal = data.is_causal_lm(config)
    task = "lm" if (data_name == "bbc" and causal) else "classify"
    labels = data.TWEET_LABELS if data_name == "tweets" else data.BBC_TOPICS
    filled = DemoConfig(**{**asdict(cfg), "data": data_name})
    if cfg.policy == "block" and cfg.order is None:
        filled.order = DEFAULT_ORDER
    if cfg.lr is not None:  # one --lr sets both, unless one is given on its own
        filled.lr_nto = cfg.lr_nto or cfg.lr
        filled.lr_adamw = cfg.lr_adamw or cfg.lr
    for key, value in TASK_DEFAULTS[task].items():
        if getattr(filled, key) is None:
            setattr(filled, key, value)
    _check_max_length(config, filled.max_length)
    filled.budget = parse_budget(cfg.budget)
    _check_budget_fits(config, task, len(labels), filled)
    check_out_dir(filled.out)  # last: it creates the folder
    return Resolved(filled, task, source, 0 if task == "lm" else len(labels))


def _check_max_length(config, max_length: int) -> None:
    """Tokens per example / LM block: at least 2, at most the model's positions."""
    positions = getattr(config, "max_position_embeddings", None)
    if max_length < 2 or (isinstance(positions, int) and max_length > positions):
        most = f"{positions:,}, this model's max_position_embeddings" if isinstance(
            positions, int) else f"{LIMITS['max_length']:,}"
        raise ValueError(f"--max-length {max_length}; allowed: 2 to {most}")


def check_out_dir(out: str) -> None:
    """Make `out` (a folder) and check a file can be written there, before any training:
    a results folder that cannot be written must not cost two training runs."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out!r} is a file; allowed: a folder (it is created when "
                         "missing); pass another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--out {out!r} cannot be created or written ({e.strerror or e}); "
                         "pass a folder you can write to") from None


def _check_budget_fits(config, task: str, num_labels: int, cfg: DemoConfig) -> None:
    """Let NTO's planner parse the budget and check that something fits, on meta tensors."""
    from . import plan  # the optimizer package: raises ValueError for a bad budget

    model = data.meta_model(config, task, num_labels)
    plan(model, cfg.budget, **nto_kwargs(cfg))


def nto_kwargs(cfg: DemoConfig) -> dict[str, Any]:
    """NTO's schedule arguments for this run (`order` applies to the block policy only)."""
    kw: dict[str, Any] = {"policy": cfg.policy, "switch_every": cfg.switch_every,
                          "seed": cfg.seed}
    if cfg.policy == "block":
        kw["order"] = cfg.order or DEFAULT_ORDER
    return kw


# ------------------------------------------------------------------------------ memory

def adamw_memory(model, opt) -> dict[str, int]:
    """AdamW's training state measured from storage: gradients and every state tensor."""
    grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    state = storage_bytes(v for s in opt.state.values() for v in s.values())
    return {"grad_bytes": grads, "state_bytes": state, "index_bytes": 0,
            "total_bytes": grads + state}


def nto_memory(opt) -> dict[str, int]:
    rep = dict(opt.memory_report())
    rep["total_bytes"] = rep["grad_bytes"] + rep["state_bytes"] + rep["index_bytes"]
    return rep


def current_rss() -> int | None:
    """Resident set size now, in bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss() -> int:
    """This process's peak RSS in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------------------- training

def _prepare(r: Resolved, tokenizer):
    """(n_train, take, test, majority): `take(indices)` builds one training batch; `test` is
    the tokenized held-out part; `majority` the majority-class share of it (classification).

    Training examples are tokenized per batch: only the steps x batch_size examples a run
    draws are ever tokenized (the whole tweets split takes ~10 s on one core).
    """
    cfg = r.cfg
    ds = data.load_dataset(cfg.data)
    if r.task == "lm":
        n_train = cfg.steps * cfg.batch_size
        blocks = data.lm_blocks(tokenizer, [t for t, _ in ds.train], cfg.max_length, n_train)
        test = data.lm_blocks(tokenizer, [t for t, _ in ds.test], cfg.max_length, cfg.eval_size)
        return (len(blocks), lambda idx: {"input_ids": blocks[idx], "labels": blocks[idx]},
                {"input_ids": test}, None)

    def take(idx):
        rows = [ds.train[i] for i in idx.tolist()]
        return data.trim_batch(data.encode_classification(tokenizer, rows, cfg.max_length))

    test = data.encode_classification(tokenizer, ds.test[: cfg.eval_size], cfg.max_length)
    counts = test["labels"].bincount(minlength=r.num_labels)
    return len(ds.train), take, test, float(counts.max()) / max(1, len(test["labels"]))


def _batches(n: int, take, steps: int, batch_size: int, seed: int):
    """`steps` batches of `batch_size` indices into n examples, drawn without replacement
    and reshuffled each epoch (seeded), each built by `take`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        yield take(idx)


def _make_optimizer(which: str, model, cfg: DemoConfig):
    import torch

    if which == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr_adamw,
                                 weight_decay=WEIGHT_DECAY)
    from . import NTO

    return NTO(model.named_parameters(), lr=cfg.lr_nto, weight_decay=WEIGHT_DECAY,
               budget=cfg.budget, **nto_kwargs(cfg))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(which: str, model, opt, batches, cfg: DemoConfig, device) -> dict:
    """The loop; memory is sampled after backward and after step, outside the timing."""
    from tqdm.auto import tqdm

    measure = (lambda: nto_memory(opt)) if which == "nto" else (lambda: adamw_memory(model, opt))
    losses, times, peak_mem, rss_max = [], [], {"total_bytes": -1}, current_rss() or 0
    model.train()
    bar = tqdm(batches, total=cfg.steps,
               desc=f"train {which}", unit="step", file=sys.stderr, dynamic_ncols=True)
    for batch in bar:
        batch = {k: v.to(device) for k, v in batch.items()}
        _sync(device)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        mem_bwd = measure()  # gradients exist now, before any step could free them
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        for mem in (mem_bwd, measure()):
            if mem["total_bytes"] > peak_mem["total_bytes"]:
                peak_mem = mem
        rss_max = max(rss_max, current_rss() or 0)
        opt.zero_grad(set_to_none=True)
        times.append((t1 - t0) + (t3 - t2))
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return {"losses": losses, "step_times_s": times, "training_state": peak_mem,
            "rss_max_sampled": rss_max}


def _evaluate(which: str, model, test: dict, task: str, device, batch_size: int = 64) -> dict:
    import torch
    from tqdm.auto import tqdm

    model.eval()
    n = len(test["input_ids"])
    correct, loss_sum, count = 0, 0.0, 0
    with torch.no_grad():
        for i in tqdm(range(0, n, batch_size), desc=f"eval {which}", unit="batch",
                      file=sys.stderr, dynamic_ncols=True):
            batch = {k: v[i:i + batch_size].to(device) for k, v in test.items()}
            if task == "lm":
                batch["labels"] = batch["input_ids"]
                rows = len(batch["input_ids"])
                loss_sum += float(model(**batch).loss) * rows
                count += rows
            else:
                batch = data.trim_batch(batch)
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
                count += len(batch["labels"])
    if task == "lm":
        mean = loss_sum / max(1, count)
        return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)), "eval_size": count}
    return {"accuracy": correct / max(1, count), "eval_size": count}


def run_one(r: Resolved, which: str) -> dict:
    """Load, train with `which` ("nto" or "adamw"), evaluate; runs in a fresh process."""
    import torch

    data.offline()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg, t_start = r.cfg, time.perf_counter()
    device = torch.device(cfg.device)
    tokenizer = data.load_tokenizer(r.source)
    n_train, take, test, majority = _prepare(r, tokenizer)
    torch.manual_seed(cfg.seed)  # same new head for both optimizers
    model = data.load_model(r.source, r.task, r.num_labels).to(device)
    with warnings.catch_warnings(record=True) as caught:  # shown once, under the table
        warnings.simplefilter("always")
        opt = _make_optimizer(which, model, cfg)
    # the pretrained LM's held-out loss, once (the NTO run): the yardstick for both runs
    before = _evaluate("pretrained", model, test, r.task, device) \
        if r.task == "lm" and which == "nto" else None
    rss_loaded = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)  # same dropout masks for both optimizers
    out = _train(which, model, opt, _batches(n_train, take, cfg.steps, cfg.batch_size,
                                             cfg.seed), cfg, device)
    out.update(_evaluate(which, model, test, r.task, device))
    out.update({
        "optimizer": which,
        "train_examples": n_train,
        "majority_baseline": majority,
        "rss_after_load": rss_loaded,
        "peak_rss": peak_rss(),
        "wall_s": time.perf_counter() - t_start,
        "trainable_elements": sum(p.numel() for p in model.parameters()),
        "warnings": [str(w.message) for w in caught],
        "before_training": before,
    })
    if device.type == "cuda":
        out["peak_device_allocated"] = torch.cuda.max_memory_allocated(device)
    if which == "nto":
        out["active_at_end"] = list(opt.active())
    _summarize_run(out)
    return out


def _summarize_run(out: dict) -> None:
    times, losses = out["step_times_s"], out["losses"]
    timed = times[1:] if len(times) > 1 else times  # step 1 pays one-off allocation costs
    out["mean_step_s"] = sum(timed) / len(timed)
    tail = max(1, len(losses) // 10)
    out["final_loss"] = sum(losses[-tail:]) / tail  # mean of the last 10% of steps
    out["final_loss_steps"] = tail


def _run_in_child(r: Resolved, which: str) -> dict:
    """run_one in a fresh interpreter, so its peak RSS is its own.

    A plain `python -c` child (not multiprocessing) works from any caller, notebooks and
    stdin scripts included; the config goes in and the results come back as JSON files.
    The child's stderr (progress bars) is the terminal's.
    """
    with tempfile.TemporaryDirectory(prefix="nto-demo-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"cfg": asdict(r.cfg), "task": r.task,
                                    "source": [r.source.name, str(r.source.folder),
                                               r.source.gguf_file],
                                    "num_labels": r.num_labels, "which": which}))
        code = "import sys; from nto_ext.demo import _child_main; _child_main(sys.argv[1:])"
        proc = subprocess.run([sys.executable, "-c", code, str(spec), str(result)])
        out = json.loads(result.read_text()) if result.exists() else {}
    if "error" in out or proc.returncode != 0:
        raise RunFailed(f"the {which} run failed (exit {proc.returncode}): "
                           f"{out.get('error', 'see the messages above')}")
    return out


def _child_main(argv: list[str]) -> None:
    spec_path, result_path = (Path(a) for a in argv)
    spec = json.loads(spec_path.read_text())
    name, folder, gguf = spec["source"]
    r = Resolved(DemoConfig(**spec["cfg"]), spec["task"], data.ModelSource(name, Path(folder),
                 gguf), spec["num_labels"])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run_one(r, spec["which"])
    except Exception as e:
        result_path.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise
    result_path.write_text(json.dumps(out))


# ------------------------------------------------------------------------- the demo run

def run_demo(cfg: DemoConfig, in_process: bool = False) -> dict:
    """Validate, run NTO then AdamW (each in its own process), write results.json + PNG."""
    t0 = time.perf_counter()
    r = resolve(cfg)
    out_dir = Path(r.cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for which in OPTIMIZERS:
        log.info("training %s: %s on %s, %d steps", which, r.cfg.model, r.cfg.data, r.cfg.steps)
        runs[which] = run_one(r, which) if in_process else _run_in_child(r, which)
    results = _results(r, runs, time.perf_counter() - t0)
    results["files"] = {"results": str(out_dir / RESULTS_FILE), "plot": str(out_dir / PLOT_FILE)}
    plot(results, out_dir / PLOT_FILE)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _results(r: Resolved, runs: dict, wall: float) -> dict:
    import torch
    import transformers

    from . import __version__

    nto, adamw = runs["nto"]["training_state"], runs["adamw"]["training_state"]
    budget = nto.get("budget_bytes")
    return {
        "config": {**asdict(r.cfg), "task": r.task, "model_path": str(r.source.folder),
                   "gguf_file": r.source.gguf_file, "weight_decay": WEIGHT_DECAY},
        "runs": runs,
        "summary": {
            "nto_state_bytes": nto["total_bytes"],
            "adamw_state_bytes": adamw["total_bytes"],
            "state_ratio": nto["total_bytes"] / max(1, adamw["total_bytes"]),
            "budget_bytes": budget,
            "within_budget": None if budget is None else nto["total_bytes"] <= budget,
        },
        "environment": {"nto_ext": __version__, "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_threads": torch.get_num_threads()},
        "wall_s": wall,
    }


# ------------------------------------------------------------------------------ output

def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:,.1f}"


def format_table(results: dict) -> str:
    """The side-by-side table `nto demo` prints."""
    cfg, runs, summ = results["config"], results["runs"], results["summary"]
    n, a = runs["nto"], runs["adamw"]
    budget = cfg["budget"] if isinstance(cfg["budget"], str) else repr(cfg["budget"])
    sched = f", {cfg['order']}" if cfg["policy"] == "block" else ""
    head = [f"NTO ({budget}, {cfg['policy']}{sched})", "AdamW (torch)"]
    rows: list[tuple[str, str, str]] = [
        ("training state, MiB (grads+state)", _mib(n["training_state"]["total_bytes"]),
         _mib(a["training_state"]["total_bytes"])),
        ("  gradients, MiB", _mib(n["training_state"]["grad_bytes"]),
         _mib(a["training_state"]["grad_bytes"])),
        ("  optimizer state (+index), MiB",
         _mib(n["training_state"]["state_bytes"] + n["training_state"]["index_bytes"]),
         _mib(a["training_state"]["state_bytes"])),
        ("peak process memory (RSS), MiB", _mib(n["peak_rss"]), _mib(a["peak_rss"])),
        ("learning rate", f"{cfg['lr_nto']:g}", f"{cfg['lr_adamw']:g}"),
        ("mean step time, ms", f"{n['mean_step_s'] * 1e3:,.0f}",
         f"{a['mean_step_s'] * 1e3:,.0f}"),
        (_loss_label(n["final_loss_steps"]), f"{n['final_loss']:.4f}",
         f"{a['final_loss']:.4f}"),
    ]
    if cfg["task"] == "lm":
        if n.get("before_training"):
            b = n["before_training"]
            rows.append(("held-out loss before training", f"{b['eval_loss']:.4f}",
                         f"{b['eval_loss']:.4f}"))
        rows.append((f"held-out loss ({n['eval_size']} blocks)", f"{n['eval_loss']:.4f}",
                     f"{a['eval_loss']:.4f}"))
        rows.append(("held-out perplexity", f"{n['perplexity']:.2f}", f"{a['perplexity']:.2f}"))
    else:
        rows.append((f"held-out accuracy ({n['eval_size']} ex.)", f"{n['accuracy']:.2%}",
                     f"{a['accuracy']:.2%}"))
    if "peak_device_allocated" in n:
        rows.insert(5, ("peak device memory, MiB", _mib(n["peak_device_allocated"]),
                        _mib(a["peak_device_allocated"])))
    w0 = max(len(r[0]) for r in rows)
    w1, w2 = (max(len(head[i]), *(len(r[i + 1]) for r in rows)) for i in (0, 1))
    lines = [f"{'':{w0}}  {head[0]:>{w1}}  {head[1]:>{w2}}"]
    lines += [f"{r[0]:{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}" for r in rows]
    lines.append("")
    lines.append(_verdict(cfg, summ))
    lines += [f"note: {w}" for w in n.get("warnings", [])]
    return "\n".join(lines)


def _loss_label(tail: int) -> str:
    return f"final train loss (mean, last {tail} steps)" if tail > 1 else \
        "final train loss (last step)"


def _verdict(cfg: dict, summ: dict) -> str:
    what = (f"{cfg['model']} on {cfg['data']}, {cfg['steps']} steps of {cfg['batch_size']}, "
            f"seed {cfg['seed']}")
    line = (f"NTO's training state is {summ['state_ratio']:.1%} of AdamW's ({what})")
    if summ["budget_bytes"] is not None:
        ok = "within" if summ["within_budget"] else "OVER"
        line += f"; {ok} the budget of {_mib(summ['budget_bytes'])} MiB"
    return line + "."


def plot(results: dict, path: Path) -> None:
    """Loss vs step for both optimizers, and bar charts of the two measured memories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, runs = results["config"], results["runs"]
    names = {"nto": f"NTO ({cfg['budget']}, {cfg['policy']}, lr {cfg['lr_nto']:g})",
             "adamw": f"AdamW (torch, lr {cfg['lr_adamw']:g})"}
    colors = {"nto": "tab:blue", "adamw": "tab:orange"}
    fig, (ax_loss, ax_state, ax_rss) = plt.subplots(
        1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    for which in OPTIMIZERS:
        losses = runs[which]["losses"]
        steps = range(1, len(losses) + 1)
        ax_loss.plot(steps, losses, color=colors[which], alpha=0.25, linewidth=1)
        ax_loss.plot(steps, _smooth(losses), color=colors[which], linewidth=2,
                     label=f"{names[which]} (moving average)")
    ax_loss.set(xlabel="training step", ylabel="training loss (cross-entropy)",
                title=f"{cfg['model']} on {cfg['data']}: training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    labels = [f"NTO\n({cfg['budget']}, {cfg['policy']})", "AdamW\n(torch)"]
    state = [runs[w]["training_state"]["total_bytes"] / MIB for w in OPTIMIZERS]
    _bars(ax_state, labels, state, [colors[w] for w in OPTIMIZERS],
          "training state (grads + optimizer state), MiB", "training-state memory (measured)")
    budget = results["summary"]["budget_bytes"]
    if budget is not None:
        ax_state.axhline(budget / MIB, color="tab:red", linestyle="--",
                         label=f"budget {budget / MIB:,.1f} MiB")
        ax_state.legend(loc="upper left")
    rss = [runs[w]["peak_rss"] / MIB for w in OPTIMIZERS]
    _bars(ax_rss, labels, rss, [colors[w] for w in OPTIMIZERS],
          "peak resident memory of the process, MiB", "peak process memory (ru_maxrss)")
    fig.suptitle(_headline(cfg, runs), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _headline(cfg: dict, runs: dict) -> str:
    n, a = runs["nto"], runs["adamw"]
    if cfg["task"] == "lm":
        score = (f"held-out perplexity: NTO {n['perplexity']:.2f}, "
                 f"AdamW {a['perplexity']:.2f}")
    else:
        score = (f"held-out accuracy ({n['eval_size']} ex.): NTO {n['accuracy']:.1%}, "
                 f"AdamW {a['accuracy']:.1%}")
    return (f"{cfg['model']} on {cfg['data']}, {cfg['steps']} steps of {cfg['batch_size']}, "
            f"seed {cfg['seed']}  |  {score}")


def _bars(ax, labels: list[str], values: list[float], colors: list[str], ylabel: str,
          title: str) -> None:
    bars = ax.bar(labels, values, color=colors, width=0.6)
    ax.bar_label(bars, labels=[f"{v:,.1f} MiB" for v in values], padding=2)
    ax.set(ylabel=ylabel, title=title)
    ax.set_ylim(0, max(values) * 1.2 if max(values) > 0 else 1)
    ax.grid(axis="y", alpha=0.3)


def _smooth(xs: list[float], window: int = 0) -> list[float]:
    """Trailing moving average (window: ~5% of the run, at least 1)."""
    window = window or max(1, len(xs) // 20)
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out
