"""plan(..., fit=MEMORY): the largest budget whose predicted peak fits a stated memory.

Predicted peak = weights (resident) + the policy's training state at the budget (the same
memory model the policies pack with, budget.py: grads + moments + per-tensor step scalars;
sparse: compact state + the larger transient: the largest tensor's dense gradient, or a
regrowth's copy of one param's rows) + activations
(only when the user gives a measured figure: an estimate is never presented as fact) + a
safety margin of `MARGIN_FRACTION` of the stated memory.

The budget is an element count, searched by bisection with the real policy packing, so
`NTO(params, budget=fit.budget_elements, policy=...)` trains exactly what was priced. The
packing's peak need not grow monotonically with the budget (a larger budget can merge two
units into one period), so "largest" means the boundary the bisection reaches: the budget
fits and one element more does not. Sparse needs no search (16 B per chosen element;
12 with bf16 moments).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .blocks import ParamInfo, first_names, param_label
from .budget import (
    Budget,
    format_bytes,
    parse_budget,
)
from .policies import BlockPolicy, Policy, ScheduledPolicy, SparsePolicy

MARGIN_FRACTION = 0.05  # of the stated memory: allocator rounding, fragmentation, buffers
_MEMORY_ALLOWED = "a byte size such as '24GiB', '80GB', '512MiB' or an int of bytes"


@dataclass
class Fit:
    """What fits in `memory_bytes`, and why. All sizes in bytes."""

    memory: str  # as stated ("24GiB")
    memory_bytes: int
    policy: str
    dtype: str
    weights_bytes: int
    budget_elements: int  # pass this to NTO(budget=...)
    budget_percent: float  # budget_elements / total_elements * 100
    total_elements: int
    state_bytes: int  # predicted peak training state at that budget
    transient_bytes: int  # sparse: one dense gradient during backward; 0 otherwise
    activation_bytes: int | None  # None: unknown (not measured, not included)
    batch_size: int | None
    seq_len: int | None
    margin_bytes: int
    predicted_bytes: int  # weights + state + transient + activations (if given) + margin
    headroom_bytes: int  # memory_bytes - predicted_bytes
    covers: str
    untrainable: list[str] = field(default_factory=list)  # tensors too big at this budget
    # NTO's other arguments that were priced, where they differ from NTO's defaults
    # (state_dtype="int4", step_in_backward=True, ...): the budget holds only with them
    nto_kwargs: dict[str, Any] = field(default_factory=dict)

    def nto_call(self) -> str:
        """The NTO(...) call that trains exactly what was priced."""
        extra = "".join(f", {k}={v!r}" for k, v in self.nto_kwargs.items())
        return f"NTO(..., budget={self.budget_elements}, policy={self.policy!r}{extra})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        def row(label: str, n: int | None, note: str = "") -> str:
            size = "unknown" if n is None else format_bytes(n)
            return f"  {label:<18} {size:>12}  {note}".rstrip()

        shape = (f", batch {self.batch_size or '?'} x {self.seq_len or '?'} tokens"
                 if self.batch_size or self.seq_len else "")
        act_note = ("measured by you (--activation-bytes), included" if self.activation_bytes
                    is not None else "not measured, NOT included: pass --activation-bytes N "
                    "(the measured peak of one forward/backward at your batch)")
        state_note = ("compact grad + moments + index (sparse)" if self.policy == "sparse"
                      else "peak period: grads + moments + step scalars")
        lines = [f"NTO fit: policy={self.policy}, dtype {self.dtype}{shape}",
                 row("memory stated", self.memory_bytes, f"{self.memory}"),
                 row("weights", self.weights_bytes, "resident"),
                 row("training state", self.state_bytes, state_note)]
        if self.policy == "sparse":
            lines.append(row("transient", self.transient_bytes,
                             "one dense gradient during backward (the largest tensor's)"))
        lines += [row("activations", self.activation_bytes, act_note),
                  row("margin", self.margin_bytes, f"{MARGIN_FRACTION:.0%} of the memory stated"),
                  row("predicted total", self.predicted_bytes),
                  row("headroom", self.headroom_bytes),
                  f"budget: {self.budget_elements:,} elements = {self.budget_percent:.2f}% of "
                  f"{self.total_elements:,}; use {self.nto_call()}",
                  f"covers: {self.covers}"]
        if self.untrainable:
            lines.append("cannot train at this budget (too large): "
                         + first_names(self.untrainable, 5))
        return "\n".join(lines)


def parse_memory(memory: object, arg: str = "fit") -> tuple[int, str]:
    """(bytes, text) of a stated memory: a byte string ('24GiB') or an int of bytes.
    `arg` names the argument in errors (plan's `fit`, NTO's `memory`)."""
    if isinstance(memory, bool) or not isinstance(memory, (int, str)):
        raise TypeError(f"{arg}={memory!r} has type {type(memory).__name__}; allowed: "
                        f"{_MEMORY_ALLOWED}")
    if isinstance(memory, str) and memory.strip().isascii() and memory.strip().isdigit():
        memory = int(memory.strip())  # a bare number is bytes here (budgets: elements)
    if isinstance(memory, int):
        if memory <= 0:
            raise ValueError(f"{arg}={memory!r}; allowed: {_MEMORY_ALLOWED} (> 0)")
        return memory, f"{memory}B"
    try:
        b = parse_budget(memory, 1)
    except ValueError:
        b = None
    if b is None or b.kind != "bytes":
        raise ValueError(f"{arg}={memory!r} is not a memory size; allowed: {_MEMORY_ALLOWED} "
                         "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return b.amount, memory.strip()


def parse_activation_bytes(value: object) -> int | None:
    """None, an int >= 0 or a byte string ('3GiB'): the user's measured activation peak."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"activation_bytes={value!r}; allowed: an int >= 0 or a byte size "
                             "such as '3GiB' (the measured peak of one forward/backward)")
        return value
    try:
        return parse_memory(value)[0]
    except (TypeError, ValueError):
        raise ValueError(f"activation_bytes={value!r}; allowed: an int >= 0 or a byte size "
                         "such as '3GiB' (the measured peak of one forward/backward)") from None


