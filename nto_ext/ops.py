"""The only door to the kernels.

Loads the compiled module `nto_ext._C` (registering `torch.ops.nto.*`), or JIT-builds the
same sources when it is missing, or falls back to `nto_ext._reference` with one warning
naming the reason. Every op is exposed here as a plain function taking tensor lists.

NTO_EXT_BACKEND=reference|cpu|cuda forces a path (cpu/cuda: fail loudly if unavailable).
NTO_EXT_JIT=0 disables the JIT build.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _reference
from ._buildinfo import MARKER, compile_args, cuda_args

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
    from torch.utils.cpp_extension import CUDA_HOME, load

    sources = [str(_CSRC / "ops.cpp")] + sorted(str(p) for p in (_CSRC / "cpu").glob("*.cpp"))
    # The CUDA kernels too, as setup.py does, when this torch has CUDA and nvcc is found.
    cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if cuda:
        sources += sorted(str(p) for p in (_CSRC / "cuda").glob("*.cu"))
    log.warning("nto_ext: compiling the extension just in time (%s, once)",
                "several minutes: CUDA kernels included" if cuda else "about a minute")
    load(name="nto_ext_jit", sources=sources,
         extra_cflags=compile_args(torch.__version__, cuda=cuda, shell=True),
         extra_cuda_cflags=cuda_args(torch.__version__, shell=True) if cuda else None,
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    return types.SimpleNamespace(jit=True, with_cuda=int(cuda))


def _ensure_loaded() -> bool:
    """True when torch.ops.nto.* kernels are registered; decided once per process."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    forced = forced_backend()
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


def forced_backend() -> str | None:
    """The path NTO_EXT_BACKEND forces (None when unset); ValueError when it names none."""
    raw = os.environ.get("NTO_EXT_BACKEND", "")
    forced = raw.strip().lower() or None
    if forced is not None and forced not in _ALLOWED_BACKENDS:
        raise ValueError(f"NTO_EXT_BACKEND={raw!r}; allowed: {', '.join(_ALLOWED_BACKENDS)}, "
                         "or unset it (the compiled kernels when built, else the reference "
                         "ops)")
    return forced


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

    def fake(name: str):
        # Only ops whose schema this build defines (an older _C may lack some).
        if not _has_schema(name):
            return lambda fn: fn
        return torch.library.register_fake(f"nto::{name}")

    # The fakes run the reference's argument checks (metadata only: contents of meta and
    # fake tensors are unknown), so a bad call fails while tracing as it would when run.
    @fake("param_stats")
    def _(tensors, histogram=True):
        _reference._check_float_list("param_stats", "tensors", tensors)
        n = len(tensors)
        dev = tensors[0].device
        return (torch.empty(n, dtype=torch.int64, device=dev),
                torch.empty(n, dtype=torch.float64, device=dev),
                torch.empty(n, dtype=torch.float32, device=dev),
                torch.empty(n, 256 if histogram else 0, dtype=torch.int64, device=dev))

    @fake("masked_adamw_")
    def _(*args):
        _reference.check_masked_adamw(*args)

    @fake("select_topk")
    def _(tensors, k):
        _reference.check_select_topk(tensors, k)
        ctx = torch.library.get_ctx()
        return [torch.empty(ctx.new_dynamic_size(), device=t.device,
                            dtype=_reference._index_dtype_for(t.numel())) for t in tensors]

    @fake("remap_state")
    def _(old_indices, new_indices, states):
        _reference.check_remap_state(old_indices, new_indices, states)
        return [s.new_empty(*s.shape[:-1], n.shape[0]) for n, s in zip(new_indices, states)]

    @fake("gather_accumulate_")
    def _(dense, indices, compact):
        _reference.check_gather_accumulate(dense, indices, compact)


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"nto::{name}", "")
    except RuntimeError:
        return False
    return True


