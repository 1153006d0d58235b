"""What the streaming tools share: the stream prefix of sink-token models, checking start_size
against them, the cache-size and model options, and reading the evaluation text
(:class:`TextSettings`, :func:`read_stream_tokens`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from data.corpora import STREAM_TEST_BOOK, stream_test_text
from data.settings import add_settings_args
from data.sources import FilesSource, HFDatasetSource
from pretrain.checkpoints import DTYPES
from pretrain.config import ModelConfig


class StreamError(ValueError):
    """Bad streaming options or inputs; the message says what and where."""


# -- the stream -------------------------------------------------------------------------------------


def stream_prefix(config: ModelConfig) -> list[int]:
    """Ids every stream starts with: a sink-token model's k sink ids (fed, never scored); else none."""
    return list(config.sink_token_ids)


def check_start_size(config: ModelConfig, start_size: int) -> None:
    """Warn when the cache's start slots do not hold exactly the model's trained sink tokens."""
    k = config.sink_tokens
    if k and start_size < k:
        warnings.warn(
            f"model {config.name!r} was trained with {k} sink token(s) at the start of every sample, "
            f"but start_size={start_size} keeps only {start_size} of them: the rest are evicted like "
            f"ordinary tokens once the window moves on (use --start-size {k} to keep them all)",
            stacklevel=2,
        )
    elif k and start_size > k:
        warnings.warn(
            f"model {config.name!r} has {k} sink token(s); start_size={start_size} also keeps the first "
            f"{start_size - k} text token(s) as sinks",
            stacklevel=2,
        )


@contextmanager
def sink_warnings_ignored() -> Iterator[None]:
    """Silence :func:`check_start_size`'s warning where a start size other than the model's sink count
    is the point (compare's columns, the window baseline)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*sink token\(s\).*")
        yield


def resolve_cache_sizes(start_size: int, recent_size: int | None, cache_size: int | None) -> tuple[int, int]:
    """(start, recent) from ``--start-size`` with ``--recent-size`` or ``--cache-size`` (= start + recent)."""
    if start_size < 0:
        raise StreamError(f"--start-size must be >= 0, got {start_size}")
    if cache_size is not None:
        if recent_size is not None:
            raise StreamError("give --recent-size or --cache-size, not both")
        if start_size >= cache_size:
            raise StreamError(
                f"--start-size {start_size} leaves no room for recent tokens in --cache-size {cache_size} "
                f"(cache = start + recent, recent >= 1)"
            )
        return start_size, cache_size - start_size
    if recent_size is None:
        raise StreamError("give --recent-size or --cache-size")
    if recent_size < 1:
        raise StreamError(f"--recent-size must be >= 1, got {recent_size}")
    return start_size, recent_size


# -- command-line glue shared by stream-ppl, generate and chat --------------------------------------


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="run folder, HF export / stock GPT-NeoX folder, init checkpoint, or hub name")
    parser.add_argument("--tag", default=None, help="DeepSpeed checkpoint tag (default: the run's `latest`)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--device-map", default=None, help="Hugging Face models: accelerate placement, e.g. auto "
                        "(low-memory loading, layers split across GPUs / CPU; instead of --device)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder/file/hub name (default: the checkpoint's, else bundled)")


def add_cache_args(parser: argparse.ArgumentParser, start: int = 4, recent: int | None = 1020) -> None:
    parser.add_argument("--start-size", type=int, default=start, help=f"sink (start) tokens kept (default {start})")
    parser.add_argument("--recent-size", type=int, default=None, help=f"recent tokens kept (default {recent})")
    parser.add_argument("--cache-size", type=int, default=None, help="total cache = start + recent (instead of --recent-size)")
    parser.set_defaults(default_recent_size=recent)


def cache_sizes_from_args(args: argparse.Namespace) -> tuple[int, int]:
    recent = args.recent_size
    if recent is None and args.cache_size is None:
        recent = args.default_recent_size
    return resolve_cache_sizes(args.start_size, recent, args.cache_size)


@dataclass
class TextSettings:
    """The text a streaming evaluation reads (stream-ppl and compare share these options)."""

    text: str | None = None
    """a .txt/.jsonl/.json/.parquet file (or folder) to stream"""
    dataset: str | None = None
    """a Hugging Face dataset: hub name or save_to_disk folder"""
    dataset_config: str | None = None
    """the dataset's configuration name"""
    split: str = "test"
    """the dataset split"""
    text_field: str = "text"
    """the field holding each document's text"""
    max_tokens: int | None = None
    """stream at most this many text tokens"""


def add_text_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text (default: the bundled stream-test book, Moby Dick)")
    add_settings_args(group, TextSettings)


def check_text_args(args: TextSettings | argparse.Namespace) -> None:
    """The text options, checked before any model is loaded (the file must exist and be readable text)."""
    if args.text and args.dataset:
        raise StreamError("give --text or --dataset, not both")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise StreamError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.text:
        FilesSource([Path(args.text)], text_field=args.text_field)  # missing or unsupported: named now


def read_stream_tokens(args: TextSettings | argparse.Namespace, tokenizer) -> tuple[torch.Tensor, str]:
    """Tokenize the chosen text (a :class:`TextSettings`, or parsed args with its fields) into one
    stream (documents joined by the tokenizer's eos); (ids (N,), name)."""
    check_text_args(args)
    if args.text:
        source, name = FilesSource([Path(args.text)], text_field=args.text_field), str(args.text)
        documents = source.documents()
    elif args.dataset:
        source = HFDatasetSource(args.dataset, args.dataset_config, args.split, args.text_field, streaming=True)
        documents, name = source.documents(), f"{args.dataset}:{args.split}"
    else:
        documents, name = iter([stream_test_text()]), f"bundled:{STREAM_TEST_BOOK}"
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for document in documents:
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if args.max_tokens is not None and len(ids) >= args.max_tokens:
            break
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    if len(ids) < 2:
        raise StreamError(f"{name}: only {len(ids)} token(s) of text; need at least 2 to score anything")
    return torch.tensor(ids, dtype=torch.long), name


def fail(prog: str, err: Exception) -> int:
    """Print a user error (no traceback) and return the CLI's error status."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2
