"""Discovering blocks from parameter names, and packing them into units that fit a budget.

Blocks come from names (DESIGN.md, "Policies"): `...layers.N.` / `.h.N.` / `.layer.N.` /
`.block.N.` / `.blocks.N.` -> one block per layer, named by the name's prefix up to the
*first* index ("model.layers.3"; T5's "encoder.block.1.layer.0..." is "encoder.block.1"),
so encoder and decoder stacks stay apart; a component starting with `embed`, or `wte`,
`wpe`, `embeddings`, `shared` (T5/BART's tied token embedding) -> "embed"; `lm_head`,
`classifier`, `score` -> "head"; the rest (final norms, BERT's pooler) -> "other".
A head tied to the embedding (GPT-2, T5 v1.0, tied Llama/Qwen2) is one tensor that
`named_parameters()` lists once, under the embedding: such a model has no "head" block.
Without names every tensor is its own block ("#i"), in the order given (module order for
`model.parameters()`). Blocks are ordered by their first parameter, which is module order
for `named_parameters()`.

This module knows nothing about tensors' values: it works on `ParamInfo` (name, shape,
dtype), so the optimizer and `plan()` on the meta device share one implementation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

_LAYER_RE = re.compile(r"^((?:.*?\.)?(?:layers|h|layer|block|blocks)\.(\d+))(?:\.|$)")
_EMBED_NAMES = ("wte", "wpe", "embeddings", "shared")
_HEAD_NAMES = ("lm_head", "classifier", "score")
# Kinds that are also the name of their one block: `always=` may name them on any model;
# one the model lacks (a head tied into the embedding) is skipped, not an error.
KIND_BLOCKS = ("embed", "head", "other")
MAX_RANGES = 1024  # ranges of rows a tensor larger than the budget is split into, at most


@dataclass(frozen=True)
class ParamInfo:
    """What packing needs to know about one parameter (no values)."""

    name: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    # False: the user froze it (requires_grad=False when the optimizer was built): it is in
    # no block, never trains and is never counted in a budget (as torch.optim.AdamW skips it).
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, name: str | None, t: torch.Tensor) -> ParamInfo:
        return cls(name, tuple(t.shape), t.dtype, bool(t.requires_grad))


def param_label(name: str | None, index: int) -> str:
    """How reports and messages name parameter `index`: its name, or `#<index>` when it was
    given without one (e.g. `model.layers.0.mlp.up_proj.weight`, `#3`)."""
    return name if name is not None else f"#{index}"


@dataclass(frozen=True)
class Block:
    """A named set of parameters (global indices) that train together when they fit."""

    name: str
    kind: str
    params: tuple[int, ...]


class Unit(NamedTuple):
    """The smallest thing a policy switches: a whole block, one tensor of a block that is
    larger than the budget, or a range of rows (first dimension) of a tensor larger than
    the budget: `rows` = (start, stop), one param. `cost` is in budget units (elements or
    bytes). A NamedTuple: a 70B plan builds hundreds of thousands while it searches."""

    name: str
    block: str
    params: tuple[int, ...]
    elements: int
    cost: int
    rows: tuple[int, int] | None = None


def block_of(name: str | None, index: int) -> tuple[str, str]:
    """(block name, kind) of one parameter."""
    if name is None:
        return param_label(name, index), "param"
    m = _LAYER_RE.match(name)
    if m:
        return m.group(1), "layer"
    parts = name.split(".")
    if any(p.startswith("embed") or p in _EMBED_NAMES for p in parts):
        return "embed", "embed"
    if any(p in _HEAD_NAMES for p in parts):
        return "head", "head"
    return "other", "other"


def discover_blocks(infos: Sequence[ParamInfo]) -> list[Block]:
    """Blocks of all trainable parameters, ordered by their first parameter's position."""
    members: dict[str, list[int]] = {}
    kinds: dict[str, str] = {}
    for i, info in enumerate(infos):
        if not info.trainable:
            continue
        name, kind = block_of(info.name, i)
        members.setdefault(name, []).append(i)
        kinds[name] = kind
    return [Block(n, kinds[n], tuple(idx)) for n, idx in members.items()]


