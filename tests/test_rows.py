"""Issue 21: a tensor larger than the budget trains a range of its rows at a time under
block and sample (nto_ext/blocks.py row_ranges, nto_ext/policies/dense.py)."""

import warnings

import pytest
import torch
from tiny import (
    batch,
    one_thread,  # noqa: F401  (autouse fixture)
    roundtrip,
)

from nto_ext import NTO


def wide_llama(tied: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose embedding (and untied head) are 30% of it each: larger than a
    25% budget, so they are split at 1%, 10% and 25%."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=1024, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def tokens(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(20_000 + step)
    return torch.randint(0, 1024, (2, 16), generator=g)


def build(model: torch.nn.Module, **kw) -> NTO:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is too big to train: no warning
        return NTO(model if isinstance(model, list) else model.named_parameters(), **kw)


def run(model: torch.nn.Module, opt: NTO, steps: range, accumulate: int = 1) -> None:
    for step in steps:
        for micro in range(accumulate):
            x = tokens(step * 7 + micro)
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("budget", ["1%", "10%", "25%"])
@pytest.mark.parametrize("policy", ["block", "sample"])
def test_every_element_changes_within_a_cycle(policy, budget, tied):
    model = wide_llama(tied)
    opt = build(model, lr=1e-2, budget=budget, policy=policy, switch_every=1, seed=3)
    names = {i: opt.table.infos[i].name for i in opt.policy.split}
    assert "model.embed_tokens.weight" in names.values()
    assert tied or "lm_head.weight" in names.values()
    if tied:  # one tensor, listed once: one set of units
        assert "lm_head.weight" not in [n for n, _ in model.named_parameters()]
    assert opt.policy.trainable == set(range(len(opt.table.params)))
    cycle = opt.policy.cycle_steps(0)
    assert cycle <= 400  # the bound: every unit trains once a cycle
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(model, opt, range(cycle))
    for n, p in model.named_parameters():
        same = (p.detach() == before[n]).sum().item()
        assert same == 0, f"{n}: {same} of {p.numel()} elements never changed"


def test_compact_gradient_is_the_dense_gradient_rows_bit_for_bit():
    ref, model = wide_llama(), wide_llama()
    opt = build(model, budget="10%", switch_every=1)
    (i, (a, b)), = opt.policy.active_rows(0).items()  # period 0: the embedding's first rows
    for micro in range(3):  # accumulated over micro-batches, as autograd adds them
        for m in (ref, model):
            x = tokens(micro)
            m(input_ids=x, labels=x).loss.backward()
    p, dense = opt.table.params[i], list(ref.parameters())[i].grad
    assert p.grad is None  # freed in the hook
    (grad,) = opt.updater.grad_tensors()
    assert grad.shape == (b - a, 32) and torch.equal(grad, dense[a:b])
    rep = opt.memory_report()
    assert rep["grad_bytes"] == grad.numel() * 4 and rep["transient_bytes"] == dense.numel() * 4


def test_update_of_a_range_is_the_whole_update_of_those_rows():
    """One step on rows [a, b) of a split tensor: bit-identical to those rows of the same
    step on the whole tensor (100%); the other rows unchanged."""
    whole, part = wide_llama(), wide_llama()
    ow = build(whole, lr=1e-2, budget="100%")
    op = build(part, lr=1e-2, budget="10%", switch_every=2)
    (i, (a, b)), = op.policy.active_rows(0).items()
    w0 = list(whole.parameters())[i].detach().clone()
    for m, o in ((whole, ow), (part, op)):
        run(m, o, range(1))
    pw, pp = list(whole.parameters())[i].detach(), list(part.parameters())[i].detach()
    assert torch.equal(pp[a:b], pw[a:b]) and not torch.equal(pp[a:b], w0[a:b])
    assert torch.equal(pp[b:], w0[b:])
    st = op.state[list(part.parameters())[i]]
    assert st["rows"] == [a, b] and st["exp_avg"].shape == (b - a, 32)


@pytest.mark.parametrize("on_switch", ["drop", "offload"])
@pytest.mark.parametrize("policy", ["block", "sample"])
def test_resume_bit_exact_inside_a_range_period(policy, on_switch):
    kw = dict(lr=1e-2, budget="10%", policy=policy, switch_every=3, seed=5,
              state_on_switch=on_switch)
    straight = wide_llama()
    opt = build(straight, **kw)
    steps = opt.policy.cycle_steps(0) + 7  # into the second cycle: ranges come back
    run(straight, opt, range(steps), accumulate=2)

    first = wide_llama()
    o1 = build(first, **kw)
    cut = max(s for s in range(1, steps) if s % 3 == 1 and o1.policy.active_rows(s))
    run(first, o1, range(cut), accumulate=2)  # stops one step into a range's period
    assert o1.policy.active_rows(cut)
    sd = roundtrip(o1.state_dict())
    weights = roundtrip(first.state_dict())
    if on_switch == "offload":
        assert any("parked" in st for st in sd["state"].values() if isinstance(st, dict))
    resumed = wide_llama(seed=9)
    resumed.load_state_dict(weights)
    o2 = build(resumed, **kw)
    o2.load_state_dict(sd)
    run(resumed, o2, range(cut, steps), accumulate=2)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    r1, r2 = opt.memory_report(), o2.memory_report()
    del r1["peak_total_bytes"], r2["peak_total_bytes"]  # the resumed run saw fewer steps
    assert r1 == r2
    assert roundtrip(o2.state_dict())["nto"] == roundtrip(opt.state_dict())["nto"]


def test_offloaded_range_comes_back_bit_exact():
    model = wide_llama()
    opt = build(model, lr=1e-2, budget="10%", switch_every=1, state_on_switch="offload")
    (i, rows), = opt.policy.active_rows(0).items()
    p = opt.table.params[i]
    run(model, opt, range(1))
    assert opt.policy.active_rows(1)[i] != rows  # the next range of the same tensor
    kept = {k: v.clone() for k, v in opt.state[p]["parked"][rows[0]].items()
            if isinstance(v, torch.Tensor)}
    # the parked range is a host copy while the tensor trains another: counted there
    assert opt.memory_report()["offload_bytes"] >= sum(v.nbytes for v in kept.values())
    back = next(s for s in range(2, 500) if opt.policy.active_rows(s).get(i) == rows)
    run(model, opt, range(1, back))
    st = opt.state[p]  # rows[0] trains again: its moments came back as they left
    assert st["rows"] == list(rows)
    for k, v in kept.items():
        assert torch.equal(st[k].cpu(), v), k
    rep = opt.memory_report()
    assert rep["total_bytes"] <= rep["budget_bytes"] and rep["offload_bytes"] > 0


def test_edited_rows_in_a_checkpoint_are_refused():
    model = wide_llama()
    opt = build(model, budget="10%", switch_every=2)
    run(model, opt, range(1))  # step 1: the same rows as step 0, with their state
    (i, (a, b)), = opt.policy.active_rows(1).items()
    sd = opt.state_dict()
    sd["state"][i]["rows"] = [a, b + 1]
    with pytest.raises(ValueError, match=r"'rows' is \[.*\]; allowed: one of the param's row"):
        opt.load_state_dict(sd)
    other = next(r for r in opt.policy.split[i] if r != (a, b))
    sd["state"][i] = {**sd["state"][i], "rows": list(other)}
    sd["state"][i]["exp_avg"] = torch.zeros(other[1] - other[0], 32)
    sd["state"][i]["exp_avg_sq"] = torch.zeros(other[1] - other[0], 32)
    with pytest.raises(ValueError, match=r"holds rows .* but rows .* train at step 1"):
        opt.load_state_dict(sd)


def test_strided_param_trains_its_rows_through_a_copy():
    w = torch.nn.Parameter(torch.randn(8, 40).t())  # (40, 8), not contiguous
    small = torch.nn.Parameter(torch.randn(4))
    opt = build([("embed.weight", w), ("norm.weight", small)], lr=1e-2, budget=100,
                switch_every=1)
    assert opt.policy.split == {0: [(0, 10), (10, 20), (20, 30), (30, 40)]}
    before = w.detach().clone()
    for _ in range(5):
        (w.sum() * 3 + small.sum()).backward()
        opt.step()
        opt.zero_grad()
    assert not (w.detach() == before).any()


def test_tiny_llama_at_one_percent_trains_everything():
    from tiny import tiny_llama

    model = tiny_llama()
    opt = build(model, budget="1%", switch_every=1)
    assert not opt.policy.untrainable and opt.policy.split
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    rep = opt.memory_report()
    assert 0 < rep["trainable_elements"] <= rep["budget_elements"]


def test_fsdp2_sharded_params_refuse_ranges_of_rows_with_a_clear_error():
    model = wide_llama()
    opt = build(model, budget="10%", switch_every=1)
    model.model.embed_tokens.weight.device_mesh = None  # as a DTensor (FSDP2) has
    x = tokens(0)
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' is larger than the "
                       r"budget and trains a range of rows .* FSDP2-sharded .* use DDP"):
        model(input_ids=x, labels=x).loss.backward()
    opt.remove_hooks()


