"""GPT-NeoX with a softmax1 or sink_logit attention kernel, for ``trust_remote_code=True`` loading.

Self-contained (imports only torch and transformers): copied into every softmax1/sink_logit export
by ``sinklm convert``. Parameter names are GPT-NeoX's on-disk names (``gpt_neox.layers.{i}...``,
``embed_out``), plus ``gpt_neox.layers.{i}.attention.sink_logit`` for sink_logit models, so the
weights file is the same one sinklm's key map writes.

Kernels (exact, explicit-score form), per head h over the visible keys j:
- softmax1:   p_j = e^{x_j} / (1 + sum_j e^{x_j})       (one extra key of logit 0 and value 0)
- sink_logit: p_j = e^{x_j} / (e^{b_h} + sum_j e^{x_j}) (learnable b_h = ``attention.sink_logit``)
- softmax:    the stock kernel (kept so the code also runs a vanilla config)

Supports ``generate`` with a KV cache (a transformers ``DynamicCache``; keys are cached rotated,
positions continue from the cache length) and left-padded batches through ``attention_mask``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sinklm import SinkLMGPTNeoXConfig

# transformers 5 renamed the cache field/argument ``past_key_values`` -> ``cache``
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SinkLMRotaryEmbedding(nn.Module):
    """Partial rotary embedding, GPT-NeoX rotate-half over the first ``ndims`` dims of each head.

    The inverse frequencies are recomputed per call rather than kept as a buffer: transformers
    builds models on the meta device and would leave a non-persistent buffer uninitialised.
    """

    def __init__(self, ndims: int, base: float):
        super().__init__()
        self.ndims = ndims
        self.base = base

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, D), positions (B, T) -> x rotated as if its tokens sat at ``positions``."""
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.ndims, 2, dtype=torch.float) / self.ndims))
        freqs = positions.to(torch.float)[..., None] * inv_freq.to(x.device)  # (B, T, ndims/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, ndims)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x_rot, x_pass = x[..., : self.ndims], x[..., self.ndims :]
        half = self.ndims // 2
        rotated_half = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)


class SinkLMAttention(nn.Module):
    def __init__(self, config: SinkLMGPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.attention_kind
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.rotary = SinkLMRotaryEmbedding(int(self.head_dim * config.rotary_pct), config.rotary_emb_base)
        if self.kind == "sink_logit":
            self.sink_logit = nn.Parameter(torch.zeros(self.num_heads))
        else:
            self.sink_logit = None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        positions: torch.Tensor,  # (B, T)
        key_mask: torch.Tensor | None,  # (B, Tk) bool, False for padding; Tk = cached + T
        cache: Cache | None,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        # GPT-NeoX layout: the 3C outputs are [q_h, k_h, v_h] for head 0, then head 1, ...
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, H, T, D)
        q = self.rotary.rotate(q, positions)
        k = self.rotary.rotate(k, positions)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, Tk, D) with the past in front
        tk = k.shape[-2]
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, Tk)
        # query i is the token at cache slot tk - T + i: it sees keys 0 .. tk - T + i
        keep = torch.arange(tk, device=x.device)[None, :] <= (torch.arange(T, device=x.device)[:, None] + tk - T)
        keep = keep[None, None]
        if key_mask is not None:
            keep = keep & key_mask[:, None, None, :]
        scores = scores.float().masked_fill(~keep, float("-inf"))
        probs = self._probs(scores).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, T, C)
        return self.dense(out), (probs if output_attentions else None)

    def _probs(self, scores: torch.Tensor) -> torch.Tensor:
        """Weights from fp32 scores (B, H, T, Tk); the extra key's logit joins the softmax, its
        weight is dropped (rows of softmax1/sink_logit sum to less than 1)."""
        if self.kind == "softmax":
            # a fully padded row would be NaN; its output is never used, make it 0
            return torch.softmax(scores, dim=-1).nan_to_num(0.0)
        if self.kind == "softmax1":
            extra = scores.new_zeros(self.num_heads)
        else:
            extra = self.sink_logit.float()
        column = extra.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]


class SinkLMMLP(nn.Module):
    def __init__(self, config: SinkLMGPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class SinkLMGPTNeoXLayer(nn.Module):
    def __init__(self, config: SinkLMGPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = SinkLMAttention(config, layer_idx)
        self.mlp = SinkLMMLP(config)

    def forward(self, x, positions, key_mask, cache, output_attentions):
        a, probs = self.attention(self.input_layernorm(x), positions, key_mask, cache, output_attentions)
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)), summed in GPT-NeoX's order
            return self.mlp(self.post_attention_layernorm(x)) + a + x, probs
        x = a + x
        return self.mlp(self.post_attention_layernorm(x)) + x, probs


class SinkLMGPTNeoXPreTrainedModel(PreTrainedModel):
    config_class = SinkLMGPTNeoXConfig
    base_model_prefix = "gpt_neox"
    _no_split_modules = ["SinkLMGPTNeoXLayer"]
    supports_gradient_checkpointing = False
    _supports_cache_class = True  # transformers 4.x: generate may hand us a DynamicCache

    def _init_weights(self, module: nn.Module) -> None:
        # only weights missing from the checkpoint are initialised; a sink logit starts at 0 (= softmax1)
        if isinstance(module, SinkLMAttention) and module.sink_logit is not None:
            if not getattr(module.sink_logit, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.sink_logit.zero_()
            return
        super()._init_weights(module)


class SinkLMGPTNeoXModel(SinkLMGPTNeoXPreTrainedModel):
    def __init__(self, config: SinkLMGPTNeoXConfig):
        super().__init__(config)
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SinkLMGPTNeoXLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_in

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_in = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, Cache | None, tuple | None, tuple | None]:
        x = self.embed_in(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        elif isinstance(cache, tuple):
            cache = DynamicCache.from_legacy_cache(cache)  # transformers 4.x tuple caches
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, T)
        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2-D (batch, keys), got shape {tuple(attention_mask.shape)}")
            key_mask = attention_mask[:, -(past + T) :].bool()
        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden += (x,)
            x, probs = layer(x, position_ids, key_mask, cache if use_cache else None, output_attentions)
            if all_attn is not None:
                all_attn += (probs,)
        x = self.final_layer_norm(x)
        if all_hidden is not None:
            all_hidden += (x,)
        return x, (cache if use_cache else None), all_hidden, all_attn


class SinkLMGPTNeoXForCausalLM(SinkLMGPTNeoXPreTrainedModel, GenerationMixin):
    def __init__(self, config: SinkLMGPTNeoXConfig):
        super().__init__(config)
        self.gpt_neox = SinkLMGPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gpt_neox.embed_in

    def get_output_embeddings(self) -> nn.Linear:
        return self.embed_out

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.embed_out = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        hidden, cache, all_hidden, all_attn = self.gpt_neox(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.embed_out(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            # HF convention: labels are the inputs; the model shifts them
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if return_dict is False:
            return tuple(t for t in (loss, logits, cache, all_hidden, all_attn) if t is not None)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=all_hidden, attentions=all_attn, **{_CACHE_FIELD: cache}
        )
