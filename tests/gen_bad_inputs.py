"""Generate docs/bad_inputs.md: every rejected input the tests check, with the exception and
the message the code gives now (run each case, record what it raises).

    python -m tests.gen_bad_inputs           # (re)write docs/bad_inputs.md
    python -m tests.gen_bad_inputs --check   # exit 1 when docs/bad_inputs.md is stale

Sources (the tests assert each row's exception and message pattern):
  tests/test_optimizer.py   BAD_INPUTS        NTO(...) arguments
  tests/test_ops.py         BAD_ADAMW         ops.masked_adamw_ arguments
  tests/test_fuzz_ops.py    KERNEL_BAD_INPUTS the other ops
  tests/test_reliability.py LOAD_BAD_INPUTS   NTO.load_state_dict(...) checkpoints
  tests/test_checkpoint_safety.py CORRUPT, FOREIGN  corrupted, crafted and foreign states
tests/test_reliability.py::test_bad_inputs_doc_is_up_to_date fails when the file is stale.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DOC = ROOT / "docs" / "bad_inputs.md"
if str(TESTS) not in sys.path:  # the test modules import their helpers (tiny, toy) by name
    sys.path.insert(0, str(TESTS))

import torch  # noqa: E402


@dataclass
class Row:
    given: str
    error: str
    message: str


@dataclass
class Section:
    title: str
    source: str
    intro: str
    rows: list[Row]


def _refusal(fn: Callable[[], object], exc: type | tuple, given: str) -> Row:
    """Run `fn`, which must raise `exc`; the row holds what it raised."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except exc as e:
        return Row(given, type(e).__name__, str(e).strip().splitlines()[0])
    raise AssertionError(f"{given} is no longer refused: update the test table")


def _describe(v: object) -> str:
    """Short source-like text of a test argument (tensors by shape, dtype, layout)."""
    if isinstance(v, list):
        return "[" + ", ".join(_describe(x) for x in v) + "]"
    if not isinstance(v, torch.Tensor):
        return repr(v)
    dtype = "" if v.dtype in (torch.float32, torch.int64) else \
        f", dtype={str(v.dtype).removeprefix('torch.')}"
    if not v.is_contiguous():
        return f"<non-contiguous {tuple(v.shape)}{dtype}>"
    if v.numel() <= 4:
        return f"tensor({v.tolist()}{dtype})"
    shape = ", ".join(str(d) for d in v.shape)
    return f"zeros({shape}{dtype})"


def _constructor_section() -> Section:
    import test_optimizer
    from tiny import tiny_llama

    from nto_ext import NTO

    model = tiny_llama()
    rows = []
    for kwargs, exc, _ in test_optimizer.BAD_INPUTS:
        kwargs = dict(kwargs)
        params = kwargs.pop("params", None)
        args = [repr(params) if params is not None else "model.named_parameters()"]
        args += [f"{k}={v!r}" for k, v in kwargs.items()]
        source = params.factory() if params is not None else model.named_parameters()
        rows.append(_refusal(lambda s=source, kw=kwargs: NTO(s, **kw), exc,
                             f"NTO({', '.join(args)})"))
    return Section("NTO(...) arguments", "tests/test_optimizer.py BAD_INPUTS",
                   "`model` is a 4-layer Llama (45,344 parameters in 39 tensors). Everything "
                   "is refused before any hook is installed or any flag changed.", rows)


def _masked_adamw_section() -> Section:
    import test_ops

    from nto_ext import ops

    rows = []
    for over, exc, _ in test_ops.BAD_ADAMW:
        def call(over=over):
            a = test_ops._adamw_args(**over)
            ops.masked_adamw_(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"],
                              a["indices"], a["steps"], **{
                                  "lr": test_ops.HYPER["lr"], "beta1": test_ops.HYPER["beta1"],
                                  "beta2": test_ops.HYPER["beta2"], "eps": test_ops.HYPER["eps"],
                                  "weight_decay": test_ops.HYPER["weight_decay"]})
        given = ", ".join(f"{k}={_describe(v)}" for k, v in over.items())
        rows.append(_refusal(call, exc, f"masked_adamw_({given}, ...)"))
    return Section("ops.masked_adamw_ arguments", "tests/test_ops.py BAD_ADAMW",
                   "The other arguments are valid: params [zeros(10), zeros(10)], the second "
                   "indexed by tensor([1, 4, 9]) with 3-element state. Kernel and reference "
                   "give the same messages (tests/test_ops.py, tests/test_fuzz_ops.py); "
                   "nothing is written before the check fails.", rows)


