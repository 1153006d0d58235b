"""``convert(source, output, settings)``: read any checkpoint, optionally transform it, write a
Hugging Face folder or an initial checkpoint -- the API behind ``sinklm convert`` and the experiment."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from data.settings import at_least
from pretrain.checkpoints.dtypes import DTYPE_CHOICES, parse_dtype
from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.export import check_export_folder, export_hf, export_init
from pretrain.checkpoints.init_format import describe_source, read_init_source
from pretrain.checkpoints.read import Checkpoint, read_checkpoint
from pretrain.checkpoints.training import step_of
from pretrain.checkpoints.transform import add_sink_tokens, set_attention
from pretrain.config import ATTENTION_KINDS


@dataclass
class ExportSettings:
    """The options of ``sinklm convert`` (its flags are derived from these fields)."""

    to: Literal["hf", "init"] | None = None
    """target (default: init for a HF source, else hf)"""
    revision: str | None = None
    """hub revision when SOURCE is a hub name, e.g. step100000 for Pythia"""
    tag: str | None = None
    """DeepSpeed checkpoint tag, e.g. global_step1000 (default: the one in 'latest')"""
    dtype: Literal[DTYPE_CHOICES] = "fp32"
    """weights dtype of a HF export"""
    max_shard_size: int | str = "5GB"
    """split HF weights into shards above this size"""
    tokenizer: str | None = None
    """tokenizer.json / folder / hub name (default: the one the checkpoint names)"""
    text_vocab_size: int | None = field(default=None, metadata=at_least(1))
    """text tokens of a stock HF folder without a tokenizer (default 50277 for Pythia)"""
    add_sink_tokens: int | None = field(default=None, metadata=at_least(1))
    """add K sink tokens (embedding = mean text-token embedding)"""
    attention: Literal[ATTENTION_KINDS] | None = None
    """switch the attention kernel"""
    sink_logit_init: float | None = None
    """initial b_h when switching to sink_logit (default: the config's)"""
    overwrite: bool = False
    """replace an earlier export in the output folder (anything else there is refused, never deleted)"""


def convert(source: str | Path, output: str | Path, settings: ExportSettings | None = None) -> Path:
    """Convert ``source`` (any checkpoint spec) into ``output``; progress goes to stderr as in
    ``sinklm convert``. Returns the output folder; bad input is a one-line :class:`CheckpointError`."""
    s = settings or ExportSettings()
    dtype = parse_dtype(s.dtype)
    max_shard_size = check_max_shard_size(s.max_shard_size)
    inputs = _source_folders(Path(source))
    check_export_folder(output, s.overwrite, inputs)  # before reading a possibly large checkpoint
    ckpt = read_checkpoint(source, tag=s.tag, tokenizer=s.tokenizer, text_vocab_size=s.text_vocab_size, revision=s.revision)
    inputs = [*inputs, *_source_folders(ckpt.path)]  # type: ignore[arg-type]
    check_export_folder(output, s.overwrite, inputs)  # a hub snapshot's folder is known only now
    target = s.to or ("init" if ckpt.format == "hf" else "hf")
    if target == "init" and dtype != torch.float32:
        raise CheckpointError(f"--dtype {s.dtype}: initial checkpoints are always fp32")
    if s.add_sink_tokens is not None:
        ckpt = add_sink_tokens(ckpt, s.add_sink_tokens)
    if s.attention is not None or s.sink_logit_init is not None:
        ckpt = set_attention(ckpt, s.attention or ckpt.config.attention, s.sink_logit_init)
    print(f"source: {ckpt.source}\nmodel:  {ckpt.config.name}, variant {ckpt.config.variant}", file=sys.stderr)
    for note in ckpt.notes:
        print(f"note:   {note}", file=sys.stderr)
    if target == "init":
        record = source_record(ckpt)
        export_init(ckpt, output, overwrite=s.overwrite, inputs=inputs, source=record)
        print(f"recorded source: {describe_source(record)}", file=sys.stderr)
    else:
        export_hf(ckpt, output, dtype=dtype, max_shard_size=max_shard_size, overwrite=s.overwrite, inputs=inputs)
    print(f"wrote {target} checkpoint: {output}", file=sys.stderr)
    return Path(output)


def source_record(ckpt: Checkpoint) -> dict[str, Any]:
    """Where converted weights came from, as an initial checkpoint records it (from what the
    checkpoint layer resolved): a hub model's name, revision (the hub's default ``main`` when none
    was given) and commit (its snapshot folder), or a local folder's absolute path, with the
    DeepSpeed tag / step, and ``from``: the record of an initial checkpoint read (so a Pythia
    ``stepN`` survives adding sink tokens in a second pass)."""
    resolved = ckpt.resolved
    assert resolved is not None, "read_checkpoint sets it"
    if resolved.hub_name:
        return {"hub_name": resolved.hub_name, "revision": resolved.revision or "main", "commit": resolved.path.name}
    record: dict[str, Any] = {"path": str(resolved.path.resolve()), "format": ckpt.format}
    if ckpt.step is not None:
        record["step"] = ckpt.step
    if ckpt.format == "init" and ckpt.path is not None:
        record["from"] = read_init_source(ckpt.path)
    return record


def _source_folders(path: Path | None) -> list[Path]:
    """The local folders a conversion reads (a ``global_stepN`` folder's run folder too): never written to."""
    if path is None or not path.exists():
        return []
    return [path, path.parent] if step_of(path.name) is not None else [path]


def check_max_shard_size(size: int | str) -> int:
    """``--max-shard-size``: a positive byte count or a size such as 500MB / 5GB (checked before any reading)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        value = size if isinstance(size, int) else int(size) if size.strip().isdigit() else parse_size_to_int(size)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise CheckpointError(f"--max-shard-size: expected a positive size such as 500MB or 5GB, found {size!r}")
    return value
