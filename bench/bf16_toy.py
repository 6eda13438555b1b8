"""bf16 weights train as well as fp32 (issue 19): the share of fp32's loss drop reached.

A 6-layer tanh MLP (width 256, weights 3x torch's default init) is fine-tuned toward a
teacher (its starting weights plus noise of 2% of their scale): NTO (Adam) at lr 3e-5,
150 steps, fresh random inputs each step; the loss is judged in fp32 (the trained weights
cast to fp32) on a fixed held-out batch. Per budget the table gives (L0 - L) / (L0 -
L_fp32) of bf16 weights updated in place (master_weights=False), with fp32 master weights
of the active set (the default; also with state_on_switch="offload", which keeps them),
with stochastic rounding; torch.optim.AdamW on bf16 as a reference row. About a minute
on one CPU core:

    python bench/bf16_toy.py [--lr 1e-5]     # prints a markdown table
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

from nto_ext import NTO

WIDTH, LAYERS, BATCH, GAIN = 256, 6, 64, 3.0
VARIANTS = {  # name: (param dtype, NTO format arguments)
    "fp32": (torch.float32, {}),
    "bf16 plain": (torch.bfloat16, {"master_weights": False}),
    "bf16 + masters (default)": (torch.bfloat16, {}),
    "bf16 + masters, offloaded at switches": (torch.bfloat16, {"state_on_switch": "offload"}),
    "bf16 + stochastic rounding": (torch.bfloat16, {"stochastic_rounding": True}),
}


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    with torch.no_grad():  # weights at the scale of a trained net (std ~0.11), where most
        for name, p in model.named_parameters():  # Adam steps of lr 3e-5 are below half
            if name.endswith("weight"):  # a bf16 ulp (torch's default init: std ~0.036)
                p.mul_(GAIN)
    return model


def teacher() -> torch.nn.Module:
    """The student's starting weights (fp32) plus 2% noise."""
    teacher = mlp(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return teacher


def judged_loss(model: torch.nn.Module, teacher: torch.nn.Module) -> float:
    x = torch.randn(1024, WIDTH, generator=torch.Generator().manual_seed(99))
    fp32 = mlp(0)
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(fp32(x), teacher(x)))


def train(dtype: torch.dtype, budget: str, fmt: dict, steps: int, lr: float,
          adamw: bool = False, switch_every: int = 10) -> float:
    model = mlp(0).to(dtype)
    target = teacher()
    named = [(f"model.layers.{int(n.split('.')[0]) // 2}.{n.split('.')[1]}", p)  # blocks
             for n, p in model.named_parameters()]
    if adamw:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        opt = NTO(named, lr=lr, weight_decay=0.0, budget=budget, switch_every=switch_every,
                  **fmt)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(BATCH, WIDTH, generator=g)
        with torch.no_grad():
            y = target(x).to(dtype)
        torch.nn.functional.mse_loss(model(x.to(dtype)), y).float().backward()
        opt.step()
        opt.zero_grad()
    return judged_loss(model, target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--budgets", nargs="+", default=["100%", "34%"],
                    help="34%%: 2 of the 6 layers at a time; 50%%: 3")
    ap.add_argument("--switch-every", type=int, default=50,
                    help="steps between switches of the trained layers (default: NTO's, 50)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    start = judged_loss(mlp(0), teacher())
    budgets, every = args.budgets, args.switch_every
    print(f"lr {args.lr}, {args.steps} steps, switch_every {every}; judged fp32 loss at start "
          f"{start:.4e}\n")
    print("| variant | " + " | ".join(f"budget {b}: share of fp32's drop" for b in budgets)
          + " |")
    print("|---|" + "---|" * len(budgets))
    base = {b: start - train(torch.float32, b, {}, args.steps, args.lr, switch_every=every)
            for b in budgets}
    for name, (dtype, fmt) in VARIANTS.items():
        cells = [(start - train(dtype, b, fmt, args.steps, args.lr, switch_every=every)) / base[b]
                 for b in budgets]
        print(f"| {name} | " + " | ".join(f"{c:.1%}" for c in cells) + " |", flush=True)
    if "100%" in base:  # torch's AdamW has no budget: its row fills the 100% column only
        adamw = start - train(torch.bfloat16, "100%", {}, args.steps, args.lr, adamw=True)
        cells = [f"{adamw / base[b]:.1%}" if b == "100%" else "-" for b in budgets]
        print("| torch AdamW, bf16 | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
