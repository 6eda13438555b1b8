"""The params an NTO trains, in param_groups order: what the policy, the updater and the
checkpoint code know them by (index, `ParamInfo`, label)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .args import check_param
from .blocks import ParamInfo


class ParamTable:
    def __init__(self, params: list[torch.Tensor], infos: list[ParamInfo]) -> None:
        self.infos = infos
        self.reindex(params)

    def reindex(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.index = {p: i for i, p in enumerate(params)}

    @property
    def named(self) -> bool:
        return all(i.name is not None for i in self.infos) and bool(self.infos)

    def names(self) -> list[str | None]:
        return [i.name for i in self.infos]

    def trainable(self) -> list[int]:
        return [i for i, info in enumerate(self.infos) if info.trainable]

    def label(self, i: int) -> str:
        name = self.infos[i].name
        return f"parameter {name!r}" if name is not None else f"parameter #{i}"

    def call(self, op: Callable[..., Any], index: Sequence[int], *args: Any, **kw: Any) -> Any:
        """Call an op over params `index`; its errors name the param, not a list position."""
        try:
            return op(*args, **kw)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            text = re.sub(r"(\w+)\[(\d+)\]", lambda m: (
                f"{m.group(1)}[{m.group(2)}] ({self.label(index[int(m.group(2))])})"
                if int(m.group(2)) < len(index) else m.group(0)), str(e))
            raise type(e)(text) from e

    def check_replaced(self, now: list[torch.Tensor]) -> bool:
        """True when `now` (the params in param_groups) replaced some of these (e.g.
        sharded by FSDP2): the same count, each of the same shape; refused otherwise."""
        if len(now) == len(self.params) and all(a is b for a, b in zip(now, self.params)):
            return False
        if len(now) != len(self.params):
            raise ValueError(f"param_groups now hold {len(now)} params, NTO was built over "
                             f"{len(self.params)}; allowed: the same params, or each "
                             "replaced by one of the same shape (a sharded or moved copy); "
                             "add params with add_param_group")
        for i, p in enumerate(now):
            if tuple(p.shape) != tuple(self.infos[i].shape):
                raise ValueError(f"{self.label(i)} was replaced in param_groups by a tensor of "
                                 f"shape {tuple(p.shape)}, expected {tuple(self.infos[i].shape)}"
                                 "; allowed: a copy of the same (global) shape")
        return True

    def changed_dtypes(self) -> list[int]:
        """Params whose dtype changed since the plan (`model.to(torch.float32)`), each a
        dtype NTO trains. A changed shape is refused: its state no longer fits."""
        changed = []
        for i, p in enumerate(self.params):
            info = self.infos[i]
            if tuple(p.shape) != info.shape:
                raise ValueError(f"{self.label(i)} has shape {tuple(p.shape)} but NTO was "
                                 f"built over shape {info.shape} (p.data was replaced or "
                                 "reshaped); its state no longer fits: restore the shape, or "
                                 "build a new NTO; nothing was changed")
            if p.dtype != info.dtype:
                check_param(self.label(i), p)
                changed.append(i)
        return changed
