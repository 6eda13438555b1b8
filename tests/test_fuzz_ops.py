"""Fuzzing the kernels' argument checking (torch.ops.nto.*) against the reference.

Hypothesis draws whole argument lists: random lengths, dtypes (good and bad), devices (cpu,
meta), non-contiguous tensors, indices out of range / unsorted / duplicated / negative /
of the wrong dtype or rank, state and grad lengths that do not match, step counts of every
form. Every call must either succeed and agree with `_reference` (the executable spec), or
raise RuntimeError / ValueError / TypeError / IndexError (never crash), and:

- the kernel and the reference fail alike: same exception type, same first message line;
- nothing is written out of bounds: every tensor argument on the CPU is a contiguous slice
  of a larger buffer whose guard bytes before and after are checked after the call;
- a failed call writes nothing (outputs bit-identical), a call never writes its inputs.

The default run is short (SETTINGS). `bench/fuzz_ops_asan.sh` runs this file under
AddressSanitizer with many more examples: NTO_FUZZ_LIB names an ASan build of the kernels
to load instead of nto_ext._C, NTO_FUZZ_EXAMPLES sets max_examples.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_FUZZ_LIB = os.environ.get("NTO_FUZZ_LIB")
if _FUZZ_LIB:  # the ASan run: its own build of the kernels, never nto_ext._C
    os.environ["NTO_EXT_BACKEND"] = "reference"
    torch.ops.load_library(_FUZZ_LIB)

from nto_ext import _reference, ops  # noqa: E402

if _FUZZ_LIB:
    assert "nto_ext._C" not in sys.modules, "the ASan run must not load nto_ext._C"
    HAS_KERNELS = True
else:
    HAS_KERNELS = ops.backend() != "reference"
pytestmark = pytest.mark.skipif(not HAS_KERNELS, reason="compiled extension not loaded")

EXAMPLES = int(os.environ.get("NTO_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not _FUZZ_LIB,
                    database=None, suppress_health_check=list(HealthCheck))
ALLOWED = (RuntimeError, ValueError, TypeError, IndexError)  # NotImplementedError too
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
BAD_FLOATS = [torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64]
GUARD = 16  # elements of guard region on each side of every CPU tensor argument


# ----------------------------------------------------------------------------- tensors


@dataclass
class Arg:
    """One tensor argument: the tensor passed, and (CPU) the buffer it is a slice of."""

    tensor: torch.Tensor
    buf: torch.Tensor | None = None
    guard: int = 0
    snapshot: torch.Tensor | None = field(default=None, repr=False)

    def guards_intact(self) -> bool:
        if self.buf is None or self.guard == 0:
            return True
        n_guard = self.guard * self.buf.element_size()
        now = self.buf.view(torch.uint8)
        return (torch.equal(now[:n_guard], self.snapshot[:n_guard])
                and torch.equal(now[-n_guard:], self.snapshot[-n_guard:]))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor (NaN-safe bitwise comparison)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def place(values: torch.Tensor, how: str, gen: torch.Generator) -> Arg:
    """Put `values` where the kernel will see it: 'guarded' (a contiguous slice of a buffer
    with random guard bytes), 'exact' (its own allocation: ASan's redzones guard it),
    'strided' (a non-contiguous view) or 'meta'."""
    if how == "meta":
        return Arg(values.to("meta"))
    if how == "strided":
        if values.numel() < 2:  # a view of one element is contiguous: use a transposed pair
            wide = torch.zeros(2, max(values.numel(), 1) + 1, dtype=values.dtype)
            return Arg(wide.t()[: max(values.numel(), 1)])
        wide = torch.zeros(values.numel() * 2, dtype=values.dtype)
        wide[::2] = values.reshape(-1)
        return Arg(wide[::2].view(values.shape) if values.dim() == 1 else wide[::2])
    if how == "exact":
        return Arg(values.clone())
    n = values.numel()
    buf = torch.empty(n + 2 * GUARD, dtype=values.dtype)
    raw = buf.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8))
    buf[GUARD:GUARD + n] = values.reshape(-1)
    view = buf[GUARD:GUARD + n].view(values.shape)
    return Arg(view, buf, GUARD, buf.view(torch.uint8).clone())


def values_of(n: int, dtype: torch.dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(n, generator=gen) < 0.5
    if dtype.is_complex:
        return torch.randn(n, generator=gen).to(dtype)
    if not dtype.is_floating_point:
        return torch.randint(-5, 50, (n,), generator=gen).to(dtype)
    x = torch.randn(n, generator=gen)
    if kind == "special" and n:
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40,
                                3e38, -1.0])
        pick = torch.randint(0, len(special), (n,), generator=gen)
        mask = torch.rand(n, generator=gen) < 0.3
        x = torch.where(mask, special[pick], x)
    return x.to(dtype)


# ------------------------------------------------------------------------- strategies

placement = st.sampled_from(["guarded"] * 6 + ["exact"] * 3 + ["strided", "meta"])
length = st.integers(0, 40) | st.sampled_from([1, 2, 7, 31, 33, 257, 2049, 4100, 65537])
float_dtype = st.sampled_from(FLOATS) | st.sampled_from(FLOATS + BAD_FLOATS)


@st.composite
def index_spec(draw, limit: int) -> dict:
    """An index tensor for positions in [0, limit): valid or broken in one way."""
    mode = draw(st.sampled_from(["valid"] * 5 + ["unsorted", "duplicate", "negative",
                                                  "out_of_range", "huge", "float", "2d"]))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    frac = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    return {"mode": mode, "dtype": dtype, "frac": frac, "limit": limit,
            "place": draw(placement)}


def build_indices(spec: dict, gen: torch.Generator) -> Arg:
    limit, mode = spec["limit"], spec["mode"]
    keep = torch.rand(limit, generator=gen) < spec["frac"]
    idx = torch.nonzero(keep).view(-1)
    if mode == "unsorted" and idx.numel() >= 2:
        idx = idx.flip(0)
    elif mode == "duplicate" and idx.numel() >= 1:
        j = int(torch.randint(0, idx.numel(), (1,), generator=gen))
        idx = torch.cat([idx[:j + 1], idx[j:]])
    elif mode == "negative":
        idx = torch.cat([torch.tensor([-1 - int(torch.randint(0, 3, (1,), generator=gen))]),
                         idx])
    elif mode == "out_of_range":
        idx = torch.cat([idx, torch.tensor([limit])])
    elif mode == "huge":
        idx = torch.cat([idx, torch.tensor([2**31 - 1 if spec["dtype"] == torch.int32
                                            else 2**40])])
    idx = idx.to(spec["dtype"])
    if mode == "float":
        idx = idx.float()
    elif mode == "2d":
        idx = idx.view(1, -1)
    return place(idx, spec["place"], gen)


# --------------------------------------------------------------------------- the check


def _clone_for_reference(a: torch.Tensor) -> torch.Tensor:
    """A same-metadata copy (contiguity kept) for the reference to run on."""
    if a.device.type == "meta":
        return a
    out = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
    out.copy_(a)
    return out


def _first_line(e: BaseException) -> str:
    """The message's first line, numbers normalized: C++ streams print the double -1.0 as
    "-1" where Python prints "-1.0" (the only difference the fuzz finds)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return re.sub(r"(\d)\.0\b", r"\1", line)


def run_both(name: str, args: list, outputs: list[int], compare) -> None:
    """Call the kernel and the reference on equal arguments and check the contract.

    args: the op's positional arguments; lists of `Arg` become tensor lists.
    outputs: positions in `args` written in place (the rest must never change).
    compare(kernel_result, reference_result, kernel_args, reference_args) on success.
    """
    flat = [(pos, a) for pos, lst in enumerate(args) if isinstance(lst, list)
            for a in lst if isinstance(a, Arg)]
    on_meta = any(a.tensor.device.type == "meta" for _, a in flat)
    k_args = [[a.tensor if isinstance(a, Arg) else a for a in x] if isinstance(x, list) else x
              for x in args]
    r_args = [[_clone_for_reference(a) if isinstance(a, torch.Tensor) else a for a in x]
              if isinstance(x, list) else x for x in k_args]
    before = [(pos, a, _bits(a.tensor)) for pos, a in flat if a.tensor.device.type == "cpu"]
    k_err = r_err = None
    k_out = r_out = None
    try:
        k_out = getattr(torch.ops.nto, name)(*k_args)
    except ALLOWED as e:
        k_err = e
    for _, a in flat:
        assert a.guards_intact(), f"{name}: a guard region next to an argument was written"
    if on_meta:
        return  # meta: no crash and an allowed error (or the fake's result) is the contract
    try:
        r_out = getattr(_reference, name)(*r_args)
    except ALLOWED as e:
        r_err = e
    if k_err is not None or r_err is not None:
        assert k_err is not None and r_err is not None, (
            f"{name}: kernel {'raised ' + repr(k_err) if k_err else 'succeeded'} but the "
            f"reference {'raised ' + repr(r_err) if r_err else 'succeeded'}")
        assert type(k_err) is type(r_err), (k_err, r_err)
        assert _first_line(k_err) == _first_line(r_err)
        for _, a, bits in before:  # a refused call writes nothing
            assert torch.equal(_bits(a.tensor), bits), f"{name} wrote before refusing"
        return
    for pos, a, bits in before:  # inputs are never written
        if pos not in outputs:
            assert torch.equal(_bits(a.tensor), bits), f"{name} wrote an input (arg {pos})"
    compare(k_out, r_out, k_args, r_args)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, exactly: any NaN equals any NaN and -0.0 equals 0.0. The random
    examples of the ASan run found both differences, harmless: the reference's indexing
    turns a bf16 NaN 0xFFFF into 0x7FC0 where the kernel carries the bits, and with
    beta1=0 and a -0.0 gradient torch's lerp gives exp_avg 0.0 where the kernel's
    b1*m + (1-b1)*g gives -0.0."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


# ------------------------------------------------------------------------ masked_adamw_


# lr, beta1, beta2, eps, weight_decay: good ones, and each refused value
HYPERS = [(1e-2, 0.9, 0.999, 1e-8, 0.1), (1e-3, 0.0, 0.0, 0.0, 0.0), (-1.0, 0.9, 0.999, 1e-8, 0),
          (1e-3, 1.0, 0.999, 1e-8, 0.0), (1e-3, 0.9, float("nan"), 1e-8, 0.0),
          (1e-3, 0.9, 0.999, -1.0, 0.0), (1e-3, 0.9, 0.999, 1e-8, -0.5)]


@st.composite
def adamw_call(draw, min_n: int = 1):
    # min_n=1 for the raw ops: with no tensor at all torch's dispatcher cannot pick a
    # kernel (NotImplementedError); the ops.* wrappers take empty lists (see test_ops.py).
    n = draw(st.integers(min_n, 3))
    entries = []
    for _ in range(n):
        size = draw(length)
        pdt = draw(float_dtype)
        indexed = draw(st.booleans())
        e = {"size": size, "p_dtype": pdt, "indexed": indexed,
             "idx": draw(index_spec(size)) if indexed else None,
             "g_dtype": draw(st.sampled_from(["same", "fp32", "bad"])),
             "g_len": draw(st.sampled_from(["compact", "dense", "dense", "wrong"])),
             "m_len": draw(st.sampled_from(["ok"] * 6 + ["short", "long"])),
             "v_len": draw(st.sampled_from(["ok"] * 6 + ["short", "long"])),
             "m_dtype": draw(st.sampled_from([torch.float32] * 6 + [torch.bfloat16,
                                                                    torch.float64])),
             "step": draw(st.sampled_from(["int", "int", "fp32", "int64", "int32", "zero",
                                           "negative", "nan", "bool", "two", "empty",
                                           "per_elem"])),
             "places": [draw(placement) for _ in range(5)],
             "values": draw(st.sampled_from(["normal", "special"]))}
        entries.append(e)
    hyper = draw(st.sampled_from(HYPERS))
    lists_drop = draw(st.sampled_from([None] * 8 + ["grads", "exp_avgs", "indices", "steps"]))
    return entries, hyper, lists_drop, draw(st.integers(0, 2**31))


def _step_tensor(kind: str, length: int, gen: torch.Generator) -> torch.Tensor:
    """A step argument of one form: one count per tensor (good and bad values), or a tensor
    of another size (refused; "per_elem" is one int32 count per updated element, accepted
    only when that is one element)."""
    if kind == "per_elem":
        return torch.randint(0, 30, (length,), generator=gen, dtype=torch.int32)
    return {"int": torch.tensor([7.0], dtype=torch.float64), "fp32": torch.tensor(3.0),
            "int64": torch.tensor([2]), "int32": torch.tensor([5], dtype=torch.int32),
            "zero": torch.tensor([0.0], dtype=torch.float64),
            "negative": torch.tensor([-4.0]), "nan": torch.tensor([float("nan")]),
            "bool": torch.tensor([True]), "two": torch.tensor([1.0, 2.0]),
            "empty": torch.zeros(0, dtype=torch.int32)}[kind]


def build_adamw(entries, hyper, lists_drop, seed):
    gen = torch.Generator().manual_seed(seed)
    lists: dict[str, list] = {k: [] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs",
                                              "indices", "steps")}
    adj = {"ok": 0, "short": -1, "long": 1}
    for e in entries:
        size, pl = e["size"], e["places"]
        p = values_of(size, e["p_dtype"], e["values"], gen)
        idx = build_indices(e["idx"], gen) if e["indexed"] else None
        n = idx.tensor.numel() if idx is not None and idx.tensor.dim() == 1 else size
        g_len = {"compact": n, "dense": size, "wrong": n + 1}[e["g_len"]]
        g_dtype = {"same": e["p_dtype"], "fp32": torch.float32,
                   "bad": torch.float64}[e["g_dtype"]]
        g = values_of(g_len, g_dtype, e["values"], gen)
        m = values_of(max(n + adj[e["m_len"]], 0), e["m_dtype"], "normal", gen) * 0.1
        v = values_of(max(n + adj[e["v_len"]], 0), torch.float32, "normal", gen).abs()
        lists["params"].append(place(p, pl[0], gen))
        lists["grads"].append(place(g, pl[1], gen))
        lists["exp_avgs"].append(place(m, pl[2], gen))
        lists["exp_avg_sqs"].append(place(v, pl[3], gen))
        lists["indices"].append(idx)
        step_place = "exact" if pl[4] in ("strided", "guarded") else pl[4]
        lists["steps"].append(place(_step_tensor(e["step"], n, gen), step_place, gen))
    if lists_drop and lists[lists_drop]:
        lists[lists_drop].pop()
    return [*lists.values(), *hyper]


