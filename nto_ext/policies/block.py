"""policy="block" (BAdam generalized): units (blocks, or tensors of blocks larger than the
budget) packed consecutively into groups that fit; one group trains for `switch_every`
steps, then the next, in `order` ascending / descending / random (re-shuffled per cycle),
or "importance" (ascending, each group repeated by its gradient norm: scheduled.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..blocks import ParamInfo, Unit, pack_consecutive
from ..budget import Budget
from .scheduled import IMPORTANCE, ScheduledConfig, ScheduledPolicy, _generator


@dataclasses.dataclass(frozen=True)
class BlockConfig(ScheduledConfig):
    ORDERS: ClassVar[tuple[str, ...]] = ("ascending", "descending", "random", IMPORTANCE)


class BlockPolicy(ScheduledPolicy):
    """BAdam generalized: consecutive units packed into groups; groups take turns."""

    name = "block"
    Config = BlockConfig

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget, config: BlockConfig) -> None:
        super().__init__(infos, budget, config)
        self.order = config.order
        self.groups = pack_consecutive(self.units, self.capacity)

    def _make_schedule(self, cycle: int) -> list[tuple[Unit, ...]]:
        if self.order in ("ascending", IMPORTANCE):
            return list(self.groups)
        if self.order == "descending":
            return self.groups[::-1]
        perm = torch.randperm(len(self.groups), generator=_generator(self.seed, cycle, "block"))
        return [self.groups[i] for i in perm.tolist()]

    def _period_units(self, period: int) -> tuple[Unit, ...]:
        if self.order == IMPORTANCE:  # cycles of varying length: walk
            return super()._period_units(period)
        n = max(len(self.groups), 1)  # fixed cycle length: no walk needed
        self._cycle, self._cycle_start = period // n, (period // n) * n
        return self.schedule(self._cycle)[period % n]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "order": self.order}