class FoldAtStep(NTO):
    fold_rows_at_step = True  # as TrainerNTO (nto_ext.hf) sets it


@pytest.mark.parametrize("how", ["trainer", "ddp"])
def test_rows_reduced_at_step_train_bit_identically(how, monkeypatch):
    """Under DDP (the dense gradient is averaged after NTO's hook) and Trainer (clipped
    after it) the rows are taken at step(): the same bits as taking them in the hook."""
    kw = dict(lr=1e-2, budget="10%", switch_every=2)
    ref_model, model = wide_llama(), wide_llama()
    ref = build(ref_model, **kw)
    run(ref_model, ref, range(5), accumulate=2)
    if how == "ddp":
        import nto_ext.policies.dense as dense

        monkeypatch.setattr(dense, "multi_process", lambda: True)  # one rank of DDP
        opt = build(model, **kw)
    else:
        opt = FoldAtStep(model.named_parameters(), **kw)
    emb = model.model.embed_tokens.weight
    x = tokens(0)
    model(input_ids=x, labels=x).loss.backward()
    assert emb.grad is not None and emb.grad.shape == emb.shape  # dense until step()
    opt.zero_grad()
    run(model, opt, range(5), accumulate=2)
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert emb.grad is None


@pytest.mark.parametrize("cls", [NTO, FoldAtStep])
@pytest.mark.parametrize("zero", ["model", "none"])
def test_each_step_uses_its_own_rows_gradient(cls, zero):
    """The rows' compact gradient is used up by step(): Trainer zeroes grads with
    `model.zero_grad()`, which cannot reach it (before the fix, the second step of a period
    added the first step's rows into its gradient); with torch AdamW that call is all it
    takes. "none": nothing zeroed between steps, each step still takes its own rows (as the
    sparse policy's buffers; a dense grad left on a param accumulates, as in torch)."""
    kw = dict(lr=1e-2, budget="10%", switch_every=2)
    ref_model, model = wide_llama(), wide_llama()
    run(ref_model, build(ref_model, **kw), range(4))  # opt.zero_grad() after each step
    opt = cls(model.named_parameters(), **kw)
    emb = model.model.embed_tokens.weight
    for step in range(4):
        x = tokens(step * 7)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        if zero == "model":
            model.zero_grad()
        else:  # only the split tensors' rows: the other params' grads would accumulate
            for p in model.parameters():
                if p is not emb:
                    p.grad = None
    assert opt.updater.grad_tensors() == []
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_trainer_clip_sees_the_rows_kept_until_step():
    """torch's clip_grad_norm_ over model.parameters() (what Trainer calls) sees the
    gradient of a tensor training a range of rows; taken in the hook it would miss it."""
    def norm_after_backward(cls):
        model = wide_llama()
        opt = cls(model.named_parameters(), lr=1e-2, budget="10%", switch_every=2)
        opt.train()
        x = tokens(0)
        model(input_ids=x, labels=x).loss.backward()
        emb = model.model.embed_tokens.weight
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        rows = next(r for i, r in opt.policy.active_rows(0).items()
                    if opt.table.params[i] is emb)
        return norm, emb.grad, rows, opt

    norm, grad, (a, b), opt = norm_after_backward(FoldAtStep)
    assert grad is not None and grad[a:b].abs().sum() > 0
    before = {p: p.detach().clone() for p in opt.table.params}
    opt.step()
    assert float(norm) > 1e-3 and any(not torch.equal(p, v) for p, v in before.items())
    # the control: taken in the hook, the clip's norm misses the embedding's rows
    norm_hook, grad_hook, _, _ = norm_after_backward(NTO)
    assert grad_hook is None and float(norm_hook) < float(norm)


