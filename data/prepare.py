"""``sinklm data prepare``: tokenize a corpus into memory-mapped token shards plus a manifest.

Documents are tokenized in worker processes (``--workers``), in order, each followed by EOS, and
appended to ``<out>/<split>-00000.bin, ...`` (see :mod:`data.shards` for the format). The manifest,
``<out>/manifest.json``, is written last and atomically; it records the source, the tokenizer (hash,
vocabulary size, EOS id) and documents/tokens per split. It holds nothing that varies between runs,
so re-running on the same input reproduces identical shards and an identical manifest.

Long documents (a book) are cut into ~64K-character pieces before tokenizing so all workers stay
busy. Cuts go right after a single newline between two non-space characters: for byte-level BPE
tokenizers with the GPT-2 split regex (GPT-NeoX, GPT-2) no pre-token spans such a point, so the ids
are exactly those of the whole document (tested on the bundled books); other tokenizers get whole
documents.

Usage::

    sinklm data prepare --out out/data                       # bundled Gutenberg books (train/validation/stream-test)
    sinklm data prepare --out out/mine books/ --validation held_out/
    sinklm data prepare --out out/pile shard.jsonl --text-field text
    sinklm data prepare --out out/fw --dataset HuggingFaceFW/fineweb --dataset-config sample-10BT --streaming --max-docs 100000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    DataError,
    ShardWriter,
    token_dtype,
    write_json_atomic,
)
from data.sources import BundledSource, FilesSource, HFDatasetSource, Source, TextsSource

DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens = 512 MB of uint16 per shard
PIECE_CHARS = 1 << 16  # cut long documents into ~64K-character pieces
BATCH_CHARS = 1 << 20  # send ~1M characters per task to a worker
BATCH_DOCS = 1024
_SINK_TOKEN = re.compile(r"^<\|sink(_\d+)?\|>$")
# A cut point: a single newline between two non-space characters. (After a longer whitespace run the
# GPT-2 regex splits off the run's last character, so a cut there would change the ids.)
_LINE_START = re.compile(r"(?<=\S)\n(?=\S)")


# --------------------------------------------------------------------------------------------
# tokenization in worker processes
# --------------------------------------------------------------------------------------------

_worker_tokenizer = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_json: str, dtype: str) -> None:
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
def _text_tokenizer(full_json: str) -> _TextTokenizer:
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


def _pieces(source: Source, max_documents: int | None, cut: bool) -> Iterator[tuple[str, bool]]:
    """(piece, is_last_piece_of_its_document) in order."""
    for i, doc in enumerate(source.documents()):
        if max_documents is not None and i >= max_documents:
            return
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


def _tokenize_split(
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

    batches = _batches(_pieces(source, max_documents, cut))
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
    bar.close()
    stats.tokens = writer.num_tokens
    stats.seconds = time.perf_counter() - start
    return stats


# --------------------------------------------------------------------------------------------
# python API
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    manifest: dict[str, Any]
    stats: dict[str, SplitStats]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stats.values())

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def _as_source(value: Source | Sequence[str]) -> Source:
    if isinstance(value, Source):
        return value
    if isinstance(value, str):
        raise DataError("a split's documents must be a Source or a list of strings, not a single string")
    return TextsSource(list(value))


def _clear_previous(out_dir: Path, splits: Sequence[str], overwrite: bool) -> None:
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists():
        if not overwrite:
            raise DataError(f"{manifest} already exists: pass --overwrite (overwrite=True) to prepare {out_dir} again")
        manifest.unlink()  # first, so the folder never looks complete while shards are replaced
    for path in [*out_dir.glob("*.bin.tmp"), out_dir / f"{MANIFEST_NAME}.tmp"]:
        path.unlink(missing_ok=True)
    for split in splits:
        for path in out_dir.glob(f"{split}-*.bin"):
            path.unlink()


def prepare(
    out_dir: str | Path,
    splits: Mapping[str, Source | Sequence[str]] | None = None,
    tokenizer: Any = None,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_documents: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize ``splits`` ({split name: Source or list of document strings}; default: the bundled
    books' train/validation/stream-test) into ``out_dir``. ``tokenizer``: a spec for
    :func:`data.tokenizer.load_tokenizer` or a loaded fast tokenizer (sink tokens are ignored: shards
    hold text only). ``workers``: tokenizer processes (<= 1: in this process). Returns the manifest
    and per-split statistics (documents, tokens, seconds)."""
    from transformers import PreTrainedTokenizerFast

    from data.corpora import SPLIT_NAMES
    from data.tokenizer import BUNDLED_SPEC, base_vocab_size, load_tokenizer

    out_dir = Path(out_dir)
    if splits is None:
        splits = {name: BundledSource(name) for name in SPLIT_NAMES}
    if not splits:
        raise DataError("nothing to prepare: no splits given")
    for name in splits:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise DataError(f"split name {name!r}: use letters, digits, '_', '.', '-'")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    sources = {name: _as_source(value) for name, value in splits.items()}
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        tok, spec = tokenizer, getattr(tokenizer, "name_or_path", None) or "in-memory"
    else:
        tok, spec = load_tokenizer(tokenizer), str(tokenizer) if tokenizer is not None else BUNDLED_SPEC
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {spec}: has no EOS token; documents need one as separator")
    vocab_size = base_vocab_size(tok)
    dtype = token_dtype(vocab_size)
    text_tokenizer = _text_tokenizer(tok.backend_tokenizer.to_str())
    tokenizer_json, cut = text_tokenizer.json, text_tokenizer.cut
    workers = default_workers() if workers is None else workers

    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir, list(sources), overwrite)
    start = time.perf_counter()
    split_entries: dict[str, Any] = {}
    stats: dict[str, SplitStats] = {}
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:
            import multiprocessing

            # spawn: the parent may hold torch/tokenizers threads, which fork would copy half-locked.
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(
                context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json, dtype.str))
            )
        for name, source in sources.items():
            writer = SplitWriter(out_dir, name, dtype, shard_tokens)
            try:
                stats[name] = _tokenize_split(
                    source, writer, tokenizer_json, cut, tok.eos_token_id, pool, workers, max_documents, progress, f"tokenize {name}"
                )
            except BaseException:
                # Leave nothing behind: a folder without a manifest is unusable anyway, stray shards only confuse.
                writer.abort()
                written = [e["file"] for e in writer.entries] + [e["file"] for v in split_entries.values() for e in v["shards"]]
                for file in written:
                    (out_dir / file).unlink(missing_ok=True)
                raise
            entries = writer.close()
            if stats[name].documents == 0:
                raise DataError(f"split {name!r}: the source {source.describe()} produced no documents")
            split_entries[name] = {
                "source": source.describe(),
                "documents": stats[name].documents,
                "tokens": stats[name].tokens,
                "shards": entries,
            }
    seconds = time.perf_counter() - start
    from sinklm import __version__

    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": f"sinklm {__version__}",
        "tokenizer": {
            "spec": spec,
            "fingerprint": text_tokenizer.fingerprint,
            "vocab_size": vocab_size,
            "eos_id": int(tok.eos_token_id),
            "eos_token": tok.eos_token,
        },
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "max_documents": max_documents,
        "splits": split_entries,
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return PrepareResult(manifest=manifest, stats=stats, seconds=seconds)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinklm data prepare",
        description="Tokenize a corpus into memory-mapped token shards + manifest.json. With no inputs: "
        "the bundled Gutenberg books, split by book into train / validation / stream-test.",
    )
    parser.add_argument("inputs", nargs="*", help=".txt files (one document each), .jsonl/.json/.parquet files, or folders of them -> split 'train'")
    parser.add_argument("--out", default="out/data", help="output folder (default: out/data)")
    parser.add_argument("--validation", nargs="+", default=[], metavar="INPUT", help="files/folders for split 'validation' (put the train inputs before this option)")
    parser.add_argument("--text-field", default="text", help="text field of .jsonl/.json/.parquet records and datasets (default: text)")
    hf = parser.add_argument_group("Hugging Face datasets (instead of inputs)")
    hf.add_argument("--dataset", help="hub name, save_to_disk folder, or builder (json, parquet, text) with --data-files")
    hf.add_argument("--dataset-config", help="dataset configuration name")
    hf.add_argument("--split", default="train", help="dataset split for 'train' (default: train)")
    hf.add_argument("--validation-split", help="dataset split for 'validation' (e.g. validation)")
    hf.add_argument("--data-files", nargs="+", help="data_files for a builder such as json / parquet")
    hf.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it first")
    hf.add_argument("--cache-dir", help="datasets cache folder (default: the HF datasets cache)")
    parser.add_argument("--tokenizer", help="tokenizer.json, tokenizer folder or hub name (default: bundled GPT-NeoX-20B)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes (default: %(default)s; 1 = in-process)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="max tokens per shard file (default: %(default)s)")
    parser.add_argument("--max-docs", type=int, help="stop each split after this many documents (smoke tests)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _splits_from_args(args: argparse.Namespace) -> dict[str, Source] | None:
    if args.dataset and args.inputs:
        raise DataError("give either input files or --dataset, not both")
    if args.dataset:
        def hf(split: str) -> HFDatasetSource:
            return HFDatasetSource(
                name=args.dataset, config=args.dataset_config, split=split, text_field=args.text_field,
                streaming=args.streaming, data_files=args.data_files, cache_dir=args.cache_dir,
            )

        splits: dict[str, Source] = {"train": hf(args.split)}
        if args.validation_split:
            splits["validation"] = hf(args.validation_split)
        if args.validation:
            splits["validation"] = FilesSource(args.validation, args.text_field)
        return splits
    if args.inputs:
        splits = {"train": FilesSource(args.inputs, args.text_field)}
        if args.validation:
            splits["validation"] = FilesSource(args.validation, args.text_field)
        return splits
    if args.validation or args.validation_split or args.data_files or args.streaming or args.cache_dir:
        raise DataError("--validation/--validation-split/--data-files/--streaming/--cache-dir need input files or --dataset")
    return None  # bundled books


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = prepare(
            out_dir=args.out,
            splits=_splits_from_args(args),
            tokenizer=args.tokenizer,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            max_documents=args.max_docs,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except DataError as err:
        print(f"sinklm data prepare: error: {err}", file=sys.stderr)
        return 2
    for name, split in result.manifest["splits"].items():
        print(f"{name:>12}: {split['documents']:>9,} documents {split['tokens']:>14,} tokens {len(split['shards']):>4} shard(s)")
    print(
        f"wrote {Path(args.out) / MANIFEST_NAME}: {result.tokens:,} tokens in {result.seconds:.1f} s "
        f"= {result.tokens_per_second:,.0f} tokens/s with {args.workers} worker(s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
