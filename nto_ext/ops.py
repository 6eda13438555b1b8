"""The only door to the kernels.

Defines the `torch.ops.nto.*` operators (schemas, in `SCHEMAS`) with `torch.library`, with
`nto_ext._reference` as their default implementation and fake (meta) implementations, so
they trace under torch.compile / FSDP2 whatever is built. The compiled module `nto_ext._C`
(or a JIT build of the same sources) only adds CPU and CUDA kernels, which the dispatcher
prefers to the default for tensors on their device; without it the reference runs, after
one warning naming the reason. Every op is exposed here as a plain function taking tensor
lists, a thin call of its `torch.ops.nto` operator.

NTO_EXT_BACKEND=reference|cpu|cuda forces a path (reference: never load the kernels;
cpu/cuda: fail loudly if they are unavailable). NTO_EXT_JIT=0 disables the JIT build.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _reference
from ._buildinfo import MARKER, compile_args, cuda_args, path_with_ninja

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parent
_CSRC = _PKG.parent / "csrc"
_ALLOWED_BACKENDS = ("reference", "cpu", "cuda")

# The one definition of every operator; csrc/ registers kernels for them (TORCH_LIBRARY_IMPL).
SCHEMAS = {
    "param_stats": "(Tensor[] tensors, bool histogram=True) -> (Tensor numel, Tensor sumsq, "
                   "Tensor absmax, Tensor hist)",
    "masked_adamw_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
                     "Tensor(c!)[] exp_avg_sqs, Tensor?[] indices, Tensor[] steps, float lr, "
                     "float beta1, float beta2, float eps, float weight_decay) -> ()",
    "masked_adamw_int8_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
                          "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] exp_avg_scales, "
                          "Tensor(e!)[] exp_avg_sq_scales, Tensor?[] indices, Tensor[] steps, "
                          "float lr, float beta1, float beta2, float eps, "
                          "float weight_decay) -> ()",
    "masked_adamw_int4_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes, "
                          "Tensor(c!)[] exp_avg_scales, Tensor(d!)[] exp_avg_sq_scales, "
                          "Tensor[] steps, float lr, float beta1, float beta2, float eps, "
                          "float weight_decay) -> ()",
    "masked_adamw_lowp_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
                          "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, Tensor[] steps, "
                          "bool[] stochastic, int[] keys, float lr, float beta1, float beta2, "
                          "float eps, float weight_decay, bool maximize) -> ()",
    "adamw_first_step_": "(Tensor(a!)[] params, Tensor[] grads, float lr, float beta1, "
                         "float beta2, float eps, float weight_decay) -> ()",
    "select_topk": "(Tensor[] tensors, int k) -> Tensor[]",
    "remap_state": "(Tensor[] old_indices, Tensor[] new_indices, Tensor[] states) -> Tensor[]",
    "gather_accumulate_": "(Tensor[] dense, Tensor[] indices, Tensor(a!)[] compact) -> ()",
}

# "DEF" claims the namespace: a stale _C that still defines it (TORCH_LIBRARY) fails to load
# with a message naming nto, instead of running beside these definitions. Kept alive here:
# the registrations last as long as this object.
_LIB = torch.library.Library("nto", "DEF")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)
    # CompositeExplicitAutograd is the default for every device: a kernel registered for the
    # tensors' device (CPU, CUDA by _C) takes precedence, any other device runs the reference.
    _LIB.impl(_name, getattr(_reference, _name), "CompositeExplicitAutograd")
del _name, _schema


# The fakes run the reference's argument checks (metadata only: contents of meta and fake
# tensors are unknown), so a bad call fails while tracing as it would when run.
@torch.library.register_fake("nto::param_stats", lib=_LIB)
def _(tensors, histogram=True):
    _reference._check_float_list("param_stats", "tensors", tensors)
    n = len(tensors)
    dev = tensors[0].device if n else torch.device("cpu")
    return (torch.empty(n, dtype=torch.int64, device=dev),
            torch.empty(n, dtype=torch.float64, device=dev),
            torch.empty(n, dtype=torch.float32, device=dev),
            torch.empty(n, 256 if histogram else 0, dtype=torch.int64, device=dev))


@torch.library.register_fake("nto::masked_adamw_", lib=_LIB)
def _(*args):
    _reference.check_masked_adamw(*args)


@torch.library.register_fake("nto::masked_adamw_int8_", lib=_LIB)
def _(*args):
    _reference.check_masked_adamw_int8(*args)


@torch.library.register_fake("nto::masked_adamw_int4_", lib=_LIB)
def _(*args):
    _reference.check_masked_adamw_int4(*args)


@torch.library.register_fake("nto::masked_adamw_lowp_", lib=_LIB)
def _(*args):
    _reference.check_masked_adamw_lowp(*args)


@torch.library.register_fake("nto::adamw_first_step_", lib=_LIB)
def _(*args):
    _reference.check_adamw_first_step(*args)


@torch.library.register_fake("nto::select_topk", lib=_LIB)
def _(tensors, k):
    _reference.check_select_topk(tensors, k)
    ctx = torch.library.get_ctx()
    return [torch.empty(ctx.new_dynamic_size(), device=t.device,
                        dtype=_reference._index_dtype_for(t.numel())) for t in tensors]


@torch.library.register_fake("nto::remap_state", lib=_LIB)
def _(old_indices, new_indices, states):
    _reference.check_remap_state(old_indices, new_indices, states)
    return [s.new_empty(*s.shape[:-1], n.shape[0]) for n, s in zip(new_indices, states)]


@torch.library.register_fake("nto::gather_accumulate_", lib=_LIB)
def _(dense, indices, compact):
    _reference.check_gather_accumulate(dense, indices, compact)


# ------------------------------------------------------------------- loading the kernels


class BuildMismatchError(ImportError):
    """The compiled module was built against another torch than the one running."""


def _built_against(data: bytes) -> str | None:
    """The torch version a module's bytes were built against (None: no marker)."""
    at = data.find(MARKER.encode())
    if at < 0:
        return None
    end = data.index(b"\0", at)
    return data[at + len(MARKER):end].decode()


