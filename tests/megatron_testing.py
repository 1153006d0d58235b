"""Megatron indexed datasets of whole documents for any test package: ``from megatron_testing import
documents, megatron_core_dataset`` (tests/ is on sys.path through tests/conftest.py).

The documents are a prepared folder's real tokens cut at its EOS ids (each document keeps its EOS, as
gpt-neox's and Megatron-LM's ``preprocess_data.py --append-eod`` write them); the dataset is written by
megatron-core's own ``IndexedDatasetBuilder`` (a dev dependency), never by ``data.indexed``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data.shards import TokenStream


def documents(prepared, split: str = "train") -> list[np.ndarray]:
    """The split's documents, each ending in its EOS (id 0), from the prepared shards."""
    stream = TokenStream(prepared, split)[:]
    ends = np.flatnonzero(stream == 0) + 1
    assert ends[-1] == len(stream), "prepare ends every document with EOS"
    return np.split(stream, ends[:-1])


def megatron_core_dataset(folder: Path, docs: list[np.ndarray]) -> Path:
    """``folder/corpus_text_document.{bin,idx}`` (uint16) by megatron-core's builder, one item and one
    ``end_document`` per document; returns the prefix. Skips the test where megatron-core is absent."""
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "corpus_text_document"
    builder = mcore.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return prefix
