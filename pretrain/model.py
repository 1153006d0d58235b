"""A Pythia-style GPT-NeoX decoder with attention-sink variants.

Architecture exactly as Pythia / Hugging Face ``GPTNeoXForCausalLM``: token embedding, per-block
LayerNorms, fused QKV projection in GPT-NeoX's per-head interleaved layout ([q_h, k_h, v_h] per head),
partial rotary embeddings, parallel (or sequential) residual, GELU MLP, final LayerNorm, untied
output embedding over the padded vocabulary. The attention *kernel* (softmax / softmax1 /
sink_logit) lives in :mod:`pretrain.attention`; sink tokens are ordinary embedding rows.

Streaming caches plug in through :class:`KVCache`: the attention module hands the cache its
un-rotated q, k, v and itself, and the cache decides positions, masking and what to keep.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.attention import attend
from pretrain.chunked_loss import chunked_lm_loss
from pretrain.config import ModelConfig


def rotary_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, angle_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., 2 * len(inv_freq)) of the rotate-half angles ``positions * inv_freq``.

    The angles are formed in ``angle_dtype``: float32 as GPT-NeoX does, or float64 where absolute
    positions run into the millions (float32 loses ~0.25 rad at position 4e6; the streaming cache
    puts window keys at absolute stream positions).
    """
    freqs = positions.to(angle_dtype)[..., None] * inv_freq.to(device=positions.device, dtype=angle_dtype)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotate-half RoPE over the first ``cos.shape[-1]`` dims of x (..., D); the rest pass."""
    ndims = cos.shape[-1]
    x_rot, x_pass = x[..., :ndims], x[..., ndims:]
    half = ndims // 2
    rotated_half = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)


def rotary_swap(ndims: int, head_dim: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """The (D, D) matrix with ``x @ swap == rotate_half``'s swapped half (``-x[i + half]`` for i < half,
    ``x[i - half]`` for half <= i < ndims, 0 in the pass-through dims): the constant of :func:`rotary_matrix`."""
    half = ndims // 2
    eye = torch.eye(half, dtype=dtype, device=device)
    zero = torch.zeros_like(eye)
    swap = torch.cat([torch.cat([zero, eye], dim=1), torch.cat([-eye, zero], dim=1)], dim=0)  # (ndims, ndims)
    return F.pad(swap, (0, head_dim - ndims, 0, head_dim - ndims))  # the pass-through dims are not mixed


def rotary_matrix(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, swap: torch.Tensor | None = None) -> torch.Tensor:
    """The (..., D, D) matrix M with ``x @ M == rotate_half(x, cos, sin)`` for x (..., D), from tables
    cos, sin (..., ndims): one product instead of the slices and concatenations of :func:`rotate_half`,
    for a decode step that rotates a single position per row (the angles are shared by every layer).
    Built from elementwise ops and constants only (no indexed writes), so it captures in a CUDA graph;
    a caller that builds one per step passes the constant ``swap`` (:func:`rotary_swap`) made once."""
    ndims = cos.shape[-1]
    if swap is None:
        swap = rotary_swap(ndims, head_dim, cos.dtype, cos.device)
    diagonal = F.pad(cos, (0, head_dim - ndims), value=1.0)  # the pass-through dims keep their value
    return torch.diag_embed(diagonal) + swap * F.pad(sin, (0, head_dim - ndims))[..., None, :]


class RotaryEmbedding(nn.Module):
    """Partial rotary embedding (GPT-NeoX style: rotate-half over the first ``ndims`` dims)."""

    def __init__(self, head_dim: int, ndims: int, base: float):
        super().__init__()
        self.ndims = ndims
        inv_freq = 1.0 / (base ** (torch.arange(0, ndims, 2, dtype=torch.float) / ndims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def tables(
        self, positions: torch.Tensor, dtype: torch.dtype, angle_dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (..., ndims) for ``positions`` (see :func:`rotary_tables`)."""
        return rotary_tables(self.inv_freq, positions, dtype, angle_dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin of shape (1 or B, 1, T, ndims), computed in fp32."""
        cos, sin = self.tables(positions, dtype)
        if cos.dim() == 2:
            cos, sin = cos[None], sin[None]
        return cos[:, None], sin[:, None]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D) as if its tokens sat at ``positions`` ((T,) or (B, T))."""
        return self.rotate_with(x, *self.cos_sin(positions, x.dtype))

    def rotate_with(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D) with precomputed ``cos_sin`` tables."""
        return rotate_half(x, cos, sin)


class KVCache(Protocol):
    """What a cache must do for the model: attend for one layer and remember what it needs.

    ``q``, ``k``, ``v`` are (B, H, T, D) and *not* rotated; ``attention`` exposes ``rotary``
    (a :class:`RotaryEmbedding`), ``kind`` and ``sink_logit`` so the cache can rotate with positions
    of its choosing and call :func:`pretrain.attention.attend` or build scores itself. Returns the
    attention output (B, H, T, D) and, when ``need_probs``, the weights.
    """

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention: "Attention",
        position_ids: torch.Tensor | None,
        need_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class DenseCache:
    """Unbounded cache of rotated keys: plain incremental decoding (dense attention)."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[-2]

    def attend(self, layer_idx, q, k, v, attention, position_ids, need_probs):
        past = self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + q.shape[-2], device=q.device)
        q = attention.rotary.rotate(q, position_ids)
        k = attention.rotary.rotate(k, position_ids)
        if layer_idx in self.keys:
            k = torch.cat([self.keys[layer_idx], k], dim=-2)
            v = torch.cat([self.values[layer_idx], v], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return attention.kernel(q, k, v, causal=True, need_probs=need_probs)


class Attention(nn.Module):
    """Multi-head self-attention with a fused, per-head interleaved QKV projection."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.kind = config.attention
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.rotary_ndims, config.rotary_base)
        if self.kind == "sink_logit":
            self.sink_logit = nn.Parameter(torch.full((config.num_heads,), float(config.sink_logit_init)))
        else:
            self.sink_logit = None

    def kernel(self, q, k, v, mask=None, causal=False, need_probs=False):
        """This layer's attention kernel on already-rotated q, k (see :func:`pretrain.attention.attend`)."""
        return attend(q, k, v, self.kind, mask=mask, causal=causal, sink_logit=self.sink_logit, need_probs=need_probs)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        position_ids: torch.Tensor | None = None,  # (T,) or (B, T)
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,  # bool, broadcastable to (B, H, T, T)
        need_probs: bool = False,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin for position_ids, shared by all layers
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        # GPT-NeoX layout: the 3C outputs are [q_h, k_h, v_h] for head 0, then head 1, ...
        qkv = self.qkv(x).view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, H, T, D)
        if cache is not None:
            y, probs = cache.attend(self.layer_idx, q, k, v, self, position_ids, need_probs)
        else:
            if rope is None:
                rope = self.rotary.cos_sin(torch.arange(T, device=x.device) if position_ids is None else position_ids, q.dtype)
            cos, sin = (t.to(q.dtype) for t in rope)  # no-op unless autocast made q lower precision than x
            q = self.rotary.rotate_with(q, cos, sin)
            k = self.rotary.rotate_with(k, cos, sin)
            y, probs = self.kernel(q, k, v, mask=attn_mask, causal=True, need_probs=need_probs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), probs


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.mlp_size)
        self.down = nn.Linear(config.mlp_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, position_ids=None, cache=None, attn_mask=None, need_probs=False, rope=None):
        a, probs = self.attn(self.ln_attn(x), position_ids, cache, attn_mask, need_probs, rope)
        if self.parallel:
            # Pythia: x + attn(ln1(x)) + mlp(ln2(x)); summed in HF's order for bitwise parity
            return self.mlp(self.ln_mlp(x)) + a + x, probs
        x = a + x
        return self.mlp(self.ln_mlp(x)) + x, probs


