"""budget="auto" (issue 23): the largest budget whose measured peak fits the memory."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from tiny import llama_config, roundtrip, tiny_llama, train_step

import nto_ext.auto as auto
from nto_ext import NTO, plan
from nto_ext.auto import _status_kib

WEIGHTS = 45_344 * 4  # the tiny Llama in fp32


class FakeProbe:
    """A probe whose readings the test sets: in use `base`, peak `base + act`, each plus
    the gradients the `watched` model holds (as a real probe sees them)."""

    method = "fake probe"
    base = WEIGHTS + 1_000_000
    act = 50_000
    watched: torch.nn.Module | None = None

    def __init__(self, device: torch.device) -> None:
        pass

    @staticmethod
    def grads() -> int:
        m = FakeProbe.watched
        return 0 if m is None else sum(p.grad.nbytes for p in m.parameters()
                                       if p.grad is not None)

    def in_use(self) -> int:
        return FakeProbe.base + self.grads()

    def peak(self) -> int:
        return FakeProbe.base + FakeProbe.act + self.grads()

    def reset_peak(self) -> None:
        pass

    def capacity(self) -> tuple[int, str]:
        return 10**9, "fake capacity"


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(auto, "MemoryProbe", FakeProbe)
    monkeypatch.setattr(FakeProbe, "act", 50_000)
    monkeypatch.setattr(FakeProbe, "watched", None)
    return FakeProbe


def _wider_llama():
    """3.2M params (12.9 MB in fp32): big enough that its training state shows in RSS."""
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128))


def test_auto_measured_peak_is_within_the_memory_stated():
    """Real measurement (CPU: VmHWM): the peak resident memory of steps 2..8 stays within
    the memory stated, the chosen budget is neither the smallest nor everything, and the
    prediction is close to what was measured."""
    model = _wider_llama()
    n = sum(p.numel() for p in model.parameters())
    memory = _status_kib("VmRSS") + 6 * n + 40_000_000  # about half AdamW's state + room
    opt = NTO(model.named_parameters(), budget="auto", memory=memory, switch_every=3)
    rep = opt.memory_report()["budget_auto"]
    assert rep["provisional"] and rep["activation_bytes"] is None
    assert rep["memory_bytes"] == memory and "stated" in rep["memory_source"]
    small = rep["budget_elements"]
    train_step(model, opt, 0)  # the first batch: measured, then planned
    rep = opt.memory_report()["budget_auto"]
    assert not rep["provisional"] and rep["activation_bytes"] > 0
    assert small < rep["budget_elements"] < n and opt.budget.amount == rep["budget_elements"]
    assert rep["predicted_peak_bytes"] + rep["margin_bytes"] <= memory
    auto.MemoryProbe(torch.device("cpu")).reset_peak()
    for step in range(1, 8):  # several periods: every group's state is allocated in turn
        train_step(model, opt, step)
    peak = _status_kib("VmHWM")
    assert peak <= memory, (peak, rep)
    assert abs(peak - rep["predicted_peak_bytes"]) <= 0.1 * memory
    assert "measured: peak resident memory" in rep["why"]
    opt.remove_hooks()


def test_auto_without_memory_fits_the_machine():
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="auto")
    train_step(model, opt, 0)
    rep = opt.memory_report()["budget_auto"]
    assert "MemAvailable" in rep["memory_source"] or "RLIMIT" in rep["memory_source"]
    assert rep["budget_elements"] >= 45_344  # a tiny model fits whole on any machine
    opt.remove_hooks()


def test_auto_a_small_limit_gives_a_small_budget_the_same_as_plan_fit(fake):
    """Memory for the weights, the process, the activations and a few norms only: auto
    chooses what `plan(fit=...)` chooses with the same figures (its budget is exact)."""
    other = FakeProbe.base - WEIGHTS
    memory = 1_334_000
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="auto", memory=memory, switch_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # embedding and head train a range of rows at a time
        train_step(model, opt, 0)
    assert not opt.policy.untrainable and opt.policy.split
    rep = opt.memory_report()["budget_auto"]
    act = rep["activation_bytes"]
    assert FakeProbe.act - 1024 <= act <= FakeProbe.act  # less the first batch's grads
    # (the fake probe here does not see the gradients: the budget is still exact)
    f = plan(llama_config(), fit=memory, activation_bytes=other + act).fit
    assert rep["budget_elements"] == f.budget_elements < 4096  # no embedding fits
    assert rep["predicted_peak_bytes"] == f.predicted_bytes - f.margin_bytes
    for step in range(1, 6):
        train_step(model, opt, step)
    measured = opt.memory_report()["peak_total_bytes"]
    assert other + WEIGHTS + measured + act <= memory - rep["margin_bytes"]
    opt.remove_hooks()


def test_auto_nothing_fits_names_the_smallest_footprint():
    with pytest.raises(ValueError, match=r"memory='1MiB' \(1.00 MiB\): nothing fits under "
                       r"policy='block'; the smallest footprint is .* = weights 177.12 KiB "
                       r"\+ the smallest unit's training state 388 B .* \+ process memory "
                       r"beyond the weights .*State a memory of at least"):
        NTO(tiny_llama().named_parameters(), budget="auto", memory="1MiB")


def test_auto_a_batch_that_needs_more_replans_or_says_nothing_fits(fake, caplog):
    model = FakeProbe.watched = tiny_llama()
    opt = NTO(model.named_parameters(), budget="auto", memory=1_500_000, switch_every=2)
    train_step(model, opt, 0)
    first = opt.memory_report()["budget_auto"]["budget_elements"]
    FakeProbe.act = 60_000  # within the tolerance (1% of the memory): no re-plan
    train_step(model, opt, 1)
    assert opt.memory_report()["budget_auto"]["replans"] == 0
    FakeProbe.act = 150_000
    with caplog.at_level("INFO", logger="nto_ext"):
        train_step(model, opt, 2)
    rep = opt.memory_report()
    assert rep["budget_auto"]["replans"] == 1 and "re-planning" in caplog.text
    assert rep["budget_auto"]["budget_elements"] < first
    assert rep["trainable_elements"] <= rep["budget_auto"]["budget_elements"]
    FakeProbe.act = 400_000  # more than the memory has room for at any budget
    x = torch.randint(0, 128, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(ValueError, match=r"nothing fits under policy='block'; the smallest "
                       r"footprint is .* \+ activations \(measured\) \+ other process memory"):
        opt.step()
    opt.remove_hooks()


def test_auto_the_first_batch_under_a_plan_settles_the_figure_upward_once(fake, caplog):
    """The first batch (nothing frozen) is an upper bound: the next one, run under the
    plan, needs less, and the budget grows once to use that room; a later smaller batch
    changes nothing, and the plan still fits the memory."""
    model = FakeProbe.watched = tiny_llama()
    opt = NTO(model.named_parameters(), budget="auto", memory=1_500_000, switch_every=2)
    FakeProbe.act = 150_000
    train_step(model, opt, 0)
    first = opt.memory_report()["budget_auto"]
    FakeProbe.act = 60_000
    with caplog.at_level("INFO", logger="nto_ext"):
        train_step(model, opt, 1)
    rep = opt.memory_report()["budget_auto"]
    assert "re-planning upward" in caplog.text and rep["replans"] == 1
    assert rep["first_batch_activation_bytes"] == first["activation_bytes"] > 140_000
    assert rep["activation_bytes"] == 60_000
    assert rep["budget_elements"] > first["budget_elements"]
    assert rep["predicted_peak_bytes"] + rep["margin_bytes"] <= 1_500_000
    assert opt.budget.amount == rep["budget_elements"]
    FakeProbe.act = 20_000  # settled: no second upward re-plan
    train_step(model, opt, 2)
    assert opt.memory_report()["budget_auto"]["budget_elements"] == rep["budget_elements"]
    opt.remove_hooks()


def test_auto_resumes_a_state_saved_under_auto_bit_exactly(fake):
    """A fresh NTO(budget="auto") (provisional budget) loading a checkpoint saved under
    auto takes that run's budget and measured activations: the plans match, the load is
    accepted, and training continues bit for bit as the uninterrupted run does. A refused
    load leaves the fresh optimizer's provisional plan as it was."""
    def build(model):
        return NTO(model.named_parameters(), budget="auto", memory=1_500_000, switch_every=2)

    model = FakeProbe.watched = tiny_llama()
    opt = build(model)
    for step in range(3):
        train_step(model, opt, step)
    sd = roundtrip(opt.state_dict())
    assert sd["nto"]["config"]["budget_auto"] == opt.memory_report()["budget_auto"][
        "activation_bytes"]
    model2 = tiny_llama()  # a new process would rebuild the model and load its weights
    model2.load_state_dict(model.state_dict())
    fresh = build(model2)
    provisional = fresh.budget.amount
    assert provisional < opt.budget.amount
    bad = {**sd, "nto": {**sd["nto"], "step": -1}}
    with pytest.raises(ValueError):
        fresh.load_state_dict(bad)
    assert fresh.budget.amount == provisional and fresh._auto().activations is None
    fresh.load_state_dict(sd)
    assert fresh.budget.amount == opt.budget.amount
    for step in range(3, 7):
        train_step(model, opt, step)
        train_step(model2, fresh, step)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    opt.remove_hooks()
    fresh.remove_hooks()


