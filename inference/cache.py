"""The StreamingLLM cache: ``start_size`` attention-sink tokens plus the ``recent_size`` latest tokens.

Semantics (the paper's protocol, see docs/design.md, "Streaming semantics"): token t is processed once,
its keys/values are kept, and after each step the cache is trimmed to the first s and the last r
tokens. While token t is processed every layer attends to

- the sinks, tokens 0 .. min(s, t) - 1, and
- the window, tokens max(s, t - r) .. t (itself included),

with positions given by cache slot: sinks at 0 .. s - 1, the window after them, the query last.
RoPE only sees position differences, so that is the same as

- query t -> window token j at distance t - j (the absolute distance), and
- query t -> sink i at distance min(t, s + r) - i.

This cache stores keys already rotated: sinks at their slot positions 0 .. s - 1 and window keys at
their absolute positions, and rotates each query twice (at t for the window, at min(t, s + r) for
the sinks). One softmax (or softmax1 / sink_logit) runs over both groups of scores. Rotation
angles are computed in float64 (:meth:`pretrain.model.RotaryEmbedding.tables`) so that absolute
positions in the millions lose no precision.

Storage is preallocated: the sinks in ``s`` slots and the window in a ring buffer of ``r`` slots;
a step writes only the new tokens' slots (no per-token copy of the cache). Any number of new tokens
may come at once (a chunk): a banded mask gives every token exactly what it would have seen had
the tokens come one by one, so chunked streaming equals token-by-token streaming.
``recent_size=None`` is an unbounded window (dense attention; the buffer grows by doubling) and
``start_size=0`` is plain window attention. Batches stream in lockstep (every row at the same
position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pretrain.attention import attention_probs
from pretrain.model import rotate_half

# queries per explicit-score block in a chunk (CPU path): each block scores only its band of keys
QUERY_BLOCK = 256


@dataclass
class _LayerState:
    """One layer's kept keys (rotated, see module docstring) and values."""

    sink_k: torch.Tensor  # (B, H, s, D), slot i holds stream token i
    sink_v: torch.Tensor
    win_k: torch.Tensor  # (B, H, capacity, D), ring buffer of window tokens
    win_v: torch.Tensor
    win_pos: torch.Tensor  # (capacity,) long: stream position held by each slot, -1 while empty
    win_filled: int = 0  # slots 0 .. win_filled - 1 are in use (the ring fills in order)
    seen: int = 0  # tokens of the stream this layer has processed


