"""Policies: which params train at each step, and what happens to their tensors.

One module per policy (block.py, sample.py, sparse.py; scheduled.py and dense.py hold
what block and sample share); `base.py` is the interface NTO calls. This registry is the
one place that maps policy names to them: add a module and one entry in POLICIES.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..blocks import ParamInfo
from ..blocks import pack_consecutive as pack_consecutive
from ..budget import Budget
from .base import Config, Policy, Updater
from .block import BlockPolicy
from .sample import SamplePolicy
from .scheduled import ScheduledPolicy
from .sparse import SparsePolicy

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (BlockPolicy, SamplePolicy,
                                                         SparsePolicy)}
DEFAULT_POLICY = "block"

__all__ = ["POLICIES", "DEFAULT_POLICY", "Config", "Policy", "Updater", "BlockPolicy",
           "SamplePolicy", "ScheduledPolicy", "SparsePolicy", "policy_class", "configure",
           "validate_policy_args", "make_policy", "pack_consecutive"]


def policy_class(policy: object) -> type[Policy]:
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy={policy!r}; allowed: {', '.join(map(repr, POLICIES))}")
    return POLICIES[policy]


def _fields(cls: type[Policy]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls.Config)}


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a is b or (type(a) is type(b) and a == b)


def configure(policy: object, **args: Any) -> Config:
    """The validated config of `policy` from NTO's policy arguments. An argument another
    policy owns must keep its default (ValueError naming who takes it)."""
    cls = policy_class(policy)
    own = _fields(cls)
    for key, value in args.items():
        if key in own:
            continue
        owners = [name for name, c in POLICIES.items() if key in _fields(c)]
        if not owners:
            raise TypeError(f"{key!r} is not a policy argument")
        default = _fields(POLICIES[owners[0]])[key]
        if not _same(value, default):
            raise ValueError(f"{key}={value!r} applies to policy="
                             f"{' and '.join(map(repr, owners))} only (policy={policy!r}); "
                             f"allowed here: {default!r}")
    return cls.Config(**{k: v for k, v in args.items() if k in own})


def validate_policy_args(policy: object, **args: Any) -> None:
    """Check the policy arguments; TypeError / ValueError say what was given and allowed."""
    configure(policy, **args)


def make_policy(policy: str, infos: Sequence[ParamInfo], budget: Budget,
                **args: Any) -> Policy:
    """Build the policy named `policy` over `infos` from NTO's policy arguments."""
    return POLICIES[policy](infos, budget, configure(policy, **args))
