"""Toy parameter sets for the reliability tests: named like a transformer (embed, layers,
norm, head) so the policies find blocks, but with a loss whose gradients are exact and
cheap (d/dp sum(p * c) = c), so hundreds of steps take a second and gradients do not
depend on the thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nto_ext import NTO


@dataclass(frozen=True)
class Layout:
    """Sizes (elements) of the toy's tensors; 0 = no such tensor."""

    embed: int = 64
    layers: tuple[tuple[int, ...], ...] = ((32, 8), (32, 8), (32, 8), (32, 8))
    norm: int = 8
    head: int = 64
    width: int = 1  # > 1: a tensor whose size it divides is (size // width, width)

    def names_and_sizes(self) -> list[tuple[str, int]]:
        out = [("model.embed_tokens.weight", self.embed)] if self.embed else []
        for i, sizes in enumerate(self.layers):
            out += [(f"model.layers.{i}.w{j}", n) for j, n in enumerate(sizes)]
        if self.norm:
            out.append(("model.norm.weight", self.norm))
        if self.head:
            out.append(("lm_head.weight", self.head))
        return out


def toy_params(layout: Layout = Layout(), dtype: torch.dtype | list[torch.dtype] = torch.float32,
               seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, Parameter) pairs with seeded values; `dtype` may be one per tensor."""
    gen = torch.Generator().manual_seed(seed)
    named = layout.names_and_sizes()
    dtypes = dtype if isinstance(dtype, list) else [dtype] * len(named)
    w = layout.width

    def shape(n: int) -> tuple[int, ...]:
        return (n // w, w) if w > 1 and n % w == 0 else (n,)

    return [(name, torch.nn.Parameter(torch.randn(shape(n), generator=gen).to(dt)))
            for (name, n), dt in zip(named, dtypes)]


def coefficients(params: list[torch.Tensor], step: int, micro: int = 0) -> list[torch.Tensor]:
    """The gradient each param gets at (step, micro-batch): a pure function of both."""
    gen = torch.Generator().manual_seed(1_000_003 * step + micro)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def backward(params: list[torch.Tensor], step: int, micro: int = 0,
             poison: dict[int, float] | None = None) -> None:
    """loss = sum_i sum(p_i * c_i), backward: p_i.grad += c_i. `poison` {param index:
    value} puts NaN/Inf into element 0 of that param's coefficient."""
    coefs = coefficients(params, step, micro)
    for i, v in (poison or {}).items():
        coefs[i] = coefs[i].clone()
        coefs[i].view(-1)[0] = v
    terms = [(p * c).sum() for p, c in zip(params, coefs) if p.requires_grad]
    if terms:
        torch.stack([t.float() for t in terms]).sum().backward()


def train(opt: NTO, params: list[torch.Tensor], steps: range, accumulate: int = 1) -> None:
    for step in steps:
        for micro in range(accumulate):
            backward(params, step, micro)
        opt.step()
        opt.zero_grad()


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit-identical lists of tensors (NaN-safe: compares the bytes)."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x.detach().reshape(-1).view(torch.uint8),
                        y.detach().reshape(-1).view(torch.uint8)) for x, y in zip(a, b))