@pytest.mark.parametrize("on_switch", ["drop", "offload"])
def test_adamw_state_imports_into_ranges_of_rows(on_switch):
    ref = wide_llama()
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x = tokens(0)
    ref(input_ids=x, labels=x).loss.backward()
    adamw.step()
    sd = roundtrip(adamw.state_dict())
    model = wide_llama()
    opt = build(model, lr=1e-2, budget="10%", switch_every=1, state_on_switch=on_switch)
    opt.load_state_dict(sd)
    (i, (a, b)), = opt.policy.active_rows(0).items()
    st = opt.state[opt.table.params[i]]
    assert st["rows"] == [a, b] and torch.equal(st["exp_avg"], sd["state"][i]["exp_avg"][a:b])
    assert ("parked" in st) == (on_switch == "offload")
    if on_switch == "offload":  # every other range waits on the host with its moments
        assert sorted(st["parked"]) == [r[0] for r in opt.policy.split[i] if r != (a, b)]
    run(model, opt, range(3))  # and training goes on from there


def test_dcp_save_and_load_keep_ranges_and_parked_state(tmp_path):
    from nto_ext.distributed import load_optimizer_state, save_optimizer_state

    model = wide_llama()
    kw = dict(lr=1e-2, budget="10%", switch_every=2, state_on_switch="offload")
    opt = build(model, **kw)
    run(model, opt, range(3))  # inside the second range's period: the first one parked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming ... a single process"
        save_optimizer_state(model, opt, str(tmp_path / "o"))
        model2 = wide_llama()
        opt2 = build(model2, **kw)
        load_optimizer_state(model2, opt2, str(tmp_path / "o"))
    a, b = opt.state_dict(), opt2.state_dict()
    (i, rows), = opt.policy.active_rows(3).items()
    assert a["state"][i]["rows"] == b["state"][i]["rows"] == list(rows)
    assert sorted(b["state"][i]["parked"]) == sorted(a["state"][i]["parked"]) != []
    for start, st in a["state"][i]["parked"].items():
        assert st["rows"] == b["state"][i]["parked"][start]["rows"]
        assert torch.equal(st["exp_avg_sq"], b["state"][i]["parked"][start]["exp_avg_sq"])
