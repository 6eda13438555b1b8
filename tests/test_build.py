"""The foundation: the compiled backend is the one running, fallbacks work and say why."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nto_ext
from nto_ext import _reference, ops

ROOT = Path(__file__).resolve().parent.parent


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
    assert ops._built_against(fake.read_bytes()) == "1.0.0"
    monkeypatch.setattr(ops.importlib.util, "find_spec",
                        lambda name: type("S", (), {"origin": str(fake)})())
    with pytest.raises(ops.BuildMismatchError, match="built against torch 1.0.0.*rebuild"):
        ops._load_compiled()


def test_statically_linked_libstdcxx_is_refused_before_loading(tmp_path, monkeypatch):
    """A module that carries its own libstdc++ (seen on a GPU image's /opt/gcc) crashed the
    process at its first error message: refused by name before it is loaded."""
    fake = tmp_path / "_C.so"
    marker = f"nto-ext-built-against-torch:{torch.__version__}\0".encode()
    fake.write_bytes(b"\x7fELF..." + marker + b"_ZNSt6locale7classicEv\0libc10.so\0")
    monkeypatch.setattr(ops.importlib.util, "find_spec",
                        lambda name: type("S", (), {"origin": str(fake)})())
    with pytest.raises(ops.BuildMismatchError, match="libstdc\\+\\+ linked into it.*CXX=g\\+\\+"):
        ops._load_compiled()
    assert not ops._links_libstdcxx_statically(
        b"_ZNSt6locale7classicEv\0libstdc++.so.6\0")  # imported from the shared library


def test_the_built_module_links_libstdcxx_dynamically():
    spec = importlib.util.find_spec("nto_ext._C")
    if spec is None or spec.origin is None:
        pytest.skip("nto_ext._C is not built")
    assert not ops._links_libstdcxx_statically(Path(spec.origin).read_bytes())


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


# One door: ops.py defines the operators with the reference as their default kernel; _C only
# adds CPU/CUDA kernels, which the dispatcher prefers. Which one ran is seen in the profile:
# the reference param_stats calls aten::bincount, the CPU kernel calls no ATen op for it.
WHICH_RAN = ("import sys, torch, nto_ext.ops as o\n"
             "x = [torch.randn(1000)]\n"
             "o.param_stats(x)\n"
             "with torch.profiler.profile() as prof:\n"
             "    o.param_stats(x)\n"
             "names = {e.name for e in prof.events()}\n"
             "print(o.backend(), 'nto::param_stats' in names, 'aten::bincount' in names,\n"
             "      'nto_ext._C' in sys.modules)")


def test_compiled_cpu_kernel_wins_over_the_reference():
    if os.environ.get("NTO_EXT_BACKEND") == "reference":
        pytest.skip("reference backend forced by the environment")
    r = _run(WHICH_RAN, NTO_EXT_BACKEND="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu-ext", "True", "False", "True"]


def test_forced_reference_runs_the_reference_through_the_same_op():
    r = _run(WHICH_RAN, NTO_EXT_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["reference", "True", "True", "False"]


def test_fakes_are_registered_without_the_extension():
    code = ("import torch, nto_ext.ops as o\n"
            "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "from torch.fx.experimental.symbolic_shapes import ShapeEnv\n"
            "m = torch.empty(5, device='meta')\n"
            "print(torch.ops.nto.param_stats([m])[3].shape)\n"
            "print(torch.ops.nto.remap_state([torch.arange(5, device='meta')],\n"
            "    [torch.arange(3, device='meta')], [torch.empty(2, 5, device='meta')])[0].shape)\n"
            "with FakeTensorMode(shape_env=ShapeEnv()):\n"
            "    print(len(torch.ops.nto.select_topk([torch.randn(9)], 4)))\n"
            "try:\n"
            "    torch.ops.nto.select_topk([m], 6)\n"
            "except ValueError as e:\n"
            "    print(str(e).split(';')[0])\n"
            "print(o.backend())")
    r = _run(code, NTO_EXT_BACKEND="reference")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["torch.Size([1, 256])", "torch.Size([2, 3])", "1",
                                     "select_topk: k=6 is out of range", "reference"]


def test_ops_asks_the_dispatcher_nothing_private():
    src = (ROOT / "nto_ext" / "ops.py").read_text()
    assert "torch._C" not in src and "_reference." + "masked_adamw_(" not in src


# ninja: torch's cpp_extension needs the executable (the JIT build refuses to start without
# it); the pip package is declared, and the README installs it before building.


def _ninja_requirement(reqs: list[str]) -> str | None:
    return next((r for r in reqs if re.match(r"ninja\b", r)), None)


def test_ninja_is_declared_where_the_install_needs_it():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert _ninja_requirement(meta["build-system"]["requires"]), "build-system.requires"
    assert _ninja_requirement(meta["project"]["dependencies"]), "project.dependencies"
    # --no-build-isolation installs no build requirement: each README command that builds
    # must have installed ninja in an earlier step of the same command.
    commands = [line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("python3.11 -m venv") and "--no-build-isolation" in line]
    assert len(commands) >= 2, "the README's demo and test commands"
    for cmd in commands:
        before = cmd.split("--no-build-isolation")[0]
        assert re.search(r"pip install [^&]*\bninja\b", before), cmd


def test_path_with_ninja_adds_the_package_folder_only_when_needed(tmp_path, monkeypatch):
    from nto_ext._buildinfo import path_with_ninja

    pkg, system = tmp_path / "pkg", tmp_path / "system"
    pkg.mkdir(), system.mkdir()
    monkeypatch.setitem(sys.modules, "ninja", type(sys)("ninja"))
    monkeypatch.setattr(sys.modules["ninja"], "BIN_DIR", str(pkg), raising=False)
    assert path_with_ninja(str(system)) == os.pathsep.join([str(pkg), str(system)])
    exe = system / "ninja"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert path_with_ninja(str(system)) == str(system)  # a ninja on PATH is used as it is


def _path_without_ninja(farm: Path) -> str:
    """One folder linking every program on this PATH except ninja (the compiler stays)."""
    farm.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name != "ninja" and not os.path.lexists(farm / name):
                (farm / name).symlink_to(Path(folder) / name)
    return str(farm)


JIT_IN_VENV = ("import importlib.util, shutil; import nto_ext.ops as o; "
               "o.importlib.util.find_spec = lambda n: None; "
               "print(shutil.which('ninja'), o.backend())")


@pytest.mark.slow
def test_jit_build_in_a_fresh_venv_without_system_ninja(tmp_path):
    """Minutes: a fresh venv (torch and nto_ext from this environment through a .pth file),
    PATH without any ninja and without the venv's bin (not activated), NTO_EXT_BACKEND=cpu.
    Without the pip package the JIT build must fail naming ninja; with the declared
    requirement installed (from PyPI) it must build and run the compiled kernels."""
    import sysconfig

    import tomllib

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # appended after the venv's own site-packages: a ninja installed there comes first
    Path(site, "nto_host.pth").write_text(f"{sysconfig.get_path('purelib')}\n{ROOT}\n")
    env = dict(os.environ, PATH=_path_without_ninja(tmp_path / "bin"), NTO_EXT_BACKEND="cpu",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))

    def jit():
        return subprocess.run([py, "-c", JIT_IN_VENV], capture_output=True, text=True,
                              env=env, timeout=1800)

    r = jit()
    assert r.returncode != 0 and "ninja" in r.stderr.lower(), r.stdout + r.stderr[-3000:]
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    req = _ninja_requirement(meta["project"]["dependencies"])
    subprocess.run([py, "-m", "pip", "install", "-q", "--ignore-installed", "--no-deps", req],
                   check=True, timeout=600, env=env)
    r = jit()
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["None", "cpu-ext"]
