"""Streaming decode, one token per step, with fixed shapes and every piece of bookkeeping on the device.

:class:`~inference.cache.SinkCache` is general (chunks of any length, the weights when asked, an
unbounded window) and keeps its bookkeeping in Python ints: right for prompts, but one decode step
then costs a host round-trip per layer and launches shaped by Python state, so on a GPU it is bound
by launches, not arithmetic. Here the same cache semantics (see the module docstring of
:mod:`inference.cache`) are laid out for one new token per step:

- one preallocated buffer holds every layer's keys and values, ``s`` sink slots followed by the
  ``r`` ring slots (slot ``s + (j - s) % r`` holds window token j, as in SinkCache's ring) and one
  last slot for the step's own token, so a layer scores and mixes all it attends to in one product
  each (a CPU step is bound by the number of small kernels, not by arithmetic);
- the stream position ``t``, the slot it writes and a per-slot additive mask (0 for a filled slot,
  ``-inf`` for an empty one) are device tensors, updated in place by the step itself;
- the rotary angles for the step's three positions (query for the window at t, query for the
  sinks at min(t, s + r), the new key at t) are formed once per step on the device, in float64 as
  SinkCache does, as one (3D, 4D) matrix shared by all layers (built from
  :func:`pretrain.model.rotary_matrix` blocks; the query blocks carry the scores' 1/sqrt(D)): one
  product of a head's [q, k, v] gives both rotated queries, the rotated key and the value; no
  per-layer memo, no ``.item()``.

So every step runs the same kernels on the same addresses, batches of B streams in lockstep, from
the first token on (empty slots are masked) and across the point where eviction starts.
:class:`DecodeStep` runs the whole step (embedding, every layer, the head) eagerly, through
``torch.compile`` or replayed from one captured CUDA graph, over the blocks' folded products
(:mod:`inference.folded_blocks`). Prompts still go through SinkCache's chunked path:
:meth:`StaticSinkCache.from_sink_cache` takes over its state and :meth:`StaticSinkCache.write_back`
returns it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from inference.folded_blocks import FoldedBlocks
from inference.static_step import MODES, StaticStep, ring_slot
from pretrain.attention import attention_probs
from pretrain.model import rotary_matrix, rotary_swap, rotary_tables

__all__ = ["MODES", "DecodeStep", "StaticSinkCache"]


class StaticSinkCache:
    """SinkCache's state for one token per step, in fixed buffers, and one layer's attention over it."""

    def __init__(self, model, batch_size: int, start_size: int, recent_size: int, dtype: torch.dtype | None = None):
        config, param = model.config, next(model.parameters())
        device, dtype = param.device, dtype or param.dtype
        if recent_size is None or recent_size < 1:
            raise ValueError(f"StaticSinkCache needs a bounded window (recent_size >= 1), got {recent_size!r}")
        self.start_size, self.recent_size = start_size, recent_size
        n = start_size + recent_size
        B, H, D = batch_size, config.num_heads, config.head_dim
        # slots: s sinks, the r-slot ring, then the step's own token (rewritten every step)
        self.kv = torch.zeros((config.num_layers, 2, B, H, n + 1, D), dtype=dtype, device=device)  # [keys, values]
        # additive mask over the slots: -inf while a slot is empty; the own-token slot is always on
        self.bias = torch.full((n + 1,), float("-inf"), dtype=dtype, device=device)
        self.bias[n] = 0.0
        # the sink slots take the query rotated at the sinks' position, the rest the query at t
        self.is_sink = torch.arange(n + 1, device=device) < start_size
        self.position = torch.zeros((), dtype=torch.long, device=device)  # t: the next token's stream position
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where token t is written
        self.inv_freq = model.blocks[0].attn.rotary.inv_freq.to(torch.float64)  # as SinkCache's float64 angles
        # a head's [q, k, v] (3D) @ rotation -> [q at t, q at min(t, s + r) (both scaled), k at t, v] (4D)
        self.rotation = torch.zeros(3 * D, 4 * D, dtype=dtype, device=device)
        self.rotation[2 * D :, 3 * D :] = torch.eye(D, dtype=dtype, device=device)
        self._query_blocks = self.rotation[:D, : 2 * D].view(D, 2, D)  # q -> [q at t | q at sinks]
        self._key_block = self.rotation[D : 2 * D, 2 * D : 3 * D]
        ndims = model.blocks[0].attn.rotary.ndims
        self._swap = rotary_swap(ndims, D, torch.float64, device)
        self._block_scale = torch.tensor([1.0 / math.sqrt(D)] * 2 + [1.0], dtype=torch.float64, device=device).view(3, 1, 1)
        # per-layer views and the step's scratch tensors, made once: a layer slices and allocates
        # nothing (on a CPU each of those is another ~1 us of dispatch, and a step runs ~15 per layer)
        per_head = self.kv.view(config.num_layers, 2, B * H, n + 1, D)
        self._layer_kv = list(self.kv)  # (2, B, H, n + 1, D) per layer
        self._keys_t = [layer[0].transpose(1, 2) for layer in per_head]  # (B H, D, n + 1)
        self._values = [layer[1] for layer in per_head]  # (B H, n + 1, D)
        self._own = [layer[:, :, :, n:] for layer in self.kv]  # (2, B, H, 1, D): the own-token slot
        self._rows = torch.zeros(B, H, 1, 4 * D, dtype=dtype, device=device)  # [q at t, q at sinks, k, v]
        self._new = self._rows[..., 2 * D :].view(B, H, 1, 2, D).permute(3, 0, 1, 2, 4)  # (2, B, H, 1, D)
        self._queries = self._rows[..., : 2 * D].view(B * H, 2, D)
        both = torch.zeros(B * H, 2, n + 1, dtype=dtype, device=device)  # the scores of both queries
        self._both, self._both_window, self._both_sinks = both, both[:, :1], both[:, 1:]
        self._scores = torch.zeros(B * H, 1, n + 1, dtype=dtype, device=device)
        self._scores_heads = self._scores.view(B, H, 1, n + 1)
        self._out = torch.zeros(B * H, 1, D, dtype=dtype, device=device)
        self._out_rows = self._out.view(B, H * D)

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    @property
    def keys(self) -> torch.Tensor:
        return self.kv[:, 0]  # (L, B, H, n + 1, D), a view

    @property
    def values(self) -> torch.Tensor:
        return self.kv[:, 1]

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the step reads or writes in place (their addresses never change)."""
        return (self.kv, self.bias, self.position, self.slot, self.rotation)

    # -- the step's bookkeeping, all on the device ----------------------------------------------

    def begin(self) -> None:
        """Rotations and write slot for token ``position`` (before the layers run)."""
        s, r = self.start_size, self.recent_size
        t = self.position
        positions = torch.stack([t, t.clamp(max=s + r), t])  # q window, q sinks, new key
        cos, sin = rotary_tables(self.inv_freq, positions, torch.float64, torch.float64)
        # (3, D, D) in float64; the two query blocks carry the scores' 1/sqrt(D)
        blocks = rotary_matrix(cos, sin, self._swap.shape[0], self._swap) * self._block_scale
        self._query_blocks.copy_(blocks[:2].transpose(0, 1))
        self._key_block.copy_(blocks[2])
        self.slot.copy_(ring_slot(t, s, r).view(1))

    def advance(self) -> None:
        """After the layers: the written slot is now filled, the stream moves on."""
        self.bias.index_fill_(0, self.slot, 0.0)
        self.position.add_(1)

    def attend_token(self, layer_idx: int, qkv: torch.Tensor, attention) -> torch.Tensor:
        """Layer ``layer_idx``'s attention for the step's token: ``qkv`` (B, H, 1, 3D) in GPT-NeoX's
        per-head [q, k, v] layout, not rotated; writes its key and value; returns the heads' output
        (B, C) in a scratch tensor that the next layer's call overwrites."""
        torch.matmul(qkv, self.rotation, out=self._rows)
        self._own[layer_idx].copy_(self._new)
        torch.baddbmm(self.bias, self._queries, self._keys_t[layer_idx], out=self._both)  # empty slots -> -inf
        torch.where(self.is_sink, self._both_sinks, self._both_window, out=self._scores)
        scores = self._scores_heads
        probs = attention_probs(scores if scores.dtype == torch.float32 else scores.float(), attention.kind, attention.sink_logit)
        if probs.dtype != self._out.dtype:
            probs = probs.to(self._out.dtype)
        torch.bmm(probs.view(self._scores.shape), self._values[layer_idx], out=self._out)
        self._layer_kv[layer_idx].index_copy_(3, self.slot, self._new)
        return self._out_rows

    # -- moving state to and from SinkCache (between prompts and decoding; not per token) ------------

    @classmethod
    def from_sink_cache(cls, model, cache, batch_size: int = 1) -> "StaticSinkCache":
        """A static cache holding exactly what ``cache`` (a bounded SinkCache) holds now."""
        layers = cache.layers
        if layers:
            batch_size = layers[0].sink_k.shape[0]
        static = cls(model, batch_size, cache.start_size, cache.recent_size, layers[0].sink_k.dtype if layers else None)
        if not layers:
            return static
        s, seen = cache.start_size, cache.seen
        for i, state in layers.items():
            kept = min(s, seen)
            static.keys[i, :, :, :kept] = state.sink_k[:, :, :kept]
            static.values[i, :, :, :kept] = state.sink_v[:, :, :kept]
            static.keys[i, :, :, s:-1] = state.win_k
            static.values[i, :, :, s:-1] = state.win_v
        static.bias[: min(s, seen)] = 0.0
        static.bias[s:-1] = torch.where(layers[0].win_pos >= 0, 0.0, float("-inf"))
        static.position.fill_(seen)
        return static

    def write_back(self, cache) -> None:
        """Put this state into ``cache`` (a SinkCache of the same sizes), e.g. before the next prompt."""
        s, r = self.start_size, self.recent_size
        seen = int(self.position)
        cache.reset()
        window = torch.arange(max(s, seen - r), seen, device=self.keys.device)  # window tokens held
        win_pos = torch.full((r,), -1, dtype=torch.long, device=self.keys.device)
        win_pos[(window - s) % r] = window
        for i in range(self.keys.shape[0]):
            state = cache._state(i, self.keys[i, :, :, :1], self.values[i, :, :, :1])
            state.sink_k.copy_(self.keys[i, :, :, :s])
            state.sink_v.copy_(self.values[i, :, :, :s])
            state.win_k.copy_(self.keys[i, :, :, s:-1])
            state.win_v.copy_(self.values[i, :, :, s:-1])
            state.win_pos.copy_(win_pos)
            state.win_filled = len(window)
            state.seen = seen


