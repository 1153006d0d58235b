"""Changing a checkpoint's model: more sink tokens, another attention kernel."""

from __future__ import annotations

from dataclasses import replace

import torch

from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.read import Checkpoint, validated_state
from pretrain.config import ATTENTION_KINDS, ConfigError


def add_sink_tokens(ckpt: Checkpoint, count: int) -> Checkpoint:
    """``count`` more sink tokens; their input-embedding rows start at the mean embedding of the
    text tokens (a neutral, in-distribution vector). Output rows are kept: padded rows never appear
    as targets, so a trained model already gives them low logits, and no label is ever a sink."""
    if count < 1:
        raise CheckpointError(f"--add-sink-tokens must be >= 1, got {count}")
    cfg = ckpt.config
    try:
        new_cfg = replace(cfg, sink_tokens=cfg.sink_tokens + count)
    except ConfigError as err:
        raise CheckpointError(f"--add-sink-tokens {count}: {err}") from None
    new_ids = new_cfg.sink_token_ids[cfg.sink_tokens :]
    embed = ckpt.state["embed.weight"].clone()
    mean = embed[: cfg.vocab_size].float().mean(dim=0)
    embed[new_ids] = mean.to(embed.dtype)
    state = dict(ckpt.state, **{"embed.weight": embed})
    note = f"added {count} sink token(s) at ids {new_ids}, embedding = mean of {cfg.vocab_size} text-token rows"
    return replace(ckpt, config=new_cfg, state=state, notes=ckpt.notes + [note])


def set_attention(ckpt: Checkpoint, kind: str, sink_logit_init: float | None = None) -> Checkpoint:
    """Switch the attention kernel; sink_logit gains a per-head logit (``sink_logit_init``, default
    the config's), leaving sink_logit drops it."""
    if kind not in ATTENTION_KINDS:
        raise CheckpointError(f"--attention: unknown attention kind {kind!r}; expected one of {', '.join(ATTENTION_KINDS)}")
    cfg = ckpt.config
    init = cfg.sink_logit_init if sink_logit_init is None else sink_logit_init
    new_cfg = replace(cfg, attention=kind, sink_logit_init=init)
    state = {k: v for k, v in ckpt.state.items() if not k.endswith("attn.sink_logit")}
    notes = list(ckpt.notes)
    if kind == "sink_logit":
        for i in range(cfg.num_layers):
            old = ckpt.state.get(f"blocks.{i}.attn.sink_logit")
            state[f"blocks.{i}.attn.sink_logit"] = old if old is not None else torch.full((cfg.num_heads,), float(init))
    elif cfg.attention == "sink_logit":
        notes.append("dropped the learned sink logits (the new kernel has none)")
    if kind != cfg.attention:
        notes.append(f"attention {cfg.attention} -> {kind}")
    return replace(ckpt, config=new_cfg, state=validated_state(state, new_cfg, ckpt.source), notes=notes)
