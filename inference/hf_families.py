"""The Hugging Face model families that stream here, and what each one's positions are.

Two kinds of position, two ways of reaching the attention (``docs/design.md``, "Streaming semantics"):

- RoPE (rotate-half) families: GPT-NeoX / Pythia, the Llama family (Llama 2/3, Mistral, Qwen2/3,
  SmolLM3) and Falcon (``alibi=False``). Positions are assigned by slot in the cache; keys are
  re-rotated by whole positions (:class:`KeyShift`).
- ALiBi families: MPT and Falcon with ``alibi=True``. The bias of a (query, key) pair is the slope
  times the distance between their *slots* in the cache; keys carry no position at all.

GPT-NeoX and the Llama family compute attention through transformers' attention-function registry
(``AttentionInterface``), so the chunked path registers an attention function for them. MPT and
Falcon compute attention inside their own attention modules (no registry), but their decoder blocks
take the bias / mask / rotary tables as arguments: the chunked path drives the blocks itself
(:func:`model_parts`), with no change to any library module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from transformers.models.falcon.modeling_falcon import build_alibi_tensor
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from pretrain.model import rotary_tables, rotate_half

INTERFACE_TYPES = ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "smollm3")
"""model_type values whose attention goes through ``AttentionInterface`` (rotate-half RoPE)."""
BLOCK_TYPES = ("mpt", "falcon")
"""model_type values whose decoder blocks take bias, mask and rotary tables as arguments."""
SUPPORTED_MODEL_TYPES = INTERFACE_TYPES + BLOCK_TYPES
_UNSUPPORTED_ROPE = ("dynamic", "longrope")


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_supported(model: nn.Module) -> str:
    """The model's ``model_type``, or a ValueError naming the supported ones (never a silent dense run)."""
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"the sink cache supports Hugging Face model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
            f"this model is {model_type!r}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if not uses_alibi(config) and rope_type in _UNSUPPORTED_ROPE:
        raise ValueError(f"the sink cache cannot shift keys under rope_type {rope_type!r} (frequencies change with length)")
    return model_type


def uses_alibi(config) -> bool:
    """MPT always; Falcon when its config says ``alibi``."""
    config = text_config(config)
    return config.model_type == "mpt" or (config.model_type == "falcon" and bool(getattr(config, "alibi", False)))


class KeyShift:
    """Rotate keys (or queries) by whole numbers of positions, using the model's live RoPE frequencies.

    HF's keys are ``scale * R(p) k`` on the first ``rotary_dim`` dims (``scale`` is the rope type's
    attention scaling, usually 1). ``R(p + d) = R(d) R(p)``, so a pure rotation by ``d`` moves a key
    from position p to p + d without knowing p or k.
    """

    def __init__(self, rotary_module: nn.Module):
        if not hasattr(rotary_module, "inv_freq"):
            raise ValueError(f"{type(rotary_module).__name__} has no inv_freq buffer; not a RoPE module")
        self.rotary_module = rotary_module

    @property
    def rotary_dim(self) -> int:
        return 2 * self.rotary_module.inv_freq.shape[-1]

    def __call__(self, keys: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
        """keys (..., T, D) at positions p -> the same at p + shift (an int, or (T,) per row)."""
        if isinstance(shift, int):
            if shift == 0 or keys.shape[-2] == 0:
                return keys
            shift = torch.tensor([shift], device=keys.device)
        return self.rotate(keys, *self.tables(shift.to(keys.device)))

    def tables(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, rotary_dim) in float32 of a shift (T,): computed once, applied by :meth:`rotate`."""
        return rotary_tables(self.rotary_module.inv_freq, shift, torch.float32)

    def rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """keys (..., T, D) rotated by the angles of :meth:`tables`, in float32, back in their dtype."""
        dim = self.rotary_dim
        shifted = rotate_half(keys[..., :dim].float(), cos, sin).to(keys.dtype)
        return shifted if dim == keys.shape[-1] else torch.cat([shifted, keys[..., dim:]], dim=-1)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its embedding's device, or the CPU where accelerate offloaded the
    embedding (its weights on "meta"; accelerate's hook loads them and moves the ids where they run)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def find_rotary_module(model: nn.Module) -> nn.Module:
    """The model's (single, shared) rotary embedding module, e.g. ``model.model.rotary_emb``."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and "rotary" in type(module).__name__.lower():
            return module
    raise ValueError(f"no rotary embedding module (with an inv_freq buffer) found in {type(model).__name__}")


def key_shift_of(model: nn.Module) -> KeyShift | None:
    """The key rotation of a RoPE model; None for ALiBi (its keys carry no position)."""
    check_supported(model)
    return None if uses_alibi(model.config) else KeyShift(find_rotary_module(model))


# -- ALiBi: the bias of a (query slot, key slot) pair, exactly as each family's modelling code ----------


class AlibiBias:
    """Per-head bias by slot, with the family's own numbers (MPT's float slopes; Falcon's bf16 table)."""

    def __init__(self, model: nn.Module):
        config = text_config(model)
        self.model_type = config.model_type
        self.heads = config.num_attention_heads
        if self.model_type == "mpt":
            self.length = config.max_seq_len
            # entry L-1-d is -slope * d: the bias of a key d slots before the query (MPT slices the end)
            self.table = build_mpt_alibi_tensor(self.heads, self.length, config.attn_config.alibi_bias_max)[:, 0]
        else:
            self.length = config.max_position_embeddings
            self.head_dim = config.hidden_size // self.heads
            self.table = None  # built on first use in the model's dtype

    def __call__(self, q_slots: torch.Tensor, k_slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(H, Tq, K) bias for queries at ``q_slots`` (Tq,) and keys at ``k_slots`` (Tq, K) (any value
        where masked; clamped into range)."""
        if self.model_type == "mpt":
            distance = (q_slots[:, None] - k_slots).clamp(0, self.length - 1)
            table = self.table.to(q_slots.device)
            return table[:, self.length - 1 - distance]
        if self.table is None or self.table.dtype != dtype:
            ones = torch.ones(1, self.length, dtype=torch.long)
            # FalconModel: alibi (slope * key slot, in bf16) / sqrt(head_dim) is added to the scaled scores
            self.table = build_alibi_tensor(ones, self.heads, dtype)[:, 0] / math.sqrt(self.head_dim)
        table = self.table.to(q_slots.device)
        return table[:, k_slots.clamp(0, self.length - 1)]


# -- the pieces of a block-driven model -------------------------------------------------------------


@dataclass
class ModelParts:
    """What the chunked path calls, in order: embed -> blocks -> norm -> head."""

    embed: nn.Module
    blocks: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module | None  # Falcon's rotary embedding (tables for given positions)


def model_parts(model: nn.Module) -> ModelParts:
    model_type = check_supported(model)
    if model_type == "mpt":
        t = model.transformer
        return ModelParts(t.wte, t.blocks, t.norm_f, model.lm_head, None)
    if model_type == "falcon":
        t = model.transformer
        return ModelParts(t.word_embeddings, t.h, t.ln_f, model.lm_head, None if uses_alibi(model.config) else t.rotary_emb)
    raise ValueError(f"{model_type!r} runs through the attention-function registry, not driven block by block")
