"""The one key map between our parameter names and Hugging Face GPT-NeoX, used both ways.

Our modules are named for what they are (``blocks.3.attn.qkv``); HF's follow GPT-NeoX
(``gpt_neox.layers.3.attention.query_key_value``). Tensors map one-to-one with identical layout
(the fused QKV is already in GPT-NeoX's per-head interleaved order), so conversion is a rename.
``sink_logit`` has no stock counterpart; it goes to ``attention.sink_logit`` and is read by the
bundled modelling code of softmax1/sink_logit exports.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from pretrain.config import ModelConfig

# (ours, hf) with ``{i}`` standing for the layer index
KEY_MAP: list[tuple[str, str]] = [
    ("embed.weight", "gpt_neox.embed_in.weight"),
    ("blocks.{i}.ln_attn.weight", "gpt_neox.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.ln_attn.bias", "gpt_neox.layers.{i}.input_layernorm.bias"),
    ("blocks.{i}.ln_mlp.weight", "gpt_neox.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.ln_mlp.bias", "gpt_neox.layers.{i}.post_attention_layernorm.bias"),
    ("blocks.{i}.attn.qkv.weight", "gpt_neox.layers.{i}.attention.query_key_value.weight"),
    ("blocks.{i}.attn.qkv.bias", "gpt_neox.layers.{i}.attention.query_key_value.bias"),
    ("blocks.{i}.attn.proj.weight", "gpt_neox.layers.{i}.attention.dense.weight"),
    ("blocks.{i}.attn.proj.bias", "gpt_neox.layers.{i}.attention.dense.bias"),
    ("blocks.{i}.attn.sink_logit", "gpt_neox.layers.{i}.attention.sink_logit"),
    ("blocks.{i}.mlp.up.weight", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight"),
    ("blocks.{i}.mlp.up.bias", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias"),
    ("blocks.{i}.mlp.down.weight", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight"),
    ("blocks.{i}.mlp.down.bias", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias"),
    ("ln_f.weight", "gpt_neox.final_layer_norm.weight"),
    ("ln_f.bias", "gpt_neox.final_layer_norm.bias"),
    ("lm_head.weight", "embed_out.weight"),
]

# Names that different transformers versions use in memory for the same on-disk tensor; the
# on-disk (hub) name is the one in KEY_MAP (Pythia's files say ``embed_out.weight``; transformers 5
# calls the module ``lm_head`` and renames on load).
HF_ALIASES = {"lm_head.weight": "embed_out.weight"}

# HF buffers that may appear in older checkpoints and carry no weights
_HF_IGNORED = re.compile(r"(\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)|rotary_emb\.inv_freq)$")


def _compile(direction: int) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for pair in KEY_MAP:
        src, dst = pair[direction], pair[1 - direction]
        pattern = re.compile("^" + re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
        rules.append((pattern, dst))
    return rules


_TO_HF = _compile(0)
_FROM_HF = _compile(1)


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]], direction: str) -> str:
    for pattern, dst in rules:
        match = pattern.match(key)
        if match:
            return dst.replace("{i}", match.group("i")) if "i" in match.groupdict() else dst
    raise KeyError(f"no {direction} mapping for parameter {key!r}")


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF GPT-NeoX names (same tensors)."""
    return {_rename(k, _TO_HF, "ours->HF"): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-NeoX state dict -> our names; HF's non-weight buffers are dropped."""
    return {
        _rename(HF_ALIASES.get(k, k), _FROM_HF, "HF->ours"): v for k, v in state.items() if not _HF_IGNORED.search(k)
    }


def load_into_hf_model(model: torch.nn.Module, hf_state: dict[str, torch.Tensor]) -> None:
    """Load an on-disk-named HF state dict into an in-memory transformers model of any version."""
    names = set(model.state_dict())
    renamed = {}
    for key, value in hf_state.items():
        alias = next((a for a, disk in HF_ALIASES.items() if disk == key), None)
        renamed[alias if key not in names and alias in names else key] = value
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    missing = [m for m in missing if not _HF_IGNORED.search(m)]
    if missing or unexpected:
        raise KeyError(f"HF model state mismatch: missing {missing}, unexpected {unexpected}")


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """GPT-NeoX ``config.json`` fields for this shape (vocab_size is the padded embedding size)."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_size,
        "hidden_act": "gelu",
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_pct},
        "max_position_embeddings": cfg.max_seq_len,
        "layer_norm_eps": cfg.layer_norm_eps,
        "use_parallel_residual": cfg.use_parallel_residual,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
    }


def from_hf_config(hf: dict[str, Any], text_vocab_size: int | None = None, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a GPT-NeoX ``config.json`` mapping.

    HF stores only the padded embedding size; ``text_vocab_size`` (the tokenizer's size, e.g.
    50,277) recovers the split between text ids and spare rows. Without it the padded size is used.
    """
    rope = hf.get("rope_parameters") or {}
    rotary_pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 1.0)))
    base = rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    padded = int(hf["vocab_size"])
    vocab = text_vocab_size or padded
    multiple = padded if padded % 128 else 128
    sinklm = hf.get("sinklm") or {}
    mlp = int(hf.get("intermediate_size") or 4 * int(hf["hidden_size"]))
    fields: dict[str, Any] = dict(
        name=hf.get("_name_or_path") or "hf-gpt-neox",
        vocab_size=vocab,
        vocab_multiple=multiple,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        num_heads=int(hf["num_attention_heads"]),
        intermediate_size=None if mlp == 4 * int(hf["hidden_size"]) else mlp,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rotary_pct=float(rotary_pct),
        rotary_base=float(base),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
        attention=sinklm.get("attention", "softmax"),
        sink_tokens=int(sinklm.get("sink_tokens", 0)),
    )
    fields.update(overrides)
    cfg = ModelConfig.from_dict(fields)
    if cfg.padded_vocab_size != padded:
        raise ValueError(
            f"config.json vocab_size={padded} does not match text vocab {vocab} padded to "
            f"{cfg.padded_vocab_size} (multiple {multiple})"
        )
    return cfg
