"""Tokenizing a split's documents in worker processes, in order, into shard files.

Long documents (a book) are cut into ~64K-character pieces before tokenizing so all workers stay
busy. Cuts go right after a single newline between two non-space characters: for byte-level BPE
tokenizers with the GPT-2 split regex (GPT-NeoX, GPT-2) no pre-token spans such a point, so the ids
are exactly those of the whole document (tested on the bundled books); other tokenizers get whole
documents. :mod:`data.prepare` drives this for every split and writes the manifest.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.shards import ShardWriter
from data.sources import Source

PIECE_CHARS = 1 << 16  # cut long documents into ~64K-character pieces
BATCH_CHARS = 1 << 20  # send ~1M characters per task to a worker
BATCH_DOCS = 1024
# A cut point: a single newline between two non-space characters. (After a longer whitespace run the
# GPT-2 regex splits off the run's last character, so a cut there would change the ids.)
_LINE_START = re.compile(r"(?<=\S)\n(?=\S)")


# --------------------------------------------------------------------------------------------
# tokenization in worker processes
# --------------------------------------------------------------------------------------------

_worker_tokenizer = None
_worker_dtype: np.dtype | None = None


def init_worker(tokenizer_json: str, dtype: str) -> None:
    # Each worker tokenizes its batch single-threaded; parallelism comes from the processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _load_tokenizer(tokenizer_json, dtype)


def _load_tokenizer(tokenizer_json: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = _tokenizer_from_json(tokenizer_json)
    _worker_dtype = np.dtype(dtype)


@functools.lru_cache(maxsize=4)
def _tokenizer_from_json(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


@dataclass(frozen=True)
class _TextTokenizer:
    """What prepare needs from a tokenizer, derived once per tokenizer JSON (parsing it takes ~0.5 s)."""

    json: str  # text-only tokenizer for the workers
    cut: bool  # piece cuts are exact
    fingerprint: str


@functools.lru_cache(maxsize=4)
def text_tokenizer(full_json: str) -> _TextTokenizer:
    from data.tokenizer import tokenizer_fingerprint

    state = _text_only_state(json.loads(full_json))
    return _TextTokenizer(json.dumps(state, ensure_ascii=False), piece_cuts_are_exact(state), tokenizer_fingerprint(state))


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None and _worker_dtype is not None
    encodings = _worker_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.array(e.ids, dtype=_worker_dtype) for e in encodings]


def _text_only_state(state: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer state without sink tokens (a literal "<|sink|>" in the text must stay text) and
    without a post-processor (documents get no BOS/sink prefixes; we add EOS ourselves)."""
    from data.tokenizer import is_sink_token

    state = dict(state)
    state["added_tokens"] = [t for t in state.get("added_tokens", []) if not is_sink_token(t["content"])]
    state["post_processor"] = None
    state["truncation"] = None
    state["padding"] = None
    return state


def piece_cuts_are_exact(state: dict[str, Any]) -> bool:
    """True when cutting text right after a single newline between non-space characters cannot change
    the ids: byte-level BPE with the GPT-2 split regex (no pre-token spans such a newline), no prefix
    space, an NFC-or-no normalizer (a newline never composes), and no added token spanning the cut."""
    pre = state.get("pre_tokenizer") or {}
    norm = state.get("normalizer")
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return False
    if norm is not None and norm.get("type") != "NFC":
        return False
    return not any("\n" in t["content"] for t in state.get("added_tokens", []))


def split_document(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``piece_chars`` right after single newlines between non-spaces."""
    if len(text) <= piece_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > piece_chars:
        match = _LINE_START.search(text, start + piece_chars)
        if match is None:
            break
        cut = match.start() + 1  # keep the newline with the left piece
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


# --------------------------------------------------------------------------------------------
# writing one split
# --------------------------------------------------------------------------------------------


class SplitWriter:
    """Appends token arrays to ``<split>-NNNNN.bin`` shards of at most ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.entries: list[dict[str, Any]] = []
        self.num_tokens = 0
        self._writer: ShardWriter | None = None

    def _new_writer(self) -> ShardWriter:
        name = f"{self.split}-{len(self.entries):05d}.bin"
        return ShardWriter(self.out_dir / name, self.dtype)

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._writer is None:
                self._writer = self._new_writer()
            room = self.shard_tokens - self._writer.num_tokens
            self._writer.write(tokens[:room])
            self.num_tokens += min(room, tokens.size)
            tokens = tokens[room:]
            if self._writer.num_tokens >= self.shard_tokens:
                self.entries.append(self._writer.close())
                self._writer = None

    def close(self) -> list[dict[str, Any]]:
        if self._writer is not None or not self.entries:
            writer = self._writer or self._new_writer()
            self.entries.append(writer.close())
            self._writer = None
        return self.entries

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    characters: int = 0
    seconds: float = 0.0
    empty_skipped: int = 0  # documents with no text but whitespace: never a document of one EOS token


def _pieces(source: Source, max_documents: int | None, cut: bool, stats: SplitStats) -> Iterator[tuple[str, bool]]:
    """(piece, is_last_piece_of_its_document) in order; empty documents are skipped and counted."""
    kept = 0
    for doc in source.documents():
        if max_documents is not None and kept >= max_documents:
            return
        if not doc.strip():
            stats.empty_skipped += 1
            continue
        kept += 1
        parts = split_document(doc) if cut else [doc]
        for j, part in enumerate(parts):
            yield part, j == len(parts) - 1


def _batches(pieces: Iterator[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        chars += len(text)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
            yield texts, ends
            texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


def tokenize_split(
    source: Source,
    writer: SplitWriter,
    tokenizer_json: str,
    cut: bool,
    eos_id: int,
    pool: Any,
    workers: int,
    max_documents: int | None,
    progress: bool,
    desc: str,
) -> SplitStats:
    from tqdm.auto import tqdm

    stats = SplitStats()
    eos = np.array([eos_id], dtype=writer.dtype)
    bar = tqdm(total=source.total_bytes(), unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False)
    start = time.perf_counter()

    def consume(arrays: list[np.ndarray], texts: list[str], ends: list[bool]) -> None:
        for ids, text, end in zip(arrays, texts, ends):
            writer.write(ids)
            stats.characters += len(text)
            if end:
                writer.write(eos)
                stats.documents += 1
        bar.update(sum(len(t) for t in texts))
        bar.set_postfix(docs=stats.documents, tokens=writer.num_tokens, refresh=False)

    batches = _batches(_pieces(source, max_documents, cut, stats))
    try:  # the bar is cleared on any error too, so the error message starts its own line
        if pool is None:
            _load_tokenizer(tokenizer_json, writer.dtype.str)
            for texts, ends in batches:
                consume(_encode_batch(texts), texts, ends)
        else:
            # Bounded in flight (Pool.imap would read the whole input ahead): streaming corpora stay streaming.
            in_flight = 2 * workers
            pending: deque = deque()
            for texts, ends in batches:
                pending.append((pool.apply_async(_encode_batch, (texts,)), texts, ends))
                while len(pending) >= in_flight:
                    result, t, e = pending.popleft()
                    consume(result.get(), t, e)
            while pending:
                result, t, e = pending.popleft()
                consume(result.get(), t, e)
    finally:
        bar.close()
    stats.tokens = writer.num_tokens
    stats.seconds = time.perf_counter() - start
    return stats


# --------------------------------------------------------------------------------------------
# python API
# --------------------------------------------------------------------------------------------
