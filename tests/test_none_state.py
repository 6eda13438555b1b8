"""state_dtype="none" (formats/none.py) and its op, adamw_first_step_: the first update of
a fresh AdamW state, no moments read or kept. What block and sample with a switch every
step do to a param anyway, in a third of the bytes per element."""

from __future__ import annotations

import pytest
import test_reliability as rel
import torch
from hypothesis import given
from test_int8 import (
    BF16,
    HAS_KERNELS,
    SIZES,
    _normal,
    check_resume_in_a_fresh_process,
    cpu_variant_outputs,
    needs_kernels,
)

from nto_ext import NTO, _reference, ops

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
DTYPES = [(torch.float32, torch.float32), (BF16, BF16), (BF16, torch.float32),
          (torch.float16, torch.float16), (torch.float16, torch.float32)]


def _fresh_adamw(p, g, hyper=HYPER):
    """masked_adamw_ on zero fp32 moments at step 1: the definition."""
    p = p.clone()
    zeros = [torch.zeros(p.numel()) for _ in "mv"]
    ops.masked_adamw_([p], [g], [zeros[0]], [zeros[1]], [None], 1, **hyper)
    return p


def _first(p, g, hyper=HYPER):
    p = p.clone()
    ops.adamw_first_step_([p], [g], **hyper)
    return p


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@needs_kernels
@pytest.mark.parametrize("dtype,gdtype", DTYPES)
@pytest.mark.parametrize("beta1,wd", [(0.9, 0.1), (0.3, 0.0), (0.0, 0.01)])
def test_kernel_equals_adamw_on_a_fresh_state_bitwise(dtype, gdtype, beta1, wd):
    """Every size (vector tails, past one work item), both lerp formulas (beta1 below and
    above 0.5), with and without decay: the param's bits are masked_adamw_'s on zero
    moments at step 1 (for a grad of another dtype than a low-precision param: the grad
    rounded to the param's dtype is what masked_adamw_ takes, so only same-dtype pairs and
    fp32 params are compared with it; the rest with the reference below)."""
    hyper = {**HYPER, "beta1": beta1, "weight_decay": wd}
    for n in [0, *SIZES]:
        p = _normal(n, 1).to(dtype)
        g = (_normal(n, 2) * 1e-3).to(gdtype)
        got = _first(p, g, hyper)
        if gdtype == dtype or dtype == torch.float32:
            want = _fresh_adamw(p, g, hyper)
            assert torch.equal(_bits(got), _bits(want)), (n, dtype, gdtype)
        ref = p.clone()
        _reference.adamw_first_step_([ref], [g], *hyper.values())
        # the reference runs torch's ops, whose fp32 rounding differs by an ulp or two
        fp32 = dtype == torch.float32
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-6 if fp32 else 8e-3,
                                   atol=1e-8 if fp32 else 1e-5)


def test_reference_is_adamw_on_a_fresh_state():
    """The spec against torch.optim.AdamW's own first step (fp32, one param)."""
    p = torch.nn.Parameter(_normal(1000, 3))
    q = p.detach().clone()
    p.grad = _normal(1000, 4)
    torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1, foreach=False).step()
    _reference.adamw_first_step_([q], [p.grad], *HYPER.values())
    torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)


def test_update_is_sign_descent_with_decay():
    """m_hat = g and v_hat = g^2: each element moves by lr (times (1 - lr wd) decay) in
    the direction of -g, whatever |g| (much larger than eps)."""
    p = torch.zeros(6) + 1.0
    g = torch.tensor([1e-3, -1e-3, 5.0, -5.0, 1e-2, 0.0])
    ops.adamw_first_step_([p], [g], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.5)
    want = torch.tensor([0.95 - 0.1, 0.95 + 0.1, 0.85, 1.05, 0.85, 0.95])
    torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)


