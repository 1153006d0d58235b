"""Load a checkpoint for inference: a ready :class:`GPTNeoX` and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoints.dtypes import parse_dtype
from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.read import Checkpoint, read_checkpoint
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX


@dataclass
class LoadedModel:
    model: GPTNeoX  # in eval mode
    config: ModelConfig
    tokenizer: Any  # transformers PreTrainedTokenizerFast with the sink tokens (never None)
    source: str


def load_tokenizer_for(ckpt: Checkpoint, prepend_sinks: bool = True):
    """The checkpoint's tokenizer (the bundled GPT-NeoX-20B one when it names none) with its sink
    tokens (post-processor prepending them if asked), checked against the model: same text
    vocabulary, and the training fingerprint when known."""
    from data.tokenizer import base_vocab_size, load_tokenizer, tokenizer_fingerprint

    cfg = ckpt.config
    tokenizer = load_tokenizer(
        ckpt.tokenizer_spec, cfg.sink_tokens, padded_vocab_size=cfg.padded_vocab_size, prepend_sinks=prepend_sinks
    )
    base = base_vocab_size(tokenizer)
    name = ckpt.tokenizer_spec or "the bundled GPT-NeoX-20B tokenizer"
    if base != cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer {name} has {base} text tokens but the model's vocab_size is {cfg.vocab_size}; "
            "pass the run's tokenizer with --tokenizer"
        )
    if ckpt.tokenizer_fingerprint and tokenizer_fingerprint(tokenizer) != ckpt.tokenizer_fingerprint:
        raise CheckpointError(
            f"tokenizer {name} (fingerprint {tokenizer_fingerprint(tokenizer)}) is not the one the run trained with "
            f"(fingerprint {ckpt.tokenizer_fingerprint}); pass it with --tokenizer"
        )
    return tokenizer


def load_model(
    path: str | Path,
    tag: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    tokenizer: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """A ready :class:`GPTNeoX` (eval mode, ``dtype``, on ``device``) from any supported checkpoint
    folder or hub name, with its tokenizer: the one the checkpoint names (``tokenizer`` overrides
    it), else the bundled GPT-NeoX-20B tokenizer with the model's sink tokens."""
    ckpt = read_checkpoint(path, tag=tag, tokenizer=tokenizer, revision=revision)
    model = GPTNeoX(ckpt.config)
    model.load_state_dict(ckpt.state, strict=True)
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise CheckpointError(f"device {device!r}: {err}") from None
    model.to(device=device, dtype=parse_dtype(dtype)).eval()
    return LoadedModel(model=model, config=ckpt.config, tokenizer=load_tokenizer_for(ckpt), source=ckpt.source)
