"""A plain per-token reference of the streaming protocol for stock transformers models (test helper).

Written from the HF modules' weights, independent of the caches under test: per layer it keeps the
kept tokens' keys and values *as computed when each token arrived* (un-rotated), trims them to the
first S and last R tokens after every step, and every step re-applies positions 0..len-1 inside the
cache (RoPE, query at the last slot) or an ALiBi bias of slope times the slot distance --
``docs/design.md``'s semantics verbatim. Families: GPT-NeoX, Llama/Qwen2, MPT, Falcon (both decoder
layouts, multi-query, ALiBi).
"""

from __future__ import annotations

import math

import torch


def rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """Rotate-half RoPE of x (H, T, D) at ``positions`` (T,) on the first rotary_dim dims."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes 2^(-8h/H), h = 1..H (H a power of two; MPT and Falcon agree there)."""
    assert heads & (heads - 1) == 0, "reference slopes are for a power-of-two head count"
    return torch.tensor([2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)])


class ReferenceStream:
    """Token-by-token StreamingLLM: one ``step(token)`` -> logits (V,)."""

    def __init__(self, model, start: int, recent: int):
        self.model, self.start, self.recent = model, start, recent
        cfg = model.config
        self.kind = cfg.model_type
        self.alibi = self.kind == "mpt" or (self.kind == "falcon" and cfg.alibi)
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        if self.kind == "falcon":
            self.kv_heads = cfg.num_kv_heads if cfg.new_decoder_architecture else (1 if cfg.multi_query else self.heads)
        else:
            self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        if not self.alibi:
            rope_params = cfg.rope_parameters
            self.rotary_dim = int(self.head_dim * rope_params.get("partial_rotary_factor", 1.0))
            self.base = rope_params["rope_theta"]
        self.scale = model.transformer.blocks[0].attn.softmax_scale if self.kind == "mpt" else 1 / math.sqrt(self.head_dim)
        self.keys: list[torch.Tensor] = [torch.zeros(self.kv_heads, 0, self.head_dim) for _ in range(cfg.num_hidden_layers)]
        self.values = [t.clone() for t in self.keys]

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (H, 1, D), k, v (H_kv, 1, D) of the new token -> (1, H * D); then keep and evict."""
        keys = torch.cat([self.keys[i], k], dim=1)  # (H_kv, L, D) as computed on arrival
        values = torch.cat([self.values[i], v], dim=1)
        length = keys.shape[1]
        rep = self.heads // self.kv_heads
        if self.alibi:
            distance = (length - 1 - torch.arange(length)).float()  # query at the last slot
            bias = -alibi_slopes(self.heads)[:, None, None] * distance  # (H, 1, L)
            if self.kind == "falcon":
                bias = bias / math.sqrt(self.head_dim)  # Falcon scales its ALiBi with the scores
            scores = q @ keys.repeat_interleave(rep, 0).transpose(-1, -2) * self.scale + bias
        else:
            keys = rope(keys, torch.arange(length), self.rotary_dim, self.base)
            q = rope(q, torch.tensor([length - 1]), self.rotary_dim, self.base)
            scores = q @ keys.repeat_interleave(rep, 0).transpose(-1, -2) * self.scale
        probs = torch.softmax(scores, dim=-1)
        out = probs @ values.repeat_interleave(rep, 0)
        if keys.shape[1] > self.start + self.recent:
            keep = list(range(self.start)) + list(range(length - self.recent, length))
            keys_kept, values = torch.cat([self.keys[i], k], 1)[:, keep], values[:, keep]
        else:
            keys_kept = torch.cat([self.keys[i], k], 1)
        self.keys[i], self.values[i] = keys_kept, values
        return out.transpose(0, 1).reshape(1, -1)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(n, self.head_dim)[:, None]  # (n, 1, D)

    def _falcon_qkv(self, attention, h):
        fused = attention.query_key_value(h)[0]
        cfg = self.model.config
        if cfg.new_decoder_architecture:
            groups = fused.view(self.kv_heads, self.heads // self.kv_heads + 2, self.head_dim)
            return groups[:, :-2].reshape(self.heads, 1, self.head_dim), groups[:, -2:-1], groups[:, -1:]
        if not cfg.multi_query:
            three = fused.view(self.heads, 3, self.head_dim)
            return three[:, 0:1], three[:, 1:2], three[:, 2:3]
        q, k, v = fused.split([self.heads * self.head_dim, self.head_dim, self.head_dim])
        return self._heads(q, self.heads), self._heads(k, 1), self._heads(v, 1)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        m, tok = self.model, torch.tensor([token])
        if self.kind == "gpt_neox":
            x = m.gpt_neox.embed_in(tok)
            for i, layer in enumerate(m.gpt_neox.layers):
                qkv = layer.attention.query_key_value(layer.input_layernorm(x)).view(self.heads, 1, 3 * self.head_dim)
                a = layer.attention.dense(self._attend(i, *qkv.chunk(3, dim=-1)))
                x = x + a + layer.mlp(layer.post_attention_layernorm(x))  # parallel residual
            return m.get_output_embeddings()(m.gpt_neox.final_layer_norm(x))[0]
        if self.kind == "mpt":
            x = m.transformer.wte(tok)
            for i, block in enumerate(m.transformer.blocks):
                q, k, v = block.attn.Wqkv(block.norm_1(x))[0].chunk(3)
                q, k, v = (self._heads(t, self.heads) for t in (q, k, v))
                x = x + block.attn.out_proj(self._attend(i, q, k, v))
                x = x + block.ffn.down_proj(block.ffn.act(block.ffn.up_proj(block.norm_2(x))))
            return m.lm_head(m.transformer.norm_f(x))[0]
        if self.kind == "falcon":
            cfg = m.config
            x = m.transformer.word_embeddings(tok)
            for i, layer in enumerate(m.transformer.h):
                two_norms = cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2
                attn_in = layer.ln_attn(x) if two_norms else layer.input_layernorm(x)
                attn = layer.self_attention.dense(self._attend(i, *self._falcon_qkv(layer.self_attention, attn_in)))
                if two_norms:
                    x = x + attn + layer.mlp(layer.ln_mlp(x))
                elif cfg.new_decoder_architecture or cfg.parallel_attn:
                    x = x + attn + layer.mlp(attn_in)
                else:
                    x = x + attn
                    x = x + layer.mlp(layer.post_attention_layernorm(x))
            return m.lm_head(m.transformer.ln_f(x))[0]
        x = m.model.embed_tokens(tok)  # the Llama family
        for i, layer in enumerate(m.model.layers):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q = self._heads(attn.q_proj(h)[0], self.heads)
            k, v = self._heads(attn.k_proj(h)[0], self.kv_heads), self._heads(attn.v_proj(h)[0], self.kv_heads)
            x = x + attn.o_proj(self._attend(i, q, k, v))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.model.norm(x))[0]
