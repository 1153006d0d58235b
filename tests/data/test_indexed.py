"""Megatron / gpt-neox indexed datasets and Pythia's exact batch order.

The fixtures are written here from the documented ``.idx`` layout with ``struct.pack`` (and, where
``megatron-core`` is installed, by Megatron's own ``IndexedDatasetBuilder``), never by ``data.indexed``;
expected batches are read straight from the written bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from data.indexed import is_indexed_dataset, open_indexed
from data.loader import IGNORE_INDEX
from data.pythia_batches import PythiaBatchLoader
from data.shards import DataError

VOCAB = 1000
T = 9  # tokens per sample (Pythia: 2049)
G = 8  # global batch (Pythia: 1024)
STEPS = 5
SINK = [VOCAB, VOCAB + 1]


def write_idx(path: Path, sizes, itemsize, code=8, docs=None, magic=b"MMIDIDX\x00\x00", version=1) -> None:
    """The documented .idx layout: magic, u64 version, u8 dtype code, u64 L, u64 D, i32 sizes, i64 byte
    pointers, i64 document index."""
    sizes = [int(s) for s in sizes]
    pointers = [int(p) for p in np.concatenate([[0], np.cumsum(sizes)[:-1]]) * itemsize] if sizes else []
    docs = [0] if docs is None else docs
    L, D = len(sizes), len(docs)
    raw = magic + struct.pack("<Q", version) + struct.pack("<B", code) + struct.pack("<QQ", L, D)
    raw += struct.pack(f"<{L}i", *sizes) + struct.pack(f"<{L}q", *pointers) + struct.pack(f"<{D}q", *docs)
    path.write_bytes(raw)


def write_dataset(prefix: Path, seqs, dtype="<u2", code=8, **idx) -> bytes:
    """``prefix.bin`` holding ``seqs`` back to back and ``prefix.idx`` for it; returns the .bin bytes."""
    data = b"".join(np.asarray(s, dtype=dtype).tobytes() for s in seqs)
    prefix.with_name(prefix.name + ".bin").write_bytes(data)
    write_idx(prefix.with_name(prefix.name + ".idx"), [len(s) for s in seqs], np.dtype(dtype).itemsize, code, **idx)
    return data


def split_parts(folder: Path, data: bytes, cuts, stem="document") -> list[Path]:
    """Byte-split ``data`` at ``cuts`` into Pythia-named parts ``stem-0000i-of-0000N.bin`` (N = last part)."""
    bounds = [0, *cuts, len(data)]
    last = len(bounds) - 2
    paths = []
    for i in range(last + 1):
        path = folder / f"{stem}-{i:05d}-of-{last:05d}.bin"
        path.write_bytes(data[bounds[i] : bounds[i + 1]])
        paths.append(path)
    return paths


@pytest.fixture
def samples() -> np.ndarray:
    """STEPS whole global batches of T-token samples plus 3 leftover samples; every row distinct."""
    rows = np.random.default_rng(0).integers(0, VOCAB, size=(STEPS * G + 3, T))
    rows[:, 0] = np.arange(len(rows))  # unique first token: a row identifies its sample
    return rows


@pytest.fixture
def pythia_prefix(tmp_path, samples) -> Path:
    prefix = tmp_path / "single" / "document"
    prefix.parent.mkdir()
    write_dataset(prefix, samples)
    return prefix


def direct_sample(bin_path: Path, index: int) -> np.ndarray:
    """Sample ``index`` read from the raw bytes at the offset the format implies (index * T * 2)."""
    return np.fromfile(bin_path, dtype="<u2", count=T, offset=index * T * 2).astype(np.int64)


def gather_step(path, step, world_size, micro, sink_ids=()) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """All ranks' rows of ``step``: (rank, row number on that rank, input row, labels row)."""
    out = []
    for rank in range(world_size):
        loader = PythiaBatchLoader(path, micro, sink_ids, rank, world_size, global_batch_size=G, sample_tokens=T,
                                   start_step=step, model_vocab_size=VOCAB + 2)
        rows = 0
        for _ in range(loader.accumulation_steps):
            assert loader.step == step
            batch = next(loader)
            assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
            assert batch["input_ids"].shape == (micro, len(sink_ids) + T - 1) == batch["labels"].shape
            for inp, lab in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
                out.append((rank, rows, inp, lab))
                rows += 1
    return out


