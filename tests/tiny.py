"""Shared helpers of the optimizer tests: a tiny Llama from config and a fixed data stream.

Importable from tests (pytest puts tests/ on sys.path) and from the fresh-process resume
child (test_resume.py adds tests/ to its path).
"""

from __future__ import annotations

import io

import pytest
import torch

VOCAB = 128


def llama_config():
    import transformers

    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 45,344-parameter LlamaForCausalLM with seeded weights (39 tensors)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config())
    return model.to(dtype)


def batch(step: int, size: int = 2, length: int = 16) -> torch.Tensor:
    """Token ids for step `step`: a pure function of the step."""
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, VOCAB, (size, length), generator=g)


def train_step(model, opt, step: int) -> float:
    x = batch(step)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def three_groups(model, named: bool = True) -> list[dict]:
    """decay / no-decay / embeddings with their own lr: several param groups."""
    params = list(model.named_parameters())
    dec = [(n, p) for n, p in params if p.dim() >= 2 and "embed" not in n]
    nodec = [(n, p) for n, p in params if p.dim() < 2]
    emb = [(n, p) for n, p in params if "embed" in n]

    def f(lst):
        return lst if named else [p for _, p in lst]

    return [{"params": f(dec)}, {"params": f(nodec), "weight_decay": 0.0},
            {"params": f(emb), "lr": 3e-3}]


def roundtrip(obj):
    """obj through torch.save / torch.load(weights_only=True), as a checkpoint would go."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread: on a shared 2-core machine, two busy OpenMP
    threads per process made these tiny-model tests 5x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