def _links_libstdcxx_statically(data: bytes) -> bool:
    """Whether a module's bytes hold libstdc++'s own locale code but no libstdc++.so among
    what it loads: a g++ that links libstdc++ statically (seen: an image's /opt/gcc). That
    copy's locale is never set up inside torch's process, and the first error message that
    formats a number crashes it (SIGSEGV)."""
    return b"libstdc++.so" not in data and b"_ZNSt6locale7classicEv" in data


def _rebuild_hint() -> str:
    return ("rebuild it against this torch: pip install --no-build-isolation -e . "
            f"(from {_PKG.parent}), or set NTO_EXT_BACKEND=reference to run without it")


def _load_compiled():
    """Import nto_ext._C if it exists and was built against this torch."""
    spec = importlib.util.find_spec("nto_ext._C")
    if spec is None or spec.origin is None:
        return None
    data = Path(spec.origin).read_bytes()
    built = _built_against(data)
    if built != torch.__version__:
        raise BuildMismatchError(
            f"nto_ext._C at {spec.origin} was built against torch {built}, but torch "
            f"{torch.__version__} is running; {_rebuild_hint()}")
    if _links_libstdcxx_statically(data):
        raise BuildMismatchError(
            f"nto_ext._C at {spec.origin} has libstdc++ linked into it (its compiler links it "
            "statically), and that copy crashes the process at the first error message; "
            "rebuild with the g++ torch was built with (e.g. CC=gcc CXX=g++ pip install "
            f"--no-build-isolation -e . from {_PKG.parent}), or set NTO_EXT_BACKEND=reference")
    from . import _C  # loading registers the CPU/CUDA kernels of torch.ops.nto.*

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
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = path_with_ninja(path)  # for this build only: restored below
    try:
        load(name="nto_ext_jit", sources=sources,
             extra_cflags=compile_args(torch.__version__, cuda=cuda, shell=True),
             extra_cuda_cflags=cuda_args(torch.__version__, shell=True) if cuda else None,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    finally:
        os.environ["PATH"] = path
    return types.SimpleNamespace(jit=True, with_cuda=int(cuda))


def _last_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"


@functools.cache
def _kernels():
    """The loaded kernel module (nto_ext._C or the JIT build's facts), or None when the
    reference runs; decided once per process, on the first op call (a JIT build takes
    minutes: importing nto_ext never starts one). Raises when NTO_EXT_BACKEND forces a path
    that is unavailable, and for a stale build."""
    forced = forced_backend()
    if forced == "reference":
        return None
    reasons = []
    try:
        module = _load_compiled()
        if module is None:
            reasons.append("nto_ext._C is not built")
            module = _jit_build()
    except BuildMismatchError:
        raise
    except Exception as e:  # the fallback must name the reason, never hide it
        reason = "; ".join([*reasons, _last_line(e)])
        if forced in ("cpu", "cuda"):
            raise RuntimeError(f"NTO_EXT_BACKEND={forced} but the extension is unavailable: "
                               f"{reason}") from e
        warnings.warn(f"nto_ext: using the slow pure-PyTorch reference ops ({reason}); "
                      f"{_rebuild_hint()}", RuntimeWarning, stacklevel=4)
        return None
    if forced == "cuda" and not (module.with_cuda and torch.cuda.is_available()):
        raise RuntimeError("NTO_EXT_BACKEND=cuda but the extension was built without CUDA "
                           "or no GPU is visible; build with NTO_EXT_BUILD=cuda pip install "
                           "--no-build-isolation -e . on a machine with a GPU, or unset it")
    return module


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
    """True when CUDA tensors run compiled kernels (else they run the reference)."""
    return bool(getattr(_kernels(), "with_cuda", 0)) and torch.cuda.is_available()


def backend() -> str:
    """Which path runs the ops: "cuda-ext", "cpu-ext" or "reference"."""
    if _kernels() is None:
        return "reference"
    return "cuda-ext" if has_cuda_kernels() else "cpu-ext"


def _op(name: str):
    """torch.ops.nto.<name>, once the kernels (if any) are loaded: the dispatcher picks the
    kernel for the tensors' device, or the reference where none is registered."""
    _kernels()
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
    return _op("param_stats")(tensors, histogram)


StepsArg = int | float | torch.Tensor | Sequence[int | float | torch.Tensor]


def _step_tensors(steps: StepsArg, n: int, op: str = "masked_adamw_") -> list[torch.Tensor]:
    """`steps` as the schema wants it: one 1-element tensor per param (one count per tensor).
    Plain numbers become float64 CPU scalars (exact up to 2**53), read once on the host;
    tensors pass through unchanged (the op refuses any that is not 1-element)."""
    if isinstance(steps, (int, float, torch.Tensor)):
        if isinstance(steps, torch.Tensor) and steps.numel() != 1:
            raise ValueError(f"{op}: steps is a tensor of {steps.numel()} elements; "
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
            raise TypeError(f"{op}: steps[{i}] is {type(s).__name__}; allowed: a "
                            "number or a 1-element tensor")
    return out


def masked_adamw_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                  indices: Sequence[torch.Tensor | None], steps: StepsArg, *, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """In-place AdamW (torch.optim.AdamW's math, decoupled decay) over whole lists.

    indices[i] None: dense (state numel == param numel); else sorted unique int32/int64
    positions in the flattened param, state of len(indices[i]) elements, grad compact
    (len(indices[i])) or dense (param numel, read at the positions). steps: an int for all,
    or one count per param: an int or a 1-element tensor (on the cpu or the params' device).
    The step is the count after incrementing (first update: 1).
    Params/grads fp32/bf16/fp16 (grad dtype = param dtype or fp32; an fp32 param, e.g. a
    bf16 model's master weight, also takes a bf16/fp16 grad), state fp32 or bf16 (both
    moments of one dtype; bf16 ones are rounded to nearest once updated), math fp32.
    Elements not indexed stay bit-identical. See `_reference.masked_adamw_`."""
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), \
        list(exp_avg_sqs)
    indices = list(indices)
    steps = _step_tensors(steps, len(params))
    _op("masked_adamw_")(params, grads, exp_avgs, exp_avg_sqs, indices, steps, float(lr),
                         float(beta1), float(beta2), float(eps), float(weight_decay))


def masked_adamw_int8_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                       exp_avg_scales: Sequence[torch.Tensor],
                       exp_avg_sq_scales: Sequence[torch.Tensor], steps: StepsArg, *,
                       lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float,
                       indices: Sequence[torch.Tensor | None] | None = None) -> None:
    """masked_adamw_ with 8-bit moments: exp_avgs int8 and exp_avg_sqs uint8 (one element
    per updated element), exp_avg_scales / exp_avg_sq_scales fp32 (one per block of 256 of
    them); dequantized, updated and requantized in one pass per block. indices (None: all
    dense): per param None, or sorted unique int32/int64 positions in the flattened param
    whose compact grad, moments and blocks follow their order (policy="sparse"). See
    `_reference.masked_adamw_int8_` (the spec) and nto_ext/formats/int8.py."""
    params = list(params)
    indices = [None] * len(params) if indices is None else list(indices)
    _op("masked_adamw_int8_")(params, list(grads), list(exp_avgs), list(exp_avg_sqs),
                              list(exp_avg_scales), list(exp_avg_sq_scales), indices,
                              _step_tensors(steps, len(params), "masked_adamw_int8_"),
                              float(lr), float(beta1), float(beta2), float(eps),
                              float(weight_decay))


