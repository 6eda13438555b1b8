"""Budgets and the memory model.

A budget is either a number of trainable *elements* (an int, a fraction in (0, 1] or "N%"
of all elements) or a number of *bytes* of training state ("512MiB", "2GB", "1.5GiB",
"100KB"). Byte budgets go through the memory model below: what training keeps beyond the
weights, per trainable element, by policy and parameter dtype (DESIGN.md, "Memory model").

| policy        | gradient       | state              | index | B/elem fp32, bf16 |
|---------------|----------------|--------------------|-------|-------------------|
| adamw (torch) | param dtype    | 2 x param          | -     | 12, 6             |
| block, sample | param dtype    | 2 x fp32           | -     | 12, 10            |
|  + fp32 master| -              | + fp32 (bf16/fp16) | -     | -, 14 (default)   |
|  state int8   | param dtype    | 2 x 1 B + scales   | -     | 6.03, 4.03        |
|  state int4   | param dtype    | 1 B + scales       | -     | 5.13, 3.13        |
|  state none   | param dtype    | -                  | -     | 4, 2              |
|  step in bwd  | - (transient)  | as above           | -     | 8, 8 (fp32 state) |
| sparse        | fp32 (compact) | 2 x fp32           | int32 | 16, 16            |
| adamw8bit     | param dtype    | ~2 x 1 B           | -     | 6, 4              |

Sparse: 4 (compact grad) + 8 (moments) + 4 (index, int64 past 2**31 elements in one
tensor) = 16 B. Step counts are kept per cohort (the elements grown at one regrowth) in
small host tables, not per element (see sparse.py). It also needs one dense gradient at a
time during backward (the transient, reported apart).

state_dtype="int8" (formats/int8.py): 2 B of moments per element plus two fp32 scales per
block of 256 (and per tensor at most one partial block: counted per tensor, exactly).
state_dtype="int4" (formats/int4.py; block and sample): both moments in 1 B per element
plus two fp32 scales per block of 64.
state_dtype="bf16" (formats/bf16.py): 4 B of moments per element.
state_dtype="none" (formats/none.py; block and sample with switch_every=1): no moments,
every update is AdamW's first step from a fresh state; the gradient is the state.
step_in_backward=True (block and sample; policies/dense.py): each param's gradient is used
and freed in backward, so only the format's state counts (int8 2.03 B, int4 1.13 B, none
0 B per element); the largest active gradient is the transient.

The master row is the default for bf16/fp16 params under block and sample (the active set
only; `stochastic_rounding=True` or `master_weights=False`: 10): the policy asks its state
format (`nto_ext.formats`) for the bytes.

Dense NTO state also holds one `step` scalar per trainable tensor (a 0-dim fp32 tensor, as
`torch.optim.AdamW` keeps it): `STEP_BYTES` per tensor, counted by the model and measured
by `memory_report()`.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STEP_BYTES = 4  # one fp32 scalar `step` per tensor (torch AdamW)

_BYTE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
# ASCII digits only: '²' or '٣' pass str.isdigit() but are no budget anyone meant to write
_BYTES_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]+)\s*$", re.ASCII)
_PERCENT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*%\s*$", re.ASCII)
_INT_RE = re.compile(r"^\s*([0-9]+)\s*$", re.ASCII)
MAX_BUDGET = 2**63 - 1  # elements or bytes; torch's numel and byte counts are int64
_MAX_TEXT = 1000  # longer strings are refused unparsed (int() refuses 4,300+ digits)
_ALLOWED = ("an int (elements), a float in (0, 1] or 'N%' (share of all elements), "
            "or a byte size such as '512MiB', '2GB', '1.5GiB', '100KB'")


def bytes_per_element(optimizer: str, dtype: torch.dtype) -> int:
    """Device bytes of training state per element under the optimizers NTO is compared
    with (NTO's own policies carry their memory model: `Policy.bytes_per_element`)."""
    if optimizer == "adamw":
        return 3 * dtype.itemsize  # gradient and two moments in the param's dtype
    if optimizer == "adamw8bit":
        return dtype.itemsize + 2
    raise ValueError(f"memory model: unknown optimizer {optimizer!r}; allowed: adamw, "
                     "adamw8bit (NTO's policies: nto_ext.policies.POLICIES[name])")


def state_bytes(optimizer: str, numel: int, dtype: torch.dtype) -> int:
    """Training-state bytes of one tensor under torch AdamW or 8-bit AdamW (AdamW also
    keeps one fp32 `step` scalar per tensor)."""
    return numel * bytes_per_element(optimizer, dtype) + (STEP_BYTES if optimizer == "adamw"
                                                           else 0)


def storage_bytes(tensors: Iterable[object]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and aliases counted once; the
    local shard of a DTensor; meta tensors and non-tensors count 0)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        t = getattr(t, "_local_tensor", t)
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class Budget:
    """A parsed budget. `kind` is "elements" or "bytes"; `amount` is in that unit."""

    kind: str
    amount: int
    given: str  # repr of what the user passed, for messages ("'10%'", "1000")

    @property
    def text(self) -> str:
        """What the user passed, without quotes ("10%", "512MiB", "1000")."""
        return self.given[1:-1] if self.given[:1] in "'\"" and len(self.given) > 1 \
            else self.given

    def cost(self, items: Iterable[tuple[int, torch.dtype]],
             state_bytes: Callable[[int, torch.dtype], int]) -> int:
        """Cost of training the tensors `items` = [(numel, dtype), ...], in budget units:
        elements, or bytes by `state_bytes(numel, dtype)` (the policy's memory model)."""
        items = list(items)
        if self.kind == "elements":
            return sum(n for n, _ in items)
        return sum(state_bytes(n, d) for n, d in items)

    def describe(self) -> str:
        if self.kind == "elements":
            return f"{self.amount:,} elements"
        return f"{format_bytes(self.amount)} ({self.amount:,} bytes)"


def _bad(budget: object, why: str) -> ValueError:
    return ValueError(f"budget={budget!r}: {why}; allowed: {_ALLOWED}")


def parse_budget(budget: object, total_elements: int) -> Budget:
    """Parse a user budget against a model of `total_elements` elements.

    int -> elements; float in (0, 1] or "N%" (0 < N <= 100) -> share of all elements
    (rounded down, at least 1); byte strings -> bytes. numpy / other numeric scalars are
    taken as the Python int or float they equal. Raises TypeError / ValueError with the
    given value and what is allowed.
    """
    value = _as_python_number(budget)
    if isinstance(value, int):
        return _elements(value, budget)
    if isinstance(value, float):
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise _bad(budget, "a float budget is a share of all elements and must be in "
                       "(0, 1] (pass an int for an element count)")
        return Budget("elements", _share(value, total_elements), repr(value))
    return _parse_text(value, total_elements)


def _as_python_number(budget: object) -> int | float | str:
    """The budget as a Python int, float or str; numpy ints/floats become int/float."""
    if isinstance(budget, str):
        return budget
    # bool (numpy's too) is an int to Python but never a budget anyone meant
    if isinstance(budget, bool) or type(budget).__name__ == "bool_":
        raise _bad_type(budget)
    if isinstance(budget, numbers.Integral):
        return operator.index(budget)
    if isinstance(budget, numbers.Real):
        return float(budget)
    raise _bad_type(budget)


def _elements(n: int, budget: object) -> Budget:
    """An element-count budget; `budget` is what the user gave (for messages)."""
    if n <= 0:
        raise _bad(budget, "an element budget must be > 0")
    if n > MAX_BUDGET:
        raise _bad(budget, f"an element budget must be at most 2**63-1 ({MAX_BUDGET:,})")
    return Budget("elements", n, repr(budget) if isinstance(budget, str) else repr(n))


def _bad_type(budget: object) -> TypeError:
    return TypeError(f"budget={budget!r} has type {type(budget).__name__}; allowed: {_ALLOWED}")


def _parse_text(budget: str, total_elements: int) -> Budget:
    if len(budget) > _MAX_TEXT:
        raise _bad(budget[:40] + "...", f"{len(budget):,} characters; at most {_MAX_TEXT:,}")
    m = _PERCENT_RE.match(budget)
    if m:
        pct = float(m.group(1))
        if not 0.0 < pct <= 100.0:
            raise _bad(budget, "a percentage must be in (0%, 100%]")
        return Budget("elements", _share(pct / 100.0, total_elements), repr(budget))
    m = _INT_RE.match(budget)
    if m:
        return _elements(int(m.group(1)), budget)
    m = _BYTES_RE.match(budget)
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise _bad(budget, "cannot parse it (byte units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB;"
                   " ASCII digits, no sign or exponent)")
    scaled = float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()]  # inf past ~1e308
    if scaled > MAX_BUDGET:
        raise _bad(budget, f"a byte budget must be at most 2**63-1 bytes ({MAX_BUDGET:,})")
    amount = math.floor(scaled)
    if amount <= 0:
        raise _bad(budget, "a byte budget must be at least 1 byte")
    return Budget("bytes", amount, repr(budget))


def _share(fraction: float, total_elements: int) -> int:
    # 100% must be every element exactly, whatever the float rounding.
    if fraction >= 1.0:
        return max(total_elements, 1)
    return max(1, math.floor(fraction * total_elements + 1e-9))
