"""Speed of the fused CPU ops against the torch op a user would otherwise call, on the
parameter shapes of a small transformer (>= 64M elements), all in one run.

Run:   python bench/kernels_table.py            (runs this file, writes docs/results/kernels.md)
or:    python -m pytest bench/bench_ops.py --benchmark-json=out.json
Not part of the test suite (pytest's testpaths is tests/). Each benchmark records in
extra_info the bytes it must move at least (`bytes`), which kernels_table.py turns into GB/s
and a fraction of the measured copy bandwidth, and the `pair` it is compared with.
"""

from __future__ import annotations

import os

import pytest
import torch

from nto_ext import ops

# A 6-layer, d=768 decoder with a 32k vocabulary and untied head: 91.7M elements, the shapes
# (and the many small vectors) of a small transformer.
D, FF, LAYERS, VOCAB = 768, 3072, 6, 32000
ROUNDS = int(os.environ.get("NTO_BENCH_ROUNDS", "5"))
if os.environ.get("NTO_BENCH_THREADS"):  # kernels_table.py's single-thread CPU-time run
    torch.set_num_threads(int(os.environ["NTO_BENCH_THREADS"]))
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def transformer_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(VOCAB, D)]
    for _ in range(LAYERS):
        shapes += [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,), (FF, D), (FF,),
                   (D, FF), (D,)]
    return shapes + [(D,), (D,), (VOCAB, D)]


def _numel(ts) -> int:
    return sum(t.numel() for t in ts)


def _run(benchmark, fn, *, group: str, name: str, nbytes: int, elements: int, pair: str = ""):
    benchmark.group = group
    benchmark.extra_info.update(name=name, bytes=nbytes, elements=elements, pair=pair,
                                threads=torch.get_num_threads(), backend=ops.backend(),
                                cpu_capability=torch.backends.cpu.get_cpu_capability())
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    shapes = transformer_shapes()
    params = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    return params, grads


def _fused_adamw(params, grads):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    for leaf, g in zip(leaves, grads):
        leaf.grad = g.clone()
    opt = torch.optim.AdamW(leaves, lr=HYPER["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=HYPER["weight_decay"], fused=True)
    opt.step()  # creates the state
    return opt


# ------------------------------------------------------------------------------ bandwidth


def test_copy_bandwidth(benchmark, model):
    n = _numel(model[0])
    src = torch.randn(n)
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), group="bandwidth", name="copy (clone) fp32",
         nbytes=8 * n, elements=n)


