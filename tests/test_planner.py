"""plan() on the meta device (nto_ext/planner.py)."""

import json
import math
import time

import pytest
import torch
from tiny import (
    llama_config,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_llama,
    train_step,
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
    for needle in ("policy=block", "budget=10% = 4,534 elements", "model.layers.3",
                   "AdamW (torch)", "8-bit AdamW", "x AdamW",
                   "dtype float32 (float32: the config names no torch_dtype)"):
        assert needle in text
    d = p.to_dict()
    json.dumps(d)
    assert d["budget"] == "10%" and plan(llama_config(), 5000).budget == "5000"
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
    p = plan(llama_config(), 50)  # a row of the 64-wide down_proj (64) is larger
    assert [u["name"] for u in p.untrainable] == [
        f"model.layers.{k}.mlp.down_proj.weight" for k in range(4)]
    assert p.largest_untrainable == "model.layers.0.mlp.down_proj.weight"
    assert "cannot train under policy=block" in str(p)
    assert p.trainable_elements == N_ELEMENTS - 4 * 64 * 32


def test_plan_shows_tensors_split_into_ranges_of_rows():
    p = plan(llama_config(), "1%")  # 453 elements: at most 14 rows of 32 a unit
    assert not p.untrainable and p.trainable_elements == N_ELEMENTS
    assert "cannot train" not in str(p)
    assert p.groups[0].names == ["model.embed_tokens.weight[0:13]"]
    assert "model.embed_tokens.weight[0:13]" in str(p)
    assert p.transient_bytes == 4096 * 4  # the embedding's dense gradient in backward
    assert "+ transient" in str(p)
    assert max(g.elements for g in p.groups) <= 453


def test_plan_bytes_and_dtype():
    p32 = plan(llama_config(), "100KiB")
    assert p32.nto_bytes <= 100 * 1024
    p16 = plan(llama_config(), "100%", dtype="bfloat16")
    assert p16.dtype == "bfloat16"
    assert p16.nto_bytes == N_ELEMENTS * 14 + N_TENSORS * STEP_BYTES  # + fp32 masters
    plain = plan(llama_config(), "100%", dtype="bfloat16", master_weights=False)
    assert plain.nto_bytes == N_ELEMENTS * 10 + N_TENSORS * STEP_BYTES
    assert p16.adamw_bytes == N_ELEMENTS * 6 + N_TENSORS * STEP_BYTES
    assert p16.weights_bytes == N_ELEMENTS * 2
    assert plan(llama_config(), "100%", dtype=torch.float16).dtype == "float16"


def _config_with_dtype(dtype: str):
    cfg = llama_config()
    cfg.torch_dtype = dtype
    return cfg


def test_plan_uses_the_config_dtype(tmp_path):
    p = plan(_config_with_dtype("bfloat16"), "100%")
    assert (p.dtype, p.dtype_source) == ("bfloat16", "the config's torch_dtype")
    assert p.weights_bytes == N_ELEMENTS * 2
    assert p.nto_bytes == N_ELEMENTS * 14 + N_TENSORS * STEP_BYTES  # with fp32 masters
    assert "dtype bfloat16 (the config's torch_dtype)" in str(p)
    p = plan(_config_with_dtype("bfloat16"), "100%", dtype="float32")  # explicit wins
    assert (p.dtype, p.dtype_source, p.weights_bytes) == ("float32", "dtype=", N_ELEMENTS * 4)
    _config_with_dtype("float16").save_pretrained(tmp_path)
    assert plan(tmp_path, "100%").dtype == "float16"
    with pytest.raises(ValueError, match=r"torch_dtype='float64', which NTO does not train; "
                       r"allowed: float32, bfloat16, float16; pass the dtype"):
        plan(_config_with_dtype("float64"), "100%")
    assert plan(_config_with_dtype("float64"), "100%", dtype="bf16").dtype == "bfloat16"
    model = tiny_llama(dtype=torch.bfloat16)  # a module: its own dtype, no source claimed
    assert plan(model, "100%").dtype == "bfloat16" and plan(model, "100%").dtype_source == ""


def test_plan_always_lists_only_blocks_the_model_has():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2,
                                  n_head=2)
    p = plan(cfg, "60%", policy="sample", always=("embed", "head"), task="lm")  # tied head
    assert p.always == ["embed"]
    assert all(g.names[0] == "embed" for g in p.groups)


@pytest.mark.parametrize("key,value,says", [
    ("num_hidden_layers", 10**9, r"num_hidden_layers=1000000000; allowed: an int in \[0, "
                                 r"4,096\]"),
    ("vocab_size", 0, r"vocab_size=0; allowed: an int in \[1, 16,777,216\]"),
    ("hidden_size", 10**30, r"hidden_size=10{30}; allowed: an int in \[1, 1,048,576\]"),
])
def test_plan_refuses_config_sizes_no_model_has(key, value, says):
    cfg = llama_config()
    setattr(cfg, key, value)
    with pytest.raises(ValueError, match=says):
        plan(cfg, "10%")


