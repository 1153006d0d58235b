"""Streaming decode, one token per step, with fixed shapes and every piece of bookkeeping on the device.

:class:`~inference.cache.SinkCache` is general (chunks of any length, the weights when asked, an
unbounded window) and keeps its bookkeeping in Python ints: right for prompts, but one decode step
then costs a host round-trip per layer and launches shaped by Python state, so on a GPU it is bound
by launches, not arithmetic. Here the same cache semantics (see the module docstring of
:mod:`inference.cache`) are laid out for one new token per step:

- one preallocated buffer per layer for keys and one for values, ``s`` sink slots followed by the
  ``r`` ring slots (slot ``s + (j - s) % r`` holds window token j, as in SinkCache's ring) and one
  last slot for the step's own token, so a layer scores and mixes all it attends to in one product
  each (a CPU step is bound by the number of small kernels, not by arithmetic);
- the stream position ``t``, the slot it writes and a per-slot additive mask (0 for a filled slot,
  ``-inf`` for an empty one) are device tensors, updated in place by the step itself;
- the rotary angles for the step's three positions (query for the window at t, query for the
  sinks at min(t, s + r), the new key at t) are formed once per step on the device, in float64 as
  SinkCache does, as rotation matrices (:func:`pretrain.model.rotary_matrix`) shared by all layers:
  a layer rotates its query twice and its key once with two products; no per-layer memo, no
  ``.item()``.

So every step runs the same kernels on the same addresses, batches of B streams in lockstep, from
the first token on (empty slots are masked) and across the point where eviction starts.
:class:`DecodeStep` runs the whole step (embedding, every layer, the head) eagerly, through
``torch.compile`` or replayed from one captured CUDA graph. Prompts still go through SinkCache's
chunked path: :meth:`StaticSinkCache.from_sink_cache` takes over its state and
:meth:`StaticSinkCache.write_back` returns it.
"""

from __future__ import annotations

import math

import torch

from inference.static_step import MODES, StaticStep, ring_slot
from pretrain.attention import attention_probs
from pretrain.model import rotary_matrix, rotary_tables

__all__ = ["MODES", "DecodeStep", "StaticSinkCache"]


class StaticSinkCache:
    """The model's cache protocol (:class:`pretrain.model.KVCache`) for one token per step, fixed shapes."""

    def __init__(self, model, batch_size: int, start_size: int, recent_size: int, dtype: torch.dtype | None = None):
        config, param = model.config, next(model.parameters())
        device, dtype = param.device, dtype or param.dtype
        if recent_size is None or recent_size < 1:
            raise ValueError(f"StaticSinkCache needs a bounded window (recent_size >= 1), got {recent_size!r}")
        self.start_size, self.recent_size = start_size, recent_size
        n = start_size + recent_size
        # slots: s sinks, the r-slot ring, then the step's own token (rewritten every step)
        shape = (config.num_layers, batch_size, config.num_heads, n + 1, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # additive mask over the slots: -inf while a slot is empty; the own-token slot is always on
        self.bias = torch.full((n + 1,), float("-inf"), dtype=torch.float32, device=device)
        self.bias[n] = 0.0
        # the sink slots take the query rotated at the sinks' position, the rest the query at t
        self.is_sink = torch.arange(n + 1, device=device) < start_size
        self.position = torch.zeros((), dtype=torch.long, device=device)  # t: the next token's stream position
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where token t is written
        self.inv_freq = model.blocks[0].attn.rotary.inv_freq.to(torch.float64)  # as SinkCache's float64 angles
        d = config.head_dim
        self.rotate_query = torch.zeros(d, 2 * d, dtype=dtype, device=device)  # [at t | at min(t, s + r)]
        self.rotate_key = torch.zeros(d, d, dtype=dtype, device=device)  # at t

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the step reads or writes in place (their addresses never change)."""
        return (self.keys, self.values, self.bias, self.position, self.slot, self.rotate_query, self.rotate_key)

    # -- the step's bookkeeping, all on the device ----------------------------------------------

    def begin(self) -> None:
        """Rotations and write slot for token ``position`` (before the layers run)."""
        s, r = self.start_size, self.recent_size
        t = self.position
        positions = torch.stack([t, t.clamp(max=s + r), t])  # q window, q sinks, new key
        cos, sin = rotary_tables(self.inv_freq, positions, self.rotate_key.dtype, torch.float64)
        rotations = rotary_matrix(cos, sin, self.rotate_key.shape[0])  # (3, D, D)
        self.rotate_query.copy_(torch.cat([rotations[0], rotations[1]], dim=-1))
        self.rotate_key.copy_(rotations[2])
        self.slot.copy_(ring_slot(t, s, r).view(1))

    def advance(self) -> None:
        """After the layers: the written slot is now filled, the stream moves on."""
        self.bias.index_fill_(0, self.slot, 0.0)
        self.position.add_(1)

    # -- the cache protocol -----------------------------------------------------------------------

    def attend(self, layer_idx, q, k, v, attention, position_ids, need_probs):
        if q.shape[-2] != 1 or need_probs or position_ids is not None:
            raise ValueError("StaticSinkCache takes one token per step, no position_ids, no weights (use SinkCache)")
        B, H, _, D = q.shape
        n = self.start_size + self.recent_size
        keys, values = self.keys[layer_idx], self.values[layer_idx]  # (B, H, n + 1, D)
        k_new = k @ self.rotate_key  # (B, H, 1, D), at t
        keys[:, :, n:].copy_(k_new)
        values[:, :, n:].copy_(v)
        queries = (q @ self.rotate_query).view(B, H, 2, D)  # rows: at t, at min(t, s + r)
        both = queries @ keys.transpose(-1, -2)  # (B, H, 2, n + 1)
        scores = torch.where(self.is_sink, both[:, :, 1:2], both[:, :, 0:1])  # (B, H, 1, n + 1)
        scores = torch.add(self.bias, scores.float(), alpha=1.0 / math.sqrt(D))  # empty slots -> -inf
        probs = attention_probs(scores, attention.kind, attention.sink_logit).to(v.dtype)
        out = probs @ values  # (B, H, 1, D)
        keys.index_copy_(2, self.slot, k_new)
        values.index_copy_(2, self.slot, v)
        return out, None

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
    :class:`~inference.static_step.StaticStep`'s.
    """

    def __init__(self, model, cache: StaticSinkCache, mode: str = "eager"):
        device = cache.keys.device
        self.check_mode(mode, device)
        self.model, self.cache = model, cache
        self.input_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(cache.batch_size, model.config.padded_vocab_size, dtype=torch.float32, device=device)
        self._init_mode(mode, device)

    def _step(self) -> None:  # called by StaticStep under inference_mode
        self.cache.begin()
        hidden = self.model.hidden_states(self.input_ids, cache=self.cache)
        self.logits.copy_(self.model.lm_head(hidden[:, -1]))
        self.cache.advance()
