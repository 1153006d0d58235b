"""``convert(source, output, settings)``: read any checkpoint, optionally transform it, write a
Hugging Face folder or an initial checkpoint -- the API behind ``sinklm convert`` and the experiment."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pretrain.checkpoints.dtypes import DTYPE_CHOICES, parse_dtype
from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.export import check_output_folder, export_hf, export_init
from pretrain.checkpoints.read import read_checkpoint
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
    text_vocab_size: int | None = None
    """text tokens of a stock HF folder without a tokenizer (default 50277 for Pythia)"""
    add_sink_tokens: int | None = None
    """add K sink tokens (embedding = mean text-token embedding)"""
    attention: Literal[ATTENTION_KINDS] | None = None
    """switch the attention kernel"""
    sink_logit_init: float | None = None
    """initial b_h when switching to sink_logit (default: the config's)"""
    overwrite: bool = False
    """replace a non-empty output folder"""


def convert(source: str | Path, output: str | Path, settings: ExportSettings | None = None) -> Path:
    """Convert ``source`` (any checkpoint spec) into ``output``; progress goes to stderr as in
    ``sinklm convert``. Returns the output folder; bad input is a one-line :class:`CheckpointError`."""
    s = settings or ExportSettings()
    dtype = parse_dtype(s.dtype)
    check_output_folder(output, s.overwrite)  # before reading a possibly large checkpoint
    ckpt = read_checkpoint(source, tag=s.tag, tokenizer=s.tokenizer, text_vocab_size=s.text_vocab_size, revision=s.revision)
    src, out = ckpt.path.resolve(), Path(output).resolve()  # type: ignore[union-attr]
    if out == src or src in out.parents:
        raise CheckpointError(f"output {out} must not be the source folder or inside it")
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
        export_init(ckpt, output, overwrite=s.overwrite)
    else:
        export_hf(ckpt, output, dtype=dtype, max_shard_size=s.max_shard_size, overwrite=s.overwrite)
    print(f"wrote {target} checkpoint: {output}", file=sys.stderr)
    return Path(output)