# ---------------------------------------------------------------------------------- adamw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_fused_torch(benchmark, model, dtype):
    params = [p.to(dtype) for p in model[0]]
    grads = [g.to(dtype) for g in model[1]]
    opt = _fused_adamw(params, grads)
    n = _numel(params)
    e = params[0].element_size()
    _run(benchmark, opt.step, group=f"adamw {dtype}",
         name=f"torch.optim.AdamW(fused=True).step() {str(dtype)[6:]}",
         nbytes=n * (7 * e), elements=n)  # torch's state has the param dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_dense_ours(benchmark, model, dtype):
    params = [p.to(dtype) for p in model[0]]
    grads = [g.to(dtype) for g in model[1]]
    ms = [torch.zeros(p.shape) for p in params]
    vs = [torch.zeros(p.shape) for p in params]
    n = _numel(params)
    e = params[0].element_size()
    step = iter(range(1, 10**6))
    fn = lambda: ops.masked_adamw_(params, grads, ms, vs, [None] * len(params), next(step),
                                   **HYPER)
    _run(benchmark, fn, group=f"adamw {dtype}", name=f"masked_adamw_ dense {str(dtype)[6:]}",
         nbytes=n * (3 * e + 16), elements=n,  # p r/w, g r; m, v fp32 r/w
         pair=f"torch.optim.AdamW(fused=True).step() {str(dtype)[6:]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_first_step_ours(benchmark, model, dtype):
    """state_dtype="none": AdamW's first step, no moments (p r/w, g r)."""
    params = [p.to(dtype) for p in model[0]]
    grads = [g.to(dtype) for g in model[1]]
    n = _numel(params)
    e = params[0].element_size()
    _run(benchmark, lambda: ops.adamw_first_step_(params, grads, **HYPER), group=f"adamw {dtype}",
         name=f"adamw_first_step_ {str(dtype)[6:]}", nbytes=n * 3 * e, elements=n,
         pair=f"torch.optim.AdamW(fused=True).step() {str(dtype)[6:]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_int4_dense_ours(benchmark, model, dtype):
    """state_dtype="int4": both moments in one byte per element (blocks of 64)."""
    params = [p.to(dtype) for p in model[0]]
    grads = [g.to(dtype) for g in model[1]]
    codes = [torch.zeros(p.numel(), dtype=torch.uint8) for p in params]
    sm = [torch.zeros(-(-p.numel() // 64)) for p in params]
    sw = [torch.zeros(-(-p.numel() // 64)) for p in params]
    n = _numel(params)
    e = params[0].element_size()
    step = iter(range(1, 10**6))
    fn = lambda: ops.masked_adamw_int4_(params, grads, codes, sm, sw, next(step), **HYPER)
    _run(benchmark, fn, group=f"adamw {dtype}", name=f"masked_adamw_int4_ dense {str(dtype)[6:]}",
         nbytes=n * (3 * e + 2 * (1 + 8 / 64)), elements=n,  # p r/w, g r; codes, scales r/w
         pair=f"torch.optim.AdamW(fused=True).step() {str(dtype)[6:]}")


def _random_positions(n: int, gen: torch.Generator) -> torch.Tensor:
    """10% of n positions, uniformly at random (touches ~81% of the 64-byte lines)."""
    return torch.sort(torch.randperm(n, generator=gen)[:max(1, n // 10)]).values


def _run_positions(n: int, gen: torch.Generator, run: int = 256) -> torch.Tensor:
    """10% of n positions in runs of `run` consecutive elements (rows / blocks of a
    matrix): the cache lines touched follow the budget."""
    if n < 10 * run:
        return _random_positions(n, gen)
    starts = torch.randperm(n // run, generator=gen)[:n // run // 10] * run
    return (torch.sort(starts).values[:, None] + torch.arange(run)).view(-1)


@pytest.mark.parametrize("layout", ["random", "runs"])
def test_adamw_indexed_10pct_ours(benchmark, model, layout):
    params, dense_grads = [p.clone() for p in model[0]], model[1]
    gen = torch.Generator().manual_seed(1)
    pick = _random_positions if layout == "random" else _run_positions
    idx = [pick(p.numel(), gen).to(torch.int32) for p in params]
    grads = [g.view(-1)[i.long()] for g, i in zip(dense_grads, idx)]  # compact, as sparse keeps
    ms = [torch.zeros(i.numel()) for i in idx]
    vs = [torch.zeros(i.numel()) for i in idx]
    k = _numel(idx)
    step = iter(range(1, 10**6))
    fn = lambda: ops.masked_adamw_(params, grads, ms, vs, idx, next(step), **HYPER)
    where = "uniformly random" if layout == "random" else "in runs of 256"
    _run(benchmark, fn, group="adamw torch.float32",
         name=f"masked_adamw_ indexed 10% fp32, {where}", nbytes=k * (8 + 4 + 16 + 4),
         elements=k,
         pair="torch.optim.AdamW(fused=True).step() float32")


@pytest.mark.parametrize("layout", ["random", "runs"])
def test_adamw_int8_indexed_10pct_ours(benchmark, model, layout):
    """policy="sparse" with 8-bit moments (issue 20): the indexed 8-bit update on the same
    positions as the fp32 row above, which it is compared with (target <= 1.3x)."""
    params, dense_grads = [p.clone() for p in model[0]], model[1]
    gen = torch.Generator().manual_seed(1)
    pick = _random_positions if layout == "random" else _run_positions
    idx = [pick(p.numel(), gen).to(torch.int32) for p in params]
    grads = [g.view(-1)[i.long()] for g, i in zip(dense_grads, idx)]
    qm = [torch.zeros(i.numel(), dtype=torch.int8) for i in idx]
    qw = [torch.zeros(i.numel(), dtype=torch.uint8) for i in idx]
    sm = [torch.zeros(-(-i.numel() // 256)) for i in idx]
    sw = [torch.zeros(-(-i.numel() // 256)) for i in idx]
    k = _numel(idx)
    step = iter(range(1, 10**6))
    fn = lambda: ops.masked_adamw_int8_(params, grads, qm, qw, sm, sw, next(step), **HYPER,
                                        indices=idx)
    where = "uniformly random" if layout == "random" else "in runs of 256"
    _run(benchmark, fn, group="adamw torch.float32",
         name=f"masked_adamw_int8_ indexed 10% fp32, {where}",
         nbytes=k * (8 + 4 + 2 * (2 + 8 / 256) + 4), elements=k,  # p r/w, g, moments, index
         pair=f"masked_adamw_ indexed 10% fp32, {where}")


def test_adamw_indexed_dense_grad_ours(benchmark, model):
    """The indexed step reading a dense grad at the positions (the gather path)."""
    params, grads = [p.clone() for p in model[0]], model[1]
    gen = torch.Generator().manual_seed(1)
    idx = [_random_positions(p.numel(), gen).to(torch.int32) for p in params]
    ms = [torch.zeros(i.numel()) for i in idx]
    vs = [torch.zeros(i.numel()) for i in idx]
    k = _numel(idx)
    step = iter(range(1, 10**6))
    fn = lambda: ops.masked_adamw_(params, grads, ms, vs, idx, next(step), **HYPER)
    _run(benchmark, fn, group="adamw torch.float32",
         name="masked_adamw_ indexed 10% fp32, uniformly random, dense grad",
         nbytes=k * (8 + 4 + 16 + 4), elements=k,
         pair="torch.optim.AdamW(fused=True).step() float32")


# ------------------------------------------------------------------------ gather_accumulate_


def _gather_case(model):
    dense = model[1]
    gen = torch.Generator().manual_seed(2)
    idx = [_random_positions(d.numel(), gen).to(torch.int32) for d in dense]
    compact = [torch.zeros(i.numel()) for i in idx]
    return dense, idx, compact


def test_gather_torch(benchmark, model):
    dense, idx, compact = _gather_case(model)
    idx64 = [i.long() for i in idx]  # index_select takes int32 too; int64 is its fast path

    def fn():
        for d, i, c in zip(dense, idx64, compact):
            c.add_(d.view(-1).index_select(0, i))

    k = _numel(idx)
    _run(benchmark, fn, group="gather_accumulate_",
         name="torch index_select + add_ (10%, per tensor)", nbytes=k * 16, elements=k)


def test_gather_accumulate_ours(benchmark, model):
    dense, idx, compact = _gather_case(model)
    k = _numel(idx)
    _run(benchmark, lambda: ops.gather_accumulate_(dense, idx, compact),
         group="gather_accumulate_", name="gather_accumulate_ (10% uniformly random)",
         nbytes=k * 16, elements=k,  # index 4 B, dense 4 B, compact r/w 8 B
         pair="torch index_select + add_ (10%, per tensor)")


# ------------------------------------------------- real positions: SmolLM2-135M's gradient


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_gradient()
    except ValueError as e:  # resolve_model: the package is not installed
        pytest.skip(f"SmolLM2-135M not available: {e}")


def smollm2_gradient():
    """SmolLM2-135M's fp32 parameters (134.5M elements), the gradient of one batch of BBC
    News text (4 x 128 tokens) and its top 10% by |g|: the positions NTO's sparse policy
    picks at a scoring step."""
    from nto_ext import data, demo

    src = data.resolve_model("smollm2")
    torch.manual_seed(0)
    tokenizer = data.load_tokenizer(src)
    model = data.load_model(src, "lm")
    cfg = demo.DemoConfig(model="smollm2", data="bbc", steps=1, batch_size=4, max_length=128,
                          eval_size=4, seed=0)
    n, take, _, _ = demo._prepare(demo.Resolved(cfg, "lm", src, 0), tokenizer)
    model(**next(iter(demo._batches(n, take, 1, 4, 0)))).loss.backward()
    params = [p.detach() for p in model.parameters()]  # the tied embedding once
    grads = [p.grad for p in model.parameters()]
    idx = ops.select_topk(grads, _numel(grads) // 10)
    return params, grads, idx


def test_adamw_fused_torch_smollm2(benchmark, smollm2):
    params, grads, _ = smollm2
    opt = _fused_adamw(params, grads)
    n = _numel(params)
    _run(benchmark, opt.step, group="adamw smollm2",
         name="torch.optim.AdamW(fused=True).step() SmolLM2-135M", nbytes=28 * n, elements=n)


def test_adamw_indexed_topk_smollm2(benchmark, smollm2):
    params, dense_grads, idx = smollm2
    params = [p.clone() for p in params]
    grads = [g.view(-1)[i.long()] for g, i in zip(dense_grads, idx)]
    ms = [torch.zeros(i.numel()) for i in idx]
    vs = [torch.zeros(i.numel()) for i in idx]
    k = _numel(idx)
    step = iter(range(1, 10**6))
    fn = lambda: ops.masked_adamw_(params, grads, ms, vs, idx, next(step), **HYPER)
    _run(benchmark, fn, group="adamw smollm2",
         name="masked_adamw_ indexed 10% fp32, top 10% |g| of SmolLM2-135M",
         nbytes=k * (8 + 4 + 16 + 4), elements=k,
         pair="torch.optim.AdamW(fused=True).step() SmolLM2-135M")


# ---------------------------------------------------------------------------- param_stats


def test_foreach_norm_torch(benchmark, model):
    params = model[0]
    n = _numel(params)
    _run(benchmark, lambda: torch._foreach_norm(params), group="param_stats",
         name="torch._foreach_norm", nbytes=4 * n, elements=n)


def test_param_stats_ours(benchmark, model):
    params = model[0]
    n = _numel(params)
    _run(benchmark, lambda: ops.param_stats(params), group="param_stats",
         name="param_stats (sumsq + absmax + histogram)", nbytes=4 * n, elements=n,
         pair="torch._foreach_norm")


def test_param_stats_no_histogram(benchmark, model):
    """What NTO's step uses for its norm and non-finite check."""
    params = model[0]
    n = _numel(params)
    _run(benchmark, lambda: ops.param_stats(params, histogram=False), group="param_stats",
         name="param_stats, histogram=False (sumsq + absmax)", nbytes=4 * n, elements=n,
         pair="torch._foreach_norm")


# ---------------------------------------------------------------------------- select_topk


def test_topk_torch(benchmark, model):
    scores = model[1]
    flat = torch.cat([g.view(-1) for g in scores]).abs()  # the same |values|, concatenated
    k = flat.numel() // 10
    _run(benchmark, lambda: torch.topk(flat, k, sorted=False), group="select_topk",
         name="torch.topk(|concat|, 10%)", nbytes=4 * flat.numel(), elements=flat.numel())


def test_select_topk_ours(benchmark, model):
    scores = model[1]
    n = _numel(scores)
    _run(benchmark, lambda: ops.select_topk(scores, n // 10), group="select_topk",
         name="select_topk (10%)", nbytes=4 * n, elements=n, pair="torch.topk(|concat|, 10%)")