def test_plan_from_local_folder(tmp_path):
    llama_config().save_pretrained(tmp_path)
    p = plan(tmp_path, "10%")
    assert p.total_elements == N_ELEMENTS
    assert plan(str(tmp_path), "10%").groups == p.groups


def test_plan_tasks_and_packaged_name():
    """task picks the head built from a config (one meta_model, nto_ext.data's); a packaged
    model name resolves like the CLI's --model."""
    lm, base = plan(llama_config(), "10%"), plan(llama_config(), "10%", task="base")
    assert "head" in [b.name for b in lm.blocks] and "head" not in [b.name for b in base.blocks]
    assert base.total_elements < lm.total_elements
    with pytest.raises(ValueError, match=r"task='seq2seq'; allowed: None .*'base'"):
        plan(llama_config(), "10%", task="seq2seq")
    from nto_ext import data

    try:
        config = data.load_config(data.resolve_model("minilm"))
    except data.MissingPackageError:
        pytest.skip("packaged model minilm not installed")
    assert plan("minilm", "10%").groups == plan(config, "10%").groups


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
    # the tied 28.3M-element embedding is larger than 10% of 134.5M: three ranges of rows
    assert not p.untrainable
    assert [n for g in p.groups for n in g.names if "embed" in n] == [
        "model.embed_tokens.weight[0:16384]", "model.embed_tokens.weight[16384:32768]",
        "model.embed_tokens.weight[32768:49152]"]


