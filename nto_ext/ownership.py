"""What NTO changes on the params it trains, and gives back: gradient hooks and
requires_grad, owned by one live NTO at a time."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

# param -> the _ParamHandles of the live NTO that owns it. A second NTO built over the same
# params takes them over (a re-run notebook cell): it reads the flags the user set from
# here, not the False flags the first NTO left, and detaches the first (issue 17).
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def grad_hook(ref: weakref.ReferenceType, index: int) -> Callable[[torch.Tensor], None]:
    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._on_grad(index, p)  # noqa: SLF001 (the hook is the optimizer's own)
    return hook


def register_hook(p: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> Any:
    """register_post_accumulate_grad_hook, also on a param that does not require grad now
    (torch refuses those): the flag is switched on for the call and restored, so __init__
    leaves requires_grad as it found it."""
    if p.requires_grad:
        return p.register_post_accumulate_grad_hook(hook)
    p.requires_grad_(True)
    try:
        return p.register_post_accumulate_grad_hook(hook)
    finally:
        p.requires_grad_(False)


# Set on a param while NTO has switched its requires_grad off. Pickling the model
# (torch.save / torch.load) carries it, so an NTO built over a reloaded model in training
# still sees the flag the user set (True) instead of NTO's temporary False. copy.deepcopy
# does not: torch's Parameter.__deepcopy__ copies data and requires_grad only (the README
# says to call remove_hooks() first).
_FROZEN_BY_NTO = "_nto_switched_off"


def user_flag(p: torch.Tensor) -> bool:
    """The requires_grad the user set on `p`: recorded by the NTO that owns it, if any."""
    owner = _OWNERS.get(p)
    if owner is not None:
        return owner.flag_of(p)
    return bool(p.requires_grad) or bool(getattr(p, _FROZEN_BY_NTO, False))


def switch(p: torch.Tensor, on: bool) -> None:
    """requires_grad as NTO sets it, with the marker that says it was NTO."""
    p.requires_grad_(on)
    if on:
        p.__dict__.pop(_FROZEN_BY_NTO, None)
    else:
        setattr(p, _FROZEN_BY_NTO, True)


class ParamHandles:
    """What NTO changes on the params it trains: its gradient hooks, and requires_grad
    (switched off while a param is inactive). `release()` removes the hooks and gives each
    param back the flag it had when NTO was built; it runs when the optimizer is
    garbage-collected (weakref.finalize, reference cycles included), on
    `NTO.remove_hooks()`, or when a newer NTO takes the params over, so a model outlives its
    NTO unchanged."""

    def __init__(self, params: list[torch.Tensor], flags: list[bool]) -> None:
        self.params: list[torch.Tensor] = []
        self.flags: list[bool] = []
        self.hooks: list[Any] = []
        self.released = False
        self.add(params, flags)

    def add(self, params: list[torch.Tensor], flags: list[bool]) -> None:
        """Own `params` (their user flags given): a previous owner is released first."""
        for prev in {id(o): o for p in params if (o := _OWNERS.get(p)) is not None
                     and o is not self}.values():
            prev.release()
            warnings.warn("NTO: another NTO was built over the same parameters; the older "
                          "one is detached (stepping it raises)", UserWarning, stacklevel=5)
        self.params += params
        self.flags += flags
        for p in params:
            _OWNERS[p] = self

    def flag_of(self, p: torch.Tensor) -> bool:
        return next(f for q, f in zip(self.params, self.flags) if q is p)

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def release(self) -> None:
        self.remove_hooks()
        self.released = True
        for p, flag in zip(self.params, self.flags):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            p.__dict__.pop(_FROZEN_BY_NTO, None)
            if _OWNERS.get(p) is self:
                del _OWNERS[p]

    def follow(self, params: list[torch.Tensor]) -> None:
        """The owned params were replaced (same order): own the new ones."""
        self.params = params
        for p in params:
            _OWNERS[p] = self
