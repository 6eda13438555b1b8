"""Run PyTorch's own generic optimizer tests (TestOptimRenewed) against NTO.

    python bench/torch_optim_contract.py --torch-tests /path/to/pytorch/test/test_optim.py

PyTorch's `test/test_optim.py` is not shipped in the wheel and is not part of this
repository: pass the file of the PyTorch release that matches the installed torch (it
imports `torch.testing._internal.common_optimizers`, which the wheel does ship). The
script builds an `OptimizerInfo` for NTO modeled on AdamW's (AdamW's configs, error
inputs, supported impls and decorators), replaces torch's optimizer database with it
before the test module is imported (the `@optims` decorators read the database at class
definition), runs every generated CPU test for NTO and writes a table of passed / failed /
skipped tests with the first line of each failure to docs/torch_optim_contract.md.

Two variants are run: budget "100%" (NTO must be AdamW) and a partial budget ("40%",
policy "block", switch_every=2). torch's tests build models of one to four tensors, so a
partial budget there often trains a single tensor; tests/test_torch_contract.py checks the
same contract at a partial budget on a model with enough tensors to hold it.
`--with-adamw` also runs torch.optim.AdamW through the same harness, as the baseline.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import os
import platform
import re
import sys
import time
import types
import unittest
from pathlib import Path

# Only CPU tests: set before torch's device-type machinery reads it.
os.environ.setdefault("PYTORCH_TESTING_DEVICE_ONLY_FOR", "cpu")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_MODULE = "torch_test_optim_for_nto"
PARTIAL = {"budget": "40%", "policy": "block", "switch_every": 2}
DROPPED: dict[str, str] = {}  # AdamW configs / flags left out of NTO's info, and why

# Why a test fails for NTO, by test name (without the _<optim>_cpu_<dtype> tail). Filled in
# from reading each failure (see docs/torch_optim_contract.md); "design" entries are meant
# to stay, the others name the fix that makes the test pass.
CLASSIFICATION: dict[str, str] = {
    "test_errors": "design: exact error wording. Every bad input is still refused (see the "
                   "input-by-input table below), in NTO's words (what was given, what is "
                   "allowed, what to do); torch's regexes match AdamW's own sentences. NTO "
                   "also refuses a param listed twice in one group (torch only warns) and "
                   "checks params before lr",
    "test_complex": "design: complex params are refused at construction with the reason "
                    "(NTO's kernels and memory model are real-valued; train "
                    "torch.view_as_real(p), which is the same update, or use AdamW)",
    "test_complex_2d": "design: complex params are refused (see test_complex)",
    "test_foreach_matches_forloop": "float64: the test runs only in float64, which NTO "
                                    "refuses with the reason (its kernels compute in fp32); "
                                    "design while the refusal stays (issue 16 item 10 allows "
                                    "it), passes once float64 params are supported",
    "test_fused_matches_forloop": "float64: as test_foreach_matches_forloop (the fp32, bf16 "
                                  "and fp16 variants pass)",
    "test_fused_error_on_params_on_meta": "design: meta params are refused at step() with "
                                          "NTO's own ValueError (materialize the model "
                                          "first); torch expects its RuntimeError wording",
    "test_step_is_noop_for_zero_grads": "test harness: the test lowers lr to 1e-5 only for a "
                                        "class named 'AdamW' (whose default weight_decay=1e-2 "
                                        "decays params that have zero grads); NTO has the "
                                        "same default and decays them exactly as AdamW with "
                                        "lr=1e-3 does",
    "test_load_nontensor_step": "needs the fix for Python-number `step` values on load "
                                "(helper: state_dict / load)",
    "test_state_dict_pre_hook": "needs the fix for non-param keys in `opt.state` (the hook "
                                "puts optimizer.state['test'] = 1; helper: state_dict)",
    "test_state_dict_pre_post_hook": "needs the fix for non-param keys in `opt.state` (as "
                                     "test_state_dict_pre_hook)",
    "test_load_state_dict_post_hook": "needs the fix for non-param keys in `opt.state` (the "
                                      "hook writes optimizer.state['ran_...'])",
    "test_load_state_dict_pre_post_hook": "needs the fix for non-param keys in `opt.state`",
    "test_deepcopy_copies_all_public_attrs": "needs the deepcopy / pickle fix (lead)",
    "test_state_dict_deterministic": "design: its last check appends param_groups to "
                                     "itself (`optimizer_c.param_groups.extend(...)`, every "
                                     "param twice) and calls state_dict(); NTO refuses a "
                                     "param listed twice (its state maps params by name and "
                                     "index). Everything before it (load, 10 steps in "
                                     "lockstep, equal state_dicts) passes",
    "test_step_pre_hook": "design: the test builds the optimizer on a tensor without "
                          "requires_grad and sets .grad by hand; NTO treats params with "
                          "requires_grad=False at construction as the user's frozen params "
                          "(issue 16 item 1: never trained, never counted), so nothing would "
                          "train and NTO refuses with a ValueError saying so",
    "test_step_post_hook": "design: all params frozen (as test_step_pre_hook)",
    "test_step_all_hooks": "design: all params frozen (as test_step_pre_hook)",
    "test_step_is_noop_when_params_have_no_grad": "design: all params frozen (as "
                                                  "test_step_pre_hook)",
    "test_can_load_older_state_dict": "needs old-state loading without the AdamW impl keys "
                                      "(foreach / fused / maximize / capturable / "
                                      "differentiable) in param_groups (lead, item 6)",
    "test_can_load_from_to_named_state_dict": "needs the AdamW kwargs (lead, item 6)",
    "test_forloop_goes_right_direction": "needs the AdamW kwargs / non-contiguous params "
                                         "(lead, items 5-6)",
    "test_param_groups_lr": "needs the AdamW kwargs in param groups (lead, item 6)",
    "test_param_groups_weight_decay": "needs the AdamW kwargs in param groups (lead, item 6)",
    "test_tensor_lr": "needs the AdamW kwargs (lead, item 6)",
    "test_non_empty_state": "needs `maximize` (lead, item 6)",
    "test_optimizer_can_be_printed": "needs the AdamW kwargs (lead, item 6)",
    "test_save_load_equality_with_weights_only": "needs the AdamW kwargs (lead, item 6)",
}


def _stub_sibling_modules() -> None:
    """test_optim.py imports three sibling test files it re-exports; they are not needed."""
    pkg = types.ModuleType("optim")
    pkg.__path__ = []  # a package, so `optim.x` imports resolve from sys.modules
    sys.modules["optim"] = pkg
    for name, attrs in {"test_lrscheduler": ("TestLRScheduler",),
                        "test_optim": ("TestDifferentiableOptimizer",),
                        "test_swa_utils": ("TestSWAUtils",)}.items():
        mod = types.ModuleType(f"optim.{name}")
        for a in attrs:
            setattr(mod, a, type(a, (), {}))  # not a TestCase: nothing is collected
        sys.modules[f"optim.{name}"] = mod
        setattr(pkg, name, mod)


IMPL_KWARGS = ("foreach", "fused", "capturable", "differentiable")


def _nto_class(name: str, bound: dict, peel: bool = False):
    """An NTO subclass whose defaults carry `bound` (budget, ...): every test builds the
    variant under test, also those that pass no kwargs or put the configs' kwargs in
    param-group dicts (NTO refuses its global arguments per group, so the configs do not
    carry them). `peel` (diagnostic only) drops AdamW's implementation kwargs before NTO
    sees them, to show what a test hits after them."""
    from nto_ext import NTO

    def __init__(self, params, *args, **kwargs):
        if peel:
            for k in IMPL_KWARGS:
                kwargs.pop(k, None)
        for k, v in bound.items():
            kwargs.setdefault(k, v)
        NTO.__init__(self, params, *args, **kwargs)

    return type(name, (NTO,), {"__init__": __init__, "__module__": __name__})


def _refusal(kwargs: dict) -> str | None:
    """NTO's ValueError for `kwargs` when it refuses them by design (a deliberate, named
    refusal), else None. A TypeError (an unknown keyword) is not a refusal: such configs
    stay in and fail, since AdamW's keywords must at least be understood."""
    from nto_ext import NTO

    try:
        NTO([torch.nn.Parameter(torch.zeros(4))], budget="100%", **kwargs)
    except ValueError as e:
        return str(e).splitlines()[0]
    except Exception:  # noqa: BLE001 (anything else is not a deliberate refusal)
        return None
    return None