BAD = [
    ((42, "10%"), {}, TypeError, r"plan\(\) got int; allowed: an nn.Module"),
    (("/nonexistent/model", "10%"), {}, ValueError, r"neither a packaged model .* nor an existing"),
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


# ------------------------------------------------------------------ plan(..., fit=MEMORY)

WEIGHTS = N_ELEMENTS * 4  # the tiny Llama in fp32


def _margin(memory: int) -> int:
    return math.ceil(0.05 * memory)


@pytest.mark.parametrize("memory,act", [("400KiB", None), ("400KiB", 30_000),
                                        (240_000, None)])
def test_fit_block_is_the_largest_budget_that_fits(memory, act):
    f = plan(llama_config(), fit=memory, activation_bytes=act).fit
    mem = f.memory_bytes
    assert f.weights_bytes == WEIGHTS and f.margin_bytes == _margin(mem)
    at = plan(llama_config(), f.budget_elements)  # the ordinary plan at the chosen budget
    assert (f.state_bytes, f.transient_bytes) == (at.nto_bytes, at.transient_bytes)
    assert f.predicted_bytes == WEIGHTS + at.nto_bytes + at.transient_bytes + (act or 0) \
        + _margin(mem) <= mem
    assert f.headroom_bytes == mem - f.predicted_bytes >= 0
    nxt = plan(llama_config(), f.budget_elements + 1)  # one element more: over the memory
    assert WEIGHTS + nxt.nto_bytes + nxt.transient_bytes + (act or 0) + _margin(mem) > mem
    assert f.budget_percent == pytest.approx(100 * f.budget_elements / N_ELEMENTS)
    assert ("activations unknown" in f.covers) == (act is None)


def test_fit_a_small_memory_gives_a_small_budget_that_trains_everything():
    f = plan(llama_config(), fit=230_000).fit
    assert f.budget_elements < 4096  # smaller than the embedding / head: ranges of rows
    assert not f.untrainable and "cannot train" not in str(f)
    assert f.transient_bytes == 4096 * 4  # their dense gradient in backward


def test_fit_sparse_and_sample():
    mem = 400 * 1024
    f = plan(llama_config(), fit=mem, policy="sparse").fit
    # the embedding's fp32 dense gradient during backward, or a drop's old + new copy of a
    # fully chosen 4,096-element param's fp32 row (8 B each): the larger
    largest = max(4096 * 4, 8 * min(f.budget_elements, 4096))
    assert (f.state_bytes, f.transient_bytes) == (16 * f.budget_elements, largest)
    assert WEIGHTS + 16 * f.budget_elements + largest + _margin(mem) <= mem
    assert WEIGHTS + 16 * (f.budget_elements + 1) + largest + _margin(mem) > mem
    s = plan(llama_config(), fit=mem, policy="sample")
    # sample redraws its periods each cycle: the fit prices a bound over every cycle
    assert s.nto_bytes <= s.fit.state_bytes and s.fit.predicted_bytes <= mem
    assert s.fit.budget_elements <= plan(llama_config(), fit=mem).fit.budget_elements


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: fp32 masters
@pytest.mark.parametrize("policy", ["block", "sample", "sparse"])
def test_fit_budget_measured_in_a_real_run(policy, dtype):
    """NTO built with the chosen budget: measured state peak + weights within the memory."""
    mem = 300_000
    f = plan(tiny_llama(dtype=dtype), fit=mem, policy=policy).fit
    model = tiny_llama(dtype=dtype)
    opt = NTO(model.named_parameters(), budget=f.budget_elements, policy=policy,
              switch_every=2)
    for step in range(12):  # several periods (and a regrowth for sparse)
        train_step(model, opt, step)
    rep = opt.memory_report()
    assert rep["step"] == 12 and rep["weights_bytes"] == f.weights_bytes
    assert rep["peak_total_bytes"] <= f.state_bytes
    assert rep["transient_bytes"] <= f.transient_bytes
    assert rep["peak_total_bytes"] + rep["transient_bytes"] + rep["weights_bytes"] <= mem
    opt.remove_hooks()


def test_fit_names_the_arguments_it_priced():
    """A fit priced with int4 moments in backward suggests the NTO call with them: the
    same budget with fp32 moments (NTO's default) would need ~11x the state bytes."""
    mem = 300_000
    f = plan(tiny_llama(), fit=mem, state_dtype="int4", step_in_backward=True).fit
    assert f.nto_kwargs == {"state_dtype": "int4", "step_in_backward": True}
    call = (f"NTO(..., budget={f.budget_elements}, policy='block', state_dtype='int4', "
            "step_in_backward=True)")
    assert f.nto_call() == call and call in str(f)
    model = tiny_llama()
    opt = NTO(model.named_parameters(), budget=f.budget_elements, **f.nto_kwargs)
    for step in range(4):
        train_step(model, opt, step)
    assert opt.memory_report()["peak_total_bytes"] <= f.state_bytes
    opt.remove_hooks()
    assert plan(tiny_llama(), fit=mem).fit.nto_kwargs == {}  # the defaults: nothing to add


def test_fit_nothing_fits_names_the_smallest_footprint():
    with pytest.raises(ValueError, match=r"fit='100KiB' \(100.00 KiB\): nothing fits under "
                       r"policy='block' \(the weights alone exceed it\); the smallest "
                       r"footprint is .* = weights 177.12 KiB \+ the smallest unit's training "
                       r"state 388 B \(tensor '.*layernorm.weight', 32 elements\) \+ the "
                       r"transient dense gradient 16.00 KiB .*, plus the 5% "
                       r"margin. State a memory of at least .* \(208,577 bytes\)"):
        plan(llama_config(), fit="100KiB")
    # the least memory named is exact: it fits, one byte less does not
    f = plan(llama_config(), fit=208_577).fit
    assert 32 <= f.budget_elements < 64 and f.state_bytes == 388  # one 32-element norm a period
    with pytest.raises(ValueError, match=r"nothing fits under policy='block'; the smallest"):
        plan(llama_config(), fit=208_576)  # weights fit; weights + one norm + margin do not
    with pytest.raises(ValueError, match=r"nothing fits under policy='sparse'.*activations "
                       r"1.00 MiB"):
        plan(llama_config(), fit="1MiB", policy="sparse", activation_bytes="1MiB")


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"budget": "10%", "fit": "1GiB"}, ValueError, r"exactly one of budget= .* or fit="),
    ({}, ValueError, r"exactly one of budget="),
    ({"fit": "10%"}, ValueError, r"fit='10%' is not a memory size; allowed: a byte size"),
    ({"fit": 0}, ValueError, r"fit=0; allowed"),
    ({"fit": 2.5}, TypeError, r"fit=2.5 has type float"),
    ({"budget": "10%", "seq_len": 128}, ValueError, r"apply with fit= only"),
    ({"fit": "1GiB", "batch_size": 0}, ValueError, r"batch_size=0; allowed: None or an int"),
    ({"fit": "1GiB", "activation_bytes": -1}, ValueError, r"activation_bytes=-1; allowed"),
    ({"fit": "1GiB", "activation_bytes": "lots"}, ValueError, r"activation_bytes='lots'"),
])
def test_fit_bad_input(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        plan(llama_config(), **kwargs)


def _llama(hidden, mlp, layers, heads, kv, vocab):
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv, vocab_size=vocab,
                                    torch_dtype="bfloat16")


@pytest.mark.parametrize("name,cfg,memory", [
    ("7B", _llama(4096, 11008, 32, 32, 32, 32000), "24GiB"),
    ("70B", _llama(8192, 28672, 80, 64, 8, 128256), "160GiB"),
])
@pytest.mark.parametrize("policy", ["block", "sparse"])
def test_fit_7b_70b_in_seconds(name, cfg, memory, policy):
    start = time.perf_counter()
    f = plan(cfg, fit=memory, policy=policy, batch_size=1, seq_len=2048).fit
    assert time.perf_counter() - start < 10
    assert 0 < f.budget_elements < f.total_elements and f.dtype == "bfloat16"
    assert f.weights_bytes == 2 * f.total_elements
    assert f.predicted_bytes <= f.memory_bytes
    assert "batch 1 x 2048 tokens" in str(f)
