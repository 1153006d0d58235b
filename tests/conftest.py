"""Shared fixtures: tiny configs, and making sure nothing reaches a hub."""

from __future__ import annotations

import os

import pytest

# Tests never download: any hub access must fail loudly instead of hanging on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_config():
    from pretrain.config import ModelConfig

    return ModelConfig.from_preset("tiny")


# Excerpt of the bundled books for data tests and training smoke tests: the first 40,000 characters of
# eight training books (one document each) and 60,000 of a validation book, about 100k tokens in all.
PREPARED_TRAIN_BOOKS = 8
PREPARED_TRAIN_CHARS = 40_000
PREPARED_VALIDATION_CHARS = 60_000


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory):
    """A prepared data dir (manifest.json + uint16 shards, splits 'train' and 'validation') made once
    per session from real Gutenberg text with the bundled GPT-NeoX tokenizer."""
    from data.corpora import SPLITS, read_book
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared_corpus")
    train = [read_book(name)[:PREPARED_TRAIN_CHARS] for name in SPLITS["train"][:PREPARED_TRAIN_BOOKS]]
    validation = [read_book(SPLITS["validation"][0])[:PREPARED_VALIDATION_CHARS]]
    prepare(out, {"train": train, "validation": validation}, workers=1, progress=False)
    return out
