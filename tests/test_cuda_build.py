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
