"""policy="sparse" (SpIEL-style): K individual elements anywhere, chosen as a global top-K
by gradient score, with compact state and periodic drop-and-regrow.

`SparsePolicy` says which steps score every gradient and how many elements to hold (K)
and to regrow; `SparseUpdater` does it on the optimizer's tensors, called from NTO's
gradient hook (`on_grad`), its update (`update`) and its schedule (`advance`).

State of a param that holds chosen elements (in `NTO.state[param]`, torch's key names):
  indices     int32 [L] (int64 past 2**31-1 elements): flat positions, in cohorts (the
              elements grown at one regrowth, or at step 0), each cohort sorted and unique
  exp_avg     fp32 [L];  exp_avg_sq  fp32 [L]  (bf16 with state_dtype="bf16"; with
              state_dtype="int8": int8 [L] and uint8 [L] levels, formats/int8.py, and
  exp_avg_scale, exp_avg_sq_scale  fp32 [B]: one per block of 256 of each cohort, the
              blocks following the cohort's rows: a cohort is updated on its own)
  step        list of C ints: updates each cohort has had. A cohort starts at 0, so its
              bias corrections are AdamW's from its own first update.
  sizes       list of C ints: elements per cohort, in the order of `indices`.
  master      fp32 [L], bf16/fp16 params under the default format only: the chosen
              elements' fp32 values (AdamW updates them; the param holds them rounded to
              nearest; a dropped element's param gets its master rounded stochastically).
              stochastic_rounding=True keeps none: the updated fp32 values are rounded
              stochastically into the param.
16 B of tensors per chosen element with the compact gradient (20 with a master, 12 with
bf16 moments: they are updated in fp32 and rounded to nearest once, formats/bf16.py; 10 +
8/256 with 8-bit moments, whose byte budgets keep 8 B per param aside for a first cohort's
partial block, and grow only what the measured bytes leave room for: the partial blocks of
later cohorts can hold the chosen count a few elements under K); the cohort tables are a
few host ints per regrowth (a step count per element would cost 4 B each).
A param without a chosen element has no state and, between scoring steps, no gradient
(requires_grad=False).

Compact gradients: the post-accumulate-grad hook gathers the chosen entries of each dense
gradient into an fp32 buffer of L elements (`gather_accumulate_` adds, so accumulation
over micro-batches is exact) and frees the dense gradient at once. Gradient memory is the
compact buffers plus the dense gradient autograd hands over, one tensor at a time: the
largest one seen is `transient_bytes`. Buffers are freed at the end of `step()` (their
values are used up) and by `zero_grad()`.

Scoring (step 0, and each regrowth), tensor by tensor, never all dense gradients at once:
the hook checks the dense gradient for NaN/Inf (a NaN anywhere skips the step under
nonfinite="skip"), adds it into the candidates it already holds for that tensor (exact),
masks chosen and candidate positions with NaN (which select_topk ranks last), and takes
the tensor's top `want` by |g| as new candidates (position, value); once all candidates
together exceed 1.5 x `want` (the number of elements to grow) only the global top `want`
are kept (one select_topk over every candidate list; afterwards the want-th value is a
threshold below which nothing can join). Candidates count in the budget (fp32 value as
gradient, position as index): 8 B each, at most 2 x want of them, exactly the room the
dropped elements (16 B each with their compact gradient) freed. With one backward per step the grown
set is the exact global top `want` by |gradient| of the free elements; with accumulation
an element scores the gradient summed from the micro-batch where it became a candidate
on (the training gradient itself stays exact). Step 0 chooses K elements and, with one
backward, updates them (below), as torch's first step would.

Drop (at the end of the step before a regrowth, so the regrowth's candidates fit): the
weakest chosen elements by the size of their AdamW update, |m_hat| / (sqrt(v_hat) + eps)
with each element's bias corrections, go until K - floor(regrow_fraction * K) remain
(found tensor by tensor with the same candidate pool, in the compact gradients' room).
Elements grown at the last regrowth that have not been updated yet are kept; NaN moments
go first; ties drop the lowest position. Kept elements' moments are carried bit for bit by
`remap_state`, cohort by cohort (8-bit ones: dequantized as the kernel reads them and
quantized again in the cohort's new blocks, one requantization per drop); a cohort left
empty is removed.

Regrowth (in the scoring step's `step()`): the top candidates join the chosen set as a
new cohort with zero moments and step count 0. With one backward since the last step a
candidate's value is its whole gradient of the step, so it becomes the new element's
compact gradient: the cohort is grown before the update, takes its first AdamW step with
the kept elements (one non-finite check and clip over both) and the peak is exactly K
chosen elements with their gradients (16 B each: the dropped elements' room). Under
accumulation a value is a partial sum, so the cohort is grown after the kept elements'
update and first trains on the next step. The step is skipped (nonfinite) or not, the
regrowth happens, so the chosen count, and the memory, stay the same from step to step.

Memory of a drop / regrowth beyond grad + state + index: per tensor, a score buffer (one
fp32 array of that tensor's chosen count) and the new copy of one state row at a time;
the largest is reported with the dense gradients in `transient_bytes`.

Limits: one device for all params (the top-K is global); DTensor params (FSDP2) and DDP
(whose reducer reads the gradients this hook frees) are not supported with sparse.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from .. import ops
from .._reference import Q8_BLOCK, q8_blocks
from ..args import check_grad_layout
from ..blocks import ParamInfo
from ..budget import Budget
from ..checkpoint import MAX_STEP, Storages, adamw_entry, check_values
from ..formats import INT8, MASTER, STOCHASTIC, Fp32Moments
from ..formats.fp32 import MOMENTS
from ..formats.int8 import LAYOUT, SCALES, dequantize_roots, quantize, quantize_roots
from ..formats.int8 import check_values as check_q8_values
from ..formats.master import stochastic_round
from .base import Config, Host, Policy, Updater, measure

log = logging.getLogger(__name__)

ROWS = MOMENTS  # one fp32 value per chosen element
MASTER_ROW = "master"  # bf16/fp16 params with master weights: the chosen elements' fp32 values
STATE_KEYS = ("indices", *ROWS, *SCALES, MASTER_ROW, "step", "sizes")  # a param's compact state
_FILL_CHUNK = 1 << 20  # positions masked per indexing call (bounds its int64 temporary)
_SMALL = 1 << 16  # tensors this small take every free element without a selection
_INF_BITS = 0x7F800000  # fp32 +inf; INF_BITS - bits(s) reverses the order of scores s >= 0
_WINDOW = 64 * Q8_BLOCK  # 8-bit moments dequantized at a time (bounds the fp32 temporaries)

Chunks = dict[int, list[list[torch.Tensor]]]  # param index -> [[positions, values], ...]


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int64 if numel > 2**31 - 1 else torch.int32


def _new_state(positions: torch.Tensor, master_of: torch.Tensor | None,
               fmt: Fp32Moments) -> dict[str, Any]:
    """State of a param whose chosen elements are `positions` (one cohort, not updated),
    its moments in format `fmt`; with `master_of` (the param, when it keeps masters)
    their fp32 masters."""
    n = positions.numel()
    st = {"indices": positions, **_zero_moments(fmt, n, positions.device),
          "step": [0], "sizes": [n]}
    if master_of is not None:
        st[MASTER_ROW] = _gather(master_of, positions)
    return st


def _zero_moments(fmt: Fp32Moments, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Zero moments of n chosen elements (one cohort): one value per element each, and
    with 8-bit moments the scales of its q8_blocks(n) blocks."""
    if fmt is INT8:
        return {k: torch.zeros(n if per == "element" else q8_blocks(n), dtype=dt, device=device)
                for k, (dt, per) in LAYOUT.items()}
    return {k: torch.zeros(n, dtype=fmt.moment_dtype, device=device) for k in MOMENTS}