class DecodeStep(StaticStep):
    """One whole decode step (embedding, all layers, the head) over a :class:`StaticSinkCache`.

    ``step(ids)`` with ids (B,) or (B, 1) returns the next-token logits (B, V) in a buffer that the
    next call overwrites; ``mode`` (eager / compile / graph) and the CUDA-graph capture are
    :class:`~inference.static_step.StaticStep`'s. The layers run over their folded products
    (:class:`~inference.folded_blocks.FoldedBlocks`), re-folded before a step if a weight changed.
    """

    def __init__(self, model, cache: StaticSinkCache, mode: str = "eager"):
        device = cache.kv.device
        self.check_mode(mode, device)
        self.model, self.cache = model, cache
        self.folded = FoldedBlocks(model)
        self.input_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self._ids = self.input_ids.view(-1)
        self.ones = torch.ones(cache.batch_size, 1, dtype=cache.kv.dtype, device=device)  # the bias rows' input
        self._layers = list(zip(self.folded.layers, (block.attn for block in model.blocks)))
        self.logits = torch.zeros(cache.batch_size, model.config.padded_vocab_size, dtype=torch.float32, device=device)
        self._init_mode(mode, device, cache.kv.dtype)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.folded.refresh()  # outside the compiled or captured step: it compares Python-side versions
        return super().__call__(ids)

    def _step(self) -> None:  # called by StaticStep under inference_mode
        model, cache, product = self.model, self.cache, self.folded.product
        config = model.config
        width, heads, eps = config.hidden_size, config.num_heads, config.layer_norm_eps
        cache.begin()
        x = F.embedding(self._ids, model.embed.weight)  # (B, C)
        for i, (f, attention) in enumerate(self._layers):
            h = product(F.layer_norm(x, (width,), eps=eps), f.w_in, f.b_in)  # (B, 3C [+ M])
            y = cache.attend_token(i, h[:, : 3 * width].view(x.shape[0], heads, 1, -1), attention)  # (B, C)
            if f.w_up is None:  # parallel residual: x + attn(ln1(x)) + mlp(ln2(x)) in one product
                x = product(torch.cat([y, F.gelu(h[:, 3 * width :]), self.ones], dim=1), f.w_out, x)
            else:  # sequential: x += attn(ln1(x)); x += mlp(ln2(x))
                x = product(torch.cat([y, self.ones], dim=1), f.w_out, x)
                u = product(F.layer_norm(x, (width,), eps=eps), f.w_up, f.b_up)
                x = product(torch.cat([F.gelu(u), self.ones], dim=1), f.w_down, x)
        self.logits.copy_(model.lm_head(model.ln_f(x)))
        cache.advance()
