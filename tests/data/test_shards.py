"""Token shard format: round trip, atomic writes, and clear errors for damaged or foreign files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.shards import (
    HEADER_BYTES,
    DataError,
    ShardWriter,
    TokenStream,
    open_shard,
    read_header,
    read_manifest,
    token_dtype,
    write_shard,
)


def test_round_trip_uint16_and_uint32(tmp_path):
    """Prevents silent dtype/offset bugs: what is written is read back bit for bit, in both widths."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 50277, size=1001).astype(np.uint16)
    large = rng.integers(0, 200_000, size=777).astype(np.uint32)
    for name, tokens in (("a.bin", small), ("b.bin", large)):
        entry = write_shard(tmp_path / name, tokens)
        assert entry["tokens"] == len(tokens)
        header = read_header(tmp_path / name)
        assert header.dtype == tokens.dtype and header.num_tokens == len(tokens)
        assert np.array_equal(open_shard(tmp_path / name), tokens)
        assert (tmp_path / name).stat().st_size == HEADER_BYTES + tokens.nbytes
    assert token_dtype(50277) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    """Prevents training on a half-copied shard or a random file: the error names the file and the mismatch."""
    path = tmp_path / "train-00000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"train-00000\.bin: truncated.*100 tokens.*254 bytes"):
        read_header(path)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"\x93NUMPY" + b"\0" * 200)
    with pytest.raises(DataError, match=r"foreign\.bin: not a sinklm token shard \(magic"):
        open_shard(foreign)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"abc")
    with pytest.raises(DataError, match=r"tiny\.bin: not a sinklm token shard \(only 3 bytes"):
        read_header(tiny)


def test_unfinished_writer_leaves_no_complete_looking_shard(tmp_path):
    """Prevents an interrupted prepare from leaving a file under the final name that readers would accept."""
    writer = ShardWriter(tmp_path / "x.bin", np.dtype(np.uint16))
    writer.write(np.arange(50, dtype=np.uint16))
    assert not (tmp_path / "x.bin").exists()  # only x.bin.tmp exists until close()
    writer._file.flush()  # as if the process died after the OS wrote the data
    with pytest.raises(DataError, match="header says 0 tokens"):
        read_header(writer.tmp_path)  # the .tmp's header still claims 0 tokens: never mistaken for complete
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_token_stream_slices_across_shards(tmp_path):
    """Prevents off-by-one errors at shard boundaries: the virtual stream equals the concatenation."""
    pieces = [np.arange(0, 7), np.arange(7, 7), np.arange(7, 20), np.arange(20, 23)]
    shards = []
    for i, piece in enumerate(pieces):
        shards.append(write_shard(tmp_path / f"train-{i:05d}.bin", piece.astype(np.uint16)))
    manifest = {
        "format": "sinklm-token-shards",
        "version": 1,
        "dtype": "uint16",
        "tokenizer": {"vocab_size": 50277},
        "splits": {"train": {"tokens": 23, "documents": 1, "shards": shards}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    stream = TokenStream(tmp_path, "train")
    full = np.arange(23)
    assert len(stream) == 23
    for start in range(24):
        for stop in range(start, 24):
            assert np.array_equal(stream[start:stop], full[start:stop]), (start, stop)
    with pytest.raises(DataError, match="no split 'validation'; the manifest has train"):
        TokenStream(tmp_path, "validation")
    # A shard swapped in from another run: the manifest's count no longer matches.
    write_shard(tmp_path / "train-00002.bin", np.arange(5, dtype=np.uint16))
    with pytest.raises(DataError, match=r"train-00002\.bin: holds 5 tokens but .*manifest.json lists 13"):
        TokenStream(tmp_path, "train")


def test_manifest_errors(tmp_path):
    """Prevents cryptic KeyErrors: missing or foreign manifests are reported with the path."""
    with pytest.raises(DataError, match="no manifest.json in .*prepare the corpus first"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match=r"manifest.json: not a sinklm manifest \(format 'something-else'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)