def test_reader_matches_written_sequences(tmp_path):
    """Prevents misreading the header or arrays: variable-length documents in int32 (code 4) read back
    exactly, with the document index, from a prefix, the .idx, the .bin or the folder; and as one token
    stream."""
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 70000, size=n) for n in (5, 1, 17, 3, 8)]
    prefix = tmp_path / "corpus_text_document"
    write_dataset(prefix, seqs, dtype="<i4", code=4, docs=[0, 2, 5])
    for path in (prefix, prefix.with_suffix(".idx"), prefix.with_suffix(".bin"), tmp_path):
        assert is_indexed_dataset(path)
        ds = open_indexed(path)
        assert len(ds) == 5 and ds.dtype == np.int32 and list(ds.document_index) == [0, 2, 5]
        for i, seq in enumerate(seqs):
            got = ds[i]
            assert got.dtype == np.int64 and np.array_equal(got, seq)
    stream = open_indexed(prefix).tokens()
    flat = np.concatenate(seqs)
    assert len(stream) == len(flat) and np.array_equal(stream[3:30], flat[3:30]) and len(stream[40:50]) == 0


def test_megatron_builder_fixture(tmp_path):
    """Prevents drift from the real format: a dataset written by megatron-core's own builder (documents
    and sequences) reads back as written and as Megatron itself reads it."""
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    rng = np.random.default_rng(2)
    docs = [[rng.integers(0, 50277, size=n) for n in lengths] for lengths in ([4, 9], [2049], [1, 1, 30])]
    bin_path, idx_path = tmp_path / "mc.bin", tmp_path / "mc.idx"
    builder = mcore.IndexedDatasetBuilder(str(bin_path), dtype=np.uint16)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.from_numpy(seq.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(idx_path))
    flat = [seq for doc in docs for seq in doc]
    ours, theirs = open_indexed(tmp_path / "mc"), mcore.IndexedDataset(str(tmp_path / "mc"))
    assert len(ours) == len(theirs) == len(flat) and ours.dtype == np.uint16
    assert np.array_equal(ours.document_index, theirs.document_indices)
    for i, seq in enumerate(flat):
        assert np.array_equal(ours[i], seq) and np.array_equal(ours[i], theirs[i])


