"""nto_ext.distributed without transformers: DCP save / load of NTO's state in one process,
DDP checks, and the import hygiene of the torch-only modules (issue 18)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from nto_ext import NTO
from nto_ext.distributed import check_ddp, load_optimizer_state, nto_of, save_optimizer_state

ROOT = Path(__file__).resolve().parent.parent

# Run in a child: transformers (and accelerate, which imports it) made unimportable by a
# meta-path finder, so a top-level `import transformers` anywhere on the path fails loudly.
_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "accelerate"):
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def _python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=180, cwd=ROOT)


def _run_without_transformers(code: str) -> subprocess.CompletedProcess:
    proc = _python(_BLOCKER + textwrap.dedent(code))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _steps(model: nn.Module, opt: NTO, steps: range) -> list[float]:
    losses = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


KW = dict(lr=1e-2, budget="40%", policy="block", switch_every=2)


def test_roundtrip_one_process(tmp_path):
    """Saved mid-period, loaded into a fresh NTO over a copy of the model: the resumed run
    is bit-identical to the uninterrupted one (state, schedule position and active set)."""
    model = _model()
    opt = NTO(model.named_parameters(), **KW)
    _steps(model, opt, range(3))
    save_optimizer_state(model, opt, str(tmp_path / "optim"))
    active = list(opt.active())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    want = _steps(model, opt, range(3, 7))

    model2 = _model(seed=1)
    model2.load_state_dict(weights)
    opt2 = NTO(model2.named_parameters(), **KW)
    load_optimizer_state(model2, opt2, str(tmp_path / "optim"))
    assert list(opt2.active()) == active
    got = _steps(model2, opt2, range(3, 7))
    assert got == want
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n


def test_load_into_other_model_refused(tmp_path):
    model = _model()
    opt = NTO(model.named_parameters(), **KW)
    _steps(model, opt, range(1))
    save_optimizer_state(model, opt, str(tmp_path / "optim"))
    with pytest.raises(ValueError, match="not parameters of the given model"):
        load_optimizer_state(_model(), opt, str(tmp_path / "optim"))


def test_torch_get_set_optimizer_state_dict_refused():
    """torch's DCP helpers (Lightning's ModelParallelStrategy, accelerate's save_state) would
    keep the active set's moments without NTO's schedule: refused, naming what to use; NTO's
    own calls and a direct state_dict() still work."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = _model()
    opt = NTO(model.named_parameters(), **KW)
    _steps(model, opt, range(1))
    sd = opt.state_dict()
    with pytest.raises(TypeError, match="get/set_optimizer_state_dict.*save_optimizer_state"
                                        ".*NTOModelParallelStrategy.*NTOTrainer"):
        get_optimizer_state_dict(model, opt)
    with pytest.raises(TypeError, match="NTO.load_state_dict"):
        set_optimizer_state_dict(model, opt, {"state": {}, "param_groups": sd["param_groups"]})
    opt.load_state_dict(sd)


def test_torch_dsd_fake_step_refused_before_the_schedule_moves():
    """On an NTO with no state yet, torch's helpers first take a zero-grad step (lr=0):
    refused at that step, so the schedule and the state stay untouched."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _model()
    opt = NTO(model.named_parameters(), **KW)
    with pytest.raises(TypeError, match=r"NTO.step\(\) was called by torch's get/set_optim"):
        get_optimizer_state_dict(model, opt)
    assert opt.step_count == 0 and not opt.state
    _steps(model, opt, range(1))  # still usable
    assert opt.step_count == 1


def test_nto_of_unwraps():
    opt = NTO(_model().named_parameters(), **KW)
    wrapper = type("AcceleratedOptimizer", (), {"optimizer": opt})()
    assert nto_of(wrapper) is opt
    with pytest.raises(TypeError, match="got SGD"):
        nto_of(torch.optim.SGD(_model().parameters(), lr=0.1))


def test_check_ddp_refuses_other_modules():
    with pytest.raises(TypeError, match="DistributedDataParallel.*got Sequential"):
        check_ddp(_model())


def test_distributed_works_without_transformers(tmp_path):
    """A torch-only user: nto_ext.distributed imports, saves and loads with transformers
    unimportable; and neither `import nto_ext` nor `nto_ext.distributed` loads it."""
    _run_without_transformers(f"""
        import torch, sys
        from torch import nn
        import nto_ext
        from nto_ext import NTO
        from nto_ext.distributed import save_optimizer_state, load_optimizer_state
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        opt = NTO(model.named_parameters(), lr=1e-2, budget="50%", switch_every=2)
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward()
            opt.step(); opt.zero_grad()
        save_optimizer_state(model, opt, {str(tmp_path / "o")!r})
        opt2 = NTO(model.named_parameters(), lr=1e-2, budget="50%", switch_every=2)
        load_optimizer_state(model, opt2, {str(tmp_path / "o")!r})
        a, b = opt.state_dict(), opt2.state_dict()
        assert a["nto"] == b["nto"], (a["nto"], b["nto"])
        assert a["state"].keys() == b["state"].keys() and a["state"]
        for i in a["state"]:
            for k, v in a["state"][i].items():  # "rows": a tensor trained a range of rows
                w = b["state"][i][k]
                assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (i, k)
        assert not [m for m in sys.modules if m.startswith("transformers")]
    """)


def test_hf_needs_transformers_blocked_really():
    """The blocker works (else the test above proves nothing): nto_ext.hf fails under it."""
    proc = _python(_BLOCKER + "import nto_ext.hf")
    assert proc.returncode != 0 and "blocked for this test: transformers" in proc.stderr


@pytest.mark.parametrize("stmt", ["import nto_ext", "from nto_ext import NTO, plan",
                                  "import nto_ext.distributed, nto_ext.planner, "
                                  "nto_ext.budget, nto_ext.checkpoint"])
def test_torch_only_imports_do_not_load_transformers(stmt):
    out = _python(f"{stmt}; import sys; print(sorted(m for m in sys.modules "
                  "if m.split('.')[0] in ('transformers', 'accelerate')))")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
