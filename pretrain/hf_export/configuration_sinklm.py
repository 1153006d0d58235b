"""Configuration of a GPT-NeoX with a softmax1 or sink_logit attention kernel (sinklm export).

Self-contained (imports only transformers): copied into every softmax1/sink_logit export so that
``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` works offline. The fields are
GPT-NeoX's, plus ``sinklm`` -- the mapping sinklm writes into ``config.json`` naming the attention
kind (``softmax1`` or ``sink_logit``), the sink tokens and the variant.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ATTENTION_KINDS = ("softmax", "softmax1", "sink_logit")


class SinkLMGPTNeoXConfig(PretrainedConfig):
    model_type = "sinklm_gpt_neox"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 512,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        intermediate_size: int | None = None,
        rotary_pct: float = 0.25,
        rotary_emb_base: float = 10000.0,
        max_position_embeddings: int = 2048,
        layer_norm_eps: float = 1e-5,
        use_parallel_residual: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        tie_word_embeddings: bool = False,
        sinklm: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        # transformers 5 names the rotary settings ``rope_parameters``; config.json carries both
        rope = kwargs.pop("rope_parameters", None) or {}
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.rotary_pct = float(rope.get("partial_rotary_factor", rotary_pct))
        self.rotary_emb_base = float(rope.get("rope_theta", rotary_emb_base))
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.use_parallel_residual = use_parallel_residual
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.sinklm = dict(sinklm or {"attention": "softmax1"})
        attention = self.sinklm.get("attention")
        if attention not in ATTENTION_KINDS:
            raise ValueError(
                f"config.json field sinklm.attention: unknown attention kind {attention!r}; "
                f"expected one of {', '.join(ATTENTION_KINDS)}"
            )
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs
        )

    @property
    def attention_kind(self) -> str:
        return self.sinklm["attention"]
