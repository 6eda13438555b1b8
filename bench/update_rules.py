"""Quality probes of update rules NTO does not ship, on bench/e2e.py's tasks (pure PyTorch,
no kernels, every weight trained at every step): what a future state format would buy
before anyone writes its kernels.

Rules (RULE-MOMENTUM):
- sign-none: AdamW's first step at every step (what `state_dtype="none"` does): 0 B/element
- factored-none: Adafactor's factored second moment (row and column means of g^2, EMA
  beta2 with AdamW's bias correction), no first moment: O(rows + cols) per tensor
- factored-fp32 / factored-q8: the same with AdamW's first moment in fp32 (4 B/element) or
  in NTO's 8-bit map (`_reference.quantize_q8`: 1 + 4/256 B/element)
- lion-fp32: Lion (sign of the interpolated momentum, beta2 0.99), decoupled decay
- adamw-q4: AdamW with both moments in 4 bits: NTO's square-root map (m = q|q| s,
  sqrt(v) = q^2 s) with 7 / 15 levels in blocks of 128 (1.06 B per element with the scales)
- adamw-q4sr: the same maps, levels chosen by stochastic rounding (an unbiased EMA: a
  nearest-rounded v loses increments smaller than half a level)
- adamw-m5v3r / adamw-m11v11r: one byte per element: m in 31 levels and v in 8 (23 and
  11), both in adamw-q4's square-root maps (a positive v keeps level 1); m5v3r is what
  `state_dtype="int4"` ships (formats/int4.py); adamw-m5v3r64: m5v3r in blocks of 64
- adamw-mq4 / adamw-vq4: adamw-q4's map on one moment, the other in fp32

    python bench/update_rules.py --task lm --rule factored-q8 --lr 1e-4 --seeds 0 1 2

Each run appends one line to docs/results/update_rules_<task>.jsonl and rewrites the .md;
runs already there are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import e2e  # noqa: E402

from nto_ext import _reference, demo  # noqa: E402

RULES = ("sign-none", "factored-none", "factored-fp32", "factored-q8", "lion-fp32", "adamw-q4",
         "adamw-q4sr", "adamw-mq4", "adamw-vq4", "adamw-m5v3r", "adamw-m11v11r",
         "adamw-m5v3r64")
Q4_BLOCK = 128


class Probe(torch.optim.Optimizer):
    """One of RULES over every param (module doc); AdamW's betas and eps."""

    def __init__(self, params, rule: str, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.v, self.m = rule.split("-")
        self.b1, self.b2, self.eps = betas[0], betas[1], eps

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad.float(), self.state[p], group["lr"],
                                 group["weight_decay"])

    def _update(self, p, g, st, lr, wd) -> None:
        t = st["t"] = st.get("t", 0) + 1
        p.mul_(1 - lr * wd)
        if self.v == "adamw" and self.m != "q4":
            p.add_(self._adamw_fake_q4(g, st, t), alpha=-lr)
            return
        if self.v == "adamw":
            p.add_(self._adamw_q4(g, st, t), alpha=-lr)
            return
        if self.v == "lion":
            m = st.setdefault("m", torch.zeros_like(g))
            p.add_(m.lerp(g, 1 - self.b1).sign(), alpha=-lr)
            m.lerp_(g, 1 - 0.99)
            return
        p.add_(self._first(g, st, t) / self._denom(g, st, t), alpha=-lr)

    def _adamw_q4(self, g, st, t):
        """AdamW's direction from 4-bit moments, requantized after the update."""
        if "qm" not in st:
            zero = _q4(torch.zeros(g.numel()), 7)
            st.update(qm=zero[0], sm=zero[1], qw=zero[0].clone(), sw=zero[1].clone())
        n = g.numel()
        m = (st["qm"] * st["qm"].abs() * st["sm"]).reshape(-1)[:n].reshape(g.shape)
        v = (st["qw"].square() * st["sw"]).square().reshape(-1)[:n].reshape(g.shape)
        m.lerp_(g, 1 - self.b1)
        v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        st["qm"], st["sm"] = _q4(m.reshape(-1), 7)
        st["qw"], st["sw"] = _q4(v.sqrt().reshape(-1), 15, keep_positive=True)
        denom = (v / (1 - self.b2 ** t)).sqrt() + self.eps
        return m / (1 - self.b1 ** t) / denom

    def _adamw_fake_q4(self, g, st, t):
        """adamw-<a FAKE_MAPS key>: the moments kept as the fp32 values of their levels,
        requantized after the update."""
        m = st.setdefault("m", torch.zeros_like(g))
        v = st.setdefault("v", torch.zeros_like(g))
        m.lerp_(g, 1 - self.b1)
        v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        out = m / (1 - self.b1 ** t) / ((v / (1 - self.b2 ** t)).sqrt() + self.eps)
        gen = st.setdefault("gen", torch.Generator().manual_seed(m.numel()))
        map_m, map_v = FAKE_MAPS[self.m]
        m.copy_(map_m(m, gen))
        v.copy_(map_v(v, gen))
        return out

    def _denom(self, g, st, t):
        if self.v == "sign":
            return g.abs() + self.eps
        rows = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(1, -1)
        g2 = rows.square() + 1e-30
        r = st.setdefault("r", torch.zeros(rows.shape[0]))
        c = st.setdefault("c", torch.zeros(rows.shape[1]))
        r.lerp_(g2.mean(1), 1 - self.b2)
        c.lerp_(g2.mean(0), 1 - self.b2)
        v = torch.outer(r, c) / r.mean() / (1 - self.b2 ** t)
        return (v.sqrt() + self.eps).reshape(g.shape)

    def _first(self, g, st, t):
        if self.m == "none":
            return g
        if self.m == "fp32":
            m = st.setdefault("m", torch.zeros_like(g))
            m.lerp_(g, 1 - self.b1)
            return m / (1 - self.b1 ** t)
        n, nb = g.numel(), _reference.q8_blocks(g.numel())  # q8: NTO's 8-bit map
        if "qm" not in st:
            st.update(qm=torch.zeros(n, dtype=torch.int8), sm=torch.zeros(nb))
        zeros_w = (torch.zeros(n, dtype=torch.uint8), torch.zeros(nb))
        m, _ = _reference.dequantize_q8(st["qm"], st["sm"], *zeros_w)
        m = m.reshape(-1)[:n].reshape(g.shape).lerp_(g, 1 - self.b1)
        st["qm"], st["sm"], _, _ = _reference.quantize_q8(
            _reference.pad_blocks(m, nb), torch.zeros(nb, _reference.Q8_BLOCK), n)
        return m / (1 - self.b1 ** t)