def _rows(st: dict[str, Any]) -> tuple[str, ...]:
    """The per-element rows of a compact state that a drop carries bit for bit: the fp32 or
    bf16 moments and the master if kept (8-bit moments are requantized, `_requantized`)."""
    if SCALES[0] in st:
        return ()
    return (*ROWS, MASTER_ROW) if MASTER_ROW in st else ROWS


def _scale_bounds(st: dict[str, Any]) -> list[tuple[int, int]]:
    """(start, end) of each cohort's quantization blocks in an 8-bit state's scales: each
    cohort's blocks start at its first element (a cohort is updated on its own)."""
    out, start = [], 0
    for n in st["sizes"]:
        out.append((start, start + q8_blocks(n)))
        start += q8_blocks(n)
    return out


def _cohort_q8(st: dict[str, Any], a: int, b: int, sa: int, sb: int) -> dict[str, torch.Tensor]:
    """The 8-bit state of one cohort: its rows [a, b) and scales [sa, sb)."""
    return {"exp_avg": st["exp_avg"][a:b], "exp_avg_sq": st["exp_avg_sq"][a:b],
            "exp_avg_scale": st["exp_avg_scale"][sa:sb],
            "exp_avg_sq_scale": st["exp_avg_sq_scale"][sa:sb]}


