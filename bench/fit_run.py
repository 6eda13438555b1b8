"""Train what AdamW cannot fit (issue 23): a 1.71B-parameter Llama in fp32 under a memory cap.

A random-init Llama of SmolLM2-1.7B's shape (fp32, 6.8 GB of weights; no weights of that
size are packaged) on the packaged BBC News text, 1 x 128 tokens per step. Each optimizer
runs in a CHILD process capped with RLIMIT_DATA (never the whole machine):

- torch.optim.AdamW needs weights + gradients + two moments (~27 GB): it fails;
- NTO(budget="auto", memory=CAP) trains STEPS steps under the same cap;

then `nto plan --fit CAP --activation-bytes A` (A = what NTO measured: the first batch
under a plan settles the figure, see nto_ext/auto.py) predicts the peak of the steps at
that plan (3+), shown beside their measured peak resident memory. Writes
docs/results/fit_run.md, .json and .png.

    python bench/fit_run.py                      # cap 12GiB, 6 steps (~10 min, 2 cores)
    python bench/fit_run.py --cap 12GiB --steps 6

It uses up to the cap (+ ~1 GB) of RAM: run it on a machine that has that free.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
# SmolLM2-1.7B's shape (HuggingFaceTB/SmolLM2-1.7B config.json), in fp32
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 130000, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
}
SEQ_LEN = 128
LR = 3e-4


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def parse_bytes(text: str) -> int:
    from nto_ext.fit import parse_memory

    return parse_memory(text, "--cap")[0]


# ------------------------------------------------------------------ the child
def child(kind: str, memory: str, steps: int, config_dir: str, out: str) -> None:
    cap = parse_bytes(memory)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))  # first: nothing allocated yet
    if kind == "capcheck":
        return _capcheck(cap, out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    import transformers

    from nto_ext import NTO, data

    torch.manual_seed(0)
    tok = data.load_tokenizer(data.resolve_model("smollm2"))
    texts = [t for t, _ in data.load_dataset("bbc").train]
    blocks = data.lm_blocks(tok, texts, SEQ_LEN, max_blocks=steps)
    config = transformers.AutoConfig.from_pretrained(config_dir)
    t0 = time.perf_counter()
    model = transformers.LlamaForCausalLM(config)
    res = {"kind": kind, "cap": cap, "params": sum(p.numel() for p in model.parameters()),
           "build_s": time.perf_counter() - t0, "losses": [], "step_s": [],
           "rss_after_build": status_bytes("VmRSS")}
    try:
        if kind == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=LR)
        else:
            opt = NTO(model.named_parameters(), lr=LR, budget="auto", memory=memory)
        reset_peak()  # the training peak: from here on
        for i in range(steps):
            t = time.perf_counter()
            x = blocks[i: i + 1]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            res["losses"].append(float(loss.detach()))
            res["step_s"].append(time.perf_counter() - t)
            if i < 2 and kind == "nto":  # step 1: provisional plan; 2: the first figure's
                res[f"auto_step{i + 1}"] = opt.memory_report()["budget_auto"]
                res[f"peak_step{i + 1}"] = status_bytes("VmHWM")
                reset_peak()  # steps 3..: trained at the settled plan
            logging.info("%s step %d loss %.4f %.1f s, peak RSS %.2f GB", kind, i + 1,
                         res["losses"][-1], res["step_s"][-1], status_bytes("VmHWM") / 1e9)
        res["outcome"] = "trained"
        if kind == "nto":
            rep = opt.memory_report()
            res["auto"] = rep["budget_auto"]
            res["report"] = {k: v for k, v in rep.items() if k != "budget_auto"}
    except (RuntimeError, MemoryError) as e:  # the allocator's "can't allocate memory"
        res["outcome"] = "failed"
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        res["failed_at_step"] = len(res["losses"]) + 1
        res["trace_tail"] = traceback.format_exc().splitlines()[-4:]
    res["peak"] = status_bytes("VmHWM")
    Path(out).write_text(json.dumps(res, indent=1))


def _capcheck(cap: int, out: str) -> None:
    """The cap works: allocating past it fails in this process, cleanly."""
    import torch

    try:
        torch.empty(cap // 4 + 2**28, dtype=torch.float32).fill_(1)
        ok = False
    except RuntimeError:
        ok = True
    Path(out).write_text(json.dumps({"cap_refuses": ok}))


def run_child(kind: str, cap: str, steps: int, config_dir: str, tmp: str) -> dict:
    out = os.path.join(tmp, f"{kind}.json")
    cmd = [sys.executable, __file__, "--child", kind, "--cap", cap, "--steps", str(steps),
           "--config", config_dir, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    sys.stderr.write(proc.stderr[-3000:])
    if not os.path.exists(out):
        return {"kind": kind, "outcome": f"crashed (exit {proc.returncode})",
                "error": proc.stderr.strip().splitlines()[-1:] or [""]}
    res = json.loads(Path(out).read_text())
    res["exit"] = proc.returncode
    return res


# ------------------------------------------------------------------ the parent
def predict(cap_text: str, config_dir: str, act: int) -> dict:
    cmd = [sys.executable, "-m", "nto_ext", "plan", "--model", config_dir, "--fit", cap_text,
           "--activation-bytes", str(act), "--batch-size", "1", "--seq-len", str(SEQ_LEN),
           "--json"]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    res = json.loads(out)
    res["seconds"] = time.perf_counter() - t
    res["command"] = " ".join(["nto"] + cmd[3:]).replace(config_dir, "smollm2-1.7b-shape/")
    return res


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def write(cap_text: str, cap: int, adamw: dict, nto: dict, fit: dict) -> None:
    auto, first = nto.get("auto", {}), nto.get("auto_step1", {})
    pred = fit["predicted_bytes"] - fit["margin_bytes"]
    meas = nto.get("peak", 0)
    err = (meas - pred) / pred if pred else float("nan")
    params = nto.get("params") or adamw.get("params")
    adamw_need = params * 16  # weights + grads + 2 moments, fp32
    rows = [
        ("model", f"Llama of SmolLM2-1.7B's shape, random init, fp32: {params:,} params "
                  f"({gb(params * 4)} of weights)"),
        ("data", f"packaged BBC News text, 1 x {SEQ_LEN} tokens per step"),
        ("memory cap", f"{cap_text} ({gb(cap)}) per child process (RLIMIT_DATA)"),
        ("AdamW (torch.optim.AdamW)", f"**{adamw['outcome']}**"
         + (f" at step {adamw.get('failed_at_step')}: `{adamw.get('error', '')[:160]}`"
            if adamw["outcome"] != "trained" else "")
         + f"; needs ~{gb(adamw_need)} for weights + grads + moments alone"),
        ("NTO budget=\"auto\"", f"**{nto['outcome']}** {len(nto.get('losses', []))} steps, "
         f"loss {' -> '.join(f'{x:.3f}' for x in nto.get('losses', []))}"),
        ("NTO chosen budget", f"{auto.get('budget_elements', 0):,} elements "
         f"({auto.get('budget_percent', 0):.1f}%), policy block"),
        ("budget after the first batch (its upper-bound figure)",
         f"{first.get('budget_elements', 0):,} elements ({first.get('budget_percent', 0):.1f}%)"),
        ("activations measured", f"first batch (nothing frozen) "
         f"{gb(auto.get('first_batch_activation_bytes') or 0)}; settled (step 2, under the "
         f"plan) {gb(auto.get('activation_bytes') or 0)}; + other process memory "
         f"{gb(auto.get('other_bytes', 0))}; re-plans {auto.get('replans', 0)}"),
        ("`nto plan --fit` predicted peak", f"{gb(pred)} (budget {fit['budget_elements']:,}"
         f", + {gb(fit['margin_bytes'])} margin = {gb(fit['predicted_bytes'])}; "
         f"answered in {fit['seconds']:.1f} s)"),
        ("measured peak RSS (steps 3+, the settled plan)", f"{gb(meas)} ({err:+.1%} vs "
         "predicted)"),
        ("measured peak RSS (step 1, provisional plan; step 2, first plan)",
         f"{gb(nto.get('peak_step1', 0))}; {gb(nto.get('peak_step2', 0))}"),
        ("NTO seconds per step", ", ".join(f"{s:.1f}" for s in nto.get("step_s", []))),
    ]
    md = ["# Training what AdamW cannot fit: 1.71B params in fp32 under a memory cap", "",
          "Machine: 2 CPU cores, 24 GiB RAM (shared). Command: `python bench/fit_run.py "
          f"--cap {cap_text} --steps {len(nto.get('losses', [])) or 6}`. "
          "Both optimizers run in a child process capped with `resource.setrlimit("
          "RLIMIT_DATA)`; the cap was first checked to refuse an allocation past it.", "",
          "| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows] + [
          "", f"Prediction: `{fit['command']}` (the activation figure is the one NTO "
          "settled on: peak resident memory of the forward/backward of step 2, the first "
          "under a plan, less what was held before, plus the process's memory beyond the "
          "weights). Measured: VmHWM of the child, reset after step 2.",
          "", f"Within 10%: {'yes' if abs(err) <= 0.10 else 'NO'} ({err:+.1%}). The "
          "first batch (nothing frozen yet) makes every weight gradient and saves every "
          "op's input for it, later steps do not: NTO plans on its figure, then re-plans "
          "upward once on the second batch's (nto_ext/auto.py).",
          "", f"NTO's log line: {auto.get('why', '')}", "", "![fit run](fit_run.png)", ""]
    (OUT / "fit_run.md").write_text("\n".join(md))
    (OUT / "fit_run.json").write_text(json.dumps(
        {"cap": cap_text, "adamw": adamw, "nto": nto, "plan_fit": fit}, indent=1))
    plot(cap, adamw_need, pred, meas, nto.get("losses", []), params)


def plot(cap: int, adamw_need: int, pred: int, meas: int, losses: list, params: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = ["AdamW\nneeds", "NTO auto\npredicted", "NTO auto\nmeasured"]
    vals = [adamw_need / 1e9, pred / 1e9, meas / 1e9]
    a.bar(names, vals, color=["#c44", "#888", "#48c"])
    a.axhline(cap / 1e9, color="k", ls="--", lw=1)
    a.text(2.45, cap / 1e9, " cap", va="center")
    a.set_ylabel("GB")
    a.set_title(f"{params / 1e9:.2f}B params, fp32, memory cap")
    b.plot(range(1, len(losses) + 1), losses, "o-", color="#48c")
    b.set_xlabel("step (1 x 128 tokens)")
    b.set_ylabel("training loss")
    b.set_title("NTO budget='auto' under the cap")
    fig.tight_layout()
    fig.savefig(OUT / "fit_run.png", dpi=80)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", default="12GiB")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", choices=["adamw", "nto", "capcheck"])
    ap.add_argument("--config")
    ap.add_argument("--out")
    ap.add_argument("--out-dir", default=str(OUT), help="where the results go")
    ap.add_argument("--tiny", action="store_true",
                    help="a 4-layer, 256-wide model of the same vocabulary: checks this script")
    args = ap.parse_args()
    OUT = Path(args.out_dir)
    if args.tiny:
        CONFIG.update(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4)
    if args.child:
        return child(args.child, args.cap, args.steps, args.config, args.out)
    cap = parse_bytes(args.cap)
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = os.path.join(tmp, "smollm2-1.7b-shape")
        os.makedirs(config_dir)
        Path(config_dir, "config.json").write_text(json.dumps(CONFIG))
        check = run_child("capcheck", "1GiB", 0, config_dir, tmp)
        if not check.get("cap_refuses"):
            sys.exit(f"RLIMIT_DATA did not refuse an allocation past the cap ({check}); "
                     "not running uncapped")
        adamw = run_child("adamw", args.cap, args.steps, config_dir, tmp)
        print("AdamW:", adamw["outcome"], adamw.get("error", ""), flush=True)
        nto = run_child("nto", args.cap, args.steps, config_dir, tmp)
        print("NTO:", nto["outcome"], nto.get("losses"), nto.get("error", ""), flush=True)
        auto = nto.get("auto") or {}
        act = (auto.get("activation_bytes") or 0) + auto.get("other_bytes", 0)
        fit = predict(args.cap, config_dir, act)
        write(args.cap, cap, adamw, nto, fit)
    print((OUT / "fit_run.md").read_text())


if __name__ == "__main__":
    main()