def _other_ops_section() -> Section:
    import test_fuzz_ops

    from nto_ext import ops

    rows = [_refusal(lambda op=op, f=factory: getattr(ops, op)(*f()), exc, text)
            for op, text, factory, exc, _ in test_fuzz_ops.KERNEL_BAD_INPUTS]
    return Section("The other ops", "tests/test_fuzz_ops.py KERNEL_BAD_INPUTS",
                   "Through the public door `nto_ext.ops`; the compiled kernels raise the same.",
                   rows)


def _checkpoint_section() -> Section:
    import test_reliability as t
    from toy import toy_params, train

    rows = []
    for text, factory, exc, _ in t.LOAD_BAD_INPUTS:
        named = toy_params()
        opt = t.build(named, **t.LOAD_KW)
        train(opt, [p for _, p in named], range(3))
        bad = factory()
        rows.append(_refusal(lambda o=opt, b=bad: o.load_state_dict(b), exc, text))
    rows.append(Row("torch.load(a checkpoint file cut short)", "RuntimeError",
                    _truncated_file_message()))
    return Section("Checkpoints: NTO.load_state_dict(...)", "tests/test_reliability.py "
                   "LOAD_BAD_INPUTS",
                   "Each input is passed to `opt.load_state_dict(...)`, where `opt` is an NTO "
                   "over a toy model (11 tensors, budget=80 elements, "
                   "switch_every=2, state_on_switch='offload') after 3 steps. A refused load "
                   "changes nothing: params, grads, requires_grad, state (on the device and "
                   "offloaded), schedule and param groups stay as they were, and training "
                   "continues bit-identically.", rows)


def _safety_section() -> Section:
    import test_checkpoint_safety as t
    from toy import toy_params, train

    rows = []
    cases = [(text, lambda e=edit: t._edit(e)) for text, edit, _ in t.CORRUPT]
    cases += [(text, factory) for text, factory, _ in t.FOREIGN]
    for text, factory in cases:
        named = toy_params()
        opt = t.build(named)
        train(opt, [p for _, p in named], range(3))
        bad = factory()
        rows.append(_refusal(lambda o=opt, b=bad: o.load_state_dict(b), ValueError, text))
    return Section("Checkpoints: corrupted, crafted and foreign states",
                   "tests/test_checkpoint_safety.py CORRUPT, FOREIGN",
                   "The same toy NTO after 3 steps loads an NTO checkpoint edited as described "
                   "(first rows) or a torch optimizer's state_dict (last rows). Every tensor and "
                   "count is checked before anything is replaced; a refused load changes "
                   "nothing.", rows)


def _truncated_file_message() -> str:
    import io

    buf = io.BytesIO()
    torch.save({"state": {}, "param_groups": []}, buf)
    cut = io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2])
    try:
        torch.load(cut, weights_only=True)
    except RuntimeError as e:
        return str(e).strip().splitlines()[0]
    raise AssertionError("torch.load accepted a truncated file")


def collect() -> list[Section]:
    return [_constructor_section(), _masked_adamw_section(), _other_ops_section(),
            _checkpoint_section(), _safety_section()]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(sections: list[Section] | None = None) -> str:
    sections = collect() if sections is None else sections
    n = sum(len(s.rows) for s in sections)
    out = ["# Bad inputs and what they raise", "",
           f"Every rejected input the tests check ({n} in all), with the exception and the "
           "message the code gives now. Generated by `python -m tests.gen_bad_inputs` from "
           "the tests' tables; `tests/test_reliability.py::test_bad_inputs_doc_is_up_to_date` "
           "fails when this file is stale. Do not edit by hand.", ""]
    for s in sections:
        out += [f"## {s.title}", "", f"From `{s.source}`. {s.intro}", "",
                "| input | raises | message |", "|---|---|---|"]
        out += [f"| `{_cell(r.given)}` | {r.error} | {_cell(r.message)} |" for r in s.rows]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/bad_inputs.md differs from what would be written")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = render()
    if args.check:
        stale = not DOC.exists() or DOC.read_text() != text
        print(f"{DOC}: {'stale' if stale else 'up to date'}")
        return int(stale)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
