"""Read gpt-neox / Megatron-LM indexed datasets (``MMapIndexedDataset``: ``<prefix>.idx`` + ``<prefix>.bin``).

Layout of the ``.idx`` file (little endian), as written by gpt-neox's ``MMapIndexedDataset.Index.writer``
and Megatron-LM's ``megatron.core.datasets.indexed_dataset._IndexWriter``::

    offset  size     field
    0       9        magic b"MMIDIDX\\x00\\x00"
    9       8        version (uint64, always 1)
    17      1        dtype code (uint8): 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
    18      8        sequence count L (uint64)
    26      8        document count D (uint64)
    34      4 L      sizes: tokens per sequence (int32)
    34+4L   8 L      pointers: byte offset of each sequence in the .bin (int64)
    34+12L  8 D      document index: sequence index where each document starts (int64)
    34+12L+8D  [L]   Megatron-LM's multimodal datasets only: one int8 mode per sequence (ignored here)

Codes 6 and 7 are floats (float64/float32 in Megatron-LM; "float"/double in older gpt-neox -- the two
disagree), never token ids, so they are refused. The ``.bin`` is the raw token array.

Pythia's pre-tokenized Pile is published with the ``.bin`` cut into byte ranges:
``document-00000-of-00020.bin`` ... ``document-00020-of-00020.bin`` (21 parts: the ``of`` number is
the last part's number, as EleutherAI's ``utils/shard_memmap.py`` names them) next to one
``document.idx``; EleutherAI's ``utils/unshard_memmap.py`` only concatenates them. :class:`ByteParts`
reads such parts as one contiguous byte stream without concatenating them (a part boundary may even
fall inside a token). Everything is ``np.memmap``-ed; nothing is read whole.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.shards import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
INDEX_HEADER_BYTES = _INDEX_HEADER.size  # 34
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = {6, 7}
_PART = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<last>\d{5})\.bin$")
_SCAN_TOKENS = 1 << 24  # tokens per chunk of the id check (32 MiB of uint16)
_ID_RANGES: dict[tuple, tuple[int, int]] = {}  # (files, sizes, mtimes) -> (smallest, largest id), this process


def _array(path: Path, dtype: str, offset: int, count: int) -> np.ndarray:
    """``count`` items of ``dtype`` at byte ``offset`` of ``path``, memory-mapped (np.memmap refuses 0 items)."""
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)) if count else np.zeros(0, dtype)


def _next_part(last_found: Path) -> str:
    """A hint naming the part after ``last_found`` (Pythia names parts 0..N ``-of-N``, so N+1 files)."""
    m = _PART.match(last_found.name)
    if m is None:
        return "a missing part?"
    following = f"{m['stem']}-{int(m['index']) + 1:05d}-of-{m['last']}.bin"
    return f"missing part {last_found.with_name(following)}?"


class ByteParts:
    """Several files read as one contiguous byte stream (one file is the common case)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        sizes = [p.stat().st_size for p in self.paths]
        # np.memmap cannot map an empty file; an empty part contributes no bytes.
        self.maps = [_array(p, "u1", 0, n) for p, n in zip(self.paths, sizes)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # part i: offsets[i]:offsets[i+1]
        self.nbytes = int(self.offsets[-1])

    def part_at(self, offset: int) -> Path:
        """The file holding byte ``offset`` of the stream."""
        return self.paths[int(np.searchsorted(self.offsets, offset, side="right")) - 1]

    def read(self, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        """``count`` items of ``dtype`` starting at byte ``offset`` of the stream (a copy when it spans parts)."""
        dtype = np.dtype(dtype)
        stop = offset + count * dtype.itemsize
        if offset < 0 or stop > self.nbytes:
            raise DataError(
                f"{self.paths[-1]}: bytes {offset}..{stop} requested but the data holds only {self.nbytes} bytes"
            )
        part = int(np.searchsorted(self.offsets, offset, side="right")) - 1
        pieces = []
        while offset < stop:
            lo = offset - self.offsets[part]
            hi = min(stop, self.offsets[part + 1]) - self.offsets[part]
            pieces.append(self.maps[part][lo:hi])
            offset = int(self.offsets[part] + hi)
            part += 1
        raw = pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [np.zeros(0, np.uint8)])
        return raw.view(dtype.newbyteorder("<"))


class IndexedDataset:
    """One Megatron indexed dataset: ``ds[i]`` is sequence ``i`` as int64, read from the memory map."""

    def __init__(self, idx_path: str | Path, bin_paths: Sequence[str | Path]):
        self.idx_path = Path(idx_path)
        self.bin_paths = [Path(p) for p in bin_paths]
        if not self.idx_path.is_file():
            raise DataError(f"index file not found: {self.idx_path}")
        size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            raw = f.read(INDEX_HEADER_BYTES)
        if len(raw) < INDEX_HEADER_BYTES or raw[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise DataError(
                f"{self.idx_path}: not a Megatron/gpt-neox MMapIndexedDataset index "
                f"(starts with {raw[:9]!r}, expected the magic {INDEX_MAGIC!r})"
            )
        _, version, code, self.num_sequences, self.num_documents = _INDEX_HEADER.unpack(raw)
        if version != INDEX_VERSION:
            raise DataError(f"{self.idx_path}: index version {version}, this code reads version {INDEX_VERSION}")
        if code in FLOAT_CODES:
            raise DataError(f"{self.idx_path}: dtype code {code} is a floating-point type, not token ids")
        if code not in DTYPE_CODES:
            raise DataError(
                f"{self.idx_path}: unknown dtype code {code}; known token codes are "
                + ", ".join(f"{c} ({np.dtype(t).name})" for c, t in DTYPE_CODES.items())
            )
        self.dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        L, D = self.num_sequences, self.num_documents
        expected = INDEX_HEADER_BYTES + 12 * L + 8 * D
        if size not in (expected, expected + L):  # + L: Megatron-LM's multimodal modes
            raise DataError(
                f"{self.idx_path}: truncated or corrupt index: the header says {L} sequences and {D} document "
                f"entries ({expected} bytes) but the file has {size} bytes"
            )
        self.sizes = _array(self.idx_path, "<i4", INDEX_HEADER_BYTES, L)
        self.pointers = _array(self.idx_path, "<i8", INDEX_HEADER_BYTES + 4 * L, L)
        self.document_index = _array(self.idx_path, "<i8", INDEX_HEADER_BYTES + 12 * L, D)
        if not self.bin_paths:
            raise DataError(f"{self.idx_path}: no .bin data file given")
        for path in self.bin_paths:
            if not path.is_file():
                raise DataError(f"data file not found: {path} (needed by {self.idx_path})")
        self.data = ByteParts(self.bin_paths)
        needed = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if L else 0
        if self.data.nbytes < needed:
            if len(self.bin_paths) == 1:
                where, hint = str(self.bin_paths[0]), "truncated download?"
            else:
                where = f"{len(self.bin_paths)} parts {self.bin_paths[0]} .. {self.bin_paths[-1].name}"
                hint = _next_part(self.bin_paths[-1])
            raise DataError(
                f"{where}: data shorter than {self.idx_path} says: the last sequence ends at byte {needed} but the "
                f"data holds {self.data.nbytes} bytes ({hint})"
            )

    def __len__(self) -> int:
        return self.num_sequences

    def where(self, index: int) -> Path:
        """The ``.bin`` file (part) where sequence ``index`` starts, for error messages."""
        return self.data.part_at(int(self.pointers[index]))

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} outside 0..{self.num_sequences - 1} of {self.idx_path}")
        size, pointer = int(self.sizes[index]), int(self.pointers[index])
        return self.data.read(pointer, size, self.dtype).astype(np.int64)

    def check_token_ids(self, vocab_size: int) -> None:
        """Every token of the data in ``0 .. vocab_size - 1``: one chunked pass over the memory map
        (the dataset records no tokenizer, so nothing else vouches for its ids). The smallest and
        largest id are remembered per process under the files' sizes and mtimes, so the trainer's
        loader does not read again what the pre-flight check just read. DataError names the part."""
        key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.bin_paths)
        if key not in _ID_RANGES:
            _ID_RANGES[key] = self._id_range()
        low, high = _ID_RANGES[key]
        if low >= 0 and high < vocab_size:
            return
        bad_id = low if low < 0 else high
        position = self._first_token_equal(bad_id)
        byte = position * self.dtype.itemsize
        sequence = int(np.searchsorted(self.pointers, byte, side="right")) - 1
        raise DataError(
            f"{self.data.part_at(byte)}: token id {bad_id} (token {position} of the data, in sequence {sequence} of "
            f"{self.idx_path}) is outside the vocabulary 0..{vocab_size - 1}: another tokenizer's data, or corrupt"
        )

    def _chunks(self):
        """(first token, tokens) over the whole data, ``_SCAN_TOKENS`` at a time, in the stored dtype."""
        total = self.data.nbytes // self.dtype.itemsize
        for first in range(0, total, _SCAN_TOKENS):
            yield first, self.data.read(first * self.dtype.itemsize, min(_SCAN_TOKENS, total - first), self.dtype)

    def _id_range(self) -> tuple[int, int]:
        low, high = 0, -1
        for _, chunk in self._chunks():
            if chunk.size:
                low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
        return low, high

    def _first_token_equal(self, token: int) -> int:
        for first, chunk in self._chunks():
            hits = np.flatnonzero(chunk == token)
            if hits.size:
                return first + int(hits[0])
        raise AssertionError("unreachable: the id was found by the range scan")

    def tokens(self) -> TokenView:
        """All sequences as one token stream (``data.shards.TokenStream``'s interface: ``len`` and
        contiguous slices, int64), e.g. to read a dataset of whole documents as text. The builders write sequences back to
        back from byte 0; that the index agrees is checked at its two ends (O(1), no full index scan)."""
        if self.num_sequences and (int(self.pointers[0]) != 0 or self.data.nbytes % self.dtype.itemsize):
            raise DataError(f"{self.idx_path}: sequences do not start at byte 0 of the data; not readable as a stream")
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if self.num_sequences else 0
        if end != self.data.nbytes:  # shorter is refused on opening; longer would add bytes no sequence holds
            raise DataError(
                f"{self.data.paths[-1]}: the data holds {self.data.nbytes - end} bytes past the end of the last sequence "
                f"in {self.idx_path} (byte {end}); not readable as a stream of its sequences"
            )
        return TokenView(self.data, self.dtype)

    def __repr__(self) -> str:
        parts = f"{len(self.bin_paths)} part(s)" if len(self.bin_paths) > 1 else str(self.bin_paths[0])
        return f"IndexedDataset({self.idx_path}, {parts}, {self.num_sequences} sequences, {self.dtype.name})"