def test_megatron_builder_pythia_batches(tmp_path, samples):
    """Prevents a loader that only agrees with our own writer: Pythia-style samples written by
    megatron-core's builder give the same batches as the struct-written fixture's raw bytes."""
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "document.bin"), dtype=np.uint16)
    for row in samples:
        builder.add_item(torch.from_numpy(row))
    builder.end_document()
    builder.finalize(str(tmp_path / "document.idx"))
    got = gather_step(tmp_path, 3, 2, 2)
    expected = [samples[3 * G + (row // 2 * 2 + rank) * 2 + row % 2] for rank, row, _, _ in got]
    assert np.array_equal(np.stack([lab for *_, lab in got]), np.stack(expected)[:, 1:])


@pytest.mark.parametrize("world_size,micro", [(1, 8), (1, 2), (2, 2), (4, 1), (2, 4)])
def test_batches_equal_direct_read(pythia_prefix, world_size, micro):
    """Prevents training on anything but Pythia's batch ``s``: for every step, all ranks' micro-batches
    together are samples [s*G, (s+1)*G) read straight from the .bin, in SampleLoader's split (rank r
    takes the r-th B of each R*B), with the sink layout inputs = sinks + sample[:-1], labels =
    [-100]*(k-1) + sample."""
    bin_path = pythia_prefix.with_suffix(".bin")
    k = len(SINK)
    for step in range(STEPS):
        got = gather_step(pythia_prefix, step, world_size, micro, SINK)
        assert len(got) == G
        for rank, row, inp, lab in got:
            u, b = divmod(row, micro)  # micro-batch u of the step, row b in it
            sample = direct_sample(bin_path, step * G + (u * world_size + rank) * micro + b)
            assert list(inp[:k]) == SINK and np.array_equal(inp[k:], sample[:-1])
            assert list(lab[: k - 1]) == [IGNORE_INDEX] * (k - 1) and np.array_equal(lab[k - 1 :], sample)


def test_no_sinks_is_gpt_neox_layout(pythia_prefix, samples):
    """Prevents an off-by-one against gpt-neox for the vanilla arm: with k = 0 a sample gives inputs
    sample[:-1] and labels sample[1:], nothing masked."""
    batch = next(PythiaBatchLoader(pythia_prefix, 2, global_batch_size=G, sample_tokens=T))
    assert np.array_equal(batch["input_ids"].numpy(), samples[:2, :-1])
    assert np.array_equal(batch["labels"].numpy(), samples[:2, 1:])


@pytest.mark.parametrize("world_size,micro", [(2, 1), (4, 2), (8, 1)])
def test_ranks_disjoint_and_cover_the_step(pythia_prefix, samples, world_size, micro):
    """Prevents duplicated or lost samples under data parallelism: the ranks' samples of a step are
    disjoint and together exactly the step's global batch."""
    for step in range(STEPS):
        by_rank: dict[int, set[int]] = {}
        for rank, _, inp, _ in gather_step(pythia_prefix, step, world_size, micro):
            by_rank.setdefault(rank, set()).add(int(inp[0]))  # a sample's first token is its index
        union = set().union(*by_rank.values())
        assert len(by_rank) == world_size and sum(len(s) for s in by_rank.values()) == len(union) == G
        assert union == set(range(step * G, (step + 1) * G))


def test_resume_equals_uninterrupted(pythia_prefix):
    """Prevents a resumed run from repeating or skipping batches: start_step=s and load_state_dict after
    m micro-batches continue exactly as an uninterrupted pass, also under another (ranks, micro-batch)
    split of the same global batch; the state is refused for a different dataset."""
    def run(**kw):
        return [b["input_ids"].numpy() for b in PythiaBatchLoader(pythia_prefix, 2, SINK, global_batch_size=G,
                                                                   sample_tokens=T, **kw)]
    full = run()
    assert len(full) == STEPS * G // 2
    for step in (1, 3, STEPS - 1):
        assert all(np.array_equal(a, b) for a, b in zip(run(start_step=step), full[step * 4 :], strict=True))
    first = PythiaBatchLoader(pythia_prefix, 2, SINK, global_batch_size=G, sample_tokens=T)
    for _ in range(6):
        next(first)
    state = first.state_dict()
    assert state["step"] == 1 and state["samples"] == 12
    again = PythiaBatchLoader(pythia_prefix, 2, SINK, global_batch_size=G, sample_tokens=T)
    again.load_state_dict(state)
    assert all(np.array_equal(next(again)["input_ids"].numpy(), b) for b in full[6:10])
    other = PythiaBatchLoader(pythia_prefix, 4, SINK, global_batch_size=G, sample_tokens=T)  # 1 rank x 4
    other.load_state_dict(state)
    assert np.array_equal(next(other)["input_ids"].numpy(), np.concatenate(full[6:8]))
    with pytest.raises(DataError, match="global_batch_size"):
        PythiaBatchLoader(pythia_prefix, 2, global_batch_size=4, sample_tokens=T).load_state_dict(state)


def test_resume_reads_nothing_before_the_step(pythia_prefix, monkeypatch):
    """Prevents a resume that scans the data from the start (hours on the 300B-token Pile): starting at
    step s touches no sample before s*G."""
    from data.indexed import IndexedDataset

    read = []
    original = IndexedDataset.__getitem__
    monkeypatch.setattr(IndexedDataset, "__getitem__", lambda self, i: read.append(int(i)) or original(self, i))
    next(PythiaBatchLoader(pythia_prefix, 2, global_batch_size=G, sample_tokens=T, start_step=4))
    assert read and min(read) >= 4 * G


def test_stops_after_last_whole_step(pythia_prefix):
    """Prevents serving a partial global batch past the data's end: the 3 leftover samples are never
    served and the iterator stops after STEPS steps."""
    loader = PythiaBatchLoader(pythia_prefix, 4, global_batch_size=G, sample_tokens=T)
    assert loader.num_steps == STEPS and len(list(loader)) == STEPS * 2 == len(loader)
    with pytest.raises(StopIteration):
        next(loader)


def test_multipart_reads_as_one(tmp_path, pythia_prefix):
    """Prevents misreading Pythia's published byte-split .bin: parts cut mid-token, named
    document-0000i-of-0000N.bin beside one document.idx, read as the single file -- sequences and
    batches alike -- from the folder, a part's path or the prefix."""
    data = pythia_prefix.with_suffix(".bin").read_bytes()
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "document.idx").write_bytes(pythia_prefix.with_suffix(".idx").read_bytes())
    paths = split_parts(folder, data, [1, 37, 38, 500])  # odd cuts split tokens and samples
    single = open_indexed(pythia_prefix)
    for path in (folder, paths[2], folder / "document"):
        ds = open_indexed(path)
        assert ds.bin_paths == paths and len(ds) == len(single)
        assert all(np.array_equal(ds[i], single[i]) for i in range(len(ds)))
    for a, b in zip(gather_step(folder, 2, 2, 2, SINK), gather_step(pythia_prefix, 2, 2, 2, SINK), strict=True):
        assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])


