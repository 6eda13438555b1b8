"""The only door to the kernels.

Loads the compiled module `nto_ext._C` (registering `torch.ops.nto.*`), or JIT-builds the
same sources when it is missing, or falls back to `nto_ext._reference` with one warning
naming the reason. Every op is exposed here as a plain function taking tensor lists.

NTO_EXT_BACKEND=reference|cpu|cuda forces a path (cpu/cuda: fail loudly if unavailable).
NTO_EXT_JIT=0 disables the JIT build.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _reference
from ._buildinfo import MARKER, compile_args

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parent
_CSRC = _PKG.parent / "csrc"
_ALLOWED_BACKENDS = ("reference", "cpu", "cuda")

_state: dict = {"loaded": None, "reason": None, "module": None}


class BuildMismatchError(ImportError):
    """The compiled module was built against another torch than the one running."""


def _built_against(path: Path) -> str | None:
    data = path.read_bytes()
    at = data.find(MARKER.encode())
    if at < 0:
        return None
    end = data.index(b"\0", at)
    return data[at + len(MARKER):end].decode()


def _rebuild_hint() -> str:
    return ("rebuild it against this torch: pip install --no-build-isolation -e . "
            f"(from {_PKG.parent}), or set NTO_EXT_BACKEND=reference to run without it")


def _load_compiled():
    """Import nto_ext._C if it exists and was built against this torch."""
    spec = importlib.util.find_spec("nto_ext._C")
    if spec is None or spec.origin is None:
        return None
    built = _built_against(Path(spec.origin))
    if built != torch.__version__:
        raise BuildMismatchError(
            f"nto_ext._C at {spec.origin} was built against torch {built}, but torch "
            f"{torch.__version__} is running; {_rebuild_hint()}")
    from . import _C  # noqa: F401  (loading registers torch.ops.nto.*)

    return _C


def _jit_build():
    """Compile the same sources as setup.py with torch.utils.cpp_extension.load."""
    if os.environ.get("NTO_EXT_JIT", "1") == "0":
        raise RuntimeError("the JIT build is disabled (NTO_EXT_JIT=0)")
    if not (_CSRC / "ops.cpp").exists():
        raise RuntimeError(f"C++ sources not found at {_CSRC}")
    from torch.utils.cpp_extension import load

    sources = [str(_CSRC / "ops.cpp")] + sorted(str(p) for p in (_CSRC / "cpu").glob("*.cpp"))
    log.warning("nto_ext: compiling the extension just in time (about a minute, once)")
    load(name="nto_ext_jit", sources=sources,
         extra_cflags=compile_args(torch.__version__, shell=True), extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)
    return "jit"


def _ensure_loaded() -> bool:
    """True when torch.ops.nto.* kernels are registered; decided once per process."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    forced = os.environ.get("NTO_EXT_BACKEND", "").lower() or None
    if forced is not None and forced not in _ALLOWED_BACKENDS:
        raise ValueError(f"NTO_EXT_BACKEND={forced!r}; allowed: {', '.join(_ALLOWED_BACKENDS)}")
    if forced == "reference":
        _state.update(loaded=False, reason="NTO_EXT_BACKEND=reference")
        return False
    reasons = []
    try:
        module = _load_compiled()
        if module is None:
            reasons.append("nto_ext._C is not built")
            module = _jit_build()
        _state.update(loaded=True, module=module)
    except BuildMismatchError:
        raise
    except Exception as e:  # the fallback must name the reason, never hide it
        reasons.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}")
        reason = "; ".join(reasons)
        if forced in ("cpu", "cuda"):
            raise RuntimeError(f"NTO_EXT_BACKEND={forced} but the extension is unavailable: "
                               f"{reason}") from e
        warnings.warn(f"nto_ext: using the slow pure-PyTorch reference ops ({reason}); "
                      f"{_rebuild_hint()}", RuntimeWarning, stacklevel=3)
        _state.update(loaded=False, reason=reason)
        return False
    if forced == "cuda" and not has_cuda_kernels():
        raise RuntimeError("NTO_EXT_BACKEND=cuda but the extension was built without CUDA")
    _register_fakes()
    return True


def has_cuda_kernels() -> bool:
    m = _state["module"]
    return bool(getattr(m, "with_cuda", 0)) and torch.cuda.is_available()


def backend() -> str:
    """Which path runs the ops: "cuda-ext", "cpu-ext" or "reference"."""
    if not _ensure_loaded():
        return "reference"
    return "cuda-ext" if has_cuda_kernels() else "cpu-ext"


def _use_kernels(tensors: Sequence[torch.Tensor]) -> bool:
    if not tensors or not _ensure_loaded():
        return False
    if tensors[0].device.type == "cuda" and not has_cuda_kernels():
        return False
    return tensors[0].device.type in ("cpu", "cuda")


_fakes_done = False


def _register_fakes() -> None:
    """Meta implementations so the ops trace under torch.compile / FSDP2 like ATen's own."""
    global _fakes_done
    if _fakes_done:
        return
    _fakes_done = True

    @torch.library.register_fake("nto::param_stats")
    def _(tensors):
        n = len(tensors)
        dev = tensors[0].device
        return (torch.empty(n, dtype=torch.int64, device=dev),
                torch.empty(n, dtype=torch.float64, device=dev),
                torch.empty(n, dtype=torch.float32, device=dev),
                torch.empty(n, 256, dtype=torch.int64, device=dev))


# ---------------------------------------------------------------------------- the ops


def param_stats(tensors: Sequence[torch.Tensor]):
    """(numel int64[n], sumsq float64[n], absmax float32[n], hist int64[n, 256]); see
    `_reference.param_stats`. `numel.sum()` is the total parameter count."""
    tensors = list(tensors)
    if _use_kernels(tensors):
        return torch.ops.nto.param_stats(tensors)
    return _reference.param_stats(tensors)


__all__ = ["backend", "param_stats", "BuildMismatchError"]
del sys
