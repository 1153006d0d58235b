"""The token stream :class:`data.loader.SampleLoader` cuts into samples, from either of two sources.

- A folder written by ``sinklm data prepare`` (``manifest.json`` + shards): one split's shards
  (:class:`data.shards.TokenStream`), checked against the manifest's sha256 and vocabulary
  (:func:`data.verify.verify_data`, cached in the folder).
- A gpt-neox / Megatron-LM indexed dataset of whole documents (``PREFIX.idx`` + ``PREFIX.bin``, or
  the ``.bin`` cut into ``PREFIX-0000i-of-0000N.bin`` parts; read by :mod:`data.indexed`), as
  gpt-neox's ``tools/datasets/preprocess_data.py`` or Megatron-LM's ``tools/preprocess_data.py``
  write it. Its stream is the ``.bin`` as stored: every sequence's tokens, in index order, back to
  back, memory-mapped. Nothing is added between documents: an end-of-document token is there
  only if the dataset was written with ``--append-eod`` (do so: the loader's windows cross
  document boundaries, as in gpt-neox). Such a dataset has no splits (``split`` does not apply:
  the whole dataset is the stream) and names no tokenizer: its ids are taken to be the run's
  tokenizer's -- the bundled GPT-NeoX-20B tokenizer of Pythia, ``vocab_size`` text tokens -- and
  every id is checked to be below ``vocab_size`` by one pass over the data (remembered per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.indexed import IndexedDataset, TokenView, is_indexed_dataset, open_indexed
from data.shards import MANIFEST_NAME, DataError, TokenStream, read_manifest
from data.tokenizer import BUNDLED_SPEC
from data.verify import verify_data

INDEXED_TOKENIZER = {
    "spec": BUNDLED_SPEC,
    "fingerprint": None,
    "source": "a Megatron indexed dataset: token ids taken to be GPT-NeoX-20B's, as in Pythia's Pile",
}
"""What a run on a Megatron dataset records as its tokenizer (no manifest says; a checkpoint keeps
this, with ``vocab_size``)."""


def is_megatron_source(path: str | Path) -> bool:
    """``path`` names a Megatron indexed dataset rather than a prepared folder (which has a manifest)."""
    return not (Path(path) / MANIFEST_NAME).is_file() and is_indexed_dataset(path)


@dataclass
class TokenSource:
    """One token stream and what is known about its tokens."""

    path: Path
    """What the user named (a prepared folder, or the dataset's prefix / .idx / folder)."""
    stream: TokenStream | TokenView
    """``len`` and contiguous slices -> int64."""
    tokenizer: dict[str, Any]
    """The manifest's tokenizer record, or :data:`INDEXED_TOKENIZER` with ``vocab_size``."""
    manifest: dict[str, Any] | None = None
    """A prepared folder's manifest; None for a Megatron dataset."""
    dataset: IndexedDataset | None = None
    """The Megatron dataset; None for a prepared folder."""

    @property
    def where(self) -> str:
        """The file to name in messages about the data as a whole."""
        return str(self.dataset.idx_path if self.dataset is not None else self.path / MANIFEST_NAME)

    def record(self) -> dict[str, Any]:
        """What a run records of this data (``Plan.manifest``): the manifest itself, or for a Megatron
        dataset its tokenizer record and an ``indexed`` entry (index file, tokens, sequences, documents)."""
        if self.manifest is not None:
            return self.manifest
        ds = self.dataset
        assert ds is not None
        indexed = {"index": str(ds.idx_path), "parts": len(ds.bin_paths), "tokens": len(self.stream),
                   "sequences": ds.num_sequences, "documents": max(0, ds.num_documents - 1)}  # fmt: skip
        return {"tokenizer": self.tokenizer, "indexed": indexed}


def open_token_source(path: str | Path, split: str, vocab_size: int | None = None, verify: bool = True) -> TokenSource:
    """The stream of ``split`` of a prepared folder, or of a whole Megatron dataset (``split`` ignored;
    ``vocab_size``, the text vocabulary its ids must stay below, is then required). ``verify``: the
    sha256 / id checks (cached); a Megatron dataset's ids are always checked."""
    path = Path(path)
    if is_megatron_source(path):
        if vocab_size is None:
            raise DataError(f"{path}: a Megatron indexed dataset names no tokenizer; give the vocabulary size its ids use")
        dataset = open_indexed(path)
        stream = dataset.tokens()
        dataset.check_token_ids(vocab_size)
        return TokenSource(path, stream, dict(INDEXED_TOKENIZER, vocab_size=vocab_size), dataset=dataset)
    manifest = read_manifest(path)
    stream = TokenStream(path, split, manifest)
    if verify:
        verify_data(path, [split], manifest, progress=False)  # sha256 and ids < vocab, cached
    return TokenSource(path, stream, dict(manifest["tokenizer"]), manifest=manifest)