class TokenView:
    """The data bytes as a flat token array: ``len(view)`` tokens, ``view[a:b]`` -> int64."""

    def __init__(self, data: ByteParts, dtype: np.dtype):
        self.data, self.dtype = data, dtype

    def __len__(self) -> int:
        return self.data.nbytes // self.dtype.itemsize

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("TokenView supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        count = max(0, stop - start)
        return self.data.read(start * self.dtype.itemsize, count, self.dtype).astype(np.int64)


def _parts_of(prefix: Path) -> list[Path]:
    """``<prefix>-NNNNN-of-MMMMM.bin`` parts in order; DataError naming the first missing one."""
    if not prefix.parent.is_dir():
        return []
    found: dict[int, tuple[int, Path]] = {}
    for path in prefix.parent.iterdir():
        m = _PART.match(path.name)
        if m and m["stem"] == prefix.name:
            found[int(m["index"])] = (int(m["last"]), path)
    if not found:
        return []
    lasts = {last for last, _ in found.values()}
    if len(lasts) > 1:
        raise DataError(f"{prefix.parent}: parts of {prefix.name} disagree on the part count (-of-{sorted(lasts)})")
    last = lasts.pop()
    for i in range(max(found) + 1):
        if i not in found:
            raise DataError(f"missing part {prefix.parent / f'{prefix.name}-{i:05d}-of-{last:05d}.bin'}")
    if max(found) > last:
        raise DataError(f"{found[max(found)][1]}: part number above the stated last part {last:05d}")
    if len(found) < last:  # fewer parts than either naming (-of-LAST or -of-COUNT) allows
        raise DataError(f"missing part {prefix.parent / f'{prefix.name}-{len(found):05d}-of-{last:05d}.bin'}")
    # len(found) == last is complete under -of-COUNT naming, one short under Pythia's -of-LAST: the size
    # check against the index decides, and names the part then.
    return [found[i][1] for i in range(len(found))]


def _resolve(path: str | Path) -> Path | None:
    """The ``.idx`` file a dataset path names, or None: ``prefix``, ``prefix.idx``, ``prefix.bin``, a part
    ``prefix-00000-of-00020.bin``, or a folder holding exactly one ``.idx`` (e.g. ``document.idx``)."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.idx"))
        return indexes[0] if len(indexes) == 1 else None
    if path.suffix == ".idx":
        return path if path.is_file() else None
    m = _PART.match(path.name)
    if m:
        candidate = path.with_name(m["stem"] + ".idx")
    elif path.suffix == ".bin":
        candidate = path.with_suffix(".idx")
    else:
        candidate = path.with_name(path.name + ".idx")
    return candidate if candidate.is_file() else None


def is_indexed_dataset(path: str | Path) -> bool:
    """Whether ``path`` names a Megatron-style dataset (by file names; :func:`open_indexed` validates)."""
    return _resolve(path) is not None


def open_indexed(path: str | Path) -> IndexedDataset:
    """Open the dataset ``path`` names (see :func:`_resolve`); the data is ``<prefix>.bin`` or its parts."""
    idx = _resolve(path)
    if idx is None:
        p = Path(path)
        if p.is_dir():
            found = sorted(x.name for x in p.glob("*.idx"))
            raise DataError(f"{p}: expected exactly one .idx file in the folder, found {found or 'none'}")
        raise DataError(f"{p}: not a Megatron indexed dataset (no {p.name}.idx or matching .idx beside it)")
    prefix = idx.with_suffix("")
    single = prefix.with_name(prefix.name + ".bin")
    parts = _parts_of(prefix)
    if single.is_file() and parts:
        raise DataError(f"{idx}: both {single.name} and {len(parts)} part(s) {parts[0].name}... exist; keep one")
    if single.is_file():
        return IndexedDataset(idx, [single])
    if parts:
        return IndexedDataset(idx, parts)
    raise DataError(f"{idx}: no data file: expected {single} or parts {prefix.name}-00000-of-NNNNN.bin beside it")
