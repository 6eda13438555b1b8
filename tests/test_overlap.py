"""Arguments that share memory are refused by the compiled kernels before anything is written
(issue 20): the kernels update params and state in parallel and read grads through restrict
pointers (on CUDA through the non-coherent cache), so a tensor an op writes may not overlap
any other argument. Read-only arguments may share memory, and so may params of indexed
entries (the sparse policy passes a param once per cohort, each writing its own positions).
The host check is shared by the CPU and CUDA kernels (csrc/checks.h); here through the CPU
build (tests/test_cuda_emu.py and tests/test_cuda.py run the CUDA side)."""

from __future__ import annotations

import pytest
import torch

from nto_ext import ops

pytestmark = pytest.mark.skipif(ops.backend() == "reference",
                                reason="compiled extension not loaded")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _entries(n, indexed=False, size=12):
    gen = torch.Generator().manual_seed(0)
    length = 3 if indexed else size
    return dict(params=[torch.randn(size, generator=gen) for _ in range(n)],
                grads=[torch.randn(length, generator=gen) for _ in range(n)],
                exp_avgs=[torch.zeros(length) for _ in range(n)],
                exp_avg_sqs=[torch.zeros(length) for _ in range(n)],
                indices=[torch.tensor([1, 4, 7]) if indexed else None for _ in range(n)],
                steps=[torch.tensor([1.0], dtype=torch.float64)] * n)


def _adamw(a):
    torch.ops.nto.masked_adamw_(*a.values(), *HYPER.values())


def _written(a):
    return [t.clone() for t in a["params"] + a["exp_avgs"] + a["exp_avg_sqs"]]


ALIASED = {  # name: (change to 2 dense entries, the pair the error names)
    "exp_avg is exp_avg_sq": (lambda a: a["exp_avg_sqs"].__setitem__(1, a["exp_avgs"][1]),
                              r"exp_avgs\[1\] and exp_avg_sqs\[1\] share memory; tensors the "
                              r"op writes must not overlap"),
    "same param twice": (lambda a: a["params"].__setitem__(1, a["params"][0]),
                         r"params\[0\] and params\[1\] share memory"),
    "grad is its param": (lambda a: a["grads"].__setitem__(0, a["params"][0].view(-1)),
                          r"params\[0\] and grads\[0\] share memory; a tensor the op writes "
                          r"and one it reads must not overlap"),
    "state overlaps another's": (lambda a: a["exp_avgs"].__setitem__(
        1, a["exp_avg_sqs"][0].view(-1)[0:12]), r"exp_avg_sqs\[0\] and exp_avgs\[1\]"),
    "partial overlap": (lambda a: (lambda buf: (a["exp_avgs"].__setitem__(0, buf[0:12]),
                                                a["exp_avgs"].__setitem__(1, buf[11:23])))(
        torch.zeros(23)), r"exp_avgs\[0\] and exp_avgs\[1\] share memory"),
    "grad overlaps another param": (lambda a: a["grads"].__setitem__(1, a["params"][0]),
                                    r"params\[0\] and grads\[1\] share memory"),
}


@pytest.mark.parametrize("case", list(ALIASED))
def test_overlapping_written_arguments_are_refused_before_any_write(case):
    change, match = ALIASED[case]
    a = _entries(2)
    change(a)
    before = _written(a)
    with pytest.raises(ValueError, match=r"^masked_adamw_: " + match):
        _adamw(a)
    assert all(torch.equal(x, y) for x, y in zip(_written(a), before))


def test_adjacent_slices_and_shared_read_only_arguments_are_allowed():
    a = _entries(2)
    buf = torch.zeros(24)  # adjacent, not overlapping
    a["exp_avgs"] = [buf[:12], buf[12:]]
    g = a["grads"][0]
    a["grads"] = [g, g]  # read twice: fine
    _adamw(a)
    assert buf.any()


def test_a_param_repeated_across_indexed_cohorts_is_allowed():
    a = _entries(2, indexed=True)
    a["params"][1] = a["params"][0]
    a["indices"][1] = torch.tensor([0, 5, 11])  # disjoint from [1, 4, 7]: the caller's contract
    want = a["params"][0].clone()
    _adamw(a)
    assert not torch.equal(a["params"][0], want)
    b = _entries(2, indexed=True)  # a repeated param with one dense entry: refused
    b["params"][1] = b["params"][0]
    b["indices"][1] = None
    b["grads"][1], b["exp_avgs"][1], b["exp_avg_sqs"][1] = (torch.zeros(12) for _ in range(3))
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        _adamw(b)


def test_gather_accumulate_refuses_overlapping_outputs():
    c = torch.zeros(4)
    dense = torch.ones(8)
    torch.ops.nto.gather_accumulate_([dense, dense], [torch.tensor([1, 2])] * 2,
                                     [c[0:2], c[2:4]])  # shared inputs: fine
    assert c.tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"^gather_accumulate_: compact\[0\] and compact\[1\] "
                                         r"share memory"):
        torch.ops.nto.gather_accumulate_([dense, dense], [torch.tensor([1, 2])] * 2,
                                         [c[0:2], c[1:3]])
    with pytest.raises(ValueError, match=r"dense\[0\] and compact\[0\] share memory"):
        torch.ops.nto.gather_accumulate_([c], [torch.tensor([1])], [c[2:3]])
    assert c.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_many_entries_are_checked_fast_and_the_first_pair_is_named():
    """The check sorts byte ranges (n log n); with 2000 entries it must not be quadratic,
    and the error still names the first clashing pair in argument order."""
    a = _entries(2000, size=4)
    _adamw(a)  # no overlap: passes
    a["exp_avgs"][1500] = a["params"][20]
    a["exp_avgs"][1999] = a["params"][10]
    with pytest.raises(ValueError, match=r"params\[10\] and exp_avgs\[1999\]|params\[20\] and "
                                         r"exp_avgs\[1500\]") as e:
        _adamw(a)
    assert "params[20] and exp_avgs[1500]" in str(e.value)