class SinkCache:
    """A sink + window KV cache implementing the model's cache protocol (:class:`pretrain.model.KVCache`).

    ``SinkCache(4, 1020)`` keeps 4 sinks and the 1020 latest tokens (while a token is processed it
    also sees itself, as in the paper). Use a fresh cache (or :meth:`reset`) per stream.
    ``use_sdpa``: run multi-token chunks through ``scaled_dot_product_attention`` (default: on CUDA).
    """

    query_block = QUERY_BLOCK

    def __init__(self, start_size: int, recent_size: int | None, use_sdpa: bool | None = None):
        if isinstance(start_size, bool) or not isinstance(start_size, int) or start_size < 0:
            raise ValueError(f"start_size must be an integer >= 0, got {start_size!r}")
        if recent_size is not None and (
            isinstance(recent_size, bool) or not isinstance(recent_size, int) or recent_size < 1
        ):
            raise ValueError(
                f"recent_size must be an integer >= 1 (or None for an unbounded, dense cache), got {recent_size!r}"
            )
        self.start_size = start_size
        self.recent_size = recent_size
        # chunks through the fused SDPA kernels: None = on CUDA only (on a CPU, SDPA with a mask
        # and unequal q/v widths falls back to a math path slower than the explicit one)
        self.use_sdpa = use_sdpa
        self.layers: dict[int, _LayerState] = {}
        self._angle_memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        recent = "unbounded" if self.recent_size is None else self.recent_size
        return f"SinkCache(start_size={self.start_size}, recent_size={recent}, seen={self.seen})"

    @property
    def bounded(self) -> bool:
        return self.recent_size is not None

    @property
    def seen(self) -> int:
        """Tokens fed so far: the stream position the next token gets."""
        return self.layers[0].seen if 0 in self.layers else 0

    def __len__(self) -> int:
        """Tokens currently kept (at most start_size + recent_size)."""
        if 0 not in self.layers:
            return 0
        state = self.layers[0]
        return min(state.seen, self.start_size) + state.win_filled

    def reset(self) -> None:
        """Forget the stream and free the buffers."""
        self.layers.clear()
        self._angle_memo.clear()

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (keys, values, slot positions), all layers."""
        total = 0
        for state in self.layers.values():
            for t in (state.sink_k, state.sink_v, state.win_k, state.win_v, state.win_pos):
                total += t.numel() * t.element_size()
        return total

    # -- the cache protocol -------------------------------------------------------------------

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,  # (B, H, T, D), not rotated
        k: torch.Tensor,
        v: torch.Tensor,
        attention,
        position_ids: torch.Tensor | None,
        need_probs: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend the T new tokens to the kept sinks, the kept window and each other; keep them.

        With ``need_probs`` the weights come back as (B, H, T, K) over the keys in cache order:
        the sinks, then window tokens oldest to newest (the new tokens last); masked keys weigh 0.
        """
        if position_ids is not None:
            raise ValueError(
                "SinkCache assigns positions itself (slot positions, as in StreamingLLM); "
                "call the model with position_ids=None"
            )
        B, H, T, D = q.shape
        state = self._state(layer_idx, k, v)
        s, r = self.start_size, self.recent_size
        t0 = state.seen
        if T == 1 and not need_probs and r is not None and t0 >= s + r:
            return self._decode_full(attention, state, q, k, v), None
        device = q.device
        pos = torch.arange(t0, t0 + T, device=device)  # stream positions of the new tokens

        rotary = attention.rotary
        cos, sin = self._angles(rotary, "absolute", t0, pos, q.dtype)
        q_win = rotate_half(q, cos, sin)  # for keys at absolute positions
        k_new = rotate_half(k, cos, sin)  # new sinks too: their absolute position is their slot
        if r is not None and t0 + T - 1 > s + r:
            # once the cache is full, sinks sit at slots 0..s-1 and the query at slot s + r
            q_sink = rotate_half(q, *self._angles(rotary, "sink", t0, pos.clamp(max=s + r), q.dtype))
        else:
            q_sink = q_win

        n_old_sinks = min(s, t0)
        n_new_sinks = max(0, min(s, t0 + T) - t0)  # the first new tokens may still be sinks
        n_old_win = state.win_filled

        # Score groups, each (B, H, T, n): old sinks | new sinks | ring window | new window tokens.
        groups_k = [
            (q_sink, state.sink_k[:, :, :n_old_sinks]),
            (q_sink, k_new[:, :, :n_new_sinks]),
            (q_win, state.win_k[:, :, :n_old_win]),
            (q_win, k_new[:, :, n_new_sinks:]),
        ]
        groups_v = [
            state.sink_v[:, :, :n_old_sinks],
            v[:, :, :n_new_sinks],
            state.win_v[:, :, :n_old_win],
            v[:, :, n_new_sinks:],
        ]
        if T > 1 and not need_probs:
            fused = q.is_cuda if self.use_sdpa is None else self.use_sdpa
            out = self._attend_packed(attention, state, pos, q_sink, q_win, k_new, v, n_new_sinks, fused)
            probs = None
        else:
            keep = self._visible(pos, state, n_old_sinks, n_new_sinks)  # (T, K) or None: all visible
            out, probs = self._attend_explicit(attention, groups_k, groups_v, keep)

        returned = self._probs_in_cache_order(probs, state, n_old_sinks + n_new_sinks) if need_probs else None
        self._keep(state, pos, k_new, v, n_new_sinks)
        return out, returned

    # -- internals ------------------------------------------------------------------------------

    def _angles(self, rotary, which: str, t0: int, positions: torch.Tensor | None, dtype: torch.dtype,
                fixed: tuple[int, ...] = (), device: torch.device | None = None):
        """cos/sin for this step's positions, computed by the first layer and reused by the others.

        Every layer processes the same tokens and GPT-NeoX layers share one rotary configuration,
        so a decode step computes its angles once instead of once per layer (fewer GPU launches).
        ``fixed``: positions given as Python ints (the tensor is then made only on a memo miss).
        """
        length = positions.shape[0] if positions is not None else len(fixed)
        where = positions.device if positions is not None else device
        key = (which, t0, length, fixed, rotary.ndims, dtype, where)
        found = self._angle_memo.get(key)
        if found is None:
            if len(self._angle_memo) >= 4:
                self._angle_memo.clear()
            if positions is None:
                positions = torch.tensor(fixed, device=where)
            found = self._angle_memo[key] = rotary.tables(positions, dtype, torch.float64)
        return found

    @staticmethod
    def _attend_explicit(attention, groups_k, groups_v, keep):
        """Scores per group, one softmax over all of them, weighted sum per group; no key copies.

        Used for single-token decoding (work and memory O(cache) per token, nothing reallocated)
        and whenever the weights are wanted. Returns (out (B, H, T, D), weights (B, H, T, K)).
        """
        scale = 1.0 / math.sqrt(groups_k[0][0].shape[-1])
        scores = torch.cat([(qq * scale) @ kk.transpose(-1, -2) for qq, kk in groups_k], dim=-1).float()
        if keep is not None:
            scores = scores.masked_fill_(~keep, float("-inf"))  # in place: scores is fresh
        probs = attention_probs(scores, attention.kind, attention.sink_logit).to(groups_v[0].dtype)
        out = None
        start = 0
        for values in groups_v:
            n = values.shape[-2]
            if n:
                part = probs[..., start : start + n] @ values
                out = part if out is None else out + part
            start += n
        return out, probs

    def _decode_full(self, attention, state: _LayerState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token once the cache is full: the steady state of a long stream.

        Same arithmetic as the general path with the bookkeeping it no longer needs: every kept key
        is visible (no mask), no new token is a sink, and the ring slot to overwrite is known. The
        two query rotations and the key rotation are one call, and scores come from the sink and
        ring buffers in place, so a decode step launches about half the kernels (decoding on a GPU
        is bound by launches, not arithmetic).
        """
        s, r = self.start_size, self.recent_size
        t = state.seen
        positions = (t, s + r, t)  # query for the window, query for the sinks, the new key
        cos, sin = self._angles(attention.rotary, "decode", t, None, q.dtype, positions, q.device)
        rotated = rotate_half(torch.cat([q, q, k], dim=2), cos, sin)  # (B, H, 3, D)
        q_win, q_sink, k_new = rotated[:, :, 0:1], rotated[:, :, 1:2], rotated[:, :, 2:3]
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.cat(
            [
                q_sink @ state.sink_k.transpose(-1, -2),  # (B, H, 1, s)
                q_win @ state.win_k.transpose(-1, -2),  # (B, H, 1, r): the ring, in slot order
                (q_win * k_new).sum(-1, keepdim=True),  # the token itself
            ],
            dim=-1,
        ).float() * scale
        probs = attention_probs(scores, attention.kind, attention.sink_logit).to(v.dtype)
        out = probs[..., :s] @ state.sink_v + probs[..., s : s + r] @ state.win_v + probs[..., s + r :] * v
        slot = (t - s) % r  # the oldest window token's slot; it leaves the cache now
        state.win_k[:, :, slot : slot + 1] = k_new
        state.win_v[:, :, slot : slot + 1] = v
        state.win_pos[slot] = t
        state.seen = t + 1
        return out

    def _attend_packed(self, attention, state: _LayerState, pos: torch.Tensor, q_sink, q_win, k_new, v, n_new_sinks, fused):
        """A chunk of T > 1 tokens, sink and window scores in one product per query block.

        Queries become [q_sink_rot | q_win_rot | q_pass], sink keys [k_rot | 0 | k_pass] and window
        keys [0 | k_rot | k_pass], so one dot product gives q_sink.k for sinks and q_win.k for the
        window, exactly; the query is pre-scaled so 1/sqrt(width) becomes 1/sqrt(D). The window
        keys (the ring, rolled oldest first, then the chunk's) are in stream order, so each block of
        queries takes only the slice its band can see. With ``fused`` the whole chunk is one
        ``scaled_dot_product_attention`` call (GPU kernels); otherwise blocks of ``query_block``
        queries go through explicit scores (on a CPU a banded slice beats SDPA's masked math path).
        Copies the kept keys once per chunk, amortised over its tokens.
        """
        s, r = self.start_size, self.recent_size
        nd = attention.rotary.ndims
        T, D = q_win.shape[-2], q_win.shape[-1]

        def packed(k: torch.Tensor, sink: bool) -> torch.Tensor:
            zeros = torch.zeros_like(k[..., :nd])
            parts = [k[..., :nd], zeros] if sink else [zeros, k[..., :nd]]
            return torch.cat([*parts, k[..., nd:]], dim=-1)

        query = torch.cat([q_sink[..., :nd], q_win[..., :nd], q_win[..., nd:]], dim=-1) * math.sqrt((D + nd) / D)
        n_sinks = min(s, state.seen) + n_new_sinks
        sink_k = packed(torch.cat([state.sink_k[:, :, : min(s, state.seen)], k_new[:, :, :n_new_sinks]], dim=2), sink=True)
        sink_v = torch.cat([state.sink_v[:, :, : min(s, state.seen)], v[:, :, :n_new_sinks]], dim=2)
        sink_pos = torch.arange(n_sinks, device=pos.device)
        # the ring in stream order: once full (and wrapping), its oldest slot is the next one written
        filled = state.win_filled
        shift = (state.seen - s) % filled if filled and r is not None and filled == r else 0
        ring = slice(0, filled)
        win_k = packed(torch.cat([state.win_k[:, :, ring].roll(-shift, 2), k_new[:, :, n_new_sinks:]], dim=2), sink=False)
        win_v = torch.cat([state.win_v[:, :, ring].roll(-shift, 2), v[:, :, n_new_sinks:]], dim=2)
        win_pos = torch.cat([state.win_pos[ring].roll(-shift, 0), pos[n_new_sinks:]])
        # window positions are consecutive: index of stream position j is j - first
        first = state.seen - filled if filled else max(s, state.seen)

        def band(q_pos: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            """(Tq, n_sinks + hi - lo) visibility of the sinks and window slice [lo, hi) for queries q_pos."""
            query_pos = q_pos[:, None]
            sinks = sink_pos[None, :] <= query_pos  # stored sinks always; a chunk's own sinks causally
            w = win_pos[None, lo:hi]
            window = (w <= query_pos) if r is None else (w <= query_pos) & (w >= query_pos - r)
            return torch.cat([sinks, window], dim=-1)

        if fused:
            keys, values = torch.cat([sink_k, win_k], dim=2), torch.cat([sink_v, win_v], dim=2)
            out, _ = attention.kernel(query, keys, values, mask=band(pos, 0, win_pos.shape[0]))
            return out
        outs = []
        scale = 1.0 / math.sqrt(D + nd)
        t0 = state.seen
        for a in range(0, T, self.query_block):
            b = min(a + self.query_block, T)
            lo = 0 if r is None else max(0, t0 + a - r - first)
            hi = t0 + b - first  # the block's last query sees up to itself
            keys = torch.cat([sink_k, win_k[:, :, lo:hi]], dim=2)
            values = torch.cat([sink_v, win_v[:, :, lo:hi]], dim=2)
            scores = ((query[:, :, a:b] * scale) @ keys.transpose(-1, -2)).float()
            scores.masked_fill_(~band(pos[a:b], lo, hi), float("-inf"))  # in place: scores is fresh
            outs.append(attention_probs(scores, attention.kind, attention.sink_logit).to(values.dtype) @ values)
        return torch.cat(outs, dim=2)

    def _state(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> _LayerState:
        B, H, _, D = k.shape
        state = self.layers.get(layer_idx)
        if state is None:
            capacity = self.recent_size if self.recent_size is not None else 256
            state = _LayerState(
                sink_k=k.new_zeros(B, H, self.start_size, D),
                sink_v=v.new_zeros(B, H, self.start_size, v.shape[-1]),
                win_k=k.new_zeros(B, H, capacity, D),
                win_v=v.new_zeros(B, H, capacity, v.shape[-1]),
                win_pos=torch.full((capacity,), -1, dtype=torch.long, device=k.device),
            )
            self.layers[layer_idx] = state
        elif state.sink_k.shape[:2] != (B, H) or state.sink_k.dtype != k.dtype or state.sink_k.device != k.device:
            raise ValueError(
                f"SinkCache layer {layer_idx} holds batch/heads {tuple(state.sink_k.shape[:2])} "
                f"{state.sink_k.dtype} on {state.sink_k.device}, got {(B, H)} {k.dtype} on {k.device}: "
                "use a fresh cache (or reset()) for a new stream"
            )
        return state

    def _visible(self, pos: torch.Tensor, state: _LayerState, n_old_sinks: int, n_new_sinks: int) -> torch.Tensor | None:
        """Boolean (T, K) mask over the score groups, or None when everything is visible."""
        T = pos.shape[0]
        r = self.recent_size
        if T == 1:
            # the ring holds exactly the latest <= r window tokens, so one new token sees all kept ones
            return None
        device = pos.device
        query = pos[:, None]  # (T, 1)
        old_sinks = torch.ones(T, n_old_sinks, dtype=torch.bool, device=device)
        new_sinks = pos[None, :n_new_sinks] <= query  # causal among the new sinks
        ring_pos = state.win_pos[None, : state.win_filled]
        new_win_pos = pos[None, n_new_sinks:]
        if r is None:
            ring = torch.ones(T, state.win_filled, dtype=torch.bool, device=device)
            new_win = new_win_pos <= query
        else:
            ring = ring_pos >= query - r
            new_win = (new_win_pos <= query) & (new_win_pos >= query - r)
        return torch.cat([old_sinks, new_sinks, ring.expand(T, -1), new_win], dim=-1)

    def _keep(self, state: _LayerState, pos: torch.Tensor, k_new: torch.Tensor, v: torch.Tensor, n_new_sinks: int) -> None:
        """Write the new tokens into their slots: sinks first, then the window (ring) slots."""
        t0 = state.seen
        if n_new_sinks:
            state.sink_k[:, :, t0 : t0 + n_new_sinks] = k_new[:, :, :n_new_sinks]
            state.sink_v[:, :, t0 : t0 + n_new_sinks] = v[:, :, :n_new_sinks]
        win_pos = pos[n_new_sinks:]
        win_k, win_v = k_new[:, :, n_new_sinks:], v[:, :, n_new_sinks:]
        n = win_pos.shape[0]
        if n:
            s, r = self.start_size, self.recent_size
            if r is None:
                self._grow(state, state.win_filled + n)
                slots = win_pos - s
            else:
                if n > r:  # only the last r of a long chunk survive
                    win_pos, win_k, win_v = win_pos[-r:], win_k[:, :, -r:], win_v[:, :, -r:]
                slots = (win_pos - s) % r
            state.win_k.index_copy_(2, slots, win_k)
            state.win_v.index_copy_(2, slots, win_v)
            state.win_pos.index_copy_(0, slots, win_pos)
            capacity = state.win_pos.shape[0]
            state.win_filled = min(capacity, state.win_filled + win_pos.shape[0]) if r is not None else state.win_filled + n
        state.seen = t0 + pos.shape[0]

    @staticmethod
    def _grow(state: _LayerState, needed: int) -> None:
        """Unbounded cache only: double the window buffer until ``needed`` slots fit (amortised O(1))."""
        capacity = state.win_pos.shape[0]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2

        def grown(t: torch.Tensor, dim: int, fill: float) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = capacity
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        state.win_k = grown(state.win_k, 2, 0.0)
        state.win_v = grown(state.win_v, 2, 0.0)
        state.win_pos = grown(state.win_pos, 0, -1)

    @staticmethod
    def _probs_in_cache_order(probs: torch.Tensor, state: _LayerState, n_sinks: int) -> torch.Tensor:
        """Reorder the ring-window columns oldest to newest (the ring stores them by slot)."""
        n_ring = state.win_filled
        if n_ring == 0:
            return probs
        order = torch.argsort(state.win_pos[:n_ring]) + n_sinks
        head = torch.arange(n_sinks, device=probs.device)
        tail = torch.arange(n_sinks + n_ring, probs.shape[-1], device=probs.device)
        return probs[..., torch.cat([head, order, tail])]
