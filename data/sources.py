"""Where documents come from: the bundled books, local files, or Hugging Face ``datasets``.

Every source is an object with ``documents()`` (an iterator of strings, one per document, read lazily
so corpora larger than RAM stream through) and ``describe()`` (a JSON-able record for the manifest).

- ``.txt`` (or ``.txt.gz``): one document per file; folders are searched recursively, sorted by path.
- ``.jsonl`` / ``.json`` / ``.parquet``: one document per record, text in ``text_field``.
- Hugging Face datasets: a hub name (needs network), a ``save_to_disk`` folder (``load_from_disk``),
  or a builder such as ``json`` / ``parquet`` with ``data_files``; ``streaming=True`` iterates without
  downloading the whole corpus first.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.corpora import GUTENBERG_DIR, SPLITS, read_book
from data.shards import DataError
from data.text import decode_text

TEXT_SUFFIXES = (".txt", ".txt.gz")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def _read_bytes(path: Path) -> bytes:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in TEXT_SUFFIXES + RECORD_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


ENCODING_ERRORS = ("strict", "replace")
"""How undecodable bytes in a UTF-8 record file are handled: an error naming file:line (the default),
or U+FFFD in their place (``--encoding-errors replace``, only when asked)."""


def decode_utf8(raw: bytes, where: str, errors: str = "strict", first_line: int = 1) -> str:
    """UTF-8 bytes -> text; bad bytes raise :class:`DataError` naming ``where:line`` unless ``errors='replace'``."""
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8", errors=errors)
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{where}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
            "fix the file, or pass --encoding-errors replace to replace undecodable bytes"
        ) from None


def iter_jsonl(path: str | Path, errors: str = "strict") -> Iterator[tuple[str, Any]]:
    """(``file:line``, record) for each non-empty line of a JSON-lines file (``.gz`` too); a line
    that is not JSON or not UTF-8 raises :class:`DataError` naming the file and line."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_utf8(raw, str(path), errors, first_line=lineno)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            yield f"{path}:{lineno}", record


# A .txt file is refused as binary when it holds a NUL byte or more than this share of control
# characters (tab, newline, carriage return and form feed do not count).
MAX_CONTROL_SHARE = 0.01
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


def refuse_binary(raw: bytes, text: str, path: Path) -> None:
    """Raise :class:`DataError` naming ``path`` when its bytes are evidently not text."""
    if b"\0" in raw:
        raise DataError(f"{path}: binary file (holds NUL bytes at offset {raw.index(0)}), expected text")
    if not text:
        return
    controls = sum(1 for _ in _CONTROL.finditer(text))
    if controls > MAX_CONTROL_SHARE * len(text):
        raise DataError(
            f"{path}: binary file ({controls / len(text):.0%} control characters, at most "
            f"{MAX_CONTROL_SHARE:.0%} expected in text)"
        )


def _text_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with a {text_field!r} field, found {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: no text field {text_field!r} (fields: {keys}); pass --text-field")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
    return value


class Source:
    """Base: a named stream of documents."""

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def total_bytes(self) -> int | None:
        """Input size for the progress bar, when cheap to know."""
        return None


@dataclass
class TextsSource(Source):
    """Documents already in memory (tests, the bundled books, small scripts)."""

    texts: list[str]
    name: str = "in-memory"
    details: dict[str, Any] = field(default_factory=dict)

    def documents(self) -> Iterator[str]:
        yield from self.texts

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "documents": len(self.texts), **self.details}

    def total_bytes(self) -> int | None:
        return sum(len(t.encode("utf-8")) for t in self.texts)


@dataclass
class BundledSource(Source):
    """One split of the bundled Gutenberg books (one document per book)."""

    split: str

    def documents(self) -> Iterator[str]:
        for name in SPLITS[self.split]:
            yield read_book(name)

    def describe(self) -> dict[str, Any]:
        return {"kind": "bundled-gutenberg", "split": self.split, "books": list(SPLITS[self.split])}

    def total_bytes(self) -> int | None:
        # Uncompressed size is in the gzip trailer (mod 2**32, fine for these books).
        total = 0
        for name in SPLITS[self.split]:
            with open(GUTENBERG_DIR / f"{name}.txt.gz", "rb") as f:
                f.seek(-4, 2)
                total += int.from_bytes(f.read(4), "little")
        return total