VARIANT = r"""
import hashlib, torch
from test_int8 import SIZES, _normal
from nto_ext import ops
h = hashlib.sha256()
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for n in SIZES:
        p, g = _normal(n, 1).to(dt), (_normal(n, 2) * 1e-3).to(dt)
        ops.adamw_first_step_([p], [g], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.1)
        h.update(p.view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@needs_kernels
def test_every_cpu_variant_and_thread_count_gives_the_same_bits():
    assert len(set(cpu_variant_outputs(VARIANT).values())) == 1
    n = 3 * 65536 + 5
    p, g = _normal(n, 5), _normal(n, 6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _first(p, g)
        torch.set_num_threads(2)
        two = _first(p, g)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("params,grads,err,msg", [
    ([torch.zeros(5)], [torch.zeros(5, dtype=BF16)], TypeError,
     r"grads\[0\] has dtype torch.bfloat16 but params\[0\] has torch.float32; allowed: "
     r"torch.float32$"),
    ([torch.zeros(5, dtype=BF16)], [torch.zeros(5, dtype=torch.float16)], TypeError,
     "allowed: torch.bfloat16 or torch.float32"),
    ([torch.zeros(5)], [torch.zeros(4)], ValueError,
     r"grads\[0\] has 4 elements; allowed: 5 \(params\[0\] has 5\)"),
    ([torch.zeros(5)], [], ValueError, "got 1 params but 0 grads"),
    ([torch.zeros(4, 2).t()], [torch.zeros(2, 4)], ValueError, r"params\[0\] is not contiguous"),
    ([torch.zeros(5, dtype=torch.float64)], [torch.zeros(5)], TypeError,
     r"params\[0\] has dtype torch.float64"),
])
def test_bad_input_is_named_alike_by_kernel_and_reference(params, grads, err, msg):
    impls = [_reference.adamw_first_step_]
    if HAS_KERNELS:
        impls.append(torch.ops.nto.adamw_first_step_.default)
    for fn in impls:
        before = [p.clone() for p in params]
        with pytest.raises(err, match=msg):
            fn(params, grads, *HYPER.values())
        assert all(torch.equal(a, b) for a, b in zip(params, before))
    for key, bad in (("lr", -1.0), ("beta1", 1.0), ("eps", float("nan"))):
        with pytest.raises(ValueError, match=f"adamw_first_step_: {key}="):
            ops.adamw_first_step_([torch.zeros(3)], [torch.zeros(3)], **{**HYPER, key: bad})


@needs_kernels
def test_the_kernel_refuses_a_grad_sharing_the_params_memory():
    buf = torch.zeros(10)
    with pytest.raises(ValueError, match="adamw_first_step_"):
        ops.adamw_first_step_([buf[:6]], [buf[4:]], **HYPER)


def test_fake_tensors_trace_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ops.adamw_first_step_([torch.zeros(8)], [torch.zeros(8)], **HYPER)
        with pytest.raises(ValueError, match="has 7 elements"):
            ops.adamw_first_step_([torch.zeros(8)], [torch.zeros(7)], **HYPER)


# --------------------------------------------------------------------- the format in NTO


def _named(seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(f"layers.{i}.w{j}", torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)))
            for i in range(6) for j, s in enumerate([(40, 30), (30,), (700,)])]


def _grads(named, step):
    g = torch.Generator().manual_seed(step)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def test_each_step_equals_sample_with_fp32_moments_where_no_param_repeats():
    """On the elements it trains, a run with no moments is the fp32 run with a switch every
    step: the same draws (given the same elements per period) and, for a param that was not
    active the step before, the same bits; a param drawn two steps in a row restarts."""
    a, b = _named(), _named()
    kw = dict(lr=1e-2, policy="sample", switch_every=1, seed=3)
    none = NTO(a, budget="30%", state_dtype="none", **kw)
    fp32 = NTO(b, budget="30%", **kw)
    assert [none.policy.active(s) for s in range(12)] == [fp32.policy.active(s)
                                                          for s in range(12)]
    prev: frozenset[int] = frozenset()
    compared = 0
    for step in range(12):
        active = none.active_set
        before = [p.detach().clone() for _, p in a]
        for named in (a, b):
            _grads(named, step)
        none.step()
        fp32.step()
        none.zero_grad()
        fp32.zero_grad()
        for i, ((_, p), (_, q)) in enumerate(zip(a, b)):
            if i not in active:
                assert torch.equal(p, before[i])
            elif i not in prev:  # a fresh state in both runs
                assert torch.equal(p, q), (step, i)
                compared += 1
            with torch.no_grad():
                q.copy_(p)  # the next step starts from the same weights
        prev = active
    assert compared >= 20


def test_memory_model_and_report_count_the_gradient_only():
    named = _named()
    total = sum(p.numel() for _, p in named)
    opt = NTO(named, lr=1e-2, budget="30%", policy="block", switch_every=1, state_dtype="none")
    assert opt.policy.bytes_per_element(torch.float32) == 4
    for step in range(4):
        _grads(named, step)
        active = opt.active_set
        for i, (_, p) in enumerate(named):
            if i not in active:  # as a backward through frozen params leaves them
                p.grad = None
        opt.step()
        rep = opt.memory_report()
        assert rep["state_bytes"] == 0  # the trained set's step scalars went with the switch
        trained = sum(named[i][1].numel() for i in active)
        assert 4 * trained <= rep["peak_total_bytes"] <= rep["budget_bytes"]
        opt.zero_grad()
    # fp32 state's bytes at 10% hold 3x the elements
    fp32 = NTO(_named(), budget="10%", policy="sample", switch_every=1)
    bytes_10 = fp32.memory_report()["budget_bytes"]
    none = NTO(_named(), budget=f"{bytes_10}B", policy="sample", switch_every=1,
               state_dtype="none")
    assert none.policy.budget_elements() >= 2.9 * 0.1 * total


@pytest.mark.parametrize("kind", rel.KINDS)
@pytest.mark.parametrize("policy", ["block", "sample"])
@rel.RUN_SETTINGS
@given(run=rel.budget_runs(widths=(1, 8)))
def test_budget_invariant_without_moments(policy, kind, run):
    """test_reliability's invariant (measured storage within the budget at every point)
    with state_dtype="none" (a switch every step), fp32 params and a bf16/fp32 mix, whole
    tensors and ranges of rows."""
    torch.set_num_threads(1)
    for name, dtype, fmt in (("none", torch.float32, {}),
                             ("none-mixed", None, {"master_weights": False})):
        rel.DTYPES[name] = dtype
        rel.FORMAT_ARGS[name] = {"state_dtype": "none", "switch_every": 1, **fmt}
        try:
            rel._budget_run(policy, kind, name, run)
        finally:
            del rel.DTYPES[name], rel.FORMAT_ARGS[name]


@pytest.mark.parametrize("policy", ["sample", "block"])
@pytest.mark.parametrize("budget", ["40%", "10%"])  # 10%: (40, 30) tensors in row ranges
def test_resume_in_a_fresh_process_is_bit_exact(tmp_path, policy, budget):
    opt = check_resume_in_a_fresh_process(tmp_path, dict(lr=1e-2, budget=budget, switch_every=1,
                                                         state_dtype="none", policy=policy),
                                          offloads=False)
    assert bool(opt.policy.split) == (budget == "10%")


def test_a_checkpoint_of_another_state_dtype_is_refused():
    a = NTO(_named(), budget="30%", policy="sample", switch_every=1, state_dtype="none")
    b = NTO(_named(), budget="30%", policy="sample", switch_every=1)
    with pytest.raises(ValueError, match="state_dtype"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="state_dtype"):
        a.load_state_dict(b.state_dict())


def test_torch_adamw_state_imports_without_its_moments():
    named = _named()
    adamw = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    _grads(named, 0)
    adamw.step()
    opt = NTO(named, lr=1e-2, budget="100%", policy="block", switch_every=1,
              state_dtype="none")
    opt.load_state_dict(adamw.state_dict())
    assert all(list(st) == ["step"] and float(st["step"]) == 1.0 for st in opt.state.values())


@pytest.mark.parametrize("kw,msg", [
    ({"policy": "sample"}, r"state_dtype='none' with switch_every=50; allowed: "
     "switch_every=1"),
    ({"policy": "block", "switch_every": 2}, "with switch_every=2; allowed: switch_every=1"),
    ({"policy": "sparse", "switch_every": 1}, "state_dtype='none' with policy='sparse'; "
     "allowed here: 'fp32', 'int8' or 'bf16'"),
    ({"policy": "sample", "switch_every": 1, "state_on_switch": "offload"},
     "state_on_switch='offload' with state_dtype='none'; allowed: 'drop'"),
    ({"policy": "sample", "switch_every": 1, "master_weights": True},
     "state_dtype='none' with master_weights=True; allowed: one of them"),
])
def test_bad_arguments_are_refused_before_anything_changes(kw, msg):
    params = [torch.nn.Parameter(torch.zeros(300)) for _ in range(2)]
    with pytest.raises(ValueError, match=msg):
        NTO(params, budget="50%", state_dtype="none", **kw)
    assert all(not p._post_accumulate_grad_hooks for p in params)


def test_bf16_params_need_master_weights_false_and_are_rounded_to_nearest():
    params = _named(dtype=BF16)
    with pytest.raises(ValueError, match="pass master_weights=False"):
        NTO(params, budget="30%", policy="sample", switch_every=1, state_dtype="none")
    opt = NTO(params, lr=1e-2, weight_decay=0.1, budget="30%", policy="sample",
              switch_every=1, state_dtype="none", master_weights=False)
    before = [p.detach().clone() for _, p in params]
    _grads(params, 0)
    grads = [p.grad for _, p in params]
    active = opt.active_set
    opt.step()
    for i, (_, p) in enumerate(params):
        if i in active:
            assert torch.equal(p.detach(), _first(before[i], grads[i])), i
        else:
            assert torch.equal(p.detach(), before[i])



def test_plan_prices_the_gradient_only(tmp_path, capsys):
    """`nto plan --state-dtype none --switch-every 1`: 4 B per fp32 element (the gradient)
    plus the step scalars; without a switch every step it is refused, naming the fix."""
    import json

    from test_cli import _in_process, _one_line_error, _tiny_llama

    from nto_ext import cli

    folder = _tiny_llama(tmp_path)
    args = ["plan", "--model", folder, "--budget", "10400", "--json", "--state-dtype", "none"]
    assert cli.main([*args, "--switch-every", "1"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["nto_bytes"] == 10336 * 4 + 10 * 4  # the largest group (test_cli's known answer)
    line = _one_line_error(_in_process(capsys, *args), "plan")
    assert "state_dtype='none' with switch_every=50; allowed: switch_every=1" in line
