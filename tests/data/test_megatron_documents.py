"""A gpt-neox / Megatron indexed dataset of whole documents as ``data.path`` of the regular loader
(``data.format: shards``): read as the documents' tokens in index order, cut into windows exactly as a
prepared folder with the same token stream is.

The fixtures hold the prepared Gutenberg excerpt's real training tokens cut into its documents (each
ending in EOS, as gpt-neox's ``preprocess_data.py --append-eod`` writes them), written (a) by
megatron-core's own ``IndexedDatasetBuilder`` and (b) by the test from the documented ``.idx`` layout
(``test_indexed.write_dataset``, ``struct.pack``), its ``.bin`` cut into three Pythia-named parts with a
part boundary inside a token. Expected samples are read from the written bytes or from the prepared
folder's own loader, never through ``data.indexed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from megatron_testing import documents, megatron_core_dataset
from test_indexed import split_parts, write_dataset

from data.loader import IGNORE_INDEX, SampleLoader
from data.shards import DataError, TokenStream
from data.token_source import open_token_source

VOCAB = 50277  # GPT-NeoX-20B's text tokens (the prepared corpus's tokenizer)
PADDED = 50304
SEQ, MICRO = 33, 3


def struct_multipart_dataset(folder: Path, docs: list[np.ndarray]) -> Path:
    """The documented layout written with struct.pack, the .bin then cut into three parts."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / "document"
    data = write_dataset(prefix, docs, docs=list(range(len(docs) + 1)))
    single = prefix.with_name("document.bin")
    single.unlink()  # keep only the parts (a .bin and parts side by side is refused)
    split_parts(folder, data, [len(data) // 3 + 1, 2 * len(data) // 3])
    return prefix


@pytest.fixture(scope="module", params=["megatron-core", "struct-multipart"])
def dataset(request, prepared_corpus, tmp_path_factory) -> Path:
    docs = documents(prepared_corpus)
    folder = tmp_path_factory.mktemp(request.param)
    return (megatron_core_dataset if request.param == "megatron-core" else struct_multipart_dataset)(folder, docs)


def raw_tokens(prefix: Path) -> np.ndarray:
    """The dataset's token stream from the raw bytes (a .bin, or its parts concatenated)."""
    files = [prefix.with_suffix(".bin")] if prefix.with_suffix(".bin").is_file() else sorted(prefix.parent.glob("document-*.bin"))
    return np.frombuffer(b"".join(f.read_bytes() for f in files), "<u2").astype(np.int64)


def loader(path, rank=0, world_size=1, sinks=(VOCAB,), **kwargs) -> SampleLoader:
    return SampleLoader(path, "train", SEQ, MICRO, sink_ids=sinks, rank=rank, world_size=world_size,
                        model_vocab_size=PADDED, vocab_size=VOCAB, **kwargs)  # fmt: skip


def test_stream_is_the_documents_as_stored(dataset, prepared_corpus):
    """Prevents reordering, dropping or inserting tokens: the stream is the documents in index order,
    back to back as stored, equal to the prepared folder's token stream they were cut from."""
    source = open_token_source(dataset, "train", VOCAB)
    flat = raw_tokens(dataset)
    assert len(source.stream) == len(flat) == len(TokenStream(prepared_corpus, "train"))
    assert np.array_equal(source.stream[: len(flat)], flat)
    assert np.array_equal(flat, TokenStream(prepared_corpus, "train")[:])
    record = source.record()
    assert record["indexed"]["documents"] == len(documents(prepared_corpus)) and record["tokenizer"]["vocab_size"] == VOCAB


def test_samples_are_the_concatenated_documents_cut(dataset):
    """Prevents a different cut than the shards': unshuffled, window i is flat[i n : i n + n + 1] of the
    raw bytes, behind the sink token, with the loader's label layout."""
    flat, n = raw_tokens(dataset), SEQ - 1
    ld = loader(dataset, shuffle=False)
    assert ld.num_windows == (len(flat) - 1) // n
    for b, batch in enumerate(ld.iter_epoch(0)):
        for row in range(MICRO):
            i = b * MICRO + row
            window = flat[i * n : i * n + n + 1]
            assert batch["input_ids"][row, 0] == VOCAB
            assert np.array_equal(batch["input_ids"][row, 1:].numpy(), window[:n])
            assert np.array_equal(batch["labels"][row].numpy(), window)  # 1 sink: no -100 before the text
    assert IGNORE_INDEX not in batch["labels"].numpy()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_batches_equal_the_prepared_folders(dataset, prepared_corpus, world_size):
    """Prevents the Megatron path drifting from the shards path: with shuffling, over two epochs every
    rank's batches equal those of the prepared folder holding the same tokens, and ranks are disjoint."""
    seen: set[int] = set()
    for rank in range(world_size):
        mine, theirs = loader(dataset, rank, world_size), loader(prepared_corpus, rank, world_size)
        assert len(mine) == len(theirs) > 0
        for _ in range(2 * len(mine) + 1):
            a, b = next(mine), next(theirs)
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        starts = {int(i) for batch in range(len(mine)) for i in mine.window_indices(0, batch)}
        assert not starts & seen and len(starts) == len(mine) * MICRO
        seen |= starts


def test_resume_equals_uninterrupted(dataset):
    """Prevents a resume that repeats or skips samples: state_dict after s batches (across an epoch
    end), loaded into a new loader, continues with exactly the uninterrupted batches."""
    for s in (1, len(loader(dataset, 1, 2)) + 2):
        whole = loader(dataset, 1, 2)
        first = [next(whole) for _ in range(s)]
        state = whole.state_dict()
        rest = [next(whole) for _ in range(4)]
        resumed = loader(dataset, 1, 2)
        resumed.load_state_dict(state)
        assert len(first) == s
        for want in rest:
            got = next(resumed)
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])


def test_bad_ids_and_sizes_name_the_file(tmp_path):
    """Prevents training on another tokenizer's ids: an id >= the vocabulary (int32 data, in the last
    part) or a sink id inside the vocabulary is a DataError naming the file; too few tokens for a
    global batch names the index; bytes past the last sequence name the .bin."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, VOCAB, size=n) for n in (40, 70, 55)]
    docs[2][50] = VOCAB + 3
    prefix = tmp_path / "document"
    data = write_dataset(prefix, docs, dtype="<i4", code=4, docs=[0, 1, 2, 3])
    prefix.with_name("document.bin").unlink()
    parts = split_parts(tmp_path, data, [len(data) // 2 + 2])
    with pytest.raises(DataError, match=rf"^{parts[1]}: token id {VOCAB + 3} \(token {40 + 70 + 50} of the data, in sequence 2"):
        loader(prefix)
    docs[2][50] = 7
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    write_dataset(fixed / "document", docs, dtype="<i4", code=4, docs=[0, 1, 2, 3])
    with pytest.raises(DataError, match=r"sink ids \[100\] fall inside the text vocabulary"):
        loader(fixed / "document", sinks=(100,))
    with pytest.raises(DataError, match=rf"{fixed / 'document.idx'}: the dataset has 165 tokens = 5 windows of 32\+1 tokens, fewer"):
        loader(fixed / "document", world_size=2)
    with open(fixed / "document.bin", "ab") as f:
        f.write(b"\0" * 8)  # bytes no sequence holds
    with pytest.raises(DataError, match=rf"^{fixed / 'document.bin'}: the data holds 8 bytes past the end of the last sequence"):
        loader(fixed / "document")