def _nto_info(co, cls, dropped: dict[str, str]):
    """OptimizerInfo for `cls` modeled on AdamW's entry in torch's own database: AdamW's
    configs and implementation flags, less those NTO refuses by design (recorded in
    `dropped`, shown in the report), so that one refused flag does not hide every other
    result of a test that loops over all configs."""
    adamw = next(o for o in co.optim_db if o.optim_cls is torch.optim.AdamW)
    refused_cfg = {k: r for k in ("amsgrad", "maximize") if (r := _refusal({k: True}))}
    impls = []
    for impl in adamw.supported_impls:
        reason = _refusal({impl: True})
        if reason:
            dropped[f"{impl}=True (implementation flag)"] = reason
        else:
            impls.append(impl)
    for k, r in refused_cfg.items():
        dropped[f"configs with {k}=True"] = r

    def inputs(device, dtype=None):
        return [oi for oi in co.optim_inputs_func_adamw(device, dtype)
                if not any(oi.kwargs.get(k) for k in refused_cfg)]

    return co.OptimizerInfo(
        cls,
        optim_inputs_func=inputs,
        optim_error_inputs_func=co.optim_error_inputs_func_adamw,
        scheduler_inputs=adamw.scheduler_inputs,
        supported_impls=tuple(impls),
        not_og_supported_flags=adamw.not_og_supported_flags,
        supports_fused_on=adamw.supports_fused_on if "fused" in impls else (),
        has_capturable_arg=adamw.has_capturable_arg,
        decorators=adamw.decorators,
    ), adamw