def _unblock(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return b.reshape(-1)[:like.numel()].reshape(like.shape)


def _sqrt_map(x: torch.Tensor, top: int, gen: torch.Generator | None = None,
              keep_positive: bool = False, block: int = Q4_BLOCK) -> torch.Tensor:
    """x rounded in the square-root map of `top` levels a side (_q4), as fp32 values."""
    q, s = _q4(x.reshape(-1), top, gen, keep_positive, block)
    return _unblock(q * q.abs() * s, x)


def _root_sqrt_map(v: torch.Tensor, gen: torch.Generator | None = None,
                   top: int = 15, block: int = Q4_BLOCK) -> torch.Tensor:
    return _sqrt_map(v.sqrt(), top, gen, keep_positive=True, block=block).square()


# first-moment map, second-moment map (each (tensor, generator) -> rounded fp32 values)
FAKE_MAPS = {
    "q4sr": (lambda m, gen: _sqrt_map(m, 7, gen), _root_sqrt_map),
    # which moment's 4 bits cost the quality: the other one kept in fp32
    "mq4": (lambda m, gen: _sqrt_map(m, 7), lambda v, gen: v),
    "vq4": (lambda m, gen: m, _root_sqrt_map),
    # one byte, both in the square-root maps: 31 x 8 and 23 x 11 of the 256 codes
    "m5v3r": (lambda m, gen: _sqrt_map(m, 15), lambda v, gen: _root_sqrt_map(v, top=7)),
    "m11v11r": (lambda m, gen: _sqrt_map(m, 11), lambda v, gen: _root_sqrt_map(v, top=10)),
    # m5v3r in blocks of 64 (1.125 B per element with the scales)
    "m5v3r64": (lambda m, gen: _sqrt_map(m, 15, block=64),
                lambda v, gen: _root_sqrt_map(v, top=7, block=64)),
}


def _q4(x: torch.Tensor, top: int, gen: torch.Generator | None = None,
        keep_positive: bool = False,
        block: int = Q4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels (float, [blocks, block]) and scales of flat `x` in the square-root map:
    |q| = round(sqrt(|x| / s)) <= top, s = max|x| / top^2 per block; a positive x keeps a
    level of at least 1 when `keep_positive` (the root maps of the second moment).
    With `gen`, |q| is rounded stochastically in |x| (unbiased)."""
    nb = -(-x.numel() // block)
    b = torch.zeros(nb * block)
    b[:x.numel()] = x
    b = b.reshape(nb, block)
    s = b.abs().amax(1, keepdim=True) / top ** 2
    a = b.abs() / torch.where(s > 0, s, 1)
    if gen is None:
        q = torch.floor(a.sqrt() + 0.5).clamp(0, top)
    else:  # between levels lo^2 <= a < (lo+1)^2: up with probability (a - lo^2) / (2 lo + 1)
        lo = torch.floor(a.sqrt()).clamp(0, top)
        up = torch.rand(a.shape, generator=gen) < (a - lo.square()) / (2 * lo + 1)
        q = (lo + up.float()).clamp(0, top)
    if keep_positive:
        q = torch.where((q == 0) & (b != 0), torch.ones_like(q), q)
    return torch.where(b < 0, -q, q), s


def run(task: str, rule: str, lr: float, seed: int) -> dict:
    name = f"rule-{rule}"
    e2e.CONFIGS[name] = ("nto", f"update rule {rule} (bench/update_rules.py)")
    e2e.build_optimizer = lambda spec, _task, model: (
        Probe(model.parameters(), rule, lr, demo.WEIGHT_DECAY), model, {"lr": lr})
    kind = e2e.TASKS[task][2]
    d = demo.TASK_DEFAULTS[kind]
    spec = e2e.RunSpec(task=task, config=name, seed=seed, steps=d["steps"],
                       batch_size=d["batch_size"], max_length=d["max_length"],
                       eval_size=d["eval_size"], switch_every=1, lisa_layers=1,
                       lora_match="10%", threads=1, extra={"lr": {"nto": lr}})
    out = e2e.run_one(spec)
    metric = "accuracy" if "accuracy" in out else "eval_loss"
    return {"rule": rule, "lr": lr, "seed": seed, metric: out[metric],
            "final_loss": out["final_loss"], "wall_s": round(out["wall_s"])}


def report(path: Path) -> None:
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        by.setdefault((r["rule"], r["lr"]), []).append(r)
    lines = [f"<!-- generated by bench/update_rules.py from {path.name} -->",
             "| rule | lr | seeds | held-out (per seed) | mean |", "|---|---|---|---|---|"]
    for (rule, lr), rs in sorted(by.items()):
        key = "accuracy" if "accuracy" in rs[0] else "eval_loss"
        rs = sorted(rs, key=lambda r: r["seed"])
        vals = [r[key] for r in rs]
        lines.append(f"| {rule} | {lr:g} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{', '.join(f'{v:.4f}' for v in vals)} | {statistics.mean(vals):.4f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=list(e2e.TASKS), default="lm")
    p.add_argument("--rule", choices=RULES, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="docs/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    path = Path(args.out) / f"update_rules_{args.task}.jsonl"
    done = {(r["rule"], r["lr"], r["seed"]) for r in (
        json.loads(line) for line in (path.read_text().splitlines() if path.exists() else [])
        if line.strip())}
    for seed in args.seeds:
        if (args.rule, args.lr, seed) in done:  # as e2e.py --resume: only what is missing
            continue
        res = run(args.task, args.rule, args.lr, seed)
        logging.info("%s", res)
        with path.open("a") as f:
            f.write(json.dumps(res) + "\n")
        report(path)


if __name__ == "__main__":
    main()
