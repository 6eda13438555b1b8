"""torch.amp.GradScaler (fp16 loss scaling) with NTO: the scaler's own path (unscale_ of
p.grad, step() skipped on an overflow) where it sees every gradient; where NTO holds
gradients off p.grad (reduced or used in backward), `_step_supports_amp_scaling` turns
True, the scaler calls step() directly and NTO refuses by name before anything changes."""

import pytest
import torch
from test_rows import FoldAtStep, tokens, wide_llama
from tiny import one_thread  # noqa: F401  (autouse fixture)

from nto_ext import NTO

SCALE = 2.0**16  # a power of two: scaling and unscaling are exact in fp32


def train(model, opt, steps: int, scaler=None, unscale: bool = False, inf_at=()) -> None:
    """`scaler.scale(loss).backward(); [scaler.unscale_(opt)]; scaler.step(opt);
    scaler.update()` (the AMP recipe), or plain backward/step without a scaler; an Inf in
    the loss at the steps `inf_at` (an overflow)."""
    for step in range(steps):
        x = tokens(step)
        loss = model(input_ids=x, labels=x).loss
        if step in inf_at:
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("unscale", [False, True])
@pytest.mark.parametrize("cls,budget", [(NTO, "40%"), (FoldAtStep, "10%")])
@pytest.mark.parametrize("policy", ["block", "sample"])
def test_scaled_steps_equal_unscaled_ones(policy, cls, budget, unscale):
    """With nothing split (40%), or split tensors' gradients kept until step() (Trainer's
    TrainerNTO, 10%), the scaled run is the unscaled run bit for bit, NTO's clipping
    included: every gradient was unscaled before it was used."""
    kw = dict(lr=1e-2, budget=budget, policy=policy, switch_every=2, max_grad_norm=0.5)
    ref, model = wide_llama(), wide_llama()
    train(ref, cls(ref.named_parameters(), **kw), 6)
    opt = cls(model.named_parameters(), **kw)
    train(model, opt, 6, torch.amp.GradScaler("cpu", init_scale=SCALE), unscale)
    for a, b in zip(params(ref), params(model)):
        assert torch.equal(a, b)
    assert opt.skipped_steps == 0 and not hasattr(opt, "found_inf")
    # the scaler's own unscale_ (Lightning clips only for optimizers without the flag)
    assert opt._step_supports_amp_scaling is False


def test_an_overflow_skips_the_step_as_adamw():
    """An Inf in the scaled gradients: the scaler lowers its scale and NTO takes no step
    (nor counts one: as when the scaler skips optimizer.step() itself, under FSDP2 and for
    torch AdamW); at 100% the run stays torch AdamW's."""
    ref, model = wide_llama(), wide_llama()
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    s_ref = torch.amp.GradScaler("cpu", init_scale=SCALE)
    train(ref, adamw, 4, s_ref, inf_at=(1,))
    opt = NTO(model.named_parameters(), lr=1e-2, budget="100%")
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    train(model, opt, 4, scaler, inf_at=(1,))
    assert scaler.get_scale() == s_ref.get_scale() == SCALE / 2
    assert opt.step_count == 3 and opt.skipped_steps == 0
    for a, b in zip(params(ref), params(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(st["step"] == 3 for st in opt.state.values())


@pytest.mark.parametrize("unscale", [False, True])
@pytest.mark.parametrize("kw,names", [
    (dict(budget="10%"), r"the rows of model.embed_tokens.weight\[0:\d+\]"),
    (dict(budget="10%", policy="sparse"), "policy='sparse''s compact gradients"),
])
def test_gradients_off_p_grad_are_refused(kw, names, unscale):
    """Rows reduced in backward and sparse's compact gradients never reach the scaler's
    inf check or unscale_ (before, the scaler failed with "No inf checks were recorded" or,
    with other gradients beside them, the rows were used scaled): refused by name, nothing
    changed."""
    model = wide_llama()
    opt = NTO(model.named_parameters(), lr=1e-2, **kw)
    before = params(model)
    with pytest.raises(ValueError, match=rf"GradScaler \(fp16\) drives this step, but NTO "
                       rf"reduced gradients in backward \({names}.*nothing was changed"):
        train(model, opt, 1, torch.amp.GradScaler("cpu", init_scale=SCALE), unscale)
    assert opt.step_count == 0 and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))


def test_step_in_backward_is_refused():
    """The scaler cannot be seen before the first backward, which already updates the
    params: step() refuses and says that update stands (not that nothing changed)."""
    model = wide_llama()
    opt = NTO(model.named_parameters(), lr=1e-2, budget="100%", step_in_backward=True)
    before = params(model)
    with pytest.raises(ValueError, match=r"step_in_backward=True already updated the params "
                       r"in this backward, with gradients the scaler had not checked.*that "
                       r"update stands") as info:
        train(model, opt, 1, torch.amp.GradScaler("cpu", init_scale=SCALE))
    assert "nothing was changed" not in str(info.value)
    assert not all(torch.equal(a, b) for a, b in zip(before, params(model)))