def load_tests(torch_tests: Path, with_adamw: bool,
               peel: bool = False) -> tuple[type, list[str]]:
    """Import test_optim.py with only our OptimizerInfos in the database; returns the
    generated CPU test class and the optimizer names to run."""
    import torch.testing._internal.common_optimizers as co

    full = _nto_class("NTO", {"budget": "100%"}, peel)
    partial = _nto_class("NTO_40pct", PARTIAL, peel)
    info_full, adamw = _nto_info(co, full, DROPPED)
    info_partial, _ = _nto_info(co, partial, {})
    infos = [info_full, info_partial] + ([adamw] if with_adamw else [])
    co.optim_db[:] = infos  # in place: test_optim.py imports this very list
    _stub_sibling_modules()
    spec = importlib.util.spec_from_file_location(TEST_MODULE, torch_tests)
    module = importlib.util.module_from_spec(spec)
    sys.modules[TEST_MODULE] = module
    spec.loader.exec_module(module)
    return module.TestOptimRenewedCPU, [i.optim_cls.__name__ for i in infos]


class _Result(unittest.TestResult):
    """Records (status, first line) per test id."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, tuple[str, str]] = {}

    @staticmethod
    def _first_line(err) -> str:
        exc_type, exc, _ = err
        text = str(exc).strip().splitlines()
        return f"{exc_type.__name__}: {text[0] if text else ''}"[:240]

    def addSuccess(self, test):  # noqa: N802 (unittest API)
        self.rows[test.id()] = ("passed", "")

    def addFailure(self, test, err):  # noqa: N802
        self.rows[test.id()] = ("failed", self._first_line(err))

    def addError(self, test, err):  # noqa: N802
        self.rows[test.id()] = ("failed", self._first_line(err))

    def addSkip(self, test, reason):  # noqa: N802
        self.rows[test.id()] = ("skipped", str(reason).splitlines()[0][:240])

    def addExpectedFailure(self, test, err):  # noqa: N802
        self.rows[test.id()] = ("xfail", self._first_line(err))

    def addUnexpectedSuccess(self, test):  # noqa: N802
        self.rows[test.id()] = ("passed", "unexpected success")


def run(test_cls: type, optim_name: str, only: str | None) -> list[tuple[str, str, str]]:
    pattern = re.compile(rf"_{re.escape(optim_name)}_cpu_")
    names = [n for n in unittest.TestLoader().getTestCaseNames(test_cls) if pattern.search(n)]
    if only:
        names = [n for n in names if re.search(only, n)]
    result = _Result()
    for n in sorted(names):
        test_cls(n).run(result)
    return [(n, *result.rows.get(f"{test_cls.__module__}.{test_cls.__name__}.{n}",
                                 ("failed", "no result recorded"))) for n in sorted(names)]


def _base(test_name: str) -> str:
    """The test method's name: parametrized names put their params (`_contiguous_True`)
    and then the optimizer, device and dtype after it."""
    known = [k for k in CLASSIFICATION if test_name.startswith(k + "_")]
    if known:
        return max(known, key=len)
    return re.sub(r"_(NTO|NTO_40pct|AdamW)_cpu_.*$", "", test_name)


def _table(rows: list[tuple[str, str, str]], classify: bool) -> list[str]:
    out = ["| test | result | first line of the failure / skip reason |"
           + (" classification |" if classify else ""),
           "|---|---|---|" + ("---|" if classify else "")]
    for name, status, line in rows:
        line = line.replace("|", "\\|").replace("\n", " ")
        cls = ""
        if classify and status == "failed":
            cls = CLASSIFICATION.get(_base(name), "unclassified")
        out.append(f"| `{name}` | {status} | {line} |" + (f" {cls} |" if classify else ""))
    return out


def _counts(rows) -> str:
    n = {s: sum(1 for r in rows if r[1] == s) for s in ("passed", "failed", "skipped")}
    return f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped of {len(rows)}"


def error_inputs_report(cls) -> list[str]:
    """test_errors input by input: is each bad input still refused, with the same
    exception type? (Its message is NTO's own; torch's regexes match AdamW's wording.)"""
    import torch.testing._internal.common_optimizers as co

    rows = ["| bad input | torch expects | NTO raises | same type |", "|---|---|---|---|"]
    for ei in co.optim_error_inputs_func_adamw("cpu", torch.float32):
        oi = ei.optimizer_error_input
        try:
            if ei.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
                cls(oi.params, **oi.kwargs)
            else:
                cls(oi.params, **oi.kwargs).step()
            got, same = "nothing", "no"
        except Exception as e:  # noqa: BLE001 (reporting whatever it raised)
            got = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            same = "yes" if isinstance(e, ei.error_type) else "no"
        want = f"{ei.error_type.__name__}: `{ei.error_regex}`"
        rows.append(f"| {oi.desc} | {want} | {got[:200]} | {same} |".replace("\n", " "))
    return rows


def _source_rev(path: Path) -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_report(path: Path, results: dict[str, list], argv: list[str], seconds: float,
                 torch_tests: Path) -> None:
    import nto_ext
    import nto_ext.ops as ops

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# PyTorch's generic optimizer tests (TestOptimRenewed) on NTO",
        "",
        "Generated by `bench/torch_optim_contract.py`; do not edit by hand.",
        "",
        f"- date: {now}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.system()} {platform.release()}; torch {torch.__version__}; "
        f"nto_ext {nto_ext.__version__} from `{Path(nto_ext.__file__).parent}` (git "
        f"{_source_rev(Path(nto_ext.__file__).parent)}), "
        f"backend `{ops.backend()}`; {seconds:.0f} s",
        f"- command: `python {' '.join(argv)}`",
        *(["- **diagnostic run** (`--peel-impl-kwargs`): AdamW's implementation kwargs were "
           "dropped before NTO saw them; not a result"] if "--peel-impl-kwargs" in argv else []),
        f"- tests: `{torch_tests.name}` ({torch_tests.stat().st_size:,} bytes, sha256 "
        f"{hashlib.sha256(torch_tests.read_bytes()).hexdigest()[:16]}), PyTorch's "
        "`test/test_optim.py` (the TestOptimRenewed generation with named-param state "
        "dicts, which imports against torch 2.13's `common_optimizers`), kept outside this "
        "repository",
        "- NTO's OptimizerInfo is AdamW's (configs default / lr / weight_decay / maximize / "
        "amsgrad, AdamW's error inputs, supported impls foreach / differentiable / fused, "
        "AdamW's decorators), less what is listed as left out below; the variant's own "
        "arguments (budget, policy, switch_every) are bound as defaults of an NTO "
        "subclass, so every test builds that variant, also those that pass no kwargs or "
        "put a config's kwargs in param-group dicts.",
        *(["- left out of NTO's OptimizerInfo because NTO refuses them by design (a "
           "ValueError naming them; each would otherwise fail every test that loops over "
           "all configs):"] if DROPPED else []),
        *[f"  - {k}: \"{v}\"" for k, v in DROPPED.items()],
        "",
    ]
    for optim_name, rows in results.items():
        title = {"NTO": 'NTO, budget="100%"',
                 "NTO_40pct": f"NTO, partial budget {PARTIAL}",
                 "AdamW": "torch.optim.AdamW (baseline, same harness)"}[optim_name]
        lines += [f"## {title}: {_counts(rows)}", ""]
        if optim_name == "NTO_40pct":
            lines += ["torch's tests use models of 1-4 tensors: at 40% such a model often "
                      "has one tensor that fits, so these results say little about the "
                      "contract at a partial budget; `tests/test_torch_contract.py` checks it "
                      "on a model with 8+ tensors. Shown for completeness.", ""]
        lines += _table(rows, classify=optim_name == "NTO") + [""]
    if "NTO" in results:
        lines += ["## Classification of the failures at 100%", "",
                  "A `design` entry is a deliberate difference from torch.optim.AdamW and "
                  "stays; `test harness` means the test itself special-cases an optimizer "
                  "by name; any other entry names the fix that makes the test pass.", ""]
        seen = []
        for name, status, _ in results["NTO"]:
            b = _base(name)
            if status == "failed" and b not in seen:
                seen.append(b)
                lines.append(f"- `{b}`: {CLASSIFICATION.get(b, 'unclassified')}")
        lines.append("")
        from nto_ext import NTO
        lines += ["## test_errors, input by input (NTO at 100%)", "",
                  *error_inputs_report(NTO), ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-tests", type=Path, required=True,
                    help="path to PyTorch's test/test_optim.py (matching the installed torch)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "torch_optim_contract.md")
    ap.add_argument("--only", help="regex: run only matching test names")
    ap.add_argument("--variants", default="NTO,NTO_40pct",
                    help="comma-separated: NTO (100%%), NTO_40pct, AdamW")
    ap.add_argument("--with-adamw", action="store_true", help="also run torch.optim.AdamW")
    ap.add_argument("--peel-impl-kwargs", action="store_true",
                    help="diagnostic: drop foreach/fused/capturable/differentiable before NTO "
                         "sees them (shows the failure behind them); not a result")
    args = ap.parse_args(argv)
    if not args.torch_tests.is_file():
        ap.error(f"--torch-tests {args.torch_tests}: no such file; pass PyTorch's "
                 "test/test_optim.py of the installed torch version")
    variants = args.variants.split(",") + (["AdamW"] if args.with_adamw else [])
    t0 = time.perf_counter()
    test_cls, available = load_tests(args.torch_tests.resolve(), "AdamW" in variants,
                                      args.peel_impl_kwargs)
    results = {}
    for v in variants:
        if v not in available:
            ap.error(f"--variants {v!r}: allowed {', '.join(available)}")
        results[v] = run(test_cls, v, args.only)
        print(f"{v}: {_counts(results[v])}", flush=True)
    shown = ["bench/torch_optim_contract.py", *(argv if argv is not None else sys.argv[1:])]
    write_report(args.out, results, shown, time.perf_counter() - t0, args.torch_tests)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
