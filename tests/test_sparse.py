"""policy="sparse" (nto_ext/policies/sparse.py): the memory bound, AdamW at
K = every element, exact gradient accumulation, the scoring rule, regrowth carrying
moments bit for bit, state_dict, bad inputs and the plan. Fresh-process resume is in
test_resume.py."""

import math

import pytest
import torch
from tiny import (
    batch,
    llama_config,
    one_thread,  # noqa: F401  (autouse fixture)
    roundtrip,
    three_groups,
    tiny_llama,
    train_step,
)

from nto_ext import NTO, ops, plan

N_ELEMENTS = 45_344
LARGEST_DENSE = 4096 * 4  # the tiny Llama's embedding / LM head gradient, fp32 bytes


def sparse(model, **kw) -> NTO:
    kw.setdefault("lr", 1e-2)
    return NTO(model.named_parameters(), policy="sparse", **kw)


def measured(opt: NTO) -> int:
    """grad + state + index bytes from the tensors themselves: dense .grad, the compact
    gradients and scoring candidates, every state tensor; each storage once."""
    tensors = [p.grad for p in opt.table.params if p.grad is not None]
    tensors += list(opt.updater.compact.values())
    tensors += [t for lst in opt.updater.cands.values() for c in lst for t in c]
    tensors += [v for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def chosen(opt: NTO) -> dict[int, torch.Tensor]:
    """Chosen positions by param index, sorted (state keeps them in cohorts)."""
    return {opt.table.index[p]: st["indices"].sort().values for p, st in opt.state.items() if st}


def element_steps(st) -> torch.Tensor:
    """Each chosen element's update count (its cohort's)."""
    return torch.repeat_interleave(torch.tensor(st["step"]), torch.tensor(st["sizes"]))


def test_state_layout_is_cohorts_of_sorted_positions():
    """16 B of tensors per chosen element: compact grad + two moments + index; step counts
    per cohort (the elements grown at one regrowth) as lists of host ints."""
    model = tiny_llama()
    opt = sparse(model, budget="10%", switch_every=2)
    for step in range(7):
        train_step(model, opt, step)
    cohorts = 0
    for st in opt.state.values():
        assert all(type(v) is int for v in st["step"] + st["sizes"])
        assert len(st["step"]) == len(st["sizes"]) and sum(st["sizes"]) == st["indices"].numel()
        start = 0
        for n in st["sizes"]:
            seg = st["indices"][start:start + n]
            assert bool((seg[1:] > seg[:-1]).all())
            start += n
        cohorts += len(st["step"])
    assert cohorts > len(opt.state)  # regrowths made new cohorts
    assert opt.memory_report()["state_bytes"] == 8 * opt.updater.count()


# ----------------------------------------------------------------------- memory bound


@pytest.mark.parametrize("budget,k", [("0.1%", 45), ("1%", 453), ("10%", 4534)])
def test_memory_within_budget_plus_one_dense_gradient_at_every_point(budget, k):
    """Checked after every gradient accumulation (a hook after NTO's) and after every
    step, over scoring steps, regrowths and plain steps, 2 micro-batches per step."""
    model = tiny_llama()
    opt = sparse(model, budget=budget, switch_every=3)
    limit = opt.budget_bytes()
    assert limit == k * 16 and opt.policy.k == k
    seen = []

    def check(_p=None):
        seen.append(measured(opt))
        assert seen[-1] <= limit + LARGEST_DENSE, (opt.step_count, seen[-1], limit)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(check)
    for step in range(8):
        for micro in range(2):
            x = batch(2 * step + micro)
            (model(input_ids=x, labels=x).loss / 2).backward()
        opt.step()
        check()
        rep = opt.memory_report()
        assert rep["total_bytes"] == measured(opt) <= limit
        assert rep["peak_total_bytes"] <= limit  # the step's peak, candidates included
        assert rep["transient_bytes"] <= 2 * LARGEST_DENSE
        assert rep["trainable_elements"] == opt.updater.count() <= k
        # K chosen after every step but the one before a regrowth (slots freed for it)
        want = k - opt.policy.regrow if (step + 1) % 3 == 0 else k
        assert rep["trainable_elements"] == want, (step, rep["trainable_elements"], want)
        assert rep["state_bytes"] == 8 * want and rep["index_bytes"] == 4 * want
        opt.zero_grad()
    assert len(seen) > 3 * 2 * 39 and max(seen) <= limit + LARGEST_DENSE  # 3 scoring steps


def test_dense_gradients_are_freed_in_backward_and_inactive_params_frozen():
    model = tiny_llama()
    opt = sparse(model, budget="1%", switch_every=4)
    for step in range(6):
        x = batch(step)
        model(input_ids=x, labels=x).loss.backward()
        assert all(p.grad is None for p in model.parameters())  # compact copies only
        scoring = step % 4 == 0
        holding = {opt.table.index[p] for p, st in opt.state.items() if st}
        for i, p in enumerate(opt.table.params):
            assert p.requires_grad == (scoring or i in holding or i == opt.anchor), (step, i)
        assert (opt.updater.cands != {}) == scoring
        opt.step()
        opt.zero_grad()
    assert opt.memory_report()["transient_bytes"] == LARGEST_DENSE
    assert 0 < len(opt.active()) < 39 and opt.active_blocks() == opt.active()


# ----------------------------------------------------------------------- AdamW at 100%


@pytest.mark.parametrize("clip", [None, 0.5])
def test_every_element_chosen_equals_adamw(clip):
    """K = every element: no scoring step, every element updated every step, three param
    groups (decay / no decay / own lr); with clipping, as clip_grad_norm_ + AdamW."""
    ref, mine = tiny_llama(), tiny_llama()
    ropt = torch.optim.AdamW(three_groups(ref, named=False), lr=1e-2, weight_decay=0.1)
    opt = NTO(three_groups(mine), lr=1e-2, weight_decay=0.1, budget="100%",
              policy="sparse", max_grad_norm=clip)
    for step in range(6):
        x = batch(step)
        ref(input_ids=x, labels=x).loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ropt.step()
        ropt.zero_grad()
        mine(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if clip is not None:
            assert opt.last_grad_norm == pytest.approx(float(norm), rel=1e-5)
    for a, b in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    assert opt.memory_report()["trainable_elements"] == N_ELEMENTS
    assert all(st["step"] == [6] for st in opt.state.values())


# ----------------------------------------------------------------------- accumulation


def _accumulate(budget: str, micro: int) -> list[torch.Tensor]:
    model = tiny_llama()
    opt = sparse(model, budget=budget, switch_every=100)
    for step in range(6):
        x = batch(step, size=8)
        # step 0 chooses the elements (same single backward in both runs: scoring under
        # accumulation sums each element from the micro-batch it became a candidate in)
        parts = 1 if step == 0 else micro
        for chunk in x.chunk(parts):
            (model(input_ids=chunk, labels=chunk).loss / parts).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("budget", ["100%", "10%"])
def test_accumulation_over_4_micro_batches_equals_one_4x_batch(budget):
    big, small = _accumulate(budget, 1), _accumulate(budget, 4)
    moved = sum(int((a != b).any()) for a, b in zip(big, tiny_llama().parameters()))
    assert moved > 5
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------- selection rules


def _dense_grads(model, x) -> list[torch.Tensor]:
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def test_first_step_chooses_the_global_top_k_by_gradient_and_updates_them():
    """Step 0 chooses the top K by |g| and gives them AdamW's first step with that
    gradient (as torch's first step would); every other element is untouched."""
    model, ref = tiny_llama(), tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = sparse(model, budget="1%", weight_decay=0.1)
    train_step(model, opt, 0)
    grads = _dense_grads(ref, batch(0))
    want = ops.select_topk(grads, 453)
    got = chosen(opt)
    for i, w in enumerate(want):
        if w.numel():
            assert torch.equal(got[i], w), i
        else:
            assert i not in got
    for i, (a, p) in enumerate(zip(before, model.parameters())):
        pos = want[i].long()
        expect = a.clone()
        if pos.numel():  # the kernel on the chosen elements alone (test_ops: = the spec)
            ops.masked_adamw_([expect], [grads[i].reshape(-1)[pos]],
                                     [torch.zeros(pos.numel())], [torch.zeros(pos.numel())],
                                     [pos], [torch.ones(1)], lr=1e-2, beta1=0.9,
                                     beta2=0.999, eps=1e-8, weight_decay=0.1)
        assert torch.equal(p.detach(), expect), i
        assert int((p.detach() != a).sum()) == int((grads[i].reshape(-1)[pos] != 0).sum()), i
    assert all(st["step"] == [1] for st in opt.state.values())


def test_first_step_under_accumulation_chooses_and_waits():
    """Two backwards before step 0: the scores are partial sums (an element counts from
    the micro-batch where it became a candidate), not the step's gradient, so the chosen
    elements first train on the next step; step 1 then updates them with its exact sum."""
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = sparse(model, budget="1%")
    for chunk in batch(0, size=4).chunk(2):
        (model(input_ids=chunk, labels=chunk).loss / 2).backward()
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(st["step"] == [0] for st in opt.state.values())
    assert opt.memory_report()["trainable_elements"] == 453
    train_step(model, opt, 1)
    assert all(st["step"] == [1] for st in opt.state.values())
    assert sum(int((a != b).sum()) for a, b in zip(before, model.parameters())) > 400


def test_first_step_clips_over_the_chosen_elements():
    """max_grad_norm at step 0: the norm is that of the chosen elements' gradient (what
    the step updates), as clip_grad_norm_ over the compact gradients."""
    model, ref = tiny_llama(), tiny_llama()
    opt = sparse(model, budget="1%", max_grad_norm=1e-3)
    train_step(model, opt, 0)
    grads = _dense_grads(ref, batch(0))
    want = ops.select_topk(grads, 453)
    norm = math.sqrt(sum(float(g.reshape(-1)[w.long()].double().square().sum())
                         for g, w in zip(grads, want)))
    assert opt.last_grad_norm == pytest.approx(norm, rel=1e-5)
    assert all(st["step"] == [1] for st in opt.state.values())


def test_regrowth_drops_the_weakest_and_grows_the_top_free_gradients():
    """switch_every=2: steps 0 and 1 update, the end of 1 drops the weakest 10% by AdamW
    update size; step 2 grows the top |gradient| of the free elements and updates them
    with the kept ones (one backward: their first step, with the gradient that chose them)."""
    model = tiny_llama()
    opt = sparse(model, budget="1%", switch_every=2)
    train_step(model, opt, 0)
    x = batch(1)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()  # updates, then drops (the next step is a regrowth)
    # the weakest by |m_hat| / (sqrt(v_hat) + eps), every element has step 2 here
    kept = chosen(opt)
    assert sum(t.numel() for t in kept.values()) == 453 - 45
    opt.zero_grad()
    ref = tiny_llama()
    ref.load_state_dict(model.state_dict())
    grads = _dense_grads(ref, batch(2))
    for i, g in enumerate(grads):
        if i in kept:
            g.view(-1)[kept[i].long()] = 0  # chosen elements cannot be grown again
    grown = ops.select_topk(grads, 45)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, 2)
    after = chosen(opt)
    for i in set(after) | set(kept):
        old = kept.get(i, torch.zeros(0, dtype=torch.int32))
        new = set(after.get(i, old).tolist()) - set(old.tolist())
        assert new == set(grown[i].tolist()), i
    for p, st in opt.state.items():  # kept elements: their third update; grown: their first
        i = opt.table.index[p]
        is_new = torch.isin(st["indices"], grown[i])
        steps = element_steps(st)
        assert bool((steps[is_new] == 1).all()) and bool((steps[~is_new] == 3).all())
        moved = p.detach().reshape(-1) != before[i].reshape(-1)
        assert bool(moved[grown[i].long()].all()), i


def test_dropped_elements_are_the_weakest_by_update_size():
    """At the end of the step before a regrowth the 10% with the smallest AdamW update
    |m_hat| / (sqrt(v_hat) + eps) (each element's own bias corrections) are dropped."""
    model = tiny_llama()
    opt = sparse(model, budget="1%", switch_every=3)
    for step in range(2):
        train_step(model, opt, step)
    sizes = {}
    update = opt.updater.update

    def spy():  # runs inside step(), after the update and before the drop
        update()
        for p, st in opt.state.items():
            m, v, t = st["exp_avg"].double(), st["exp_avg_sq"].double(), element_steps(st).double()
            size = (m / (1 - 0.9**t)).abs() / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            sizes.update({(opt.table.index[p], int(j)): float(s)
                          for j, s in zip(st["indices"], size)})

    opt.updater.update = spy
    train_step(model, opt, 2)
    after = {(i, int(j)) for i, t in chosen(opt).items() for j in t}
    dropped = set(sizes) - after
    assert len(dropped) == 45 and after <= set(sizes)
    assert max(sizes[e] for e in dropped) <= min(sizes[e] for e in after) * (1 + 1e-5)


def test_regrowth_carries_kept_moments_bit_identically():
    """Every drop and every regrowth: kept elements' exp_avg, exp_avg_sq and step count
    are the same before and after (bits), new elements start at zero, dropped ones are
    gone."""
    model = tiny_llama()
    opt = sparse(model, budget="10%", switch_every=2)
    engine = opt.updater
    events = []

    def snapshot():
        out = {}
        for p, st in opt.state.items():
            rows = zip(st["indices"].tolist(), st["exp_avg"].view(torch.int32).tolist(),
                       st["exp_avg_sq"].view(torch.int32).tolist(), element_steps(st).tolist())
            out.update({(opt.table.index[p], j): rest for j, *rest in rows})
        return out

    def spied(fn):
        def run(*args, **kw):
            before = snapshot()
            fn(*args, **kw)
            after = snapshot()
            kept = before.keys() & after.keys()
            assert all(before[e] == after[e] for e in kept)
            assert all(after[e] == [0, 0, 0] for e in after.keys() - before.keys())
            events.append((len(kept), len(after.keys() - before.keys()),
                           len(before.keys() - after.keys())))
        return run

    engine.advance, engine._grow = spied(engine.advance), spied(engine._grow)
    for step in range(7):
        train_step(model, opt, step)
    assert any(k and new for k, new, _ in events)  # regrowths
    assert any(k and gone for k, _, gone in events)  # drops


def test_memory_is_flat_from_step_to_step():
    model = tiny_llama()
    opt = sparse(model, budget="5%", switch_every=1)
    totals, peaks = [], []
    for step in range(8):
        opt.reset_peak()
        train_step(model, opt, step)
        rep = opt.memory_report()
        totals.append(rep["total_bytes"])
        peaks.append(rep["peak_total_bytes"])
    k, r = opt.policy.k, opt.policy.regrow
    assert set(totals) == {12 * (k - r)}  # after each step: K - R chosen, grads used up
    assert set(peaks[1:]) == {16 * k}  # update: every chosen element's grad, grown ones too


# ----------------------------------------------------------------------- robustness


def test_nan_on_a_scoring_step_skips_the_update_but_regrows():
    """A NaN anywhere in a scoring step's dense gradients (here: the embedding's, by a
    tensor hook) skips the update under nonfinite="skip"; the regrowth still refills the
    chosen set (from the finite scores), so memory stays flat; training goes on."""
    model = tiny_llama()
    opt = sparse(model, budget="1%", switch_every=2)
    for step in range(2):
        train_step(model, opt, step)
    before = [p.detach().clone() for p in model.parameters()]
    n_before = opt.updater.count()
    handle = model.model.embed_tokens.weight.register_hook(lambda g: g * float("nan"))
    x = batch(2)
    model(input_ids=x, labels=x).loss.backward()
    handle.remove()
    opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1 and math.isnan(opt.last_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.updater.count() == opt.policy.k > n_before
    first = opt.table.params[0]
    assert 0 not in chosen(opt) or bool(torch.isfinite(opt.state[first]["exp_avg"]).all())
    for step in range(3, 6):
        train_step(model, opt, step)
    assert opt.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())
    m2 = tiny_llama()
    raising = sparse(m2, budget="1%", nonfinite="raise")
    m2.model.embed_tokens.weight.register_hook(lambda g: g * float("nan"))
    x = batch(0)
    m2(input_ids=x, labels=x).loss.backward()
    with pytest.raises(FloatingPointError, match="'model.embed_tokens.weight' holds NaN"):
        raising.step()
    assert raising.updater.count() == 0  # raised before the chosen set changed


def test_a_first_step_without_gradients_scores_again_at_the_next():
    """Nothing chosen (step() before any backward): the next step scores every tensor
    again instead of leaving every param frozen until the next regrowth."""
    model = tiny_llama()
    opt = sparse(model, budget="1%", switch_every=50)
    opt.step()
    assert opt.updater.count() == 0 and opt.policy.is_scoring(1)
    assert all(p.requires_grad for p in model.parameters())
    train_step(model, opt, 1)
    assert opt.updater.count() == 453 and not opt.policy.is_scoring(2)


@pytest.mark.parametrize("masters", [None, False])
def test_bf16_params_and_param_groups(masters):
    """bf16 params: by default each chosen element keeps an fp32 master (4 B more per
    element, in the budget); master_weights=False updates the bf16 values in place."""
    model = tiny_llama(dtype=torch.bfloat16)
    opt = NTO(three_groups(model), lr=1e-2, budget="10%", policy="sparse", switch_every=2,
              master_weights=masters)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(5):
        train_step(model, opt, step)
        rep = opt.memory_report()
        assert rep["peak_total_bytes"] <= rep["budget_bytes"] == 4534 * (16 if masters is
                                                                           False else 20)
    for p, st in opt.state.items():
        assert st["exp_avg"].dtype == torch.float32 and st["indices"].dtype == torch.int32
        if masters is None:  # the param holds its masters rounded to nearest
            assert st["master"].dtype == torch.float32
            got = p.detach().reshape(-1)[st["indices"].long()]
            assert torch.equal(got, st["master"].to(torch.bfloat16))
        else:
            assert "master" not in st
    changed = sum(int((a != b).sum()) for a, b in zip(before, model.parameters()))
    assert 0 < changed <= 4534 + 2 * 453  # K, and the elements of two regrowths


def test_state_dict_weights_only_roundtrip_continues_identically():
    kw = {"budget": "5%", "switch_every": 2}
    model = tiny_llama()
    opt = sparse(model, **kw)
    for step in range(4):  # ends right before a regrowth (after its drop)
        train_step(model, opt, step)
    sd = roundtrip(opt.state_dict())
    assert sd["nto"]["policy_state"]["selected"] == sorted(chosen(opt))
    assert sd["nto"]["config"]["regrow_fraction"] == 0.1
    m2 = tiny_llama(seed=3)
    m2.load_state_dict(model.state_dict())
    o2 = sparse(m2, **kw)
    o2.load_state_dict(sd)
    for step in range(4, 9):
        train_step(model, opt, step)
        train_step(m2, o2, step)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))
    assert opt.state_dict()["nto"] == o2.state_dict()["nto"]


