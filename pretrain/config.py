"""The model's typed configuration (:class:`ModelConfig`), its presets and the variant names.

Loading, validation and overrides are the one config engine's (:mod:`data.settings`); this module
re-exports its names that model and run configs use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data.settings import ConfigError, from_dict, load_yaml, to_dict
from data.sinks import padded_vocab_size, sink_token_ids
from pretrain.attention import KINDS as ATTENTION_KINDS

__all__ = ["ATTENTION_KINDS", "CONFIG_DIR", "ConfigError", "ModelConfig", "from_dict", "load_yaml", "preset_path",
           "to_dict", "variant_name"]
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# --------------------------------------------------------------------------------------------
# model configuration
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape and variant of a Pythia-style GPT-NeoX decoder."""

    name: str = "custom"
    """Human-readable name of the shape (e.g. ``pythia-160m``)."""

    vocab_size: int = 50277
    """Tokenizer vocabulary size (50,277 for GPT-NeoX-20B / Pythia)."""

    vocab_multiple: int = 128
    """The embedding is padded to a multiple of this (GPT-NeoX ``make_vocab_size_divisible_by``)."""

    num_layers: int = 6
    """Number of transformer blocks."""

    hidden_size: int = 512
    """Residual stream width d_model."""

    num_heads: int = 8
    """Attention heads; must divide ``hidden_size``."""

    intermediate_size: int | None = None
    """MLP width; ``None`` means 4 x ``hidden_size`` as in Pythia."""

    max_seq_len: int = 2048
    """Training context length (HF ``max_position_embeddings``)."""

    rotary_pct: float = 0.25
    """Share of each head's dimensions that get rotary embeddings, in (0, 1]."""

    rotary_base: float = 10000.0
    """Rotary frequency base (HF ``rotary_emb_base``)."""

    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    use_parallel_residual: bool = True
    """Pythia's parallel residual: x + attn(ln1(x)) + mlp(ln2(x)); false gives the sequential form."""

    attention: str = "softmax"
    """Attention kernel: ``softmax`` (vanilla), ``softmax1`` (off-by-one, "zero sink") or
    ``sink_logit`` (a learnable per-head logit in the denominator)."""

    sink_logit_init: float = 0.0
    """Initial value of the per-head sink logit b_h (``sink_logit`` only); 0 equals softmax1."""

    sink_tokens: int = 0
    """Number k of learnable sink tokens prepended to every sample (ids from :func:`sink_token_ids`)."""

    init_method: Literal["small_init", "normal"] = "small_init"
    """Weight init: Pythia's ``small_init`` (std = sqrt(2 / (5 d))) or ``normal`` with ``init_std``."""

    init_std: float = 0.02
    """Std of the ``normal`` init (unused by ``small_init``)."""

    output_init_method: Literal["wang_init", "small_init", "normal"] = "wang_init"
    """Init of attention/MLP output projections: Pythia's ``wang_init`` (std = 2 / (L sqrt(d)))."""

    def __post_init__(self) -> None:
        def fail(key: str, message: str) -> None:
            raise ConfigError(f"model.{key}: {message}")

        for key in ("vocab_size", "vocab_multiple", "num_layers", "hidden_size", "num_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            fail("num_heads", f"{self.num_heads} heads do not divide hidden_size={self.hidden_size}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            fail("intermediate_size", f"must be >= 1, got {self.intermediate_size}")
        if not (0.0 < self.rotary_pct <= 1.0):
            fail("rotary_pct", f"must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_ndims < 2 or self.rotary_ndims % 2:
            fail("rotary_pct", f"gives {self.rotary_ndims} rotary dims per head; need an even number >= 2")
        if self.rotary_base <= 0:
            fail("rotary_base", f"must be > 0, got {self.rotary_base}")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", f"must be > 0, got {self.layer_norm_eps}")
        if self.attention not in ATTENTION_KINDS:
            fail("attention", f"unknown attention kind {self.attention!r}; expected one of {', '.join(ATTENTION_KINDS)}")
        if not math.isfinite(self.sink_logit_init):
            fail("sink_logit_init", f"must be finite, got {self.sink_logit_init}")
        if self.sink_tokens < 0:
            fail("sink_tokens", f"must be >= 0, got {self.sink_tokens}")
        try:
            sink_token_ids(self.vocab_size, self.sink_tokens, self.padded_vocab_size)
        except ValueError as err:
            fail("sink_tokens", str(err))
        if self.sink_tokens >= self.max_seq_len:
            fail("sink_tokens", f"{self.sink_tokens} sink tokens leave no room in max_seq_len={self.max_seq_len}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_ndims(self) -> int:
        # HF GPT-NeoX: int(head_size * rotary_pct)
        return int(self.head_dim * self.rotary_pct)

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.vocab_multiple)

    @property
    def sink_token_ids(self) -> list[int]:
        return sink_token_ids(self.vocab_size, self.sink_tokens, self.padded_vocab_size)

    @property
    def variant(self) -> str:
        """Short name of the variant: ``vanilla``, ``softmax1``, ``sink_logit``, ``sink1``..."""
        return variant_name(self.attention, self.sink_tokens)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> "ModelConfig":
        return from_dict(cls, data, where=where)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """Load ``configs/models/<name>.yaml`` (``pythia-14m``, ``14m`` and ``tiny`` all work)."""
        path = preset_path(name)
        data = load_yaml(path)
        data.update(overrides)
        try:
            return from_dict(cls, data, where="model")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def num_params(self, include_embeddings: bool = True) -> int:
        d, L, V, m = self.hidden_size, self.num_layers, self.padded_vocab_size, self.mlp_size
        per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
        if self.attention == "sink_logit":
            per_layer += self.num_heads
        total = L * per_layer + 2 * d
        if include_embeddings:
            total += 2 * V * d
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), counting the matmuls of
        the non-embedding weights, the attention scores/values and the output layer (PaLM-style
        accounting, as used for MFU)."""
        T = seq_len or self.max_seq_len
        d, L, m, V = self.hidden_size, self.num_layers, self.mlp_size, self.padded_vocab_size
        matmul_params = L * (3 * d * d + d * d + 2 * d * m) + d * V
        # QK^T and PV: 2 * T * d multiply-adds per token and layer, counted over the full (not
        # causal) window as PaLM's MFU does: 6 * N + 12 * L * T * d
        return 6.0 * matmul_params + 12.0 * L * T * d


def variant_name(attention: str, sink_tokens: int) -> str:
    """The one name of a variant: ``vanilla``, ``softmax1``, ``sink_logit``, ``sink2``, ``softmax1+sink1``..."""
    if sink_tokens:
        return ("" if attention == "softmax" else f"{attention}+") + f"sink{sink_tokens}"
    return "vanilla" if attention == "softmax" else attention


def preset_path(name: str) -> Path:
    models = CONFIG_DIR / "models"
    candidates = [Path(name), models / name, models / f"{name}.yaml", models / f"pythia-{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in models.glob("*.yaml"))
    raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(available)}")
