"""Issue 21: order="importance" under block and sample spends more periods where the
gradient is large (nto_ext/policies/scheduled.py), while every unit trains within a
bounded number of steps, and resumes bit-exactly."""

import pytest
import torch
from test_rows import build, run, wide_llama
from tiny import (
    one_thread,  # noqa: F401  (autouse fixture)
    roundtrip,
)

from nto_ext.policies.scheduled import MAX_REPEAT


def _periods(opt, cycle: int) -> list[tuple[str, ...]]:
    return [tuple(u.name for u in p) for p in opt.policy.schedule(cycle)]


@pytest.mark.parametrize("policy", ["block", "sample"])
def test_scores_are_the_squared_gradient_norms_and_repeat_large_periods(policy, monkeypatch):
    """observe() gets |g|^2 of each active param (the compact rows' for a range) at the
    first step of each period; cycle 1 repeats each period of its usual schedule in a row,
    more where the norm is larger, 1..MAX_REPEAT times."""
    model = wide_llama()
    opt = build(model, lr=1e-2, budget="10%", policy=policy, switch_every=2, seed=1,
                order="importance")
    seen: list[tuple[int, dict[int, float]]] = []
    observe = opt.policy.observe

    def spy(step, sq):
        seen.append((step, dict(sq)))
        expect = {i: float(g.double().pow(2).sum()) for i, g in _active_grads(opt)}
        assert sq.keys() == expect.keys()
        for i, v in sq.items():
            assert v == pytest.approx(expect[i], rel=1e-5), opt.table.label(i)
        observe(step, sq)

    monkeypatch.setattr(opt.policy, "observe", spy)
    usual = _periods(opt, 0)
    cycle0 = opt.policy.cycle_steps(0)
    run(model, opt, range(cycle0))
    assert [s for s, _ in seen] == list(range(0, cycle0, 2))  # first step of each period
    names = {u.name for u in opt.policy.units}
    assert set(opt.policy.state_dict()["scores"]) == names
    weighted = _periods(opt, 1)
    base = [p for k, p in enumerate(weighted) if k == 0 or p != weighted[k - 1]]
    if policy == "block":  # block keeps its order; repeats are consecutive
        assert base == usual
    assert sorted(map(sorted, base)) == sorted(map(sorted, _usual(opt, 1)))
    reps = [sum(1 for q in weighted if q == p) for p in base]
    norms = [sum(opt.policy.state_dict()["scores"][n] for n in p) for p in base]
    assert 1 <= min(reps) < max(reps) <= MAX_REPEAT
    assert reps[norms.index(max(norms))] == max(reps)
    assert reps[norms.index(min(norms))] == min(reps)
    opt.remove_hooks()


def _usual(opt, cycle: int) -> list[tuple[str, ...]]:
    return [tuple(u.name for u in p) for p in opt.policy._make_schedule(cycle)]


def _active_grads(opt):
    compact = {i: buf for i, (_, buf) in opt.updater.compact.items()}
    for i in sorted(opt.active_set):
        g = compact.get(i, opt.table.params[i].grad)
        if g is not None:
            yield i, g


@pytest.mark.parametrize("budget", ["1%", "10%", "25%"])
@pytest.mark.parametrize("policy", ["block", "sample"])
def test_every_element_changes_within_the_bound(policy, budget):
    """Every unit trains once a cycle, and a cycle is at most MAX_REPEAT usual ones: in
    cycle 0 + cycle 1 every element changes, within (1 + MAX_REPEAT) usual cycles."""
    model = wide_llama()
    opt = build(model, lr=1e-2, budget=budget, policy=policy, switch_every=1, seed=3,
                order="importance")
    usual = opt.policy.cycle_steps(0)
    changed = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for step in range(usual):
        _mark(model, opt, step, changed)
    end = usual + opt.policy.cycle_steps(1)  # cycle 1's length is known at its start
    assert end <= (1 + MAX_REPEAT) * usual
    for step in range(usual, end):
        _mark(model, opt, step, changed)
    missed = [n for n, c in changed.items() if not c.all()]
    assert not missed, missed
    opt.remove_hooks()


def _mark(model, opt, step: int, changed: dict) -> None:
    """One step; mark the elements it changed (compared step by step: a later update can
    undo an earlier one exactly, Adam's first steps being +-lr)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(model, opt, range(step, step + 1))
    for n, p in model.named_parameters():
        changed[n] |= p.detach() != before[n]


@pytest.mark.parametrize("on_switch", ["drop", "offload"])
@pytest.mark.parametrize("policy", ["block", "sample"])
def test_resume_bit_exact_in_a_weighted_cycle(policy, on_switch):
    """A state saved inside cycle 1 (whose schedule came from cycle 0's scores) resumes in
    a fresh optimizer bit for bit, through the start of cycle 2 (new scores)."""
    kw = dict(lr=1e-2, budget="10%", policy=policy, switch_every=2, seed=5,
              order="importance", state_on_switch=on_switch)
    straight = wide_llama()
    opt = build(straight, **kw)
    c0 = opt.policy.cycle_steps(0)
    run(straight, opt, range(c0))
    steps = c0 + opt.policy.cycle_steps(1) + 6
    run(straight, opt, range(c0, steps))

    first = wide_llama()
    o1 = build(first, **kw)
    cut = c0 + 3  # inside cycle 1, one step into a period
    run(first, o1, range(cut))
    sd = roundtrip(o1.state_dict())
    assert sd["nto"]["config"]["order"] == "importance"
    resumed = wide_llama(seed=9)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    o2 = build(resumed, **kw)
    o2.load_state_dict(sd)
    run(resumed, o2, range(cut, steps))
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert roundtrip(o2.state_dict())["nto"] == roundtrip(opt.state_dict())["nto"]


def test_a_saved_state_with_foreign_scores_or_order_is_refused():
    kw = dict(lr=1e-2, budget="10%", switch_every=1, order="importance")
    model = wide_llama()
    opt = build(model, **kw)
    run(model, opt, range(opt.policy.cycle_steps(0) + 1))
    sd = roundtrip(opt.state_dict())
    fresh = build(wide_llama(), **kw)
    before = roundtrip(fresh.state_dict())
    bad = {**sd, "nto": {**sd["nto"], "policy_state": {
        **sd["nto"]["policy_state"], "scores": {"no.such.unit": 1.0}}}}
    with pytest.raises(ValueError, match=r"policy state 'scores' must map unit names of "
                       r"this model to finite floats >= 0 \(order='importance'\)"):
        fresh.load_state_dict(bad)
    nan = {**sd, "nto": {**sd["nto"], "policy_state": {
        **sd["nto"]["policy_state"], "plans": {0: {"embed": float("nan")}}}}}
    with pytest.raises(ValueError, match=r"policy state 'plans\[0\]' must map"):
        fresh.load_state_dict(nan)
    assert roundtrip(fresh.state_dict()) == before  # nothing was loaded
    plain = build(wide_llama(), lr=1e-2, budget="10%", switch_every=1)
    with pytest.raises(ValueError, match=r"order: saved 'importance', here 'ascending'"):
        plain.load_state_dict(sd)


def test_looking_back_more_than_a_cycle_is_refused_clearly():
    model = wide_llama()
    opt = build(model, lr=1e-2, budget="25%", switch_every=1, order="importance")
    c0 = opt.policy.cycle_steps(0)
    run(model, opt, range(c0 + opt.policy.cycle_steps(1) + 1))  # into cycle 2
    assert opt.policy.active(c0) is not None  # the previous cycle: kept
    with pytest.raises(ValueError, match=r"order='importance': period 0 is before cycle 1"):
        opt.policy.active(0)
