"""Drop-in for torch.optim.AdamW (issue 16) and the ownership / refused-step rules of
issue 17, on real HF model classes built from tiny configs."""

from __future__ import annotations

import copy
import gc
import pickle
import warnings

import numpy as np
import pytest
import torch
from tiny import batch, tiny_llama, train_step
from torch import nn

from nto_ext import NTO
from nto_ext.budget import state_bytes

transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg)


def bert_step(model, opt, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 64, (4, 8), generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    model(input_ids=x, labels=y).loss.backward()
    opt.step()
    opt.zero_grad()


def bits(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------- 1: frozen params

@pytest.mark.parametrize("policy", ["block", "sample", "sparse"])
def test_params_frozen_by_the_user_never_train_and_are_not_counted(policy):
    model = tiny_bert()
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("bert.embeddings") and "layer.0." not in n)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    before = bits(frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = NTO(model.named_parameters(), lr=1e-2, budget="50%", policy=policy,
              switch_every=2)
    assert opt.budget_elements() == trainable // 2
    assert opt.memory_report()["adamw_bytes"] == sum(
        state_bytes("adamw", p.numel(), p.dtype) for p in model.parameters() if p.requires_grad)
    for s in range(8):
        bert_step(model, opt, s)
        assert opt.memory_report()["total_bytes"] <= opt.budget_bytes()
        assert not any(p.requires_grad for p in frozen)
    assert same(before, frozen)
    assert all(p not in opt.state for p in frozen)
    del opt
    gc.collect()
    assert not any(p.requires_grad for p in frozen)  # still the user's flags


def test_budget_100_with_frozen_parts_matches_adamw_for_50_steps():
    def build():
        m = tiny_llama(seed=3)
        for n, p in m.named_parameters():
            p.requires_grad_("layers.1." not in n and "embed" not in n)
        return m

    a, b = build(), build()
    nto = NTO(a.named_parameters(), lr=3e-3, weight_decay=0.1, budget="100%")
    ref = torch.optim.AdamW([p for p in b.parameters()], lr=3e-3, weight_decay=0.1,
                            fused=True)
    for s in range(50):
        train_step(a, nto, s)
        train_step(b, ref, s)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n  # fused AdamW: the same bits (README)


# ----------------------------------------------------------------- 2: empty groups

def test_empty_param_groups_are_accepted():
    model = tiny_llama()
    opt = NTO([{"params": [p for p in model.parameters()]}, {"params": [],
                                                             "weight_decay": 0.0}],
              budget="100%")
    train_step(model, opt, 0)
    assert len(opt.param_groups) == 2


# ----------------------------------------------------------------- 3: unused params

class WithUnused(nn.Module):
    """A trunk used in forward and heads that are not (an auxiliary head, a pooler)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        self.aux = nn.Linear(8, 8)
        self.pooler = nn.Linear(8, 8)

    def forward(self, x):
        return self.trunk(x).pow(2).mean()


@pytest.mark.parametrize("policy", ["block", "sample"])
@pytest.mark.parametrize("train_first", [False, True])
def test_a_period_of_unused_params_never_breaks_backward(policy, train_first):
    torch.manual_seed(0)
    model = WithUnused()
    # every tensor is its own unit: many periods hold only unused params
    opt = NTO(list(model.parameters()), lr=1e-2, budget=64, policy=policy, switch_every=1)
    used = bits(model.trunk.parameters())
    unused_only = 0
    for _ in range(60):
        if train_first:
            opt.train()  # as Trainer does, before the first backward
        active = set(opt.active())
        unused_only += all(i >= 4 for i in active)
        model(torch.randn(4, 8)).backward()  # AdamW would run it: so must we
        opt.step()
        opt.zero_grad()
    assert unused_only > 0  # the case the test is about happened
    assert not same(used, list(model.trunk.parameters()))


def test_bert_pooler_unused_under_mean_pooling():
    model = tiny_bert()
    opt = NTO(model.named_parameters(), budget="15%", policy="sample", switch_every=1)
    for s in range(40):
        g = torch.Generator().manual_seed(s)
        x = torch.randint(0, 64, (2, 8), generator=g)
        h = model.bert(input_ids=x).last_hidden_state.mean(1)  # no pooler
        model.classifier(h).sum().backward()
        opt.step()
        opt.zero_grad()


# ----------------------------------------------------------------- 4: add_param_group

def _progressive(steps: int, add_at: int, sd=None, start: int = 0):
    model = tiny_llama(seed=1)
    named = list(model.named_parameters())
    head = [(n, p) for n, p in named if "layers" not in n]
    rest = [(n, p) for n, p in named if "layers" in n]
    opt = NTO(head, lr=1e-2, budget="60%", policy="block", switch_every=2)
    if start >= add_at:
        opt.add_param_group({"params": rest, "lr": 5e-3})
    if sd is not None:
        model.load_state_dict(sd[0])
        opt.load_state_dict(sd[1])
    for s in range(start, steps):
        if s == add_at:
            opt.add_param_group({"params": rest, "lr": 5e-3})
        train_step(model, opt, s)
        assert opt.memory_report()["total_bytes"] <= opt.budget_bytes()
    return model, opt


def test_add_param_group_joins_the_plan_and_resumes_exactly():
    model, opt = _progressive(12, add_at=4)
    assert len(opt.param_groups) == 2
    assert any("layers" in n for n in opt.policy.active_names(6) + opt.active_blocks()) or \
        any("layers" in n for s in range(4, 12) for n in opt.policy.active_names(s))
    # resume: a checkpoint taken after the group joined, loaded after the same call
    m8, o8 = _progressive(8, add_at=4)
    sd = (copy.deepcopy(m8.state_dict()), copy.deepcopy(o8.state_dict()))
    resumed, _ = _progressive(12, add_at=4, sd=sd, start=8)
    assert same(list(model.parameters()), list(resumed.parameters()))


def test_add_param_group_refusals_change_nothing():
    model = tiny_llama()
    named = list(model.named_parameters())
    opt = NTO(named[:5], budget="50%")
    with pytest.raises(ValueError, match="given twice"):
        opt.add_param_group({"params": [named[0]]})
    with pytest.raises(ValueError, match="names"):
        opt.add_param_group({"params": [named[6][1]]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [named[6]], "lr": -1.0})
    assert len(opt.param_groups) == 1 and len(opt.table.params) == 5


# ----------------------------------------------------------------- 5: strided params

def test_non_contiguous_and_channels_last_params_train_like_contiguous_ones():
    torch.manual_seed(0)
    base = [torch.randn(6, 4), torch.randn(8, 3, 3, 3)]
    strided = [nn.Parameter(base[0].t().contiguous().t()),  # a transposed view
               nn.Parameter(base[1].clone().to(memory_format=torch.channels_last))]
    plain = [nn.Parameter(b.clone()) for b in base]
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    opts = [NTO(ps, lr=1e-2, budget="100%") for ps in (strided, plain)]
    for s in range(5):
        g = torch.Generator().manual_seed(s)
        coef = [torch.randn(b.shape, generator=g) for b in base]
        for ps, opt in zip((strided, plain), opts):
            sum((p * c).sum() for p, c in zip(ps, coef)).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(strided, plain):
        assert torch.equal(a, b)
    assert strided[1].is_contiguous(memory_format=torch.channels_last)


def test_sparse_refuses_strided_params_clearly():
    p = nn.Parameter(torch.randn(4, 6).t())
    with pytest.raises(ValueError, match="not contiguous; policy='sparse' needs"):
        NTO([p, nn.Parameter(torch.randn(30))], policy="sparse", budget="50%")


# ----------------------------------------------------------------- 6: AdamW keywords

def test_adamw_keyword_arguments():
    model = tiny_llama()
    NTO(model.parameters(), foreach=None, fused=False, capturable=False,
        differentiable=False, amsgrad=False, maximize=False).remove_hooks()
    for key in ("amsgrad", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{key}=True is not supported"):
            NTO(model.parameters(), **{key: True})
    with pytest.raises(TypeError, match="foreach='yes'"):
        NTO(model.parameters(), foreach="yes")
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        NTO([{"params": list(model.parameters()), "amsgrad": True}])


def test_maximize_matches_adamw():
    a, b = tiny_llama(seed=2), tiny_llama(seed=2)
    nto = NTO(a.parameters(), lr=1e-2, budget="100%", maximize=True)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01, maximize=True,
                            fused=True)
    grads_seen = []
    for s in range(4):
        for m, o in ((a, nto), (b, ref)):
            x = batch(s)
            m(input_ids=x, labels=x).loss.backward()
            if o is nto:
                grads_seen.append(next(m.parameters()).grad.clone())
            o.step()
            if o is nto:  # the user's .grad is left as it was
                assert torch.equal(next(m.parameters()).grad, grads_seen[-1])
            o.zero_grad()
    assert same(list(a.parameters()), list(b.parameters()))


# ----------------------------------------------------------------- 10: copy and pickle

@pytest.mark.parametrize("budget", ["100%", "40%"])
def test_deepcopy_and_pickle_give_a_working_optimizer(budget):
    model = tiny_llama()
    opt = NTO(model.named_parameters(), lr=1e-2, budget=budget, switch_every=2)
    for s in range(3):
        train_step(model, opt, s)
    m2, o2 = copy.deepcopy((model, opt))
    m3, o3 = pickle.loads(pickle.dumps((model, opt)))
    for s in range(3, 8):
        for m, o in ((model, opt), (m2, o2), (m3, o3)):
            train_step(m, o, s)
    assert same(list(model.parameters()), list(m2.parameters()))
    assert same(list(model.parameters()), list(m3.parameters()))
    assert o2.step_count == opt.step_count == 8


def test_float64_params_refused_with_the_reason():
    with pytest.raises(TypeError, match="float64 .*use torch.optim.AdamW"):
        NTO([nn.Parameter(torch.zeros(3, dtype=torch.float64))])


# ----------------------------------------------------------------- issue 17: ownership

def test_building_twice_then_dropping_both_restores_the_users_flags():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # the user's own choice
    first = NTO(model.named_parameters(), budget="20%")
    train_step(model, first, 0)
    assert not all(p.requires_grad for n, p in model.named_parameters() if "lm_head" not in n)
    with pytest.warns(UserWarning, match="older one is detached"):
        second = NTO(model.named_parameters(), budget="20%")  # a re-run notebook cell
    train_step(model, second, 1)
    with pytest.raises(RuntimeError, match="detached"):
        first.step()
    del first, second
    gc.collect()
    for n, p in model.named_parameters():
        assert p.requires_grad == ("lm_head" not in n), n


def test_the_newer_of_two_live_optimizers_gets_every_gradient_it_needs():
    a, b = tiny_llama(seed=4), tiny_llama(seed=4)
    old = NTO(a.named_parameters(), budget="20%", switch_every=1)
    train_step(a, old, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = NTO(a.named_parameters(), lr=1e-2, budget="100%")
    ref = NTO(b.named_parameters(), lr=1e-2, budget="100%")
    b.load_state_dict(a.state_dict())
    for s in range(1, 4):
        train_step(a, new, s)
        train_step(b, ref, s)
    assert same(list(a.parameters()), list(b.parameters()))


def test_remove_hooks_releases_even_while_a_scheduler_holds_the_optimizer():
    model = tiny_llama()
    opt = NTO(model.parameters(), budget="20%")
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    train_step(model, opt, 0)
    sched.step()
    opt.remove_hooks()
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


# ----------------------------------------------------------------- issue 17: refused steps

def _state_bits(opt):
    return [(k, v.clone() if isinstance(v, torch.Tensor) else v)
            for st in opt.state.values() for k, v in sorted(st.items())]


@pytest.mark.parametrize("break_it", [
    lambda m, o: o.param_groups[0].__setitem__("lr", float("nan")),
    lambda m, o: o.param_groups[0].__setitem__("lr", -1.0),
    lambda m, o: o.param_groups[0].__setitem__("betas", (1.0, 0.999)),
    lambda m, o: setattr(m.lm_head.weight, "grad", m.lm_head.weight.grad.to_sparse()),
    lambda m, o: setattr(m.lm_head.weight, "data", m.lm_head.weight.data.reshape(-1)),
])
def test_a_refused_step_changes_nothing_and_the_retry_is_exact(break_it):
    def run(fail: bool):
        model = tiny_llama(seed=5)
        opt = NTO(model.named_parameters(), lr=1e-2, budget="100%", nonfinite="propagate")
        train_step(model, opt, 0)
        x = batch(1)
        model(input_ids=x, labels=x).loss.backward()
        if fail:
            saved = {"grad": model.lm_head.weight.grad, "data": model.lm_head.weight.data,
                     "group": dict(opt.param_groups[0])}
            params, state = bits(model.parameters()), _state_bits(opt)
            break_it(model, opt)
            with pytest.raises((ValueError, TypeError)):
                opt.step()
            model.lm_head.weight.data = saved["data"]
            model.lm_head.weight.grad = saved["grad"]
            opt.param_groups[0].update(saved["group"])
            assert same(params, bits(model.parameters()))
            assert all(a[0] == b[0] and (torch.equal(a[1], b[1]) if isinstance(a[1], torch.Tensor)
                                         else a[1] == b[1])
                       for a, b in zip(state, _state_bits(opt)))
        opt.step()
        opt.zero_grad()
        train_step(model, opt, 2)
        return model

    assert same(list(run(False).parameters()), list(run(True).parameters()))


def test_model_double_is_refused_before_anything_changes():
    model = tiny_llama()
    opt = NTO(model.parameters(), budget="100%", nonfinite="propagate")
    train_step(model, opt, 0)
    model.double()
    x = batch(1)
    model(input_ids=x, labels=x).loss.backward()
    state = _state_bits(opt)
    with pytest.raises(TypeError, match="float64"):
        opt.step()
    assert all(torch.equal(a[1], b[1]) for a, b in zip(state, _state_bits(opt)))


def test_byte_budget_holds_after_a_dtype_cast():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = NTO(model.named_parameters(), budget="60KB", switch_every=1)
    train_step(model, opt, 0)
    model.to(torch.float32)
    for s in range(1, 6):
        train_step(model, opt, s)
        rep = opt.memory_report()
        assert rep["peak_total_bytes"] <= rep["budget_bytes"] == 60_000


def test_numpy_hyper_parameters_are_stored_as_python_numbers(tmp_path):
    model = tiny_llama()
    opt = NTO(model.parameters(), lr=np.float32(1e-3), weight_decay=np.float64(0.1),
              betas=(np.float64(0.9), 0.999), eps=np.float32(1e-8), budget=np.float64(0.5))
    train_step(model, opt, 0)
    assert type(opt.param_groups[0]["lr"]) is float
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    torch.load(tmp_path / "o.pt", weights_only=True)


# ----------------------------------------------------------------- issue 17: clear errors

def test_bad_inputs_named_by_the_param():
    with pytest.raises(ValueError, match="lr is a tensor of shape .* on meta"):
        NTO([nn.Parameter(torch.zeros(3))], lr=torch.tensor(1e-3, device="meta"))
    with pytest.raises(ValueError, match="two parameters are named 'w'"):
        NTO([("w", nn.Parameter(torch.zeros(3))), ("w", nn.Parameter(torch.zeros(3)))])
    p = nn.Parameter(torch.zeros(3, device="meta"))
    opt = NTO([("w", p)], budget="100%")
    p.grad = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="parameter 'w' is on the meta device"):
        opt.step()


def test_op_errors_name_the_param():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="100%")

    def failing(*a, **k):
        raise RuntimeError("masked_adamw_: exp_avgs[1] is not contiguous")

    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] \(parameter 'model.layers.0"):
        opt.table.call(failing, [0, 1])


# ----------------------------------------------------------------- Trainer + peft LoRA

class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, 64, (12,), generator=g)
        return {"input_ids": x, "labels": x}


def _lora_gpt2():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                  n_positions=32)
    base = transformers.GPT2LMHeadModel(cfg)
    lora = peft.LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    return peft.get_peft_model(base, lora)


@pytest.mark.parametrize("how", ["nto_optimizer", "NTOTrainer", "optimizers"])
def test_trainer_on_a_peft_lora_model(tmp_path, how):
    from nto_ext.hf import NTOTrainer, nto_of, nto_optimizer

    model = _lora_gpt2()
    named = dict(model.named_parameters())
    base = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    trainable = sum(p.numel() for p in named.values() if p.requires_grad)
    assert base and lora
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8,
        learning_rate=1e-2, weight_decay=0.01, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    kw = dict(budget="50%", policy="block", switch_every=2)
    common = dict(model=model, args=args, train_dataset=_Tokens())
    if how == "nto_optimizer":
        tr = transformers.Trainer(**common, optimizer_cls_and_kwargs=nto_optimizer(
            model, args, **kw))
    elif how == "NTOTrainer":
        tr = NTOTrainer(**common, nto_kwargs=kw)
    else:
        tr = transformers.Trainer(**common, optimizers=(NTO(model.named_parameters(),
                                                            lr=1e-2, **kw), None))
    tr.train()
    opt = nto_of(tr.optimizer)
    assert opt.budget_elements() == trainable // 2
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]) and not p.requires_grad, n
    assert sum(not torch.equal(p, lora[n]) for n, p in model.named_parameters()
               if n in lora) == len(lora)


def test_add_param_group_under_sparse_grows_into_the_new_params():
    model = tiny_llama()
    named = list(model.named_parameters())
    rest = [(n, p) for n, p in named if "layers" in n]
    opt = NTO([(n, p) for n, p in named if "layers" not in n], lr=1e-2, budget="20%",
              policy="sparse", switch_every=3)
    for s in range(4):
        train_step(model, opt, s)
    k0 = opt.policy.k
    opt.add_param_group({"params": rest})
    assert opt.policy.k > k0  # a share budget counts the new elements
    before = bits(p for _, p in rest)
    for s in range(4, 10):
        train_step(model, opt, s)
        rep = opt.memory_report()
        assert rep["total_bytes"] <= rep["budget_bytes"]
    assert not same(before, [p for _, p in rest])


def test_an_nto_over_a_pickled_copy_of_a_model_in_training_trains_every_weight():
    """torch.save(model) / pickle carry NTO's marker with its temporary False flags.
    (copy.deepcopy does not: Parameter.__deepcopy__ drops attributes; README.)"""
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="20%")
    train_step(model, opt, 0)
    assert not all(p.requires_grad for p in model.parameters())
    twin = pickle.loads(pickle.dumps(model))
    opt2 = NTO(twin.named_parameters(), budget="100%")
    assert len(opt2.policy.trainable) == len(list(twin.parameters()))
    train_step(twin, opt2, 1)
    del opt2
    gc.collect()
    assert all(p.requires_grad for p in twin.parameters())