def make_units(blocks: Sequence[Block], infos: Sequence[ParamInfo],
               cost: Callable[..., int], capacity: int,
               ) -> tuple[list[Unit], list[int]]:
    """Units that can train within `capacity`, and the params that never can.

    A block that fits is one unit; a larger block is split into its tensors; a tensor
    larger than `capacity` into ranges of its rows (`row_ranges`). A tensor whose
    `smallest_piece` is larger than `capacity` (a 1-D one, or one that would need more
    than `MAX_RANGES` ranges) is returned in the second list: it cannot train under
    block/sample.
    """
    units: list[Unit] = []
    too_big: list[int] = []
    for b in blocks:
        c = cost(b.params)
        if c <= capacity:
            units.append(Unit(b.name, b.name, b.params, _elements(infos, b.params), c))
            continue
        for i in b.params:
            ci = cost((i,))
            label = param_label(infos[i].name, i)
            if ci <= capacity:
                units.append(Unit(label, b.name, (i,), infos[i].numel, ci))
                continue
            ranges = row_ranges(infos[i], lambda n, i=i: cost((i,), n), capacity)
            if not ranges:
                too_big.append(i)
                continue
            row = infos[i].numel // infos[i].shape[0]
            # the ranges have at most two sizes: cost each once (thousands of ranges)
            costs = {z - a: cost((i,), (z - a) * row) for a, z in {ranges[0], ranges[-1]}}
            units += [Unit(f"{label}[{a}:{z}]", b.name, (i,), (z - a) * row, costs[z - a],
                           (a, z)) for a, z in ranges]
    return units, too_big


def row_ranges(info: ParamInfo, cost: Callable[[int], int], capacity: int,
               ) -> list[tuple[int, int]]:
    """The fewest equal ranges of rows (first dimension, sizes differing by at most one
    row) that each fit `capacity` (`cost(elements)` in budget units); [] when its
    `smallest_piece` does not fit. The fewest: then no two ranges of one tensor fit
    together (cost is additive in rows), so a period never holds two of them and a param
    has one active range."""
    least = smallest_piece(info)
    if least == info.numel:
        return []
    rows, row = info.shape[0], info.numel // info.shape[0]
    lo, hi = 0, rows  # the most rows that fit: lo fits (0 trivially), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid * row) <= capacity else (lo, mid - 1)
    if lo * row < least:
        return []
    n = -(-rows // lo)
    q, r = divmod(rows, n)
    bounds = [k * q + min(k, r) for k in range(n + 1)]  # the first r ranges get q + 1 rows
    return list(zip(bounds[:-1], bounds[1:]))


def smallest_piece(info: ParamInfo) -> int:
    """Elements of the smallest unit a tensor can train as: itself when it has fewer than
    2 dimensions (rows would be elements), else a range of its rows, at most
    `MAX_RANGES` ranges (a budget that needs more would train it a sliver per period, and
    plan millions of units for a large model)."""
    if len(info.shape) < 2 or info.shape[0] < 2:
        return info.numel
    rows = info.shape[0]
    return -(-rows // MAX_RANGES) * (info.numel // rows)


def pack_consecutive(units: Sequence[Unit], capacity: int) -> list[tuple[Unit, ...]]:
    """Greedy packing of consecutive units into groups whose summed cost <= capacity."""
    groups: list[tuple[Unit, ...]] = []
    cur: list[Unit] = []
    used = 0
    for u in units:
        if cur and used + u.cost > capacity:
            groups.append(tuple(cur))
            cur, used = [], 0
        cur.append(u)
        used += u.cost
    if cur:
        groups.append(tuple(cur))
    return groups


def group_label(units: Sequence[Unit], width: int = 60) -> str:
    """Short readable name of a group: whole blocks by name, split blocks as
    'model.layers.0[3 tensors]', ranges of rows as 'embed.weight[0:512]'; cut to about
    `width` characters."""
    parts: list[str] = []
    counts: dict[str, int] = {}
    for u in units:
        if u.name == u.block or u.rows is not None:  # a range of rows: the tensor[a:b]
            parts.append(u.name)
        else:
            if u.block not in counts:
                parts.append(u.block)
            counts[u.block] = counts.get(u.block, 0) + 1
    parts = [f"{p}[{counts[p]} tensor{'s' if counts[p] > 1 else ''}]" if p in counts else p
             for p in parts]
    text = ", ".join(parts) if parts else "(none)"
    return text if len(text) <= width else text[:width - 3] + "..."


def first_names(names: Sequence[str], limit: int) -> str:
    """The first `limit` names, comma-separated, and how many more: 'a, b and 3 more'."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _elements(infos: Sequence[ParamInfo], params: Sequence[int]) -> int:
    return sum(infos[i].numel for i in params)