def _positive(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; allowed: None or an int >= 1")
    return value


def check_fit_args(memory: object, activation_bytes: object, batch_size: object,
                   seq_len: object) -> tuple[int, str, int | None]:
    """Every fit argument checked before any model is built."""
    mem, text = parse_memory(memory)
    act = parse_activation_bytes(activation_bytes)
    _positive("batch_size", batch_size)
    _positive("seq_len", seq_len)
    return mem, text, act


def margin_bytes(memory: int) -> int:
    return math.ceil(MARGIN_FRACTION * memory)


def state_peak(pol: Policy) -> tuple[int, int]:
    """(predicted peak training-state bytes, transient bytes) of a built policy.

    block: exact (its periods are the same every cycle). sample: periods are redrawn each
    cycle, so an upper bound holding for every cycle: the always-trained state + the
    capacity's elements at the costliest dtype + a step scalar for every switching tensor.
    """
    infos = pol.infos
    if isinstance(pol, SparsePolicy):
        return pol.state_bytes(pol.k, pol.costliest_dtype()), pol.transient_bound()
    assert isinstance(pol, ScheduledPolicy)

    fixed = pol.unit_bytes(pol.always_units)
    transient = pol.transient_grad_bytes()
    if isinstance(pol, BlockPolicy):
        return fixed + max((pol.unit_bytes(g) for g in pol.groups), default=0), transient
    switching = sorted({i for u in pol.units for i in u.params})  # one range of each at once
    if not switching:
        return fixed, 0
    bpe = max(pol.bytes_per_element(infos[i].dtype) for i in switching)
    room = min(pol.capacity, sum(u.elements for u in pol.units))
    return fixed + math.ceil(room * bpe) + len(switching) * pol.tensor_bytes(), transient


def _elements_budget(n: int) -> Budget:
    return Budget("elements", n, repr(n))


def find_fit(infos: list[ParamInfo], policy: str, make: Callable[[Budget], Policy],
             memory: int, memory_text: str, activation_bytes: int | None,
             dtype: str, batch_size: int | None = None, seq_len: int | None = None, *,
             arg: str = "fit", activation_label: str = "activations",
             nto_kwargs: dict[str, Any] | None = None) -> Fit:
    """The largest element budget whose predicted total fits `memory` (see module doc).
    `arg` and `activation_label` name the memory and the activation figure in errors."""
    total = sum(i.numel for i in infos)
    weights = sum(i.numel * i.dtype.itemsize for i in infos)
    margin = margin_bytes(memory)
    base = weights + (activation_bytes or 0) + margin
    built = _builder(make)

    def need(pol: Policy) -> int:
        return base + sum(state_peak(pol))

    lo = _smallest_buildable(built, policy, infos, total)
    small = built(lo)
    if small is None or need(small) > memory:
        raise _nothing_fits(small, lo, infos, memory, f"{arg}={memory_text!r}", weights,
                            activation_bytes, activation_label, policy, make)
    # a search for every policy: sparse's transient grows with K (a regrowth's row copy)
    best = _bisect(lo, total, lambda e: (p := built(e)) is not None and need(p) <= memory)
    pol = built(best)
    assert pol is not None
    state, transient = state_peak(pol)
    predicted = base + state + transient
    covers = ("weights + training state" + (" + transient gradient" if transient else "")
              + (" + activations (given) + margin" if activation_bytes is not None else
                 " + margin; activations unknown (not included): leave room for them or "
                 "pass activation_bytes"))
    return Fit(memory=memory_text, memory_bytes=memory, policy=policy, dtype=dtype,
               weights_bytes=weights, budget_elements=best,
               budget_percent=100.0 * best / total, total_elements=total,
               state_bytes=state, transient_bytes=transient, activation_bytes=activation_bytes,
               batch_size=batch_size, seq_len=seq_len, margin_bytes=margin,
               predicted_bytes=predicted, headroom_bytes=memory - predicted, covers=covers,
               untrainable=[param_label(infos[i].name, i) for i in
                            sorted(pol.untrainable, key=lambda i: -infos[i].numel)],
               nto_kwargs=dict(nto_kwargs or {}))


def _builder(make: Callable[[Budget], Policy]) -> Callable[[int], Policy | None]:
    """make() at an element budget; None where the policy refuses it (below the smallest
    unit, or the always blocks): nothing would train there."""
    def built(e: int) -> Policy | None:
        try:
            return make(_elements_budget(e))
        except ValueError:
            return None
    return built


def smallest_budget(infos: list[ParamInfo], policy: str,
                    make: Callable[[Budget], Policy]) -> int:
    """The smallest element budget the policy accepts over `infos`."""
    return _smallest_buildable(_builder(make), policy, infos, sum(i.numel for i in infos))


def _bisect(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """Largest e in [lo, hi] with fits(e), given fits(lo); the answer e has fits(e) and
    (e == hi or not fits(e + 1)). ~log2(hi) policy builds."""
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _smallest_buildable(built: Callable[[int], Policy | None], policy: str,
                        infos: list[ParamInfo], total: int) -> int:
    """The smallest element budget the policy accepts (the smallest unit, plus `always`)."""
    if policy == "sparse":
        return 1
    lo = min(i.numel for i in infos)
    if built(lo) is not None:
        return lo
    if built(total) is None:
        return total  # refused at any budget: the caller reports it
    hi = total
    while hi - lo > 1:  # "builds" only grows with the budget
        mid = (lo + hi) // 2
        if built(mid) is None:
            lo = mid
        else:
            hi = mid
    return hi


def _nothing_fits(small: Policy | None, lo: int, infos: list[ParamInfo], memory: int,
                  given: str, weights: int, act: int | None, act_label: str, policy: str,
                  make: Callable[[Budget], Policy]) -> ValueError:
    if small is None:  # refused even at 100%: let the policy say why
        make(_elements_budget(lo))
    assert small is not None
    state, transient = state_peak(small)
    core = weights + state + transient + (act or 0)
    least = math.ceil(core / (1 - MARGIN_FRACTION))
    while core + margin_bytes(least) > least:
        least += 1
    pool = small.trainable if isinstance(small, ScheduledPolicy) else range(len(infos))
    smallest = min(pool, key=lambda i: infos[i].numel)
    what = (f"the smallest unit's training state {format_bytes(state)} (tensor "
            f"{infos[smallest].name or smallest!r}, {infos[smallest].numel:,} elements)"
            + (f" + the transient dense gradient {format_bytes(transient)} (of a tensor "
               "trained a range of rows at a time)" if transient else "")
            if policy != "sparse" else
            f"one element's state {state} B + the transient dense gradient "
            f"{format_bytes(transient)}")
    parts = [f"weights {format_bytes(weights)}", what]
    if act is not None:
        parts.append(f"{act_label} {format_bytes(act)}")
    over = " (the weights alone exceed it)" if weights > memory else ""
    return ValueError(
        f"{given} ({format_bytes(memory)}): nothing fits under policy={policy!r}"
        f"{over}; the smallest footprint is {format_bytes(core)} = {' + '.join(parts)}, "
        f"plus the {MARGIN_FRACTION:.0%} margin. State a memory of at least "
        f"{format_bytes(least)} ({least:,} bytes), or shrink the footprint: a 16-bit dtype "
        "(--dtype bf16 / dtype='bfloat16') halves the weights, or plan a smaller model")
