"""The foundation: the compiled backend is the one running, fallbacks work and say why."""

import os
import subprocess
import sys

import pytest
import torch

import nto_ext
from nto_ext import _reference, ops


def _run(code: str, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=600)


def test_installed_backend_is_compiled():
    # CI installs as the README says; silently landing on the reference must fail here.
    if os.environ.get("NTO_EXT_BACKEND") == "reference":
        pytest.skip("reference backend forced by the environment")
    assert ops.backend() in ("cpu-ext", "cuda-ext")


def test_forced_reference_gives_same_results():
    code = ("import torch, nto_ext; torch.manual_seed(0); "
            "t=[torch.randn(4097), torch.randn(65537).bfloat16()]; "
            "print(nto_ext.ops.backend()); r=nto_ext.ops.param_stats(t); "
            "print(r[0].tolist(), r[1].tolist(), r[2].tolist(), r[3].sum().item())")
    ref = _run(code, NTO_EXT_BACKEND="reference")
    ext = _run(code, NTO_EXT_BACKEND="")
    assert ref.returncode == 0, ref.stderr
    assert ref.stdout.splitlines()[0] == "reference"
    a, b = ref.stdout.splitlines()[1], ext.stdout.splitlines()[1]
    # numel/absmax/hist exact; sumsq: fp32-lane accumulation (see test_ops.SUMSQ_RTOL)
    ra, rb = a.split("] ["), b.split("] [")
    assert ra[0] == rb[0] and ra[2] == rb[2]
    for x, y in zip(ra[1].strip("[]").split(","), rb[1].strip("[]").split(",")):
        assert float(x) == pytest.approx(float(y), rel=1e-5)


def test_bad_backend_env_is_named():
    r = _run("import nto_ext; nto_ext.ops.backend()", NTO_EXT_BACKEND="gpu")
    assert r.returncode != 0
    assert "NTO_EXT_BACKEND='gpu'" in r.stderr and "reference, cpu, cuda" in r.stderr


def test_stale_build_is_detected(tmp_path, monkeypatch):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF...nto-ext-built-against-torch:1.0.0\0...")
    assert ops._built_against(fake) == "1.0.0"
    monkeypatch.setattr(ops.importlib.util, "find_spec",
                        lambda name: type("S", (), {"origin": str(fake)})())
    with pytest.raises(ops.BuildMismatchError, match="built against torch 1.0.0.*rebuild"):
        ops._load_compiled()


def test_missing_extension_without_jit_warns_once_and_falls_back(tmp_path):
    code = ("import warnings, importlib.util, torch; import nto_ext.ops as o; "
            "o.importlib.util.find_spec = lambda n: None; "
            "warnings.simplefilter('always'); "
            "print(o.backend()); print(o.backend()); "
            "print(o.param_stats([torch.ones(3)])[1].item())")
    r = _run(code, NTO_EXT_JIT="0", NTO_EXT_BACKEND="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reference", "reference", "3.0"]
    assert r.stderr.count("RuntimeWarning") == 1
    assert "nto_ext._C is not built" in r.stderr and "NTO_EXT_JIT=0" in r.stderr


def test_forced_cpu_without_extension_fails_loudly():
    code = ("import importlib.util; import nto_ext.ops as o; "
            "o.importlib.util.find_spec = lambda n: None; o.backend()")
    r = _run(code, NTO_EXT_JIT="0", NTO_EXT_BACKEND="cpu")
    assert r.returncode != 0 and "NTO_EXT_BACKEND=cpu but the extension is unavailable" in r.stderr


@pytest.mark.slow
def test_jit_build_when_module_missing():
    code = ("import importlib.util; import nto_ext.ops as o; "
            "o.importlib.util.find_spec = lambda n: None; print(o.backend())")
    r = _run(code, NTO_EXT_BACKEND="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cpu-ext"


def test_cli_version_and_help():
    r = _run("import sys; from nto_ext.cli import main; sys.exit(main(['--version']))")
    assert nto_ext.__version__ in r.stdout
    r = subprocess.run([sys.executable, "-m", "nto_ext", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: nto" in r.stdout


def test_param_stats_plumbing_agrees_with_reference():
    torch.manual_seed(0)
    ts = [torch.randn(70000), torch.randn(5, 7).half(), torch.empty(0),
          torch.tensor([float("inf"), 0.0, 1e-40, -2.0])]
    got, want = ops.param_stats(ts), _reference.param_stats(ts)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0)  # sumsq: fp32 lanes
    for g, w in zip((got[0], got[2], got[3]), (want[0], want[2], want[3])):
        assert torch.equal(g, w)
