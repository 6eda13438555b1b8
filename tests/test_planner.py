"""plan() on the meta device (nto_ext/planner.py)."""

import json

import pytest
import torch
from tiny import (
    llama_config,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_llama,
)

from nto_ext import NTO, Plan, plan
from nto_ext.budget import STEP_BYTES

N_ELEMENTS, N_TENSORS = 45_344, 39


def test_plan_from_config_on_meta():
    p = plan(llama_config(), "10%")
    assert isinstance(p, Plan)
    assert p.total_elements == N_ELEMENTS and p.total_tensors == N_TENSORS
    assert [b.name for b in p.blocks] == ["embed"] + [f"model.layers.{i}" for i in range(4)] \
        + ["other", "head"]
    assert p.weights_bytes == N_ELEMENTS * 4
    assert p.adamw_bytes == N_ELEMENTS * 12 + N_TENSORS * STEP_BYTES
    assert p.adamw8bit_bytes == N_ELEMENTS * 6
    assert all(g.elements <= p.budget_amount for g in p.groups)
    assert sum(g.elements for g in p.groups) == N_ELEMENTS  # each element once a cycle
    assert p.nto_bytes == max(g.nto_bytes for g in p.groups) < 0.1 * p.adamw_bytes
    assert p.cycle_steps == len(p.groups) * 50 and not p.untrainable
    text = str(p)
    for needle in ("policy=block", "budget='10%' = 4,534 elements", "model.layers.3",
                   "AdamW (torch)", "8-bit AdamW", "x AdamW"):
        assert needle in text
    d = p.to_dict()
    json.dumps(d)
    assert d["nto_vs_adamw"] == p.nto_bytes / p.adamw_bytes
    assert d["largest_untrainable"] is None


def test_plan_shares_the_optimizer_schedule():
    model = tiny_llama()
    for kwargs in ({"budget": "10%"}, {"budget": "100KiB", "order": "descending"},
                   {"budget": "30%", "policy": "sample", "always": ("embed",), "seed": 4}):
        p = plan(model, **kwargs)
        opt = NTO(model.named_parameters(), switch_every=50, **kwargs)
        for period, group in enumerate(p.groups):
            assert group.names == opt.policy.active_names(period * 50)
        opt.remove_hooks()


def test_plan_lists_untrainable_tensors_largest_first():
    p = plan(llama_config(), "1%")
    assert p.untrainable[0]["name"] == "model.embed_tokens.weight"
    assert p.largest_untrainable == "model.embed_tokens.weight"
    assert len(p.untrainable) == 30
    assert "cannot train under policy=block" in str(p)
    assert p.trainable_elements == 9 * 32


def test_plan_bytes_and_dtype():
    p32 = plan(llama_config(), "100KiB")
    assert p32.nto_bytes <= 100 * 1024
    p16 = plan(llama_config(), "100%", dtype="bfloat16")
    assert p16.dtype == "bfloat16"
    assert p16.nto_bytes == N_ELEMENTS * 10 + N_TENSORS * STEP_BYTES
    assert p16.adamw_bytes == N_ELEMENTS * 6 + N_TENSORS * STEP_BYTES
    assert p16.weights_bytes == N_ELEMENTS * 2
    assert plan(llama_config(), "100%", dtype=torch.float16).dtype == "float16"


def test_plan_from_local_folder(tmp_path):
    llama_config().save_pretrained(tmp_path)
    p = plan(tmp_path, "10%")
    assert p.total_elements == N_ELEMENTS
    assert plan(str(tmp_path), "10%").groups == p.groups


def test_plan_of_a_classifier_config():
    import transformers

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, num_labels=3)
    p = plan(cfg, "20%")
    kinds = {b.name: b.kind for b in p.blocks}
    assert kinds["head"] == "head" and kinds["embed"] == "embed"
    assert "bert.encoder.layer.1" in kinds


def test_plan_135m_model_at_10_percent():
    """SmolLM2-135M's shape, on the meta device: the plan meets the <= 0.12x AdamW target."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True)
    p = plan(cfg, "10%")
    assert p.total_elements > 100e6
    assert p.nto_bytes <= 0.12 * p.adamw_bytes
    # the tied 28.3M-element embedding is larger than 10% of 134.5M: named, not trained
    assert [u["name"] for u in p.untrainable] == ["model.embed_tokens.weight"]


BAD = [
    ((42, "10%"), {}, TypeError, r"plan\(\) got int; allowed: an nn.Module"),
    (("/nonexistent/model", "10%"), {}, ValueError, r"neither a HF model folder"),
    ((None, "10%"), {"dtype": "int8"}, ValueError, r"dtype='int8'; allowed"),
    ((None, "lots"), {}, ValueError, r"budget='lots': cannot parse it"),
    ((None, 3), {}, ValueError, r"budget=3 .* is below the smallest unit"),
    ((None, "10%"), {"policy": "lisa"}, ValueError, r"policy='lisa'; allowed"),
    ((None, "10%"), {"regrow_fraction": 0.2}, ValueError,
     r"regrow_fraction=0.2 applies to policy='sparse' only"),
    ((None, "10B"), {"policy": "sparse"}, ValueError, r"below one element .*nothing would"),
]


@pytest.mark.parametrize("args,kwargs,exc,msg", BAD)
def test_plan_bad_input(args, kwargs, exc, msg):
    model = args[0] if args[0] is not None else llama_config()
    with pytest.raises(exc, match=msg):
        plan(model, args[1], **kwargs)