def test_load_refuses_foreign_or_edited_sparse_state():
    model = tiny_llama()
    opt = sparse(model, budget="5%", switch_every=2)
    for step in range(2):
        train_step(model, opt, step)
    sd = opt.state_dict()
    fresh = sparse(tiny_llama(), budget="5%", switch_every=2)
    with pytest.raises(ValueError, match="regrow_fraction: saved 0.1, here 0.2"):
        sparse(tiny_llama(), budget="5%", switch_every=2, regrow_fraction=0.2).load_state_dict(sd)
    block = NTO(tiny_llama().named_parameters(), budget="5%", switch_every=2)
    with pytest.raises(ValueError, match="saved with policy='sparse' but this optimizer has "
                       "policy='block'"):
        block.load_state_dict(sd)
    i = next(iter(sd["state"]))
    bad = {**sd, "state": {**sd["state"], i: {**sd["state"][i],
                                               "step": [0.5] * len(sd["state"][i]["step"])}}}
    with pytest.raises(ValueError, match=r"step and sizes are \[0.5.*expected two equally long "
                       "lists of ints"):
        fresh.load_state_dict(bad)
    idx = sd["state"][i]["indices"].flip(0)
    bad = {**sd, "state": {**sd["state"], i: {**sd["state"][i], "indices": idx}}}
    if idx.numel() > 1:
        with pytest.raises(ValueError, match="indices must be unique positions .* sorted within "
                           "each cohort"):
            fresh.load_state_dict(bad)
    missing = {**sd, "state": {k: v for k, v in sd["state"].items() if k != i}}
    with pytest.raises(ValueError, match=rf"\(missing: \[{i}\]\); an edited or partial"):
        fresh.load_state_dict(missing)
    assert fresh.step_count == 0 and not fresh.state