def masked_adamw_int4_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       codes: Sequence[torch.Tensor], exp_avg_scales: Sequence[torch.Tensor],
                       exp_avg_sq_scales: Sequence[torch.Tensor], steps: StepsArg, *,
                       lr: float, beta1: float, beta2: float, eps: float,
                       weight_decay: float) -> None:
    """masked_adamw_ with both moments in one byte per element: codes uint8 (one per
    element of the param), exp_avg_scales / exp_avg_sq_scales fp32 (one per block of 64);
    whole tensors. See `_reference.masked_adamw_int4_` (the spec) and
    nto_ext/formats/int4.py."""
    params = list(params)
    _op("masked_adamw_int4_")(params, list(grads), list(codes), list(exp_avg_scales),
                              list(exp_avg_sq_scales),
                              _step_tensors(steps, len(params), "masked_adamw_int4_"),
                              float(lr), float(beta1), float(beta2), float(eps),
                              float(weight_decay))


def _signed64(key: int) -> int:
    """A 64-bit stream key as the schema's int (int64): the same bits, read signed."""
    key = int(key) & 0xFFFFFFFFFFFFFFFF
    return key - (1 << 64) if key >= 1 << 63 else key


def masked_adamw_lowp_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                       exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                       masters: Sequence[torch.Tensor], steps: StepsArg, *,
                       stochastic: Sequence[bool], keys: Sequence[int], lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float,
                       maximize: bool = False) -> None:
    """masked_adamw_ (dense) for bf16/fp16 params with grads of their dtype, the math on an
    fp32 value: masters[i] (fp32, updated; formats/master.py) or, with `masters` empty, the
    param widened. The param gets the value rounded to nearest even, or stochastically where
    stochastic[i], from the counter-based stream keys[i] (a 64-bit key; element j of the
    flattened param draws position j). `maximize` negates the grads as read. One pass over
    memory; nothing temporary. See `_reference.masked_adamw_lowp_`."""
    params = list(params)
    _op("masked_adamw_lowp_")(params, list(grads), list(exp_avgs), list(exp_avg_sqs),
                              list(masters),
                              _step_tensors(steps, len(params), "masked_adamw_lowp_"),
                              [bool(s) for s in stochastic], [_signed64(k) for k in keys],
                              float(lr), float(beta1), float(beta2), float(eps),
                              float(weight_decay), bool(maximize))


