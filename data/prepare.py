"""``sinklm data prepare``: tokenize a corpus into memory-mapped token shards plus a manifest.

Documents are tokenized in worker processes (``--workers``), in order, each followed by EOS, and
appended to ``<out>/<split>-00000.bin, ...`` (see :mod:`data.shards` for the format). The manifest,
``<out>/manifest.json``, is written last and atomically; it records the source, the tokenizer (hash,
vocabulary size, EOS id) and documents/tokens per split. It holds nothing that varies between runs,
so re-running on the same input reproduces identical shards and an identical manifest.

Long documents are cut into pieces that tokenize to exactly the whole document's ids
(:mod:`data.tokenizing`).

Usage::

    sinklm data prepare --out out/data                       # bundled Gutenberg books (train/validation/stream-test)
    sinklm data prepare --out out/mine books/ --validation held_out/
    sinklm data prepare --out out/pile shard.jsonl --text-field text
    sinklm data prepare --out out/fw --dataset HuggingFaceFW/fineweb --dataset-config sample-10BT --streaming --max-docs 100000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from data.version import __version__
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    DataError,
    token_dtype,
    write_json_atomic,
)
from data.settings import ConfigError, add_settings_args, field_docs, settings_from_args
from data.sources import BundledSource, FilesSource, HFDatasetSource, Source, TextsSource
from data.tokenizing import SplitStats, SplitWriter, init_worker, text_tokenizer, tokenize_split

DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens = 512 MB of uint16 per shard

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
    text_only = text_tokenizer(tok.backend_tokenizer.to_str())
    tokenizer_json, cut = text_only.json, text_only.cut
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
                context.Pool(workers, initializer=init_worker, initargs=(tokenizer_json, dtype.str))
            )
        for name, source in sources.items():
            writer = SplitWriter(out_dir, name, dtype, shard_tokens)
            try:
                stats[name] = tokenize_split(
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
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created_by": f"sinklm {__version__}",
        "tokenizer": {
            "spec": spec,
            "fingerprint": text_only.fingerprint,
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


@dataclass
class PrepareSettings:
    """What to tokenize and how: the options of ``sinklm data prepare`` (besides ``--out``), and the
    experiment's ``data`` section. With no inputs and no dataset: the bundled books."""

    inputs: list[str] = field(default_factory=list)
    """.txt files (one document each), .jsonl/.json/.parquet files, or folders of them -> split 'train'."""
    validation: list[str] = field(default_factory=list)
    """Files/folders for split 'validation'."""
    text_field: str = "text"
    """Text field of .jsonl/.json/.parquet records and datasets."""
    dataset: str | None = None
    """A Hugging Face dataset instead of inputs: hub name, save_to_disk folder, or builder (json, parquet, text) with data_files."""
    dataset_config: str | None = None
    """Dataset configuration name."""
    split: str = "train"
    """Dataset split for 'train'."""
    validation_split: str | None = None
    """Dataset split for 'validation' (e.g. validation)."""
    data_files: list[str] | None = None
    """data_files for a builder such as json / parquet."""
    streaming: bool = False
    """Stream the dataset instead of downloading it first."""
    cache_dir: str | None = None
    """Datasets cache folder (default: the HF datasets cache)."""
    tokenizer: str | None = None
    """tokenizer.json, tokenizer folder or hub name (default: bundled GPT-NeoX-20B)."""
    workers: int = field(default_factory=default_workers)
    """Tokenizer processes (1 = in-process)."""
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    """Max tokens per shard file."""
    max_docs: int | None = None
    """Stop each split after this many documents (smoke tests)."""
    overwrite: bool = False
    """Replace an existing prepared folder."""
    progress: bool = True
    """Show a progress bar."""

    def sources(self) -> dict[str, Source] | None:
        """{split: Source} for these settings; None means the bundled books."""
        if self.dataset and self.inputs:
            raise DataError("give either input files or --dataset, not both")
        if self.dataset:
            def hf(split: str) -> HFDatasetSource:
                return HFDatasetSource(
                    name=self.dataset, config=self.dataset_config, split=split, text_field=self.text_field,
                    streaming=self.streaming, data_files=self.data_files, cache_dir=self.cache_dir,
                )

            splits: dict[str, Source] = {"train": hf(self.split)}
            if self.validation_split:
                splits["validation"] = hf(self.validation_split)
            if self.validation:
                splits["validation"] = FilesSource(self.validation, self.text_field)
            return splits
        if self.inputs:
            splits = {"train": FilesSource(self.inputs, self.text_field)}
            if self.validation:
                splits["validation"] = FilesSource(self.validation, self.text_field)
            return splits
        if self.validation or self.validation_split or self.data_files or self.streaming or self.cache_dir:
            raise DataError("--validation/--validation-split/--data-files/--streaming/--cache-dir need input files or --dataset")
        return None  # bundled books


def prepare_with(out_dir: str | Path, settings: PrepareSettings) -> PrepareResult:
    """:func:`prepare` with typed settings: what the CLI and the experiment call."""
    return prepare(
        out_dir=out_dir,
        splits=settings.sources(),
        tokenizer=settings.tokenizer,
        workers=settings.workers,
        shard_tokens=settings.shard_tokens,
        max_documents=settings.max_docs,
        overwrite=settings.overwrite,
        progress=settings.progress,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinklm data prepare",
        description="Tokenize a corpus into memory-mapped token shards + manifest.json. With no inputs: "
        "the bundled Gutenberg books, split by book into train / validation / stream-test.",
    )
    docs = field_docs(PrepareSettings)
    parser.add_argument("inputs", nargs="*", help=docs["inputs"])
    parser.add_argument("--out", default="out/data", help="output folder (default: out/data)")
    parser.add_argument("--validation", nargs="+", default=[], metavar="INPUT", help=docs["validation"] + " (put the train inputs before this option)")
    parser.add_argument("--data-files", nargs="+", help=docs["data_files"])
    add_settings_args(parser, PrepareSettings, skip=("inputs", "validation", "data_files"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(PrepareSettings, args)
        result = prepare_with(args.out, settings)
    except (DataError, ConfigError) as err:
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