BAD = [
    ({"state_on_switch": "offload"}, r"state_on_switch='offload' does not apply to "
     r"policy='sparse' \(it carries the moments.*allowed here: 'drop'"),
    ({"always": ("embed",)}, r"always=\('embed',\) applies to policy='block' and 'sample'"),
    ({"regrow_fraction": 0.5}, r"regrow_fraction=0.5; allowed: None \(0.1\) or a number in "
     r"\[0, 0.25\]"),
    ({"regrow_fraction": "all"}, r"regrow_fraction='all'; allowed"),
    ({"budget": "15B"}, r"budget='15B' .* is below one element under policy='sparse' \(16 B "
     r"per chosen element.*nothing would train. Raise the budget to at least 16B"),
    ({"policy": "block", "regrow_fraction": 0.2},
     r"regrow_fraction=0.2 applies to policy='sparse' only \(policy='block'\)"),
]


@pytest.mark.parametrize("kw,msg", BAD)
def test_bad_inputs(kw, msg):
    kw = {"policy": "sparse", **kw}
    with pytest.raises(ValueError, match=msg):
        NTO(tiny_llama().named_parameters(), **kw)


def test_byte_budget_and_static_selection():
    model = tiny_llama()
    opt = sparse(model, budget="40KiB", switch_every=1, regrow_fraction=0)
    assert opt.policy.k == 40 * 1024 // opt.policy.bytes_per_element(torch.float32)
    train_step(model, opt, 0)
    first = chosen(opt)
    for step in range(1, 4):
        train_step(model, opt, step)
        assert opt.memory_report()["peak_total_bytes"] <= 40 * 1024
    assert all(torch.equal(first[i], t) for i, t in chosen(opt).items())


def test_plan_for_sparse():
    p = plan(llama_config(), "10%", policy="sparse", switch_every=20)
    assert p.policy == "sparse" and p.groups[0].elements == 4534
    assert p.nto_bytes == 4534 * 16 and p.density == pytest.approx(0.1, abs=1e-4)
    # the largest dense gradient (4,096 fp32 elements), or a drop's old + new copy of one
    # fp32 row of a param all of whose 4,096 elements are chosen: 8 B each
    assert p.transient_bytes == max(LARGEST_DENSE, 8 * 4096) and not p.untrainable
    assert p.trainable_elements == N_ELEMENTS and p.regrow_fraction == 0.1
    text = str(p)
    for needle in ("selection: 4,534 of 45,344 elements (10.00%)", "453 of them",
                   "every 20 steps", "+ transient", "32.00 KiB"):
        assert needle in text, needle
    opt = sparse(tiny_llama(), budget="10%")
    assert opt.budget_bytes() == p.nto_bytes
