"""The CUDA path's build, checked without a GPU: every .cu compiles through nvcc's front ends
against the installed torch's headers (bench/cuda_syntax_check.sh; skipped, with the reason,
when nvcc is missing or unusable), every op has a CUDA registration, and setup.py / the JIT
build pick the CUDA sources exactly when torch has CUDA and nvcc is found."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nto_ext import ops

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"


def test_cuda_sources_compile_with_nvcc():
    """~45 s on 2 cores: one translation unit, front ends only (no code generation)."""
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "cuda_syntax_check.sh")], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout + r.stderr
    if r.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1])
    assert r.returncode == 0, out[-6000:]
    assert "passed" in out


@pytest.mark.slow
def test_dense_adamw_kernel_fits_two_blocks_per_sm_without_spills():
    """Issue 20: the dense kernel took 102-114 registers (one 512-thread block per SM); its
    __launch_bounds__(512, 2) caps it at 64, which it must meet without spilling (ptxas,
    sm_90; ~1 minute)."""
    env = dict(os.environ, PYTHON=sys.executable, NTO_CUDA_CHECK="full", JOBS="1",
               NTO_CUDA_FILES="csrc/cuda/masked_adamw.cu", NTO_CUDA_EXTRA="-Xptxas -v")
    r = subprocess.run(["bash", str(ROOT / "bench" / "cuda_syntax_check.sh")], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout + r.stderr
    if r.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1])
    assert r.returncode == 0, out[-6000:]
    regs, kernel = {}, None
    for line in out.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            kernel = m.group(1)
        elif m := re.search(r"Used (\d+) registers", line):
            regs[kernel] = int(m.group(1))
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            assert m.groups() == ("0", "0"), f"{kernel} spills: {line}"
    dense = {k: v for k, v in regs.items() if "dense_kernel" in k}
    assert len(dense) >= 5 and all(v <= 64 for v in dense.values()), dense  # + bf16 moments
    assert any("indexed_kernel" in k for k in regs), regs


def _registered(folder: Path, key: str) -> dict[str, str]:
    """op name -> file, for every TORCH_LIBRARY_IMPL(nto, <key>, m) m.impl in folder."""
    found = {}
    for f in sorted(folder.glob("*.c*")):
        for block in re.findall(rf"TORCH_LIBRARY_IMPL\(nto, {key}, m\)\s*\{{(.*?)\}}",
                                f.read_text(), re.S):
            for name in re.findall(r'm\.impl\("(\w+)"', block):
                found[name] = f.name
    return found


@pytest.mark.parametrize("folder,key", [("cpu", "CPU"), ("cuda", "CUDA")])
def test_every_op_has_a_kernel_per_backend(folder, key):
    registered = _registered(ROOT / "csrc" / folder, key)
    missing = [s for s in ops.SCHEMAS if s not in registered]
    assert not missing, f"ops without a {key} kernel: {missing}"
    unknown = [s for s in registered if s not in ops.SCHEMAS]
    assert not unknown, f"{key} kernels for ops that nto_ext/ops.py does not define: {unknown}"


def test_csrc_defines_no_schema():
    """ops.py defines the operators; csrc/ only adds kernels (a second TORCH_LIBRARY(nto)
    would refuse to load beside ops.py's definitions)."""
    defining = [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.*")
                if re.search(r"TORCH_LIBRARY\(|\.def\(", p.read_text())]
    assert not defining, f"schemas defined in {defining}; define them in ops.SCHEMAS"


def _captured_jit(monkeypatch, cuda_version, cuda_home):
    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(kw))
    monkeypatch.delenv("NTO_EXT_JIT", raising=False)
    module = ops._jit_build()
    return module, seen


def test_jit_build_adds_cuda_sources_when_torch_has_cuda(monkeypatch):
    module, kw = _captured_jit(monkeypatch, "12.8", "/usr/local/cuda")
    cu = sorted(str(p) for p in CUDA_DIR.glob("*.cu"))
    assert cu and [s for s in kw["sources"] if s.endswith(".cu")] == cu
    assert "-DNTO_WITH_CUDA" in kw["extra_cflags"] and "-DNTO_WITH_CUDA" in kw["extra_cuda_cflags"]
    assert module.with_cuda == 1


@pytest.mark.parametrize("cuda_version,cuda_home", [(None, "/usr/local/cuda"), ("12.8", None)])
def test_jit_build_is_cpu_only_otherwise(monkeypatch, cuda_version, cuda_home):
    module, kw = _captured_jit(monkeypatch, cuda_version, cuda_home)
    assert not [s for s in kw["sources"] if s.endswith(".cu")]
    assert kw["extra_cuda_cflags"] is None and "-DNTO_WITH_CUDA" not in kw["extra_cflags"]
    assert module.with_cuda == 0


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_forced_cuda_build_on_cpu_torch_says_why():
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, NTO_EXT_BUILD="cuda"), timeout=300)
    assert r.returncode != 0
    assert "NTO_EXT_BUILD=cuda" in r.stderr and "CPU-only build" in r.stderr


# ------------------------------------------------------------ bench/gpu_check.sh (issue 20)

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python in gpu_check.sh: imports succeed, the CUDA probe reports a device,
# anything else (the build) hangs.
case "$*" in
  --version) echo "Python (fake)" ;;
  "-c import "*) exit 0 ;;
  -) cat > /dev/null; echo "torch 0.0 (CUDA 12.8), Fake GPU, 1 GiB, sm_90" ;;
  *get_device_capability*) echo 9.0 ;;
  *) exec sleep 600 ;;
esac
"""


def _gpu_check(tmp_path, **env):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OUT=str(out), **env))
    return r, (out / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_gpu_check_without_cuda_writes_the_summary_naming_why(tmp_path):
    r, summary = _gpu_check(tmp_path, PYTHON=sys.executable)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED: torch cannot run CUDA here" in summary
    assert "- build: not reached" in summary and "exit status 1" in summary


def test_gpu_check_step_that_hangs_is_timed_out_and_the_summary_kept(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"  # gpu_check only asks for its version
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8'\necho 'Build'\n")
    nvcc.chmod(0o755)
    r, summary = _gpu_check(tmp_path, PYTHON=str(fake), BUILD_TIMEOUT="3",
                            CUDA_HOME=str(nvcc.parent.parent))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "- build: TIMED OUT" in summary and "Fake GPU" in summary
    assert "TIMED OUT after 3 s" in (tmp_path / "out" / "build.log").read_text()


# ------------------------------------------------------------- bench/bench_cuda.py


def test_bench_cuda_dry_run_reports_host_time_per_call(tmp_path):
    """--device cpu runs the script's plumbing (no GPU): every timed measure reports GPU-side
    milliseconds and host microseconds per call, and the markdown has both columns."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_cuda.py"), "--device",
                        "cpu", "--elements", str(1 << 15), "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json

    res = json.loads((tmp_path / "bench_cuda.json").read_text())
    for key in ("dense_fp32", "dense_bf16", "indexed10_fp32", "param_stats", "topk10"):
        assert res[key]["ms"] > 0 and res[key]["host_us"] > 0, key
    assert res["dense_fp32"]["fused_host_us"] > 0
    assert "host us/call" in (tmp_path / "bench_cuda.md").read_text()