def _close_params(ks: list, rs: list) -> None:
    """Params within one rounding (sqrt differs by an ulp between libraries)."""
    for a, b in zip(ks, rs):
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}[a.dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=1e-5, equal_nan=True)


def _compare_adamw(_k, _r, k_args, r_args):
    _close_params(k_args[0], r_args[0])
    for pos in (2, 3):  # moments: bit for bit
        for a, b in zip(k_args[pos], r_args[pos]):
            assert _same_values(a, b)


@SETTINGS
@given(adamw_call())
def test_fuzz_masked_adamw(call):
    run_both("masked_adamw_", build_adamw(*call), outputs=[0, 2, 3], compare=_compare_adamw)


# ---------------------------------------------------------------- adamw_first_step_


@st.composite
def first_call(draw):
    entries = [{"size": draw(length), "p_dtype": draw(float_dtype),
                "g_dtype": draw(st.sampled_from(["same", "same", "fp32", "bad"])),
                "g_len": draw(st.sampled_from(["ok"] * 5 + ["wrong"])),
                "places": [draw(placement) for _ in range(2)],
                "values": draw(st.sampled_from(["normal", "special"]))}
               for _ in range(draw(st.integers(1, 3)))]
    return entries, draw(st.sampled_from(HYPERS)), draw(st.booleans()), \
        draw(st.integers(0, 2**31))


