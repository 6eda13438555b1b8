"""Block discovery and packing (nto_ext/blocks.py) and the policies' schedules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import (
    llama_config,
    one_thread,  # noqa: F401  (autouse fixture)
)

from nto_ext.blocks import (
    ParamInfo,
    Unit,
    block_of,
    discover_blocks,
    first_names,
    group_label,
    make_units,
    pack_consecutive,
    param_label,
    row_ranges,
)
from nto_ext.budget import Budget
from nto_ext.policies import BlockPolicy, SamplePolicy, make_policy

NAMES = [
    ("model.embed_tokens.weight", "embed", "embed"),
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0", "layer"),
    ("model.layers.11.mlp.down_proj.weight", "model.layers.11", "layer"),
    ("model.norm.weight", "other", "other"),
    ("lm_head.weight", "head", "head"),
    ("transformer.wte.weight", "embed", "embed"),
    ("transformer.wpe.weight", "embed", "embed"),
    ("transformer.h.3.attn.c_attn.weight", "transformer.h.3", "layer"),
    ("transformer.ln_f.bias", "other", "other"),
    ("bert.embeddings.word_embeddings.weight", "embed", "embed"),
    ("bert.embeddings.LayerNorm.weight", "embed", "embed"),
    ("bert.encoder.layer.5.output.dense.weight", "bert.encoder.layer.5", "layer"),
    ("bert.pooler.dense.weight", "other", "other"),
    ("classifier.weight", "head", "head"),
    ("score.weight", "head", "head"),
    ("vit.blocks.2.attn.qkv.weight", "vit.blocks.2", "layer"),
    ("layers.7.weight", "layers.7", "layer"),
    ("encoder.layers.0.fc1.weight", "encoder.layers.0", "layer"),
    ("decoder.layers.0.fc1.weight", "decoder.layers.0", "layer"),
    ("model.layers.2.mlp.blocks.1.w", "model.layers.2", "layer"),  # first index wins
    ("highway.weight", "other", "other"),
    # T5: the shared embedding; a block is `encoder.block.N`, not `...block.N.layer.M`
    ("shared.weight", "embed", "embed"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0", "layer"),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "encoder.block.0", "layer"),
    ("decoder.block.1.layer.2.DenseReluDense.wo.weight", "decoder.block.1", "layer"),
    ("encoder.final_layer_norm.weight", "other", "other"),
    ("model.shared.weight", "embed", "embed"),  # BART
    # ViT
    ("vit.embeddings.cls_token", "embed", "embed"),
    ("vit.embeddings.patch_embeddings.projection.weight", "embed", "embed"),
    ("vit.encoder.layer.1.attention.attention.query.weight", "vit.encoder.layer.1", "layer"),
    ("vit.layernorm.weight", "other", "other"),
    ("model.layers.0.mlp.shared_expert.gate_proj.weight", "model.layers.0", "layer"),
    ("blockade.weight", "other", "other"),
]


@pytest.mark.parametrize("name,block,kind", NAMES)
def test_block_of(name, block, kind):
    assert block_of(name, 0) == (block, kind)


def test_unnamed_params_are_their_own_blocks():
    assert block_of(None, 7) == ("#7", "param")
    infos = [ParamInfo(None, (3,), torch.float32) for _ in range(3)]
    assert [b.name for b in discover_blocks(infos)] == ["#0", "#1", "#2"]


def test_param_label():
    """One way to name a parameter in reports: its name, else `#<index>` ("" is a name)."""
    assert param_label("model.norm.weight", 3) == "model.norm.weight"
    assert param_label(None, 3) == "#3"
    assert param_label("", 0) == ""


def _llama_infos():
    import transformers

    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(llama_config())
    return [ParamInfo.of(n, p) for n, p in m.named_parameters()]


def test_discover_llama_in_module_order():
    blocks = discover_blocks(_llama_infos())
    assert [b.name for b in blocks] == ["embed"] + [f"model.layers.{i}" for i in range(4)] \
        + ["other", "head"]
    assert [len(b.params) for b in blocks] == [1, 9, 9, 9, 9, 1, 1]
    assert sorted(i for b in blocks for i in b.params) == list(range(39))


def test_make_units_splits_big_blocks_and_lists_too_big():
    infos = _llama_infos()
    blocks = discover_blocks(infos)

    def cost(params, elements=None):
        return sum(infos[i].numel if elements is None else elements for i in params)

    units, too_big = make_units(blocks, infos, cost, 3000)
    assert not too_big  # embed and head (128 x 32 = 4096 elements) are split into rows
    ranged = [(u.name, u.rows, u.elements) for u in units if u.rows is not None]
    assert ranged == [("model.embed_tokens.weight[0:64]", (0, 64), 2048),
                      ("model.embed_tokens.weight[64:128]", (64, 128), 2048),
                      ("lm_head.weight[0:64]", (0, 64), 2048),
                      ("lm_head.weight[64:128]", (64, 128), 2048)]
    layer0 = [u for u in units if u.block == "model.layers.0"]
    assert len(layer0) == 9 and all(len(u.params) == 1 for u in layer0)
    assert [u.name for u in units if u.block == "other"] == ["other"]  # whole block fits
    units, too_big = make_units(blocks, infos, cost, 31)  # one row (32) is too big
    assert len(too_big) == 39 and not units  # 1-D norms (32) are not split
    units, too_big = make_units(blocks, infos, cost, 10_000)
    assert not too_big and [u.name for u in units] == [b.name for b in blocks]


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 300), st.integers(1, 7), st.integers(0, 9), st.integers(1, 400))
def test_row_ranges_cover_the_rows_and_no_two_fit_together(rows, width, overhead, capacity):
    info = ParamInfo("w", (rows, width), torch.float32)

    def cost(n):
        return n + overhead  # additive in rows, plus a per-tensor cost (byte budgets)

    ranges = row_ranges(info, cost, capacity)
    if cost(width) > capacity:
        assert ranges == []
        return
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a < b == c for (a, b), (c, _) in zip(ranges, ranges[1:]))  # contiguous
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert all(cost(s * width) <= capacity for s in sizes)
    if len(ranges) > 1:  # so one period never holds two ranges of one tensor
        a, b = sorted(sizes)[:2]
        assert cost(a * width) + cost(b * width) > capacity
        assert cost(-(-rows // (len(ranges) - 1)) * width) > capacity  # the fewest ranges


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40),
       st.integers(min_value=50, max_value=200))
def test_pack_consecutive_properties(costs, capacity):
    units = [Unit(f"u{i}", f"u{i}", (i,), c, c) for i, c in enumerate(costs)]
    groups = pack_consecutive(units, capacity)
    assert [u for g in groups for u in g] == units  # every unit once, in order
    assert all(sum(u.cost for u in g) <= capacity for g in groups)
    for a, b in zip(groups, groups[1:]):  # greedy: the next unit did not fit
        assert sum(u.cost for u in a) + b[0].cost > capacity


def test_group_label():
    whole = Unit("model.layers.0", "model.layers.0", (0,), 1, 1)
    parts = [Unit(f"model.layers.1.w{i}", "model.layers.1", (i,), 1, 1) for i in range(3)]
    assert group_label([whole] + parts) == "model.layers.0, model.layers.1[3 tensors]"
    assert group_label([]) == "(none)"
    assert group_label([whole] * 20, width=30).endswith("...")


def _policy(name, budget, **kw):
    return make_policy(name, _llama_infos(), budget, **kw)


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
def test_block_policy_cycles_cover_every_unit(order):
    pol = _policy("block", Budget("elements", 10_000, "10000"), switch_every=2, order=order)
    assert isinstance(pol, BlockPolicy)
    n = len(pol.groups)
    for cycle in range(3):
        seen = [i for k in range(n) for i in pol.active((cycle * n + k) * 2)]
        assert sorted(seen) == list(range(39))  # each param exactly once per cycle
    first = [pol.active_names(k * 2) for k in range(n)]
    if order == "ascending":
        assert first[0] == ["embed"] and first[-1][-1] == "head"
    if order == "descending":
        assert first[0][-1] == "head"
    if order == "random":  # reshuffled every cycle, deterministic in the seed
        again = _policy("block", Budget("elements", 10_000, "10000"), switch_every=2,
                        order=order)
        assert [again.active_names(k) for k in range(0, 40, 2)] == \
            [pol.active_names(k) for k in range(0, 40, 2)]
        cycles = {tuple(tuple(pol.active_names((c * n + k) * 2)) for k in range(n))
                  for c in range(6)}
        assert len(cycles) > 1


def test_block_policy_switches_every_n_steps():
    pol = _policy("block", Budget("elements", 10_000, "10000"), switch_every=5)
    assert pol.active(0) == pol.active(4) != pol.active(5)


def test_sample_policy_fits_and_covers():
    budget = Budget("elements", 15_000, "15000")
    pol = _policy("sample", budget, switch_every=1, seed=3, always=("embed", "head"))
    assert isinstance(pol, SamplePolicy)
    embed_head = {0, 38}
    for cycle in range(3):
        sched = pol.schedule(cycle)
        assert sum(1 for p in sched for _ in p) == len(pol.units)  # each unit once a cycle
    seen = set()
    for step in range(pol.cycle_steps(0)):
        act = pol.active(step)
        assert embed_head <= act
        assert pol.cost(sorted(act)) <= budget.amount
        seen |= act
    assert seen == set(range(39))
    other = _policy("sample", budget, switch_every=1, seed=4, always=("embed", "head"))
    assert [other.active(s) for s in range(10)] != [pol.active(s) for s in range(10)]


def test_sample_layers_fixed_count():
    pol = _policy("sample", Budget("elements", 30_000, "30000"), switch_every=1,
                  always=("embed", "head", "other"), sample_layers=2)
    for step in range(12):
        names = pol.active_names(step)
        assert set(names[:3]) == {"embed", "head", "other"}
        assert len(names) == 5 and len(set(names[3:])) == 2
        assert all(n.startswith("model.layers.") for n in names[3:])


def test_policy_state_dict_is_a_cursor():
    pol = _policy("sample", Budget("elements", 10_000, "10000"), switch_every=1)
    want = [pol.active(s) for s in range(40)]
    sd = pol.state_dict()
    fresh = _policy("sample", Budget("elements", 10_000, "10000"), switch_every=1)
    fresh.load_state_dict(sd)
    assert [fresh.active(s) for s in range(40)] == want  # also backwards (recomputed)
    with pytest.raises(ValueError, match="cycle"):
        fresh.load_state_dict({"cycle": -1, "cycle_start": 0})


def test_always_errors():
    with pytest.raises(ValueError, match=r"always=\('nope',\): no block named \['nope'\]; "
                       r"blocks of this model: 'embed', .*'head'; also allowed, when the "
                       r"model lacks them: embed, head, other"):
        _policy("block", Budget("elements", 10_000, "10000"), always=("nope",))
    with pytest.raises(ValueError, match=r"no block named \['layer'\]"):  # many blocks
        _policy("block", Budget("elements", 10_000, "10000"), always=("embed", "layer"))
    with pytest.raises(ValueError, match=r"always=\('embed', 'head'\) needs 8,192 elements"):
        _policy("block", Budget("elements", 5_000, "5000"), always=("embed", "head"))


def test_sample_layers_errors():
    with pytest.raises(ValueError, match="sample_layers=99 but only"):
        _policy("sample", Budget("elements", 30_000, "30000"), sample_layers=99)
    with pytest.raises(ValueError, match="sample_layers=3: the 3 largest units need"):
        _policy("sample", Budget("elements", 20_000, "20000"), sample_layers=3)


# ------------------------------------------------------------------ the common HF families

def _gpt2():
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2))


def _t5(tie: bool = True):
    import transformers

    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    cfg.tie_word_embeddings = tie  # set after init: some transformers versions force True
    return transformers.T5ForConditionalGeneration(cfg)


def _bert():
    import transformers

    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3))


def _decoder(name: str):
    import transformers

    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False)
    return getattr(transformers, f"{name}ForCausalLM")(cfg)


def _vit():
    import transformers

    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=4))


def _text_batch(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 96, (2, 8), generator=g)
    if model.config.model_type == "bert":
        return {"input_ids": x, "labels": torch.tensor([0, 2])}
    return {"input_ids": x, "labels": x}


def _vit_batch(model):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g),
            "labels": torch.tensor([1, 3])}


LAYERS = {"gpt2": ["transformer.h.0", "transformer.h.1"],
          "t5": ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"],
          "bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
          "llama": ["model.layers.0", "model.layers.1"],
          "vit": ["vit.encoder.layer.0", "vit.encoder.layer.1"]}
# (builder, batch, blocks in order, kind that is absent: a head tied to the embedding)
FAMILIES = {
    "gpt2": (_gpt2, _text_batch, ["embed", *LAYERS["gpt2"], "other"], "head"),
    "t5": (_t5, _text_batch, ["embed", *LAYERS["t5"][:2], "other", *LAYERS["t5"][2:]], "head"),
    "t5-untied": (lambda: _t5(tie=False), _text_batch,
                  ["embed", *LAYERS["t5"][:2], "other", *LAYERS["t5"][2:], "head"], None),
    "bert": (_bert, _text_batch, ["embed", *LAYERS["bert"], "other", "head"], None),
    "llama": (lambda: _decoder("Llama"), _text_batch,
              ["embed", *LAYERS["llama"], "other", "head"], None),
    "qwen2": (lambda: _decoder("Qwen2"), _text_batch,
              ["embed", *LAYERS["llama"], "other", "head"], None),
    "mistral": (lambda: _decoder("Mistral"), _text_batch,
                ["embed", *LAYERS["llama"], "other", "head"], None),
    "vit": (_vit, _vit_batch, ["embed", *LAYERS["vit"], "other", "head"], None),
}
# what each non-layer block holds (name prefixes), where the family is easy to get wrong
MEMBERS = {
    "gpt2": {"embed": ["transformer.wte.", "transformer.wpe."], "other": ["transformer.ln_f."]},
    "t5": {"embed": ["shared."], "other": ["encoder.final_layer_norm.",
                                           "decoder.final_layer_norm."]},
    "t5-untied": {"embed": ["shared.", "encoder.embed_tokens.", "decoder.embed_tokens."],
                  "head": ["lm_head."]},
    "bert": {"embed": ["bert.embeddings."], "other": ["bert.pooler."], "head": ["classifier."]},
    "llama": {"embed": ["model.embed_tokens."], "other": ["model.norm."], "head": ["lm_head."]},
    "vit": {"embed": ["vit.embeddings."], "other": ["vit.layernorm."], "head": ["classifier."]},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_families_blocks_and_always(family, caplog):
    import logging

    from nto_ext import NTO

    build, make_batch, want, absent = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    named = list(model.named_parameters())
    if any(n.startswith("vit.layers.") for n, _ in named):  # transformers 5 renamed them
        want = [w.replace("vit.encoder.layer.", "vit.layers.") for w in want]
    blocks = discover_blocks([ParamInfo.of(n, p) for n, p in named])
    assert [b.name for b in blocks] == want
    assert [b.kind for b in blocks] == [n if n in ("embed", "head", "other") else "layer"
                                        for n in want]
    for block, prefixes in MEMBERS.get(family, {}).items():
        members = [named[i][0] for b in blocks if b.name == block for i in b.params]
        assert members and all(m.startswith(tuple(prefixes)) for m in members), members
        assert {p for p in prefixes if any(m.startswith(p) for m in members)} == set(prefixes)
    assert sorted(i for b in blocks for i in b.params) == list(range(len(named)))

    caplog.set_level(logging.INFO, logger="nto_ext.policies")
    opt = NTO(model.named_parameters(), lr=1e-2, budget="60%", policy="sample",
              switch_every=1, always=("embed", "head"))
    told = [r.getMessage() for r in caplog.records if "no " in r.getMessage()]
    if absent:
        assert any(f"no {absent} block" in m for m in told), told
    else:
        assert not told, told
    fixed = [named[i][1] for b in blocks if b.name in ("embed", "head") for i in b.params]
    before = [p.detach().clone() for p in fixed]
    batch = make_batch(model)
    for step in range(3):
        model(**batch).loss.backward()
        assert {i for b in blocks if b.name in ("embed", "head") for i in b.params} \
            <= opt.policy.active(step)
        opt.step()
        opt.zero_grad()
    # trained at every step (T5 untied: `shared` is no longer used in forward)
    assert sum(not torch.equal(p, b) for p, b in zip(fixed, before)) >= len(
        [a for a in ("embed", "head") if a in want])
    assert {a for a in ("embed", "head") if a in want} == {
        u.name for u in opt.policy.always_units}
    opt.remove_hooks()


def test_first_names():
    assert first_names(["a", "b"], 3) == "a, b"
    assert first_names(["a", "b", "c", "d", "e"], 3) == "a, b, c and 2 more"
    assert first_names([], 3) == ""