def column_blocks(weight: torch.Tensor, max_blocks: int, contiguous_columns: bool = False) -> torch.Tensor:
    """An (N, K) weight, nn.Linear's layout, as (b, K, N / b) column blocks for :func:`few_rows_product`,
    ``b`` the most blocks up to ``max_blocks`` that divide N.

    By default a view: each output is then a dot product over K, which rounds as ``F.linear`` does.
    ``contiguous_columns`` copies each block to a row-major (K, N / b), which the CPU BLAS streams
    faster when N / b is large (a vocabulary head: a pythia-14m decode step takes 2.2 ms with the copy,
    3.2 ms with the view, on the 2-core EPYC) but sums term by term along K (~2.5x F.linear's rounding
    error)."""
    n, k = weight.shape
    b = next(b for b in range(max_blocks, 0, -1) if n % b == 0)
    blocks = weight.view(b, n // b, k).transpose(1, 2)
    return blocks.contiguous() if contiguous_columns else blocks


def few_rows_product(rows: torch.Tensor, blocks: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """``base + rows @ W`` for rows (..., K) and W given as :func:`column_blocks` (b, K, N / b); ``base``
    broadcasts to (..., N) (a bias, or the residual stream), or is already cut as (b, 1, N / b) (a bias
    cut once, not per call).

    One batched product: for a few rows the CPU BLAS barely shares one product between two threads,
    while a batched one gives each thread whole blocks (2-core EPYC, one row: pythia-14m's head
    2.6 -> 0.46 ms, 160m's 10 -> 4.4 ms; a 160m decode step with its layers' products blocked, 43 -> 31 ms)."""
    b, k, width = blocks.shape
    one_row = rows.dim() == 2 and rows.shape[0] == 1  # a decode step's: fewer view ops (~1 us each)
    flat = rows.expand(b, 1, k) if one_row else rows.reshape(1, -1, k).expand(b, -1, -1)  # (b, M, K)
    if base is None:
        out = torch.bmm(flat, blocks)
    else:
        if base.dim() != 3:  # -> (b, M or 1, N / b)
            base = base.reshape(b, 1, width) if one_row or base.dim() == 1 else base.reshape(-1, b, width).transpose(0, 1)
        out = torch.baddbmm(base, flat, blocks)
    if one_row:
        return out.view(1, b * width)
    return out.transpose(0, 1).reshape(*rows.shape[:-1], b * width)  # (..., N)


class VocabHead(nn.Linear):
    """The untied output embedding. ``head(hidden)`` -> logits; ``head(hidden, labels)`` -> the mean
    next-token loss, computed in chunks (:mod:`pretrain.chunked_loss`) so the full logits never exist.
    Both go through the module call, so ZeRO-3 gathers the weight for either.

    Decoding on a CPU multiplies a few rows by the (V, C) weight, where ``F.linear`` is slow (see
    :func:`few_rows_product`). So inference (no grad) on the CPU with at most :attr:`FEW_ROWS` rows
    multiplies against a copy of the weight in :attr:`BLOCKS` contiguous column blocks (still faster
    at 32 rows, slower from about 128), rebuilt whenever the weight's storage or version changes (an
    optimizer step, a load, a ZeRO-3 gather).
    """

    FEW_ROWS = 32
    BLOCKS = 4

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            return chunked_lm_loss(hidden, self.weight, labels)
        if (
            hidden.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and hidden[..., 0].numel() <= self.FEW_ROWS
        ):
            return few_rows_product(hidden, self._blocked_weight())  # (..., V)
        return super().forward(hidden)

    def _blocked_weight(self) -> torch.Tensor:
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
        if getattr(self, "_blocked_key", None) != key:
            self._blocked = column_blocks(weight.detach(), self.BLOCKS, contiguous_columns=True)  # (b, C, V / b)
            self._blocked_key = key
        return self._blocked


class ModelOutput(NamedTuple):
    # a NamedTuple rather than a dataclass: ZeRO-3's forward hooks look inside tuples for tensors
    logits: torch.Tensor | None  # (B, T, padded_vocab); None when the loss was asked for instead
    attentions: list[torch.Tensor] | None = None  # per layer (B, H, T, Tk) when requested
    hidden_states: torch.Tensor | None = None  # final hidden states, after ln_f (B, T, C)
    loss: torch.Tensor | None = None  # mean next-token loss when ``labels`` were given


class GPTNeoX(nn.Module):
    """The decoder. ``forward(input_ids, position_ids=None, cache=None)`` -> :class:`ModelOutput`;
    :meth:`hidden_states` is its trunk (everything but the vocabulary head)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = VocabHead(config.hidden_size, config.padded_vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Pythia's init: ``small_init`` N(0, sqrt(2/(5d))) for embeddings and input projections,
        ``wang_init`` N(0, 2/(L sqrt(d))) for the attention and MLP output projections, zero biases,
        unit LayerNorms, and ``sink_logit_init`` for sink logits."""
        cfg = self.config
        d, L = cfg.hidden_size, cfg.num_layers
        stds = {"small_init": math.sqrt(2.0 / (5.0 * d)), "normal": cfg.init_std, "wang_init": 2.0 / (L * math.sqrt(d))}
        std_in, std_out = stds[cfg.init_method], stds[cfg.output_init_method]
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith("attn.proj") or name.endswith("mlp.down")
                nn.init.normal_(module.weight, mean=0.0, std=std_out if is_output else std_in)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std_in)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, Attention) and module.sink_logit is not None:
                nn.init.constant_(module.sink_logit, cfg.sink_logit_init)

    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (T,) or (B, T); default 0..T-1 (or from the cache)
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,  # extra boolean mask (B|1, H|1, T, T), ANDed with causal
        attentions: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The trunk: embedding, blocks, final LayerNorm -> hidden states (B, T, C).

        Lets callers apply the (large) vocabulary head to just the positions they need. When
        ``attentions`` is a list, each layer's attention weights are appended to it.
        """
        x = self.embed(input_ids)  # (B, T, C)
        rope = None
        if cache is None:
            # every layer rotates with the same tables: compute them once per forward, not per layer
            positions = torch.arange(x.shape[1], device=x.device) if position_ids is None else position_ids
            rope = self.blocks[0].attn.rotary.cos_sin(positions, x.dtype)
        need_probs = attentions is not None
        for block in self.blocks:
            x, probs = block(x, position_ids, cache, attn_mask, need_probs, rope)
            if need_probs:
                attentions.append(probs)
        return self.ln_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (T,) or (B, T); default 0..T-1 (or from the cache)
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,  # extra boolean mask (B|1, H|1, T, T), ANDed with causal
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        labels: torch.Tensor | None = None,  # (B, T) aligned targets (-100 = none): loss instead of logits
    ) -> ModelOutput:
        """Logits; or, given ``labels``, the mean next-token loss (:func:`lm_loss` of those logits,
        computed without them: what training calls)."""
        attentions = [] if output_attentions else None
        hidden = self.hidden_states(input_ids, position_ids, cache, attn_mask, attentions)
        extras = dict(attentions=attentions, hidden_states=hidden if output_hidden_states else None)
        if labels is not None:
            return ModelOutput(logits=None, loss=self.lm_head(hidden, labels), **extras)
        return ModelOutput(logits=self.lm_head(hidden), **extras)  # (B, T, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; ``labels`` are already aligned with ``logits`` (B, T)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)