def build_first(entries, hyper, drop_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for e in entries:
        g_dtype = {"same": e["p_dtype"], "fp32": torch.float32, "bad": torch.float64}
        g = values_of(e["size"] + (e["g_len"] == "wrong"), g_dtype[e["g_dtype"]], e["values"],
                      gen)
        params.append(place(values_of(e["size"], e["p_dtype"], e["values"], gen),
                            e["places"][0], gen))
        grads.append(place(g, e["places"][1], gen))
    if drop_grad:
        grads.pop()
    return [params, grads, *hyper]


@SETTINGS
@given(first_call())
def test_fuzz_adamw_first_step(call):
    run_both("adamw_first_step_", build_first(*call), outputs=[0],
             compare=lambda _k, _r, k_args, r_args: _close_params(k_args[0], r_args[0]))


# --------------------------------------------------------------- gather_accumulate_


@st.composite
def gather_call(draw):
    n = draw(st.integers(1, 3))
    entries = [{"size": (size := draw(length)), "dtype": draw(float_dtype),
                "idx": draw(index_spec(size)),
                "c_len": draw(st.sampled_from(["ok"] * 5 + ["short", "long"])),
                "c_dtype": draw(st.sampled_from([torch.float32] * 5 + [torch.float16])),
                "places": [draw(placement) for _ in range(2)],
                "values": draw(st.sampled_from(["normal", "special"]))} for _ in range(n)]
    return entries, draw(st.sampled_from([None] * 6 + ["indices", "compact"])), \
        draw(st.integers(0, 2**31))


def build_gather(entries, drop, seed):
    gen = torch.Generator().manual_seed(seed)
    dense, indices, compact = [], [], []
    for e in entries:
        dense.append(place(values_of(e["size"], e["dtype"], e["values"], gen), e["places"][0],
                           gen))
        idx = build_indices(e["idx"], gen)
        indices.append(idx)
        n = idx.tensor.numel() + {"ok": 0, "short": -1, "long": 1}[e["c_len"]]
        compact.append(place(values_of(max(n, 0), e["c_dtype"], "normal", gen), e["places"][1],
                             gen))
    if drop == "indices" and indices:
        indices.pop()
    if drop == "compact" and compact:
        compact.pop()
    return [dense, indices, compact]


def _compare_gather(_k, _r, k_args, r_args):
    for a, b in zip(k_args[2], r_args[2]):
        assert _same_values(a, b)


@SETTINGS
@given(gather_call())
def test_fuzz_gather_accumulate(call):
    run_both("gather_accumulate_", build_gather(*call), outputs=[2], compare=_compare_gather)


# ---------------------------------------------------------------------- remap_state


@st.composite
def remap_call(draw):
    n = draw(st.integers(1, 3))
    entries = [{"limit": (lim := draw(length)), "old": draw(index_spec(lim)),
                "new": draw(index_spec(lim)), "rows": draw(st.sampled_from([0, 1, 2, 3])),
                "s_len": draw(st.sampled_from(["ok"] * 5 + ["short", "long"])),
                "dtype": draw(float_dtype), "place": draw(placement)} for _ in range(n)]
    return entries, draw(st.sampled_from([None] * 6 + ["old", "new"])), \
        draw(st.integers(0, 2**31))


def build_remap(entries, drop, seed):
    gen = torch.Generator().manual_seed(seed)
    olds, news, states = [], [], []
    for e in entries:
        old, new = build_indices(e["old"], gen), build_indices(e["new"], gen)
        n = max(old.tensor.numel() + {"ok": 0, "short": -1, "long": 1}[e["s_len"]], 0)
        shape = (n,) if e["rows"] == 0 else (e["rows"], n)
        vals = values_of(math.prod(shape), e["dtype"], "special", gen).view(shape)
        olds.append(old)
        news.append(new)
        states.append(place(vals, e["place"], gen))
    if drop == "old" and olds:
        olds.pop()
    if drop == "new" and news:
        news.pop()
    return [olds, news, states]


def _compare_remap(k_out, r_out, _k, _r):
    assert len(k_out) == len(r_out)
    for a, b in zip(k_out, r_out):
        assert _same_values(a, b)


@SETTINGS
@given(remap_call())
def test_fuzz_remap_state(call):
    run_both("remap_state", build_remap(*call), outputs=[], compare=_compare_remap)


# ------------------------------------------------------------- select_topk, param_stats


@st.composite
def list_call(draw):
    n = draw(st.integers(1, 4))
    entries = [{"size": draw(length), "dtype": draw(float_dtype), "place": draw(placement),
                "values": draw(st.sampled_from(["normal", "special"]))} for _ in range(n)]
    return entries, draw(st.integers(-3, 70000)), draw(st.integers(0, 2**31))


def build_list(entries, seed):
    gen = torch.Generator().manual_seed(seed)
    return [place(values_of(e["size"], e["dtype"], e["values"], gen), e["place"], gen)
            for e in entries]


@SETTINGS
@given(list_call(), st.sampled_from(["k", "total", "zero", "over"]))
def test_fuzz_select_topk(call, which):
    entries, k, seed = call
    ts = build_list(entries, seed)
    total = sum(t.tensor.numel() for t in ts)
    k = {"k": min(k, total) if k >= 0 else k, "total": total, "zero": 0, "over": total + 1}[which]

    def compare(k_out, r_out, _k, _r):
        assert len(k_out) == len(r_out)
        for a, b in zip(k_out, r_out):
            assert _same_bits(a, b)

    run_both("select_topk", [ts, k], outputs=[], compare=compare)


@SETTINGS
@given(list_call())
def test_fuzz_param_stats(call):
    entries, _, seed = call

    def compare(k_out, r_out, _k, _r):
        for j in (0, 3):  # numel, hist: exact
            assert _same_bits(k_out[j], r_out[j])
        # absmax: exact, any NaN bit pattern for NaN
        torch.testing.assert_close(k_out[2], r_out[2], rtol=0, atol=0, equal_nan=True)
        # sumsq: fp32 lanes (see test_ops.SUMSQ_RTOL)
        torch.testing.assert_close(k_out[1], r_out[1], rtol=1e-5, atol=0, equal_nan=True)

    run_both("param_stats", [build_list(entries, seed)], outputs=[], compare=compare)


# ---------------------------------------------------------------- the wrappers (ops.*)


@SETTINGS
@given(adamw_call(min_n=0))
def test_fuzz_wrapper_masked_adamw_never_crashes(call):
    """The public door (ops.masked_adamw_): takes python step ints and routes meta tensors
    to the reference; any outcome but a crash or an unexpected exception type is fine."""
    args = build_adamw(*call)
    lists = [[a.tensor if isinstance(a, Arg) else a for a in x] for x in args[:6]]
    steps = [7] * len(lists[0]) if call[0] and call[0][0]["step"] == "int" else lists[5]
    try:
        ops.masked_adamw_(*lists[:5], steps, lr=args[6], beta1=args[7], beta2=args[8],
                          eps=args[9], weight_decay=args[10])
    except ALLOWED:
        pass


# ------------------------------------------------------------- kernel bad-input table

def _z(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


# (op, the call as the docs show it, factory of the arguments, exception, message regex).
# docs/bad_inputs.md lists these with the messages they produce (tests/gen_bad_inputs.py).
KERNEL_BAD_INPUTS = [
    ("select_topk", "select_topk([zeros(4)], k=5)", lambda: ([_z(4)], 5), ValueError,
     r"select_topk: k=5 is out of range; allowed: 0..4"),
    ("select_topk", "select_topk([zeros(4)], k=-1)", lambda: ([_z(4)], -1), ValueError,
     r"select_topk: k=-1 is out of range"),
    ("select_topk", "select_topk([zeros(4), zeros(4, dtype=int64)], 1)",
     lambda: ([_z(4), _z(4, dtype=torch.int64)], 1), TypeError,
     r"select_topk: tensors\[1\] has dtype torch.int64; allowed: torch.float32"),
    ("param_stats", "param_stats([zeros(4, 4).t()])", lambda: ([_z(4, 4).t()],), ValueError,
     r"param_stats: tensors\[0\] is not contiguous; pass .contiguous\(\) tensors"),
    ("param_stats", "param_stats([zeros(3), zeros(3, dtype=float64)])",
     lambda: ([_z(3), _z(3, dtype=torch.float64)],), TypeError,
     r"param_stats: tensors\[1\] has dtype torch.float64; allowed: torch.float32, "
     r"torch.bfloat16, torch.float16"),
    ("gather_accumulate_", "gather_accumulate_([ones(5)], [tensor([1, 5])], [zeros(2)])",
     lambda: ([torch.ones(5)], [torch.tensor([1, 5])], [_z(2)]), IndexError,
     r"gather_accumulate_: indices\[0\]\[1\] = 5 is out of range for dense\[0\] with 5 "
     r"elements; allowed: 0..4"),
    ("gather_accumulate_", "gather_accumulate_([ones(5)], [tensor([1, 2])], [zeros(3)])",
     lambda: ([torch.ones(5)], [torch.tensor([1, 2])], [_z(3)]), ValueError,
     r"compact\[0\] has 3 elements but len\(indices\[0\]\) is 2; they must match"),
    ("gather_accumulate_", "gather_accumulate_([ones(5)], [tensor([1])] * 2, [zeros(1)])",
     lambda: ([torch.ones(5)], [torch.tensor([1])] * 2, [_z(1)]), ValueError,
     r"got 1 dense but 2 indices; every list needs one entry per dense"),
    ("gather_accumulate_", "gather_accumulate_([ones(5)], [tensor([1])], [zeros(1).half()])",
     lambda: ([torch.ones(5)], [torch.tensor([1])], [_z(1, dtype=torch.float16)]), TypeError,
     r"compact\[0\] has dtype torch.float16; allowed: torch.float32"),
    ("remap_state", "remap_state([tensor([1, 3])], [tensor([2, 3])], [zeros(2, 3)])",
     lambda: ([torch.tensor([1, 3])], [torch.tensor([2, 3])], [_z(2, 3)]), ValueError,
     r"states\[0\] has shape \(2, 3\); its last dimension \(3\) must equal "
     r"len\(old_indices\[0\]\) = 2"),
    ("remap_state", "remap_state([tensor([1, 3])], [tensor([3, 2])], [zeros(2)])",
     lambda: ([torch.tensor([1, 3])], [torch.tensor([3, 2])], [_z(2)]), ValueError,
     r"new_indices\[0\]\[1\] = 2 follows 3; indices must be sorted ascending and unique"),
    ("remap_state", "remap_state([tensor([-1, 3])], [tensor([2, 3])], [zeros(2)])",
     lambda: ([torch.tensor([-1, 3])], [torch.tensor([2, 3])], [_z(2)]), IndexError,
     r"old_indices\[0\]\[0\] = -1 is negative; positions are >= 0"),
    ("remap_state", "remap_state([tensor([[1, 3]])], [tensor([2, 3])], [zeros(2)])",
     lambda: ([torch.tensor([[1, 3]])], [torch.tensor([2, 3])], [_z(2)]), ValueError,
     r"old_indices\[0\] has 2 dimensions; indices must be 1-D"),
]


@pytest.mark.parametrize("op,text,factory,exc,msg", KERNEL_BAD_INPUTS,
                         ids=[c[1][:50] for c in KERNEL_BAD_INPUTS])
def test_kernel_bad_input_table(op, text, factory, exc, msg):
    """Each documented refusal, through the public door (ops.*) and the kernel itself."""
    for fn in (getattr(ops, op), getattr(torch.ops.nto, op)):
        args = factory()
        before = [_bits(t) for a in args if isinstance(a, list) for t in a
                  if t.device.type == "cpu"]
        with pytest.raises(exc, match=msg):
            fn(*args)
        after = [_bits(t) for a in args if isinstance(a, list) for t in a
                 if t.device.type == "cpu"]
        assert all(torch.equal(x, y) for x, y in zip(before, after))
