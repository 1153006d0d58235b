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
from typing import Any, Literal

from data.outputs import building, check_output_folder
from data.settings import ArgumentParser, ConfigError, add_settings_args, at_least, field_docs, settings_from_args
from data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    DataError,
    read_manifest,
    token_dtype,
    write_json_atomic,
)
from data.sources import ENCODING_ERRORS, BundledSource, FilesSource, HFDatasetSource, Source, TextsSource
from data.tokenizing import SplitStats, SplitWriter, init_worker, text_tokenizer, tokenize_split
from data.verify import VERIFIED_NAME

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


PREPARED_KIND = "prepared data folder"


def recognise_prepared(folder: Path) -> list[str]:
    """The entries of ``folder`` that ``prepare`` did not write (all of them unless it holds a manifest of ours)."""
    names = sorted(p.name for p in folder.iterdir())
    try:
        manifest = read_manifest(folder)
    except DataError:
        return names
    ours = {MANIFEST_NAME, VERIFIED_NAME} | {e["file"] for split in manifest["splits"].values() for e in split["shards"]}
    return [n for n in names if n not in ours and not (n.endswith(".bin.tmp") or n == f"{MANIFEST_NAME}.tmp")]


def _short(source: Source) -> str:
    if isinstance(source, FilesSource):
        names = [str(p) for p in source.paths]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return str(source.describe().get("kind", type(source).__name__))


def _input_paths(sources: Mapping[str, Source]) -> list[Path]:
    return [p for s in sources.values() if isinstance(s, FilesSource) for p in s.paths]


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
    hold text only). ``workers``: tokenizer processes (1: in this process).

    Everything is checked before any work; the folder is built as a temporary sibling and replaces
    ``out_dir`` only once complete (:mod:`data.outputs`), so a failure leaves the old data as it was,
    and ``overwrite`` replaces only an earlier prepared folder. Empty documents are skipped and
    counted. Returns the manifest and per-split statistics (documents, tokens, seconds)."""
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
    if workers is not None and workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be >= 1, got {max_documents}")
    sources = {name: _as_source(value) for name, value in splits.items()}
    inputs = _input_paths(sources)
    check_output_folder(out_dir, overwrite, PREPARED_KIND, recognise_prepared, inputs)  # before the tokenizer loads
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

    with building(out_dir, overwrite, PREPARED_KIND, recognise_prepared, inputs) as tmp_dir:
        result = _tokenize_into(tmp_dir, sources, tokenizer_json, cut, tok, dtype, workers, shard_tokens, max_documents, progress)
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
            "splits": result[0],
        }
        write_json_atomic(tmp_dir / MANIFEST_NAME, manifest)
    return PrepareResult(manifest=manifest, stats=result[1], seconds=result[2])


def _tokenize_into(
    out_dir: Path, sources: Mapping[str, Source], tokenizer_json: str, cut: bool, tok: Any, dtype: Any,
    workers: int, shard_tokens: int, max_documents: int | None, progress: bool,
) -> tuple[dict[str, Any], dict[str, SplitStats], float]:
    """Every split's shards in ``out_dir`` (a fresh folder); (manifest splits, stats, seconds)."""
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
                writer.abort()
                raise
            entries = writer.close()
            if stats[name].documents == 0:
                raise DataError(
                    f"split {name!r} ({_short(source)}): expected at least one document with text, found none "
                    f"({stats[name].empty_skipped} empty document(s) skipped)"
                )
            split_entries[name] = {
                "source": source.describe(),
                "documents": stats[name].documents,
                "empty_documents_skipped": stats[name].empty_skipped,
                "tokens": stats[name].tokens,
                "shards": entries,
            }
    return split_entries, stats, time.perf_counter() - start


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
    encoding_errors: Literal[ENCODING_ERRORS] = "strict"
    """Bytes that are not UTF-8 in .jsonl/.json files: strict (an error naming file:line) or replace (with U+FFFD)."""
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
    workers: int = field(default_factory=default_workers, metadata=at_least(1))
    """Tokenizer processes (1 = in-process)."""
    shard_tokens: int = field(default=DEFAULT_SHARD_TOKENS, metadata=at_least(1))
    """Max tokens per shard file."""
    max_docs: int | None = field(default=None, metadata=at_least(1))
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
                splits["validation"] = FilesSource(self.validation, self.text_field, self.encoding_errors)
            return splits
        if self.inputs:
            splits = {"train": FilesSource(self.inputs, self.text_field, self.encoding_errors)}
            if self.validation:
                splits["validation"] = FilesSource(self.validation, self.text_field, self.encoding_errors)
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
    parser = ArgumentParser(
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
        empty = f" ({split['empty_documents_skipped']:,} empty skipped)" if split["empty_documents_skipped"] else ""
        print(f"{name:>12}: {split['documents']:>9,} documents{empty} {split['tokens']:>14,} tokens {len(split['shards']):>4} shard(s)")
    print(
        f"wrote {Path(args.out) / MANIFEST_NAME}: {result.tokens:,} tokens in {result.seconds:.1f} s "
        f"= {result.tokens_per_second:,.0f} tokens/s with {args.workers} worker(s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
