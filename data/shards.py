"""Token shards on disk: a small fixed header followed by raw token ids, read back with ``np.memmap``.

Layout of one shard file (little endian)::

    offset  size  field
    0       8     magic  b"SINKTOK\\0"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token (uint32: 2 = uint16, 4 = uint32)
    16      8     number of tokens (uint64)
    24      40    zero padding (the header is 64 bytes, so the token array stays aligned)
    64      ...   tokens

A shard is written to ``<name>.tmp`` and renamed only once it is complete and flushed, so an
interrupted run never leaves a file under the final name. Readers check the magic, version, dtype and
that the file size matches the token count, so a truncated or foreign file fails with a message
naming the file instead of feeding garbage to training.

The ``manifest.json`` beside the shards lists them per split; it is also written atomically, last.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"SINKTOK\0"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")  # magic, version, bytes per token, token count
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sinklm-token-shards"
MANIFEST_VERSION = 1


class DataError(ValueError):
    """Bad data on disk or bad data options; the message names the file and what is wrong."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-NeoX's 50,277 does), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    num_tokens: int


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate a shard's header and size; raises :class:`DataError` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token shard not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: not a sinklm token shard (only {size} bytes, header needs {HEADER_BYTES})")
    magic, version, itemsize, num_tokens = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a sinklm token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: shard format version {version}, this code reads version {FORMAT_VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: bytes per token is {itemsize}, expected 2 (uint16) or 4 (uint32)")
    expected = HEADER_BYTES + num_tokens * itemsize
    if size != expected:
        raise DataError(
            f"{path}: truncated or corrupt shard: header says {num_tokens} tokens x {itemsize} bytes "
            f"({expected} bytes with header) but the file has {size} bytes"
        )
    dtype = np.dtype(np.uint16) if itemsize == 2 else np.dtype(np.uint32)
    return ShardHeader(version=version, dtype=dtype, num_tokens=int(num_tokens))


def open_shard(path: str | Path) -> np.memmap | np.ndarray:
    """Memory-map a shard's tokens (read-only; pages load on access, never the whole file)."""
    header = read_header(path)
    if header.num_tokens == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))