@dataclass
class FilesSource(Source):
    """Local files: ``.txt`` = one document per file; ``.jsonl``/``.json``/``.parquet`` = one per record."""

    paths: list[Path]
    text_field: str = "text"
    encoding_errors: str = "strict"

    def __post_init__(self) -> None:
        if self.encoding_errors not in ENCODING_ERRORS:
            raise DataError(f"--encoding-errors: expected one of {', '.join(ENCODING_ERRORS)}, found {self.encoding_errors!r}")
        self.paths = expand_paths(self.paths)

    def documents(self) -> Iterator[str]:
        for path in self.paths:
            suffix = _suffix(path)
            if suffix in TEXT_SUFFIXES:
                raw = _read_bytes(path)
                text = decode_text(raw)
                refuse_binary(raw, text, path)
                yield text
            elif suffix in (".jsonl", ".jsonl.gz"):
                yield from self._jsonl(path)
            elif suffix in (".json", ".json.gz"):
                yield from self._json(path)
            elif suffix == ".parquet":
                yield from self._parquet(path)

    def _jsonl(self, path: Path) -> Iterator[str]:
        for where, record in iter_jsonl(path, self.encoding_errors):
            yield _text_of(record, self.text_field, where)

    def _json(self, path: Path) -> Iterator[str]:
        try:
            data = json.loads(decode_utf8(_read_bytes(path), str(path), self.encoding_errors))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]  # the {"data": [...]} layout HF's json builder also accepts
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}), found {type(data).__name__}")
        for i, record in enumerate(data):
            yield _text_of(record, self.text_field, f"{path}[{i}]")

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid etc.
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        columns = parquet.schema_arrow.names
        if self.text_field not in columns:
            raise DataError(f"{path}: no text column {self.text_field!r} (columns: {', '.join(columns)}); pass --text-field")
        # Row group by row group: a parquet file larger than RAM streams through.
        for batch in parquet.iter_batches(columns=[self.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text

    def describe(self) -> dict[str, Any]:
        names = [str(p) for p in self.paths]
        return {
            "kind": "files",
            "files": names if len(names) <= 50 else names[:50] + [f"... {len(names) - 50} more"],
            "num_files": len(names),
            "text_field": self.text_field,
        }

    def total_bytes(self) -> int | None:
        return sum(p.stat().st_size for p in self.paths)


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for supported files, sorted for a fixed order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in TEXT_SUFFIXES + RECORD_SUFFIXES)
            if not found:
                raise DataError(f"{path}: no .txt/.jsonl/.json/.parquet files in this folder")
            out.extend(found)
        elif path.is_file():
            if _suffix(path) not in TEXT_SUFFIXES + RECORD_SUFFIXES:
                raise DataError(
                    f"{path}: unsupported file type {_suffix(path)!r}; expected one of "
                    f"{', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}"
                )
            out.append(path)
        else:
            raise DataError(f"input not found: {path}")
    return out


def _is_saved_dataset(path: Path) -> bool:
    """A ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


@dataclass
class HFDatasetSource(Source):
    """A Hugging Face ``datasets`` corpus: hub name, builder + data_files, or a ``save_to_disk`` folder."""

    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    data_files: list[str] | None = None
    cache_dir: str | None = None

    def _load(self) -> Any:
        import datasets

        path = Path(self.name).expanduser()
        if path.is_dir() and _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if self.split not in loaded:
                    raise DataError(f"{path}: no split {self.split!r}; it has {', '.join(loaded)}")
                loaded = loaded[self.split]
            # Streaming a saved Arrow dataset: iterate shard by shard without materialising Python rows.
            return loaded.to_iterable_dataset() if self.streaming else loaded
        try:
            return datasets.load_dataset(
                self.name,
                self.config,
                split=self.split,
                streaming=self.streaming,
                data_files=self.data_files,
                cache_dir=self.cache_dir,
            )
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            raise DataError(f"dataset {self.name!r} (config {self.config!r}, split {self.split!r}): {err}") from None

    def documents(self) -> Iterator[str]:
        dataset = self._load()
        columns = getattr(dataset, "column_names", None)
        if columns is not None and self.text_field not in columns:
            raise DataError(
                f"dataset {self.name!r}: no text column {self.text_field!r} (columns: {', '.join(columns)}); "
                "pass --text-field"
            )
        if columns is not None:
            dataset = dataset.select_columns([self.text_field])
        for i, record in enumerate(dataset):
            yield _text_of(record, self.text_field, f"dataset {self.name!r} row {i}")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "hf-dataset", "name": self.name, "split": self.split, "text_field": self.text_field}
        if self.config:
            out["config"] = self.config
        if self.data_files:
            out["data_files"] = list(self.data_files)
        if self.streaming:
            out["streaming"] = True
        return out
