"""The `nto` command (also `python -m nto_ext`).

- `nto demo`: fine-tune a packaged model with NTO and with torch AdamW, side by side.
- `nto plan`: what would train under a budget, and its memory, from a config (no weights).
- `nto backend`: which kernel path runs.

Bad input ends in one line on stderr (`nto <command>: error: ...`) and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import NoReturn

from . import __version__
from .formats import STATE_DTYPES
from .policies import DEFAULT_POLICY, POLICIES

_POLICY_HELP = f"{', '.join(POLICIES)} (default: {DEFAULT_POLICY})"

EXIT_BAD_INPUT = 2
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and the same exit status."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fail(command: str, err: BaseException) -> int:
    msg = " ".join(str(err).split()) or type(err).__name__
    print(f"nto {command}: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import MissingPackageError

    # NotImplementedError: a policy the optimizer names but does not provide yet;
    # OSError: a file or folder named on the command line cannot be read or written
    return (ValueError, TypeError, NotImplementedError, MissingPackageError, OSError)


def _check_backend_env() -> None:
    """NTO_EXT_BACKEND, when set, must name a path (checked before any work starts)."""
    from . import ops

    ops.forced_backend()


# ---------------------------------------------------------------------------- commands

def _cmd_backend(args: argparse.Namespace) -> int:
    from . import ops

    try:
        ops.forced_backend()  # checked even when this process loaded the ops already
        name = ops.backend()
    except (ValueError, RuntimeError) as e:  # a bad or unavailable NTO_EXT_BACKEND
        return _fail("backend", e)
    print(name)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    cfg = demo.DemoConfig(model=args.model, data=args.data, steps=args.steps,
                          budget=args.budget, policy=args.policy,
                          switch_every=args.switch_every, order=args.order,
                          batch_size=args.batch_size, lr=args.lr, lr_nto=args.lr_nto,
                          lr_adamw=args.lr_adamw, max_length=args.max_length,
                          eval_size=args.eval_size,
                          seed=args.seed, device=args.device, out=args.out)
    try:
        _check_backend_env()
        results = demo.run_demo(cfg)
    except _user_errors() as e:
        return _fail("demo", e)
    except demo.RunFailed as e:
        print(f"nto demo: {e}", file=sys.stderr)
        return 1
    print()
    print(demo.format_table(results))
    print(f"wrote {results['files']['results']} and {results['files']['plot']} "
          f"({results['wall_s']:.0f} s in all)")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    try:
        p = _make_plan(args)
    except _user_errors() as e:
        return _fail("plan", e)
    if p.fit is None:
        print(json.dumps(p.to_dict(), indent=2) if args.json else str(p))
    elif args.json:
        d = p.to_dict()
        print(json.dumps({**d.pop("fit"), "plan": d}, indent=2))
    else:
        print(p.fit)
        print(f"(nto plan --model {args.model} --budget {p.fit.budget_elements}"
              f"{_plan_flags(args)} shows what trains in each period)")
    return 0


def _plan_flags(args: argparse.Namespace) -> str:
    """The flags of `args` that change what a plan prices (to repeat them with --budget)."""
    flags = [(args.dtype is not None, f" --dtype {args.dtype}"),
             (args.policy != DEFAULT_POLICY, f" --policy {args.policy}"),
             (args.master_weights is False, " --no-master-weights"),
             (args.stochastic_rounding, " --stochastic-rounding"),
             (args.switch_every != 50, f" --switch-every {args.switch_every}"),
             (args.state_dtype != "fp32", f" --state-dtype {args.state_dtype}"),
             (args.step_in_backward, " --step-in-backward"),
             (args.num_labels is not None, f" --num-labels {args.num_labels}")]
    return "".join(flag for given, flag in flags if given)


def _make_plan(args: argparse.Namespace):
    """Every argument is checked before the model is built (on the meta device)."""
    import torch

    from . import data, plan
    from .demo import POLICIES, parse_budget
    from .fit import check_fit_args
    from .planner import config_dtype

    if args.policy not in POLICIES:
        raise ValueError(f"unknown policy {args.policy!r}; allowed: {', '.join(POLICIES)}")
    if args.num_labels is not None and not 1 <= args.num_labels <= data.MAX_NUM_LABELS:
        raise ValueError(f"--num-labels {args.num_labels}; allowed: an int in "
                         f"[1, {data.MAX_NUM_LABELS:,}] (the classification head's size)")
    fit_args = {"activation_bytes": args.activation_bytes, "batch_size": args.batch_size,
                "seq_len": args.seq_len}
    if args.fit is None:
        budget = parse_budget(args.budget)
        given = [f"--{k.replace('_', '-')}" for k, v in fit_args.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: used with --fit only (not --budget); "
                             "pass --fit MEMORY (e.g. --fit 24GiB) or drop them")
    else:
        budget = None
        check_fit_args(args.fit, **fit_args)
    _check_backend_env()
    src = data.resolve_model(args.model)
    config = data.load_config(src)
    if args.dtype is not None:
        dtype, source = getattr(torch, DTYPES[args.dtype]), "--dtype"
    else:
        dtype, source = config_dtype(config)
    model = data.meta_model(config, num_labels=args.num_labels, dtype=dtype)
    fit = {} if args.fit is None else {"fit": args.fit, **fit_args}
    p = plan(model, budget, policy=args.policy, dtype=dtype, master_weights=args.master_weights,
             stochastic_rounding=args.stochastic_rounding, state_dtype=args.state_dtype,
             switch_every=args.switch_every, step_in_backward=args.step_in_backward, **fit)
    p.dtype_source = source
    return p


# ------------------------------------------------------------------------------ parser

def _add_demo(sub) -> None:
    from .data import DATASETS, MODELS

    d = sub.add_parser(
        "demo", help="fine-tune a packaged model with NTO and with AdamW, side by side",
        description=(
            "Fine-tune a pretrained model with NTO (under --budget) and with torch AdamW, "
            "same seed, data and steps, each in its own process; print training-state "
            "memory, peak process memory, step time, loss and held-out accuracy; write "
            "results.json and a PNG to --out. Default: all-MiniLM-L6-v2 on the tweets "
            "sentiment corpus (3 classes), nothing downloaded."))
    d.add_argument("--model", default="minilm", metavar="NAME_OR_PATH",
                   help=f"packaged model ({', '.join(MODELS)}) or a local HF folder "
                        "(default: minilm)")
    d.add_argument("--data", choices=DATASETS, default=None,
                   help="dataset (default: tweets for encoders, bbc for causal LMs; bbc with "
                        "a causal LM is language modelling, otherwise 5-topic classification)")
    d.add_argument("--steps", type=int, help="training steps (default: 150; 30 for causal LMs)")
    d.add_argument("--budget", default="10%",
                   help="NTO budget: '10%%', 0.1, an element count, or bytes like '64MiB' "
                        "(default: 10%%)")
    d.add_argument("--policy", default=DEFAULT_POLICY, help=_POLICY_HELP)
    d.add_argument("--switch-every", type=int,
                   help="steps between changes of NTO's active set (default: 20; 3 for LMs)")
    d.add_argument("--order", default=None,
                   help="NTO block order, --policy block only: ascending, descending, random or "
                        "importance (default: descending: the head and top layers first)")
    d.add_argument("--batch-size", type=int, help="examples per step (default: 16; 4 for LMs)")
    d.add_argument("--lr", type=float,
                   help="learning rate of both optimizers (default: NTO 3e-4, AdamW 1e-4, "
                        "each the better of the two here; 5e-5 for LMs)")
    d.add_argument("--lr-nto", type=float, help="NTO's learning rate alone")
    d.add_argument("--lr-adamw", type=float, help="AdamW's learning rate alone")
    d.add_argument("--max-length", type=int,
                   help="tokens per example / LM block (default: 64; 128 for LMs)")
    d.add_argument("--eval-size", type=int,
                   help="held-out examples (default: 1000) or LM blocks (default: 32)")
    d.add_argument("--seed", type=int, default=0, help="seed for init, batches, dropout, NTO")
    d.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    d.add_argument("--out", default="nto-demo-out", metavar="DIR",
                   help="where results.json and nto_demo.png go (default: ./nto-demo-out)")
    d.set_defaults(func=_cmd_demo)


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="what would train under a budget, and its memory (no weights loaded)",
        description=(
            "Build the model on the meta device from its config (no weights are read) and "
            "show what NTO would train under --budget: groups, bytes per group, and NTO's "
            "training-state memory against AdamW's and 8-bit AdamW's (computed). With "
            "--fit MEMORY instead: the largest budget whose predicted peak fits MEMORY."))
    p.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                   help="packaged model (minilm, smollm2), a local HF folder, or a .gguf file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--budget", help="'8GiB', '512MiB', '10%%', 0.1 or an element count")
    what.add_argument("--fit", metavar="MEMORY",
                      help="instead of --budget: the largest budget whose predicted peak "
                           "(weights + training state + 5%% margin, + --activation-bytes "
                           "when given) fits this memory, e.g. 24GiB")
    p.add_argument("--activation-bytes", metavar="N", default=None,
                   help="with --fit: your measured activation peak of one forward/backward "
                        "(bytes or '3GiB'); without it activations are unknown, not counted")
    p.add_argument("--batch-size", type=int, default=None,
                   help="with --fit: the batch the activations are for (shown)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="with --fit: tokens per example the activations are for (shown)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="parameter dtype (default: the config's torch_dtype, else fp32)")
    p.add_argument("--policy", default=DEFAULT_POLICY, help=_POLICY_HELP)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--no-master-weights", dest="master_weights", action="store_false",
                     default=None, help="bf16/fp16 params without fp32 master weights")
    fmt.add_argument("--stochastic-rounding", action="store_true",
                     help="bf16/fp16 params rounded stochastically instead of fp32 masters")
    p.add_argument("--switch-every", type=int, default=50,
                   help="optimizer steps between changes of the active set (default 50; "
                        "--state-dtype none needs 1)")
    p.add_argument("--state-dtype", default="fp32", choices=STATE_DTYPES,
                   help="how the two AdamW moments are stored: fp32 (8 B per element), int8 "
                        "(blockwise 8-bit, 2.03 B), int4 (both in one byte, 1.13 B; block/"
                        "sample), bf16 (4 B) or none (0 B: every update is AdamW's first; "
                        "block/sample with a switch every step); with int8/int4/bf16/none, "
                        "bf16 models also need --no-master-weights")
    p.add_argument("--step-in-backward", action="store_true",
                   help="each param updated in backward and its gradient freed there (block, "
                        "sample): the budget holds the moments only")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classification head size for encoder models (default: the config's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nto", description=(
        "nto_ext: fine-tune HuggingFace models under a hard training-state memory budget."))
    p.add_argument("--version", action="version", version=f"nto_ext {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    b = sub.add_parser("backend",
                       help="print which kernel path runs: cpu-ext, cuda-ext or reference")
    b.set_defaults(func=_cmd_backend)
    _add_demo(sub)
    _add_plan(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