def _gather(p: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 copies of p's elements at `positions`, a chunk at a time."""
    flat = p.detach().reshape(-1)
    out = torch.empty(positions.numel(), dtype=torch.float32, device=p.device)
    for a in range(0, positions.numel(), _FILL_CHUNK):
        out[a:a + _FILL_CHUNK] = flat[positions[a:a + _FILL_CHUNK]]
    return out


def _scatter(p: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """p's elements at `positions` = values (already of p's dtype), a chunk at a time."""
    flat = p.detach().view(-1)
    for a in range(0, positions.numel(), _FILL_CHUNK):
        flat[positions[a:a + _FILL_CHUNK]] = values[a:a + _FILL_CHUNK]


def _cohorts(st: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(start, end, step count) of each cohort's rows in `st`."""
    out, start = [], 0
    for n, t in zip(st["sizes"], st["step"]):
        out.append((start, start + n, t))
        start += n
    return out


def _fill(flat: torch.Tensor, positions: torch.Tensor, value: float) -> None:
    """flat[positions] = value, a chunk at a time (indexing converts positions to int64)."""
    for start in range(0, positions.numel(), _FILL_CHUNK):
        flat[positions[start:start + _FILL_CHUNK]] = value


def _union(a: torch.Tensor, b: torch.Tensor, av: torch.Tensor | None = None,
           bv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sorted union of two disjoint sorted index tensors (of a's dtype), without sorting:
    b[j] lands at (number of a below it) + j, a fills the remaining slots in order. With
    values av / bv (one per position): the union's values in the same order, else None."""
    if b.numel() == 0:
        return a, av
    if a.numel() == 0:
        return b.to(a.dtype), bv
    b = b.to(a.dtype)
    slots = torch.searchsorted(a, b)
    slots += torch.arange(b.numel(), device=b.device)
    rest = torch.ones(a.numel() + b.numel(), dtype=torch.bool, device=a.device)
    rest[slots] = False

    def merged(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rest.numel(), dtype=x.dtype, device=x.device)
        out[slots] = y
        out[rest] = x
        return out

    return merged(a, b), (merged(av, bv) if av is not None else None)


def _keep_top(chunks: Chunks, k: int) -> Chunks:
    """The k largest |value| over all chunks (one select_topk; ties: lowest param index,
    then position), chunk order and each chunk's position order kept."""
    flat = [(i, c) for i in sorted(chunks) for c in chunks[i]]
    picks = ops.select_topk([c[1] for _, c in flat], k)
    out: Chunks = {}
    for (i, c), sel in zip(flat, picks):
        if sel.numel() == c[0].numel():
            out.setdefault(i, []).append(c)
        elif sel.numel():
            out.setdefault(i, []).append([c[0][sel], c[1][sel]])
    return out


class _Pool:
    """Candidates (to grow, or to drop): per param, chunks of (sorted positions, values).
    Keeps the top `k` by |value| of everything added, exactly: it reduces (one
    select_topk over every chunk) only when it holds more than `slack`. After a reduce,
    `tau` (the k-th largest |value|) filters what can still join (|v| >= tau; ties are
    settled by the next reduce); it stays valid while at least k held values reach it
    (`above` counts them per param), which `changed(i)` re-checks after param i's values
    changed (accumulation of a later micro-batch)."""

    def __init__(self, k: int, slack: int) -> None:
        self.k, self.slack = k, max(k, slack)
        self.chunks: Chunks = {}
        self.n = 0
        self.nbytes = 0
        self.tau: float | None = None
        self.above: dict[int, int] = {}

    def add(self, i: int, pos: torch.Tensor, val: torch.Tensor, checked: bool = False) -> None:
        """Add candidates (positions sorted); `checked`: already filtered by tau."""
        if self.tau is not None:
            if not checked:
                ok = val.abs() >= self.tau
                if not bool(ok.all()):
                    pos, val = pos[ok], val[ok]
            self.above[i] = self.above.get(i, 0) + pos.numel()
        if pos.numel() == 0:
            return
        self.chunks.setdefault(i, []).append([pos, val])
        self.n += pos.numel()
        self.nbytes += _nbytes(pos) + _nbytes(val)
        if self.n > self.slack:
            self.reduce()

    def changed(self, i: int) -> None:
        if self.tau is None:
            return
        self.above[i] = sum(int((c[1].abs() >= self.tau).sum()) for c in self.chunks[i])
        if sum(self.above.values()) < self.k:
            self.tau = None

    def reduce(self) -> None:
        if self.n <= self.k:
            return
        self.chunks = _keep_top(self.chunks, self.k)
        kept = [c for lst in self.chunks.values() for c in lst]
        self.n = sum(c[0].numel() for c in kept)
        self.nbytes = sum(_nbytes(c[0]) + _nbytes(c[1]) for c in kept)
        tau = min(float(c[1].abs().min()) for c in kept)
        self.tau = None if math.isnan(tau) else tau  # NaN kept: fewer than k numbers
        self.above = {i: sum(c[0].numel() for c in lst) for i, lst in self.chunks.items()}

    def tensors(self) -> list[torch.Tensor]:
        return [t for lst in self.chunks.values() for c in lst for t in c]


# Largest share of the chosen elements one regrowth replaces. The drop keeps its weakest
# candidates (8 B each, up to 2x the count) in the compact gradients' room (4 B per chosen
# element, free between steps): 16 * fraction <= 4 keeps the drop inside the budget.
MAX_REGROW_FRACTION = 0.25
DEFAULT_REGROW_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class SparseConfig(Config):
    regrow_fraction: float | None = None  # None: DEFAULT_REGROW_FRACTION

    def __post_init__(self) -> None:
        if self.state_dtype == "none":
            raise ValueError("state_dtype='none' with policy='sparse'; allowed here: 'fp32', "
                             "'int8' or 'bf16' (sparse keeps its chosen elements across "
                             "steps, and their moments are read; 'none' is for block and "
                             "sample with switch_every=1)")
        if self.state_dtype == "int4":
            raise ValueError("state_dtype='int4' with policy='sparse'; allowed here: 'fp32', "
                             "'int8' or 'bf16' (the 4-bit format updates whole tensors; "
                             "sparse updates chosen elements of them; use 'int4' with block "
                             "or sample)")
        super().__post_init__()
        r = self.regrow_fraction
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))
                              or not 0.0 <= r <= MAX_REGROW_FRACTION):
            raise ValueError(f"regrow_fraction={r!r}; allowed: None (0.1) or a number in [0, "
                             f"{MAX_REGROW_FRACTION}] (share of the chosen elements replaced "
                             "at each regrowth; 0 keeps the first choice)")


class SparseUpdater(Updater):
    """Compact gradients, scoring, drop and regrowth of `NTO(policy="sparse")`."""

    index_keys = ("indices",)

    def __init__(self, host: Host, policy: Policy) -> None:
        super().__init__(host, policy)
        self.policy: SparsePolicy = policy  # type: ignore[assignment]
        self.compact: dict[int, torch.Tensor] = {}  # param index -> fp32 [L] gradient
        self.scored: dict[int, int] = {}  # param index -> gradients scored this step
        self.compact_bytes = 0
        self.pool: _Pool | None = None  # scoring: candidate positions, summed gradients
        self.bad: int | None = None  # first param with NaN/Inf in a scored dense gradient
        self.dense_bytes = 0  # largest dense gradient handed to the hook
        self.temp_bytes = 0  # largest temporary of a drop / regrowth
        self._want = (-1, 0)  # (step, elements to grow at that step)
        self._base: tuple[int, int] | None = None  # (step, state + index bytes) in backward

    # ------------------------------------------------------------------ bookkeeping
    def _state(self, p: torch.Tensor) -> dict[str, Any] | None:
        st = self.host.state.get(p)
        return st if st and "indices" in st else None

    def count(self) -> int:
        """Chosen elements now."""
        return sum(st["indices"].numel() for st in self.host.state.values()
                   if isinstance(st, dict) and "indices" in st)

    def trainable_elements(self) -> int:
        return self.policy.total if self.policy.dense else self.count()

    def transient_bytes(self) -> int:
        return max(self.dense_bytes, self.temp_bytes)

    @property
    def cands(self) -> Chunks:
        """Scoring candidates by param index (empty outside a scoring step)."""
        return self.pool.chunks if self.pool is not None else {}

    def grad_tensors(self) -> list[torch.Tensor]:
        """Compact gradients and candidate values (reported as gradient bytes)."""
        return list(self.compact.values()) + [c[1] for lst in self.cands.values() for c in lst]

    def index_tensors(self) -> list[torch.Tensor]:
        """Candidate positions (reported as index bytes; chosen indices are in state)."""
        return [c[0] for lst in self.cands.values() for c in lst]

    def clear(self) -> None:
        """Forget gradients and candidates (zero_grad, load_state_dict)."""
        self._free_compact()
        self.pool = None
        self.bad = None
        self.scored = {}
        self._want = (-1, 0)
        self._base = None

    def _free_compact(self) -> None:
        self.compact.clear()
        self.compact_bytes = 0

    def _note_peak(self) -> None:
        self.peak = max(self.peak, sum(measure(self.host, self)))

    def _note_peak_in_backward(self) -> None:
        """As _note_peak, from counters: state does not change during backward, and the
        dense gradients are freed by the time this runs (one measure per step, not per
        tensor)."""
        step = self.host.step_count
        if self._base is None or self._base[0] != step:
            self._base = (step, sum(measure(self.host, self)) - self.compact_bytes
                          - (self.pool.nbytes if self.pool else 0))
        total = self._base[1] + self.compact_bytes + (self.pool.nbytes if self.pool else 0)
        self.peak = max(self.peak, total)

    def want(self) -> int:
        """Elements to grow at the current step (K minus the chosen count)."""
        step = self.host.step_count
        if self._want[0] != step:
            want = max(0, self.policy.k - self.count())
            if self.policy.q8_reserve():
                want = min(want, self._q8_room())
            self._want = (step, want)
        return self._want[1]

    def _q8_room(self) -> int:
        """Elements that can grow in the budget's bytes with 8-bit moments: each param that
        grows adds a cohort whose last block may be partial (8 B of scales beyond
        bytes_per_element), and cohorts that lost elements may hold partial blocks too, so
        the room is measured (state, indices and the kept elements' compact gradients)."""
        _, state, index = measure(self.host, self)
        room = self.policy.budget_bytes() - state - index - 4 * self.count()
        bpe = self.policy.bytes_per_element(self.policy.costliest_dtype())
        params = self.policy.q8_reserve() // 8  # at most one partial block each
        every = math.floor((room - 8 * params) / bpe)
        return every if every >= params else max(0, math.floor(room / (bpe + 8)))

    def _dense_state(self, p: torch.Tensor) -> dict[str, Any]:
        """K = every element: the whole param is chosen, state made at its first use."""
        n = p.numel()
        st = _new_state(torch.arange(n, dtype=_index_dtype(n), device=p.device),
                        self._master_of(p), self._format(p))
        self.host.state[p] = st
        return st

    def init_state(self) -> None:
        """NTO.init_state(): with K = every element, make all state now; otherwise state
        exists exactly for the chosen elements already."""
        if self.policy.dense:
            for i in self.policy.trainable:
                p = self.host.table.params[i]
                if self._state(p) is None:
                    self._dense_state(p)

    # ------------------------------------------------------------------ the hook
    def on_grad(self, i: int, p: torch.Tensor) -> None:
        """Fold the dense gradient of active param i into its compact buffer (and into
        the candidates on a scoring step), then free it."""
        g = p.grad
        if g is None:
            return
        if hasattr(p, "device_mesh") or hasattr(g, "device_mesh"):
            raise NotImplementedError(
                f"{self.host.table.label(i)} is a DTensor (FSDP2): policy='sparse' does not "
                "support sharded params yet; use policy='block' or 'sample' with FSDP2")
        self.dense_bytes = max(self.dense_bytes, _nbytes(g))
        with torch.no_grad():
            scored = self._fold(i, p, g.reshape(-1))
        p.grad = None
        if scored:
            self._note_peak_in_backward()  # with the new candidates, the dense grad gone

    def _fold(self, i: int, p: torch.Tensor, flat: torch.Tensor) -> bool:
        st = self._state(p)
        if st is None and self.policy.dense:
            st = self._dense_state(p)
        if st is not None:
            buf = self.compact.get(i)
            if buf is None:
                buf = torch.zeros(st["indices"].numel(), dtype=torch.float32,
                                  device=flat.device)
                self.compact[i] = buf
                self.compact_bytes += _nbytes(buf)
            bounds = _cohorts(st)  # the op takes sorted positions: one entry per cohort
            ops.gather_accumulate_([flat] * len(bounds), [st["indices"][a:b] for a, b, _ in bounds],
                                   [buf[a:b] for a, b, _ in bounds])
        if not self.policy.is_scoring(self.host.step_count):
            return False
        self.scored[i] = self.scored.get(i, 0) + 1
        self._score(i, flat, st)
        return True

    def _score(self, i: int, flat: torch.Tensor, st: dict[str, Any] | None) -> None:
        want = self.want()
        if want <= 0:
            return
        _, _, absmax, hist = ops.param_stats([flat])  # before NaN masking hides it
        if self.bad is None and (int(hist[0, 255]) > 0 or not math.isfinite(float(absmax[0]))):
            self.bad = i
        if self.pool is None:  # room: the dropped elements' 16 B = 2 candidates each
            self.pool = _Pool(want, want)  # holds <= 2 x want: reduces past want
        pool = self.pool
        chunks = pool.chunks.get(i, [])
        for pos, val in chunks:  # already candidates: their score sums the micro-batches
            ops.gather_accumulate_([flat], [pos], [val])
        if chunks:
            pool.changed(i)
        taken = ([st["indices"]] if st is not None else []) + [c[0] for c in chunks]
        free = flat.numel() - sum(t.numel() for t in taken)
        k = min(want, free)
        if k <= 0:
            return
        for t in taken:  # the dense gradient is used up: mask in place
            _fill(flat, t, float("nan"))
        if flat.numel() <= _SMALL:  # small: a mask is cheaper than a selection
            # |g| >= tau (only what can still join; NaN compares false), else not NaN
            mask = flat.abs() >= pool.tau if pool.tau is not None else flat == flat
            if int(mask.sum()) <= k:
                pos = mask.nonzero().view(-1).to(_index_dtype(flat.numel()))
                pool.add(i, pos, flat[pos].float(), checked=True)
                return
        pos = ops.select_topk([flat], k)[0]
        val = flat[pos].float()
        ok = ~torch.isnan(val)  # masked positions (and NaN gradients) never join
        if not bool(ok.all()):
            pos, val = pos[ok], val[ok]
        pool.add(i, pos, val)

    # ------------------------------------------------------------------ step()
    def update(self) -> None:
        """AdamW on the chosen elements with their compact
        gradients (non-finite check and clipping over them), then, on a scoring step,
        the regrowth. Compact gradients are used up."""
        host = self.host
        table = host.table
        for i, p in enumerate(table.params):  # gradients written outside a backward
            if p.grad is not None:
                if i in host.active_set:
                    check_grad_layout(table.label(i), p.grad)
                    self.on_grad(i, p)
                else:
                    p.grad = None
        scoring = self.policy.is_scoring(host.step_count)
        if scoring and self.pool is not None:
            self.pool.reduce()
        # one backward since the last step: each candidate's value is its whole gradient
        # of this step, so the grown elements take their first update with the kept ones
        grow_now = scoring and all(n == 1 for n in self.scored.values())
        finite = self._scores_finite()  # nonfinite="raise" raises before anything changed
        if grow_now:  # the peak (K elements with their gradients) is noted after the update
            self._grow(with_grads=True)
        entries = [(gi, table.index[p], p, self.compact[table.index[p]])
                   for gi, group in enumerate(host.param_groups) for p in group["params"]
                   if table.index[p] in self.compact]
        if finite and entries and host.guard.check(entries, table, host.step_count):
            self._adamw(entries)
        self._note_peak()  # compact gradients, state and candidates: the step's peak
        self._free_compact()
        self.bad = None
        self.scored = {}
        if scoring and not grow_now:
            self._grow()
            self._note_peak()

    def _scores_finite(self) -> bool:
        """nonfinite handling of a scoring step's dense gradients (the compact ones are
        checked with the update)."""
        if self.bad is None:
            return True
        return self.host.guard.found_nonfinite(self.host.table.label(self.bad),
                                               self.host.step_count)

    def _format(self, p: torch.Tensor) -> Fp32Moments:
        """How p's compact moments are kept (nto_ext.formats)."""
        return self.policy.state_format(p.dtype)

    def _moments(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of p's fp32 or bf16 compact moments (state_dtype="bf16")."""
        return self._format(p).moment_dtype

    def _master_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """p, when its chosen elements keep fp32 masters (bf16/fp16 under the default)."""
        return p if self.policy.state_format(p.dtype) is MASTER else None

    def _round_into(self, i: int, p: torch.Tensor, positions: torch.Tensor,
                    values: torch.Tensor) -> None:
        """p's elements at `positions` = fp32 `values` rounded stochastically, with param
        i's stream of this step at those positions (formats/master.py's, as block's)."""
        if positions.numel():
            _scatter(p, positions, stochastic_round(values, p.dtype, self.policy.seed,
                                                    self.host.step_count, i, positions))

    def _adamw(self, entries: list) -> None:
        """One masked_adamw_ call per group over every cohort: fp32 params updated at
        their chosen positions; bf16/fp16 ones through fp32 values of those elements (the
        masters, or copies rounded back stochastically), written back rounded."""
        host = self.host
        batches: dict[tuple, list] = defaultdict(list)
        for gi, i, p, g in entries:
            batches[(gi, p.device, p.dtype)].append((i, p, g, host.state[p]))
        for (gi, _, dtype), items in batches.items():
            group = host.param_groups[gi]
            fmt = self.policy.state_format(dtype)
            if fmt is INT8:
                self._adamw_int8(group, items)
                continue
            values = [self._fp32_values(p, st, fmt) for _, p, _, st in items]
            args: tuple[list, ...] = ([], [], [], [], [], [])  # one entry per cohort
            for (_, p, g, st), x in zip(items, values):
                st["step"] = [t + 1 for t in st["step"]]
                for a, b, t in _cohorts(st):
                    at = None if x is not None else st["indices"][a:b]  # compact: dense
                    for lst, v in zip(args, (p if x is None else x[a:b], g[a:b],
                                             st["exp_avg"][a:b], st["exp_avg_sq"][a:b], at,
                                             t)):
                        lst.append(v)
            beta1, beta2 = group["betas"]
            ops.masked_adamw_(*args, lr=float(group["lr"]), beta1=float(beta1),
                              beta2=float(beta2), eps=float(group["eps"]),
                              weight_decay=float(group["weight_decay"]))
            for (i, p, _, st), x in zip(items, values):
                if fmt is MASTER:  # rounded to nearest, as torch casts (and block's masters)
                    rounded = x.to(dtype)
                    self.temp_bytes = max(self.temp_bytes, _nbytes(rounded))
                    _scatter(p, st["indices"], rounded)
                elif fmt is STOCHASTIC:
                    self._round_into(i, p, st["indices"], x)

    def _adamw_int8(self, group: dict[str, Any], items: list) -> None:
        """One masked_adamw_int8_ call over every cohort of the group's params with 8-bit
        moments (updated in place at their positions; each cohort its own blocks)."""
        args: tuple[list, ...] = ([], [], [], [], [], [], [], [])  # one entry per cohort
        for _, p, g, st in items:
            st["step"] = [t + 1 for t in st["step"]]
            for (a, b, t), (sa, sb) in zip(_cohorts(st), _scale_bounds(st)):
                q = _cohort_q8(st, a, b, sa, sb)
                for lst, v in zip(args, (p, g[a:b], *q.values(), st["indices"][a:b], t)):
                    lst.append(v)
        beta1, beta2 = group["betas"]
        ops.masked_adamw_int8_(*args[:6], args[7], indices=args[6], lr=float(group["lr"]),
                               beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                               weight_decay=float(group["weight_decay"]))

    def _fp32_values(self, p: torch.Tensor, st: dict[str, Any], fmt) -> torch.Tensor | None:
        """What AdamW updates in fp32 for a bf16/fp16 param: its masters, or (stochastic
        rounding) a transient fp32 copy of its chosen elements; None: the param itself."""
        if fmt is MASTER:
            return st[MASTER_ROW]
        if fmt is STOCHASTIC:
            x = _gather(p, st["indices"])
            self.temp_bytes = max(self.temp_bytes, _nbytes(x))
            return x
        return None

    # ------------------------------------------------------------------ regrowth
    def _grow(self, with_grads: bool = False) -> None:
        """The candidates join the chosen set: per param, one new cohort (zero moments,
        step 0). with_grads: their values become the new rows of the compact gradients
        (the update that follows is their first); else the values are freed before any
        new state is made."""
        cands = self.cands
        self.pool = None
        grown = []
        for i in sorted(cands):
            pos, val = cands[i][0]
            val = val if with_grads else None
            for c in cands[i][1:]:
                pos, val = _union(pos, c[0], val, c[1] if with_grads else None)
            grown.append((i, pos, val))
        del cands
        self._base = None
        for i, pos, val in grown:
            self._append(i, pos)
            if val is not None:  # one gradient's old and new copies alive at a time
                old = self.compact.pop(i, None)
                self.compact[i] = val if old is None else torch.cat([old, val])
                self.compact_bytes += _nbytes(val)
                self.temp_bytes = max(self.temp_bytes, _nbytes(self.compact[i]))
        self._selected_changed()

    def _append(self, i: int, pos: torch.Tensor) -> None:
        p = self.host.table.params[i]
        st = self._state(p)
        if st is None:
            self.host.state[p] = _new_state(pos.to(_index_dtype(p.numel())), self._master_of(p),
                                            self._format(p))
            return
        n = pos.numel()
        new = _zero_moments(self._format(p), n, pos.device)
        if MASTER_ROW in st:
            new[MASTER_ROW] = _gather(p, pos)
        for key in list(new):  # one row's new copy alive with the old at a time
            st[key] = torch.cat([st[key], new.pop(key)])
            self.temp_bytes = max(self.temp_bytes, _nbytes(st[key]))
        st["indices"] = torch.cat([st["indices"], pos.to(st["indices"].dtype)])
        st["step"] = [*st["step"], 0]
        st["sizes"] = [*st["sizes"], n]

    def _selected_changed(self) -> None:
        host = self.host
        table = host.table
        self.policy.set_selected(table.index[p] for p in table.params if self._state(p))

    def advance(self, step: int) -> None:
        """Called when the schedule reaches `step`: before a regrowth, drop the weakest
        chosen elements so that floor(regrow_fraction * K) slots are free."""
        if step == 0 or not self.policy.is_scoring(step):
            return
        n_drop = self.count() - (self.policy.k - self.policy.regrow)
        if n_drop <= 0:
            return
        host = self.host
        table = host.table
        group_of = {table.index[p]: g for g in host.param_groups for p in g["params"]}
        # room: the compact gradients' 4 B per chosen element (freed between steps)
        pool = _Pool(n_drop, self.policy.k // 2 - n_drop)
        with torch.no_grad():
            for i, p in enumerate(table.params):
                st = self._state(p)
                if st is None:
                    continue
                key = self._weakness(st, group_of[i])
                n = key.numel()
                if n <= n_drop and n <= _SMALL:  # every element is a candidate
                    pool.add(i, torch.arange(n, dtype=_index_dtype(n), device=key.device), key)
                else:
                    pos = ops.select_topk([key], min(n_drop, n))[0]
                    pool.add(i, pos, key[pos])
                del key
            pool.reduce()
            self._base = None
            for i in sorted(pool.chunks):
                st = self.host.state[table.params[i]]
                keep = torch.ones(st["indices"].numel(), dtype=torch.bool,
                                  device=st["indices"].device)
                for pos, _ in pool.chunks[i]:
                    keep[pos] = False
                self._keep(i, keep)
            del pool
            self._selected_changed()
        self._note_peak()

    def _weakness(self, st: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """Per chosen element, a key whose |value| is largest for the weakest element:
        the AdamW update size |m / bc1| / (sqrt(v / bc2) + eps) with its cohort's bias
        corrections, in reversed order (the fp32 bit pattern of s >= 0 is monotone:
        INF_BITS - bits(s)). Not yet updated: kept (s = inf, key 0); NaN moments: dropped
        first (s = 0, key inf)."""
        beta1, beta2 = group["betas"]
        eps = float(group["eps"])
        score = torch.empty(st["exp_avg"].shape, dtype=torch.float32,
                            device=st["exp_avg"].device)  # bf16 / 8-bit moments: widened
        self.temp_bytes = max(self.temp_bytes, _nbytes(score))
        for a, b, t, m, v in self._pieces(st):
            seg = score[a:b]
            if t == 0:
                seg.fill_(float("inf"))
                continue
            seg.copy_(v).div_(1 - float(beta2) ** t).sqrt_().add_(eps)
            seg.mul_(1 - float(beta1) ** t)
            torch.div(m, seg, out=seg).abs_()
        score.nan_to_num_(nan=0.0, posinf=float("inf"))
        bits = score.view(torch.int32)
        bits.neg_().add_(_INF_BITS)
        return score

    def _pieces(self, st: dict[str, Any]):
        """(start, end, step count, exp_avg, exp_avg_sq) over the compact rows: each
        cohort's slices, or (8-bit moments) its fp32 values dequantized _WINDOW at a time."""
        if SCALES[0] not in st:
            for a, b, t in _cohorts(st):
                yield a, b, t, st["exp_avg"][a:b], st["exp_avg_sq"][a:b]
            return
        for (a, b, t), (sa, sb) in zip(_cohorts(st), _scale_bounds(st)):
            for s, e, m, w in self._windows(_cohort_q8(st, a, b, sa, sb)):
                yield a + s, a + e, t, m, w * w

    def _windows(self, q: dict[str, torch.Tensor]):
        """(start, end, exp_avg, sqrt(exp_avg_sq)) of one cohort's 8-bit state `q`,
        dequantized _WINDOW elements at a time (windows start on block boundaries): fp32
        temporaries of a few hundred KiB whatever the cohort's size."""
        n = q["exp_avg"].numel()
        for s in range(0, n, _WINDOW):
            e, blk = min(n, s + _WINDOW), s // Q8_BLOCK
            m, w = dequantize_roots(_cohort_q8(q, s, e, blk, blk + q8_blocks(e - s)))
            self.temp_bytes = max(self.temp_bytes, 3 * _nbytes(m))
            yield s, e, m, w

    def _requantized(self, st: dict[str, Any], keep: torch.Tensor,
                     live: list[tuple[int, int, int]]) -> None:
        """8-bit moments of the kept elements of the `live` cohorts (index, start, end)."""
        bounds = _scale_bounds(st)
        parts = [self._requantize(_cohort_q8(st, a, b, *bounds[c]), keep[a:b])
                 for c, a, b in live]
        for key in LAYOUT:  # one row's new copy alive with the old at a time
            st[key] = torch.cat([q[key] for q in parts]) if len(parts) > 1 else parts[0][key]

    def _requantize(self, q: dict[str, torch.Tensor], keep: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """One cohort's 8-bit state `q` reduced to the elements where `keep`: their moments
        as the kernel dequantizes them, quantized again in new blocks of 256 (the blocks
        before the first dropped element get their levels and scales back; the others are
        requantized once, within the map's error, formats/int8.py), a window at a time."""
        kept = int(keep.sum())
        out = {k: torch.empty(kept if per == "element" else q8_blocks(kept), dtype=dt,
                              device=keep.device) for k, (dt, per) in LAYOUT.items()}
        ms: list[torch.Tensor] = []
        ws: list[torch.Tensor] = []
        done = 0
        for s, e, m, w in self._windows(q):
            ms.append(m[keep[s:e]])
            ws.append(w[keep[s:e]])
            last = e == keep.numel()
            if sum(x.numel() for x in ms) < _WINDOW and not last:
                continue
            m, w = torch.cat(ms), torch.cat(ws)
            take = m.numel() if last else m.numel() // Q8_BLOCK * Q8_BLOCK  # whole blocks
            part = quantize_roots(m[:take], w[:take])
            for key, (_, per) in LAYOUT.items():
                at0 = done if per == "element" else done // Q8_BLOCK
                out[key][at0:at0 + part[key].numel()] = part[key]
            done += take
            ms, ws = [m[take:]], [w[take:]]
            self.temp_bytes = max(self.temp_bytes, 4 * _nbytes(m))
        return out

    def _keep(self, i: int, keep: torch.Tensor) -> None:
        """Param i keeps the chosen elements where `keep` is True: their moments are
        carried bit for bit (remap_state, cohort by cohort), cohorts left empty go, a param
        left with none loses its state."""
        p = self.host.table.params[i]
        st = self.host.state[p]
        idx = st["indices"]
        if MASTER_ROW in st:  # a dropped element's master goes: the param keeps its value
            gone = ~keep  # rounded stochastically (its progress below half an ulp is kept
            self._round_into(i, p, idx[gone], st[MASTER_ROW][gone])  # on average)
        live, olds, news = [], [], []
        for c, (a, b, _) in enumerate(_cohorts(st)):
            new = idx[a:b][keep[a:b]]
            if new.numel():
                live.append((c, a, b))
                olds.append(idx[a:b])
                news.append(new)
        if not live:
            self.host.state.pop(p)
            return
        if SCALES[0] in st:
            self._requantized(st, keep, live)
        for key in _rows(st):  # one row's new copy alive with the old at a time
            row = st[key]
            parts = ops.remap_state(olds, news, [row[a:b] for _, a, b in live])
            st[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
            self.temp_bytes = max(self.temp_bytes, 2 * _nbytes(st[key]))
            del parts
        st["indices"] = torch.cat(news)
        st["step"] = [st["step"][c] for c, _, _ in live]
        st["sizes"] = [n.numel() for n in news]

    # ------------------------------------------------------------------ loading
    def check_state(self, i: int, p: torch.Tensor, st: dict[str, Any], seen: Storages,
                    propagate: bool) -> dict[str, Any]:
        """`st` as it will be kept; ValueError unless it is compact state NTO.state_dict()
        could have saved."""
        where = f"optimizer state for {self.host.table.label(i)}"
        extra = [k for k in st if k not in STATE_KEYS]
        if extra:  # it would be kept in memory outside the budget
            raise ValueError(f"{where}: unexpected entry {extra[0]!r:.40}; allowed: "
                             f"{', '.join(STATE_KEYS)} (a corrupted or crafted checkpoint?); "
                             "nothing was loaded")
        for key in ("indices", *ROWS):
            if not isinstance(st.get(key), torch.Tensor):
                raise ValueError(f"{where}: compact (sparse) state needs tensors indices, "
                                 f"exp_avg, exp_avg_sq; {key!r} is missing or not a tensor")
        idx = st["indices"]
        if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1 or idx.numel() == 0:
            raise ValueError(f"{where}: indices is a {idx.dtype} tensor of shape "
                             f"{tuple(idx.shape)}; expected a non-empty 1-D int32/int64 tensor")
        n = idx.numel()
        rows = ROWS
        fmt = self._format(p)
        want = {k: LAYOUT[k][0] if fmt is INT8 else self._moments(p) for k in ROWS}
        if fmt is MASTER:
            if not isinstance(st.get(MASTER_ROW), torch.Tensor):
                raise ValueError(f"{where}: no {MASTER_ROW!r} entry; allowed: a state saved "
                                 "with fp32 master weights (build NTO with the master_weights "
                                 "of the run that saved it); nothing was loaded")
            rows = (*ROWS, MASTER_ROW)
            want[MASTER_ROW] = torch.float32
        elif MASTER_ROW in st:
            raise ValueError(f"{where}: a {MASTER_ROW!r} entry, but this run keeps no master "
                             f"weights for {p.dtype} params; allowed: build NTO with the "
                             "master_weights of the run that saved it; nothing was loaded")
        for key in rows:
            v = st[key]
            if v.dtype != want[key] or v.shape != (n,) or not v.is_contiguous() \
                    or v.device.type == "meta":
                raise ValueError(f"{where}: {key} is a {v.dtype} tensor of shape "
                                 f"{tuple(v.shape)} on {v.device}; expected a contiguous "
                                 f"{want[key]} tensor of {n} elements (one per index)")
        step, sizes = st.get("step"), st.get("sizes")
        ints = [v for v in (step, sizes) if isinstance(v, (list, tuple))
                and all(type(x) is int for x in v)]
        if len(ints) != 2 or len(step) != len(sizes) or not step or min(step) < 0 \
                or max(step) > MAX_STEP or min(sizes) <= 0 or sum(sizes) != n:
            raise ValueError(f"{where}: step and sizes are {step!r:.80} and {sizes!r:.80}; "
                             "expected two equally long lists of ints, one entry per cohort: "
                             f"step counts in [0, {MAX_STEP}], sizes > 0 summing to {n} (the "
                             "indices)")
        if fmt is INT8:
            self._check_q8(where, st, propagate)
        elif SCALES[0] in st or SCALES[1] in st:
            raise ValueError(f"{where}: 8-bit moment scales, but this run keeps "
                             f"state_dtype={self.policy.cfg.state_dtype!r}; allowed: build NTO "
                             "with the state_dtype of the run that saved it; nothing was loaded")
        x = idx.long().cpu()
        ok = int(x.min()) >= 0 and int(x.max()) < p.numel()
        for a, b, _ in _cohorts(st):
            ok = ok and (b - a < 2 or bool((x[a + 1:b] > x[a:b - 1]).all()))
        xs = torch.sort(x).values
        if not ok or (n > 1 and not bool((xs[1:] > xs[:-1]).all())):
            raise ValueError(f"{where}: indices must be unique positions in [0, {p.numel()}), "
                             "sorted within each cohort")
        out = {k: seen.claim(f"{where}: {k}", v) if isinstance(v, torch.Tensor) else v
               for k, v in st.items()}
        for key in rows if fmt is not INT8 else ():
            check_values(where, key, out[key], propagate)
        return out

    @staticmethod
    def _check_q8(where: str, st: dict[str, Any], propagate: bool) -> None:
        """The scales of an 8-bit compact state (its rows and cohorts checked already): one
        fp32 per block of 256 of each cohort; then the values (formats/int8.py)."""
        blocks = sum(q8_blocks(n) for n in st["sizes"])
        for key in SCALES:
            v = st.get(key)
            if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 \
                    or tuple(v.shape) != (blocks,) or not v.is_contiguous() \
                    or v.device != st["indices"].device:
                got = (f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}"
                       if isinstance(v, torch.Tensor) else type(v).__name__)
                raise ValueError(f"{where}: {key} is {got}; expected a contiguous float32 "
                                 f"tensor of {blocks} elements on {st['indices'].device} (one "
                                 "per block of 256 of each cohort, as NTO.state_dict() saves "
                                 "it with state_dtype='int8'); nothing was loaded")
        check_q8_values(where, st, propagate)

    def import_entry(self, where: str, st: dict[str, Any],
                     p: torch.Tensor) -> dict[str, Any] | None:
        """Every element chosen (K >= all elements) keeps AdamW's moments; otherwise
        nothing is chosen at step 0 and they are dropped."""
        if not self.policy.dense:
            return None
        out = adamw_entry(where, st, p, compact=True)
        if self._format(p) is INT8:
            return {**out, **quantize(out["exp_avg"], out["exp_avg_sq"])}
        for key in ROWS:
            out[key] = out[key].to(self._moments(p))
        if self._master_of(p) is not None:  # AdamW's weights are the param itself
            out[MASTER_ROW] = _gather(p, out["indices"])
        return out

    def trained(self) -> frozenset[int]:
        return self.policy.selected

    def check_loaded(self, new_state: dict[torch.Tensor, dict[str, Any]], step: int) -> None:
        """The loaded state agrees with the loaded policy state: exactly the params listed
        as holding chosen elements have state, and together at most K elements."""
        host = self.host
        table = host.table
        have = {table.index[p] for p, st in new_state.items() if st}
        if have != set(self.policy.selected) and not (self.policy.dense and have <= set(
                self.policy.selected)):
            raise ValueError("optimizer state: the params with compact state do not match the "
                             "sparse policy's chosen params (a foreign or edited checkpoint); "
                             "nothing was loaded")
        n = sum(st["indices"].numel() for st in new_state.values() if st)
        if n > self.policy.k:
            raise ValueError(f"optimizer state holds {n:,} chosen elements but the budget "
                             f"allows {self.policy.k:,}; nothing was loaded")


class SparsePolicy(Policy):
    """SpIEL-style: K individual elements anywhere, a global top-K by gradient score.

    K is the budget in elements (byte budgets: bytes // the sparse bytes per element). Step
    0 is a scoring step (every tensor gets its gradient, reduced to candidates tensor by
    tensor; the step chooses K elements and updates them). Every `switch_every` steps
    after it is a regrowth: `floor(regrow_fraction * K)` of the weakest chosen elements
    were dropped at the end of the step before, the step's gradients score the free
    elements, as many new elements are grown from the top scores, and the step updates
    the kept and the grown ones (the grown ones wait a step under accumulation).
    Between scoring steps only tensors holding chosen elements need a gradient. With K >=
    all elements every element is chosen from the start: no scoring step, no regrowth
    (AdamW to fp32 rounding).
    """

    name = "sparse"
    Config = SparseConfig
    updater = SparseUpdater
    no_offload = ("it carries the moments of kept elements and starts grown ones at zero")
    needs_contiguous = True
    compact_grads = True

    def bytes_per_element(self, dtype: torch.dtype) -> float:
        # compact fp32 grad, two fp32 (bf16) moments or 2 + 8/256 B of 8-bit ones, int32
        # index (+ an fp32 master for bf16/fp16 params)
        fmt = self.state_format(dtype)
        moments = fmt.element_bytes if fmt is INT8 else 2 * fmt.moment_dtype.itemsize
        return 4 + moments + 4 + (4 if fmt is MASTER else 0)

    def q8_reserve(self) -> int:
        """Bytes a byte budget keeps aside with 8-bit moments: each param's first cohort may
        end in a partial block, whose two scales bytes_per_element does not count."""
        q8 = self.state_format(self.costliest_dtype()) is INT8
        return 8 * sum(i.trainable for i in self.infos) if q8 else 0

    def costliest_dtype(self) -> torch.dtype:
        """The trainable dtype whose chosen elements cost the most (K is sized by it)."""
        return max((i.dtype for i in self.infos if i.trainable), key=self.bytes_per_element,
                   default=torch.float32)

    def transient_bound(self) -> int:
        """Most bytes alive beside the state: one dense gradient during backward (the
        largest tensor's), or a drop's remap of one fp32 row of a param (its old and new
        copies: 8 B per chosen element of that param)."""
        sizes = [(i.numel, i.dtype.itemsize) for i in self.infos if i.trainable] or [(0, 4)]
        return max(max(n * b for n, b in sizes), 8 * min(self.k, max(n for n, _ in sizes)))

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget,
                 config: SparseConfig) -> None:
        super().__init__(infos, budget, config)
        self.regrow_fraction = float(DEFAULT_REGROW_FRACTION if config.regrow_fraction is None
                                     else config.regrow_fraction)
        self.total = sum(i.numel for i in self.infos if i.trainable)
        self.k = min(self._budget_elements(), self.total)
        self.dense = self.k >= self.total
        self.regrow = 0 if self.dense else math.floor(self.regrow_fraction * self.k)
        everything = frozenset(j for j, i in enumerate(self.infos) if i.trainable)
        self._everything = everything
        self._selected = everything if self.dense else frozenset()

    def _budget_elements(self) -> int:
        if self.budget.kind == "elements":
            return self.budget.amount
        bpe = self.bytes_per_element(self.costliest_dtype())  # any element may be chosen
        k = int((self.budget.amount - self.q8_reserve()) // bpe)
        if k < 1:
            raise ValueError(
                f"budget={self.budget.given} ({self.budget.describe()}) is below one element "
                f"under policy='sparse' ({bpe:g} B per chosen element: fp32 gradient, two "
                "moments (fp32: 8 B, bf16: 4, 8-bit: 2 + 8/256) and an int32 index, plus an "
                "fp32 master for bf16/fp16 params; 8-bit moments keep 8 B per param aside "
                f"for partial blocks); nothing would train. Raise the budget to at least "
                f"{math.ceil(bpe) + self.q8_reserve()}B.")
        return k

    # ---------------------------------------------------------------- the schedule
    def is_scoring(self, step: int) -> bool:
        """True when every tensor's gradient is scored at `step`: the first step, each
        regrowth, and any step while nothing is chosen (a first step without gradients)."""
        if self.dense:
            return False
        return (step == 0 or not self._selected
                or (self.regrow > 0 and step % self.switch_every == 0))

    def active(self, step: int) -> frozenset[int]:
        if self.dense or self.is_scoring(step):
            return self._everything
        return self._selected

    @property
    def selected(self) -> frozenset[int]:
        """Params that hold chosen elements now."""
        return self._selected

    def set_selected(self, params: Sequence[int] | frozenset[int]) -> None:
        self._selected = frozenset(params)

    def active_names(self, step: int) -> list[str]:
        return [self.infos[i].name if self.infos[i].name is not None else f"#{i}"
                for i in sorted(self._selected)]

    @property
    def trainable(self) -> frozenset[int]:
        return self._everything  # every element can be chosen

    def describe(self) -> str:
        regrow = (f"{self.regrow:,} regrown every {self.switch_every} steps"
                  if self.regrow else "no regrowth")
        return (f"{self.k:,} of {self.total:,} elements ({self.k / max(self.total, 1):.2%}), "
                f"{regrow}")

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        return {"policy": self.name, "budget_kind": self.budget.kind,
                "budget_amount": self.budget.amount, "switch_every": self.switch_every,
                "regrow_fraction": self.regrow_fraction}

    def state_dict(self) -> dict[str, Any]:
        return {"selected": sorted(self._selected)}

    def initial_state(self) -> dict[str, Any]:
        return {"selected": sorted(self._everything) if self.dense else []}

    def take_over(self, old: Policy) -> None:
        if isinstance(old, SparsePolicy):  # the chosen elements' params stay chosen
            self.set_selected(old.selected)

    def check_state_dict(self, state: object) -> None:
        super().check_state_dict(state)
        sel = state.get("selected")  # type: ignore[union-attr]
        n = len(self.infos)
        if not isinstance(sel, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in sel):
            raise ValueError(f"policy state 'selected' must list param indices in [0, {n}), "
                             f"got {sel!r}"[:300])
        frozen = sorted(set(sel) - self._everything)
        if frozen:
            raise ValueError(f"policy state 'selected' lists params {frozen[:8]} that were "
                             "frozen (requires_grad=False) when this optimizer was built")
        if self.dense and set(sel) != self._everything:
            raise ValueError("policy state 'selected' must list every param when the budget "
                             "covers every element")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._selected = frozenset(state["selected"])

    def remap_state_dict(self, state: dict[str, Any], perm: Sequence[int]) -> dict[str, Any]:
        return {**state, "selected": sorted(perm[i] for i in state["selected"])}