def adamw_first_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *,
                      lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float) -> None:
    """The first update of a fresh AdamW state over whole contiguous params, no moments
    read or kept: bit for bit `masked_adamw_` on zero fp32 moments at step 1 (m_hat = g,
    v_hat = g^2). Grads of the param's dtype or fp32; bf16/fp16 params are updated in fp32
    and rounded to nearest even once. One read of p and g and one write of p: 3 of the 7
    passes over memory of AdamW's update. See `_reference.adamw_first_step_`."""
    _op("adamw_first_step_")(list(params), list(grads), float(lr), float(beta1),
                             float(beta2), float(eps), float(weight_decay))


def select_topk(tensors: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Exact global top-k by |x| over the concatenated tensors: per tensor, ascending int32
    positions (int64 past 2**31-1 elements) in the flattened tensor. Ties at the threshold
    go to the lowest concatenated position; NaN ranks below every number. k=0 gives empty
    lists; k larger than the total is an error. See `_reference.select_topk`."""
    return _op("select_topk")(list(tensors), int(k))


def remap_state(old_indices: Sequence[torch.Tensor], new_indices: Sequence[torch.Tensor],
                states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Move compact state from one sorted index set to another: states[i] has shape
    [..., len(old_indices[i])] (e.g. [2, L] = stacked exp_avg/exp_avg_sq); returns
    [..., len(new_indices[i])] with kept positions carried and new positions 0."""
    return _op("remap_state")(list(old_indices), list(new_indices), list(states))


def gather_accumulate_(dense: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
                       compact: Sequence[torch.Tensor]) -> None:
    """compact[i] += dense[i].view(-1)[indices[i]] in place (dense fp32/bf16/fp16, compact
    fp32, indices sorted unique): the sparse policy's gradient compaction."""
    _op("gather_accumulate_")(list(dense), list(indices), list(compact))


__all__ = ["backend", "param_stats", "masked_adamw_", "masked_adamw_int8_",
           "masked_adamw_int4_", "masked_adamw_lowp_", "adamw_first_step_", "select_topk",
           "remap_state", "gather_accumulate_", "BuildMismatchError", "forced_backend",
           "has_cuda_kernels", "SCHEMAS"]