def test_auto_deepcopy_and_sparse(fake):
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget="auto", memory=1_500_000, policy="sparse")
    train_step(model, opt, 0)
    rep = opt.memory_report()
    assert rep["budget_auto"]["budget_elements"] == opt.policy.k > 0
    other = copy.deepcopy(opt)
    assert other.memory_report()["budget_auto"]["budget_elements"] == opt.policy.k
    opt.remove_hooks()


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"budget": "10%", "memory": "1GiB"}, ValueError,
     r"memory='1GiB' applies with budget='auto' only \(got budget='10%'\)"),
    ({"budget": "auto", "memory": "lots"}, ValueError,
     r"memory='lots' is not a memory size; allowed: a byte size"),
    ({"budget": "auto", "memory": 0}, ValueError, r"memory=0; allowed"),
    ({"budget": "auto", "memory": 1.5}, TypeError, r"memory=1.5 has type float"),
])
def test_auto_bad_arguments_change_nothing(kwargs, exc, msg):
    model = tiny_llama()
    with pytest.raises(exc, match=msg):
        NTO(model.named_parameters(), **kwargs)
    assert all(p.requires_grad for p in model.parameters())


def test_auto_refuses_meta_params():
    with torch.device("meta"):
        layer = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"measures CUDA or CPU memory; the params are on "
                       r"meta"):
        NTO(layer.parameters(), budget="auto")


def test_auto_finds_the_process_rlimit():
    """In a child capped with RLIMIT_DATA, the memory auto fits is the cap's room."""
    code = textwrap.dedent("""
        import resource, torch
        from nto_ext.auto import MemoryProbe
        cap = 3 * 2**30
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        mem, src = MemoryProbe(torch.device("cpu")).capacity()
        print(abs(mem - cap) < 2**30, src)  # the cap counts VmData; RSS adds library pages
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "True RLIMIT_DATA of this process"
