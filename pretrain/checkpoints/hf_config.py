"""What a Hugging Face ``config.json`` of ours holds: GPT-NeoX fields plus the ``sinklm`` field
(attention kind, sink tokens, variant, the full ModelConfig), read and written here only.

softmax1 / sink_logit cannot be expressed by stock GPT-NeoX, so their exports get
``model_type: sinklm_gpt_neox`` and an ``auto_map`` to the bundled modelling code
(``trust_remote_code=True``); the stock loader refuses them instead of building a vanilla model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from data.version import __version__
from pretrain.checkpoints.dtypes import dtype_name
from pretrain.checkpoints.errors import CheckpointError
from pretrain.config import ATTENTION_KINDS, ModelConfig, variant_name
from pretrain.hf_keymap import to_hf_config

REMOTE_MODEL_TYPE = "sinklm_gpt_neox"
REMOTE_ARCHITECTURE = "SinkLMGPTNeoXForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_sinklm.SinkLMGPTNeoXConfig",
    "AutoModelForCausalLM": "modeling_sinklm.SinkLMGPTNeoXForCausalLM",
}
# ModelConfig fields that GPT-NeoX's config.json cannot hold; kept in its ``sinklm.model`` field
NON_SHAPE_FIELDS = ("name", "sink_logit_init", "init_method", "init_std", "output_init_method")


def read_config_json(file: Path) -> dict[str, Any]:
    """A ``config.json`` as a mapping; unreadable JSON or a non-object is an error naming the file."""
    try:
        config = json.loads(file.read_bytes())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config


def sinklm_field(config: dict[str, Any], where: str) -> tuple[str, list[int], str]:
    """(attention, sink ids, variant) declared by a ``config.json`` mapping, validated; a folder
    without a ``sinklm`` field is an ordinary model (vanilla)."""
    sinklm = config.get("sinklm")
    if sinklm is None:
        if config.get("model_type") == REMOTE_MODEL_TYPE:
            raise CheckpointError(
                f"{where}: model_type {REMOTE_MODEL_TYPE!r} but no 'sinklm' field naming its attention kind and "
                f"sink tokens; refusing to guess the variant"
            )
        return "softmax", [], "vanilla"
    if not isinstance(sinklm, dict):
        raise CheckpointError(f"{where}: field 'sinklm' must be a mapping, found {type(sinklm).__name__}")
    attention = sinklm.get("attention", "softmax")
    if attention not in ATTENTION_KINDS:
        raise CheckpointError(f"{where}: sinklm.attention is {attention!r}; expected one of {', '.join(ATTENTION_KINDS)}")
    ids = sinklm.get("sink_token_ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{where}: sinklm.sink_token_ids must be a list of ints, found {ids!r}")
    count = sinklm.get("sink_tokens", len(ids))
    if count != len(ids):
        raise CheckpointError(f"{where}: sinklm.sink_tokens is {count} but sinklm.sink_token_ids lists {len(ids)} id(s) {ids}")
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and any(not 0 <= i < vocab for i in ids):
        raise CheckpointError(f"{where}: sink token ids {ids} are outside vocab_size {vocab}")
    return attention, list(ids), str(sinklm.get("variant") or variant_name(attention, len(ids)))


def sinklm_record(cfg: ModelConfig) -> dict[str, Any]:
    """The ``sinklm`` field of an export's ``config.json`` (and of an in-memory HF model's config)."""
    return {
        "attention": cfg.attention,
        "sink_tokens": cfg.sink_tokens,
        "sink_token_ids": cfg.sink_token_ids,
        "variant": cfg.variant,
        "version": __version__,
        "vocab_size": cfg.vocab_size,
        "model": cfg.to_dict(),
    }


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of an export: GPT-NeoX fields plus the ``sinklm`` field; softmax1/sink_logit
    get a model type stock transformers does not know and an ``auto_map`` to the bundled code."""
    hf = to_hf_config(cfg)
    if cfg.attention != "softmax":
        hf["architectures"] = [REMOTE_ARCHITECTURE]
        hf["model_type"] = REMOTE_MODEL_TYPE
        hf["auto_map"] = dict(AUTO_MAP)
    hf["dtype"] = dtype_name(dtype)
    hf["torch_dtype"] = dtype_name(dtype)  # transformers 4.x reads this name
    hf["sinklm"] = sinklm_record(cfg)
    return hf