class ShardWriter:
    """Append token arrays to one shard; :meth:`close` finalises the header and renames into place.

    Tokens go to ``<path>.tmp`` with a zero count in the header; the count is filled in and the file
    renamed only after everything is flushed, so a crash leaves at most a ``.tmp`` file behind.
    """

    def __init__(self, path: str | Path, dtype: np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.num_tokens = 0
        self._hash = hashlib.sha256()
        self._file = open(self.tmp_path, "wb")
        self._file.write(self._header_bytes(0))

    def _header_bytes(self, num_tokens: int) -> bytes:
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, num_tokens)
        return header + b"\0" * (HEADER_BYTES - len(header))

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"{self.path}: token id {int(tokens.max())} does not fit in {self.dtype}")
        data = tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.num_tokens += int(tokens.size)

    def close(self) -> dict[str, Any]:
        """Finish the shard; returns its manifest entry (file name, tokens, sha256 of the tokens)."""
        self._file.seek(0)
        self._file.write(self._header_bytes(self.num_tokens))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return {"file": self.path.name, "tokens": self.num_tokens, "sha256": self._hash.hexdigest()}

    def abort(self) -> None:
        """Drop the partial file (used when tokenization fails)."""
        if not self._file.closed:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def write_shard(path: str | Path, tokens: np.ndarray, dtype: np.dtype | None = None) -> dict[str, Any]:
    """Write one complete shard in a single call (tests and small tools)."""
    tokens = np.asarray(tokens)
    writer = ShardWriter(path, dtype if dtype is not None else tokens.dtype)
    try:
        writer.write(tokens)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON via a temporary file + rename so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``<data_dir>/manifest.json``; errors name the file and the problem."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME if data_dir.is_dir() or not data_dir.name.endswith(".json") else data_dir
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST_NAME} in {data_dir}: prepare the corpus first "
            f"(`sinklm data prepare --out {data_dir}`), or the run was interrupted before finishing"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({' '.join(str(err).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: not a sinklm manifest (format {found!r}, expected {MANIFEST_FORMAT!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(
            f"{path}: manifest version {manifest.get('version')!r}, this code reads version {MANIFEST_VERSION}"
        )
    check_manifest_schema(manifest, path)
    return manifest


# The fields every reader relies on: dotted path -> expected type ("*" = every entry of a mapping or list).
_SCHEMA: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("tokenizer", dict),
    ("tokenizer.vocab_size", int),
    ("dtype", str),
    ("splits", dict),
    ("splits.*", dict),
    ("splits.*.tokens", int),
    ("splits.*.shards", list),
    ("splits.*.shards.*", dict),
    ("splits.*.shards.*.file", str),
    ("splits.*.shards.*.tokens", int),
    ("splits.*.shards.*.sha256", str),
)
_TYPE_NAMES = {dict: "a mapping", list: "a list", int: "an integer", str: "a string"}


def _values_at(data: Any, keys: list[str], where: str) -> list[tuple[str, Any]]:
    """(dotted location, value) for every value at ``keys`` below ``data`` ('*' fans out)."""
    if not keys:
        return [(where, data)]
    key, rest = keys[0], keys[1:]
    if key == "*":
        items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
        return [hit for k, v in items for hit in _values_at(v, rest, f"{where}.{k}" if where else str(k))]
    if not isinstance(data, dict) or key not in data:
        return [(f"{where}.{key}" if where else key, _MISSING)]
    return _values_at(data[key], rest, f"{where}.{key}" if where else key)


_MISSING = object()


def check_manifest_schema(manifest: dict[str, Any], path: Path) -> None:
    """Every field readers use is present with the right type; else a DataError naming the field."""
    for dotted, kind in _SCHEMA:
        for where, value in _values_at(manifest, dotted.split("."), ""):
            expected = _TYPE_NAMES[kind]  # type: ignore[index]
            if value is _MISSING:
                raise DataError(f"{path}: manifest field {where!r} is missing (expected {expected}); prepare the data again")
            if not isinstance(value, kind) or isinstance(value, bool):
                raise DataError(f"{path}: manifest field {where!r} is {value!r} (expected {expected})")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: manifest field 'dtype' is {manifest['dtype']!r} (expected 'uint16' or 'uint32')")
    if manifest["tokenizer"]["vocab_size"] < 1:
        raise DataError(f"{path}: manifest field 'tokenizer.vocab_size' is {manifest['tokenizer']['vocab_size']} (expected >= 1)")
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            name = shard["file"]
            if Path(name).name != name or not name.endswith(".bin"):
                raise DataError(f"{path}: splits.{split}: shard file {name!r} is not a .bin name inside the data folder")


class TokenStream:
    """One split's shards as a single virtual token array, memory-mapped shard by shard.

    ``stream[start:stop]`` gathers across shard boundaries; nothing is read until sliced, so a
    corpus far larger than RAM is fine.
    """

    def __init__(self, data_dir: str | Path, split: str, manifest: dict[str, Any] | None = None):
        self.data_dir = Path(data_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.data_dir)
        manifest_path = self.data_dir / MANIFEST_NAME
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(
                f"{manifest_path}: no split {split!r}; the manifest has {', '.join(sorted(splits)) or 'none'}"
            )
        self.split = split
        self.shards: list[np.ndarray] = []
        expected_dtype = np.dtype(self.manifest["dtype"])
        for entry in splits[split]["shards"]:
            path = self.data_dir / entry["file"]
            header = read_header(path)
            if header.num_tokens != entry["tokens"]:
                raise DataError(
                    f"{path}: holds {header.num_tokens} tokens but {manifest_path} lists {entry['tokens']} "
                    "(shards and manifest come from different runs)"
                )
            if header.dtype != expected_dtype:
                raise DataError(f"{path}: dtype {header.dtype} but {manifest_path} says {expected_dtype}")
            self.shards.append(open_shard(path))
        sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # shard i covers offsets[i]:offsets[i+1]
        self.num_tokens = int(self.offsets[-1])
        listed = int(splits[split].get("tokens", self.num_tokens))
        if listed != self.num_tokens:
            raise DataError(f"{manifest_path}: split {split!r} lists {listed} tokens but its shards hold {self.num_tokens}")

    def __len__(self) -> int:
        return self.num_tokens

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        start, stop, _ = index.indices(self.num_tokens)
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        shard = first
        while start < stop:
            lo = start - self.offsets[shard]
            hi = min(stop, self.offsets[shard + 1]) - self.offsets[shard]
            pieces.append(np.asarray(self.shards[shard][lo:hi], dtype=np.int64))
            start = self.offsets[shard] + hi
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
