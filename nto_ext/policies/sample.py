"""policy="sample" (LISA generalized): every cycle the units are shuffled; each period
takes the next units of that permutation while they fit (or exactly `sample_layers` of
them), so every unit trains once per cycle. order="importance" repeats each period by its
gradient norm (scheduled.py); "random" (the default) is LISA's uniform draw."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..blocks import ParamInfo, Unit, pack_consecutive
from ..budget import Budget
from .scheduled import IMPORTANCE, ScheduledConfig, ScheduledPolicy, _generator


@dataclasses.dataclass(frozen=True)
class SampleConfig(ScheduledConfig):
    sample_layers: int | None = None  # draw exactly this many units per period (LISA)
    ORDERS: ClassVar[tuple[str, ...]] = ("random", IMPORTANCE)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.sample_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"sample_layers={n!r}; allowed: None or an int >= 1")


class SamplePolicy(ScheduledPolicy):
    """LISA generalized: shuffled units, taken per period while they fit (or n at a time)."""

    name = "sample"
    Config = SampleConfig

    def __init__(self, infos: Sequence[ParamInfo], budget: Budget,
                 config: SampleConfig) -> None:
        super().__init__(infos, budget, config)
        self.sample_layers = config.sample_layers
        if self.sample_layers is not None:
            self._check_sample_layers(self.sample_layers)

    def _check_sample_layers(self, n: int) -> None:
        if n > len(self.units):
            raise ValueError(f"sample_layers={n} but only {len(self.units)} units can be "
                             f"drawn under budget={self.budget.given}; allowed: 1.."
                             f"{len(self.units)}")
        worst = sum(sorted((u.cost for u in self.units), reverse=True)[:n])
        if worst > self.capacity:
            raise ValueError(
                f"sample_layers={n}: the {n} largest units need {self._fmt(worst)} but budget="
                f"{self.budget.given} leaves {self._fmt(self.capacity)} for them; raise the "
                "budget or lower sample_layers")

    def _make_schedule(self, cycle: int) -> list[tuple[Unit, ...]]:
        perm = torch.randperm(len(self.units), generator=_generator(self.seed, cycle, "sample"))
        order = [self.units[i] for i in perm.tolist()]
        n = self.sample_layers
        if n is None:
            return pack_consecutive(order, self.capacity)
        periods = [tuple(order[k:k + n]) for k in range(0, len(order), n)]
        short = n - len(periods[-1])
        if short:  # keep the count fixed: top up the last period from the cycle's start
            periods[-1] = periods[-1] + tuple(order[:short])
        return periods

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sample_layers": self.sample_layers}