def test_missing_part(tmp_path, pythia_prefix):
    """Prevents silently training on a hole or a short tail: a missing middle part and a missing last
    part (Pythia numbers parts 0..N as -of-N) each fail naming that part."""
    data = pythia_prefix.with_suffix(".bin").read_bytes()
    for missing in (1, 3):
        folder = tmp_path / f"gap{missing}"
        folder.mkdir()
        (folder / "document.idx").write_bytes(pythia_prefix.with_suffix(".idx").read_bytes())
        paths = split_parts(folder, data, [100, 200, 300])
        paths[missing].unlink()
        with pytest.raises(DataError, match=f"missing part .*document-0000{missing}-of-00003.bin"):
            open_indexed(folder)


def corrupt(prefix: Path, offset: int, raw: bytes) -> Path:
    idx = prefix.with_suffix(".idx")
    data = bytearray(idx.read_bytes())
    data[offset : offset + len(raw)] = raw
    idx.write_bytes(bytes(data))
    return idx


@pytest.mark.parametrize(
    "offset,raw,message",
    [
        (0, b"TNTIDX\x00\x00\x00", "expected the magic"),
        (9, struct.pack("<Q", 2), "index version 2"),
        (17, struct.pack("<B", 9), "unknown dtype code 9"),
        (17, struct.pack("<B", 6), "dtype code 6 is a floating-point"),
        (18, struct.pack("<Q", STEPS * G + 4), "truncated or corrupt index"),
    ],
)
def test_bad_index_names_the_file(pythia_prefix, offset, raw, message):
    """Prevents feeding garbage to training from a foreign or damaged index: wrong magic, unknown
    version, unknown or float dtype code and a count that does not match the file size each raise a
    DataError naming the .idx."""
    idx = corrupt(pythia_prefix, offset, raw)
    with pytest.raises(DataError, match=message) as err:
        open_indexed(pythia_prefix)
    assert str(idx) in str(err.value)


def test_short_bin_names_the_file(pythia_prefix):
    """Prevents reading past a truncated download: a .bin one byte shorter than the index says fails
    naming it."""
    bin_path = pythia_prefix.with_suffix(".bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-1])
    with pytest.raises(DataError, match="data shorter than") as err:
        open_indexed(pythia_prefix)
    assert str(bin_path) in str(err.value)


def test_sample_length_must_match(tmp_path, samples):
    """Prevents a dataset of documents (or a wrong seq_len) passing as Pythia samples: a first sample of
    the wrong length fails at construction, a later one when its batch is built, naming the .idx."""
    rows = [list(r) for r in samples]
    prefix = tmp_path / "docs"
    write_dataset(prefix, rows[:17] + [rows[17] + [1]] + rows[18:])
    loader = PythiaBatchLoader(prefix, 2, global_batch_size=G, sample_tokens=T, start_step=1)
    with pytest.raises(DataError, match=f"sequence 17 has {T + 1} tokens, but every sample must have {T} tokens") as e:
        list(loader)
    assert str(prefix.with_suffix(".idx")) in str(e.value)
    with pytest.raises(DataError, match="sequence 0 has"):
        PythiaBatchLoader(prefix, 2, global_batch_size=G, sample_tokens=T + 1)


def test_token_ids_checked_against_the_model(tmp_path, samples):
    """Prevents an out-of-range embedding lookup or a sink id among the text: a token >= the model's
    vocabulary, or equal to a sink id, fails when its batch is built, naming the .bin."""
    prefix = tmp_path / "big"
    bad = samples.copy()
    bad[10, 4] = VOCAB + 5
    bad[20, 2] = SINK[0]
    write_dataset(prefix, bad)
    loader = PythiaBatchLoader(prefix, 2, SINK, global_batch_size=G, sample_tokens=T, model_vocab_size=VOCAB + 2)
    with pytest.raises(DataError, match=f"sample 10 holds token id {VOCAB + 5} at position 4, outside") as e:
        list(loader)
    assert str(prefix.with_suffix(".bin")) in str(e.value)
    loader.seek(2)
    with pytest.raises(DataError, match="sample 20 .* sink ids"):
        list(loader)


def test_bad_split_and_recognition(tmp_path, pythia_prefix):
    """Prevents a global batch the ranks cannot split evenly, and data.path misrecognition: a sinklm
    token-shard folder or a missing path is not an indexed dataset, and opening one says why."""
    with pytest.raises(DataError, match="not a whole number of micro-batches"):
        PythiaBatchLoader(pythia_prefix, 3, global_batch_size=G, sample_tokens=T)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    for path in (tmp_path / "shards", tmp_path / "nothing"):
        assert not is_indexed_dataset(path)
        with pytest.raises(DataError):
            open_indexed(path)
