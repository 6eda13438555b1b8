"""Builds nto_ext._C from csrc/ against the torch that is installed now.

NTO_EXT_BUILD=auto (default) | cpu | cuda | none
  auto: CUDAExtension when this torch has CUDA and nvcc is found, else CppExtension.
  none: no compiled module; the first op call JIT-builds it (nto_ext/ops.py).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _buildinfo():
    """nto_ext/_buildinfo.py, loaded by path (importing the package needs it built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_nto_buildinfo",
                                                  os.path.join(ROOT, "nto_ext", "_buildinfo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    mode = os.environ.get("NTO_EXT_BUILD", "auto").lower()
    if mode not in ("auto", "cpu", "cuda", "none"):
        raise SystemExit(f"NTO_EXT_BUILD={mode!r}: allowed values are auto, cpu, cuda, none")
    if mode == "none":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError as e:  # pragma: no cover - told to the user at build time
        raise SystemExit(
            "nto_ext compiles against the installed torch: install it first "
            "(pip install torch==2.13.0), then pip install --no-build-isolation -e ."
        ) from e
    want_cuda = mode == "cuda" or (mode == "auto" and torch.version.cuda is not None
                                   and ce.CUDA_HOME is not None)
    if mode == "cuda" and (torch.version.cuda is None or ce.CUDA_HOME is None):
        raise SystemExit(
            f"NTO_EXT_BUILD=cuda, but torch {torch.__version__} "
            + ("is a CPU-only build; install a CUDA build of torch"
               if torch.version.cuda is None else
               "found no CUDA toolkit (nvcc); install one and set CUDA_HOME")
            + ", or build the CPU kernels with NTO_EXT_BUILD=cpu")

    info = _buildinfo()
    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    kwargs = dict(name="nto_ext._C", sources=sources,
                  extra_compile_args={"cxx": info.compile_args(torch.__version__, cuda=want_cuda)},
                  extra_link_args=["-fopenmp"])
    if want_cuda:
        kwargs["sources"] += _sources("csrc/cuda/*.cu")
        kwargs["extra_compile_args"]["nvcc"] = info.cuda_args(torch.__version__)
        ext = ce.CUDAExtension(**kwargs)
    else:
        ext = ce.CppExtension(**kwargs)
    # ninja (the pip package, README's install step) also when this environment is not
    # activated: without it BuildExtension falls back to a slow serial build.
    os.environ["PATH"] = info.path_with_ninja(os.environ.get("PATH", ""))
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