def _has_kernel(name: str, device: torch.device | str) -> bool:
    """True when `torch.ops.nto.<name>` has a kernel registered for this device (a backend
    may lack some ops; the wrapper then runs the reference)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return (key is not None and _has_schema(name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"nto::{name}", key))


# _kernel_for asks only after the extension is loaded, when the answer is final.
_has_kernel_cached = functools.cache(_has_kernel)


def _kernel_for(name: str, tensors: Sequence[torch.Tensor]):
    """The compiled op to call for these tensors, or None to run the reference."""
    if not _use_kernels(tensors) or not _has_kernel_cached(name, tensors[0].device.type):
        return None
    return getattr(torch.ops.nto, name)


# ---------------------------------------------------------------------------- the ops


def param_stats(tensors: Sequence[torch.Tensor], *, histogram: bool = True):
    """(numel int64[n], sumsq float64[n], absmax float32[n], hist int64[n, 256]); see
    `_reference.param_stats`. `numel.sum()` is the total parameter count. histogram=False
    gives hist as int64[n, 0] and the same numel, sumsq and absmax, bit for bit, in less
    time on the CPU (a norm and non-finite check: one read of memory)."""
    tensors = list(tensors)
    if not isinstance(histogram, bool):
        raise TypeError(f"param_stats: histogram={histogram!r}; allowed: True or False")
    kernel = _kernel_for("param_stats", tensors)
    if kernel:
        return kernel(tensors, histogram)
    return _reference.param_stats(tensors, histogram)


StepsArg = int | float | torch.Tensor | Sequence[int | float | torch.Tensor]


def _step_tensors(steps: StepsArg, n: int) -> list[torch.Tensor]:
    """`steps` as the schema wants it: one 1-element tensor per param (one count per tensor).
    Plain numbers become float64 CPU scalars (exact up to 2**53), read once on the host;
    tensors pass through unchanged (the op refuses any that is not 1-element)."""
    if isinstance(steps, (int, float, torch.Tensor)):
        if isinstance(steps, torch.Tensor) and steps.numel() != 1:
            raise ValueError(f"masked_adamw_: steps is a tensor of {steps.numel()} elements; "
                             "pass an int, a 1-element tensor, or a list with one entry per "
                             "param")
        steps = [steps] * n
    out, cache = [], {}
    for i, s in enumerate(steps):
        if isinstance(s, torch.Tensor):
            out.append(s)
        elif isinstance(s, (int, float)) and not isinstance(s, bool):
            if s not in cache:
                cache[s] = torch.tensor([float(s)], dtype=torch.float64)
            out.append(cache[s])
        else:
            raise TypeError(f"masked_adamw_: steps[{i}] is {type(s).__name__}; allowed: a "
                            "number or a 1-element tensor")
    return out


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                  indices: Sequence[torch.Tensor | None], steps: StepsArg, *, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """In-place AdamW (torch.optim.AdamW's math, decoupled decay) over whole lists.

    indices[i] None: dense (state numel == param numel); else sorted unique int32/int64
    positions in the flattened param, state of len(indices[i]) fp32 elements, grad compact
    (len(indices[i])) or dense (param numel, read at the positions). steps: an int for all,
    or one count per param: an int or a 1-element tensor (on the cpu or the params' device).
    The step is the count after incrementing (first update: 1).
    Params/grads fp32/bf16/fp16 (grad dtype = param dtype or fp32), state fp32, math fp32.
    Elements not indexed stay bit-identical. See `_reference.masked_adamw_`."""
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), \
        list(exp_avg_sqs)
    indices = list(indices)
    steps = _step_tensors(steps, len(params))
    args = (params, grads, exp_avgs, exp_avg_sqs, indices, steps,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))
    kernel = _kernel_for("masked_adamw_", params)
    if kernel:
        kernel(*args)
    else:
        _reference.masked_adamw_(*args)


def select_topk(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Exact global top-k by |x| over the concatenated tensors: per tensor, ascending int32
    positions (int64 past 2**31-1 elements) in the flattened tensor. Ties at the threshold
    go to the lowest concatenated position; NaN ranks below every number. k=0 gives empty
    lists; k larger than the total is an error. See `_reference.select_topk`."""
    tensors = list(tensors)
    kernel = _kernel_for("select_topk", tensors)
    return kernel(tensors, int(k)) if kernel else _reference.select_topk(tensors, int(k))


def remap_state(old_indices: Sequence[torch.Tensor], new_indices: Sequence[torch.Tensor],
                states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Move compact state from one sorted index set to another: states[i] has shape
    [..., len(old_indices[i])] (e.g. [2, L] = stacked exp_avg/exp_avg_sq); returns
    [..., len(new_indices[i])] with kept positions carried and new positions 0."""
    old_indices, new_indices, states = list(old_indices), list(new_indices), list(states)
    kernel = _kernel_for("remap_state", states)
    if kernel:
        return kernel(old_indices, new_indices, states)
    return _reference.remap_state(old_indices, new_indices, states)


def gather_accumulate_(dense: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                       compact: Sequence[torch.Tensor]) -> None:
    """compact[i] += dense[i].view(-1)[indices[i]] in place (dense fp32/bf16/fp16, compact
    fp32, indices sorted unique): the sparse policy's gradient compaction."""
    dense, indices, compact = list(dense), list(indices), list(compact)
    kernel = _kernel_for("gather_accumulate_", dense)
    if kernel:
        kernel(dense, indices, compact)
    else:
        _reference.gather_accumulate_(dense, indices, compact)


__all__ = ["backend", "param_stats", "masked_adamw_", "select_topk", "remap_state",
           "gather_accumulate_", "BuildMismatchError"]
del sys
