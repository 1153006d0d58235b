"""Exact chunked streaming for Hugging Face models: the per-token protocol's numbers, many tokens per forward.

``docs/design.md`` ("Streaming semantics"): when token t is processed each layer attends to the sinks
0 .. min(s, t) - 1 and the window max(s, t - r) .. t, positions by slot in the cache (query at slot
min(t, s + r)). :mod:`inference.cache` evaluates that in chunks for our model; this module does the same
for the families of :mod:`inference.hf_families`, keeping each layer's sinks and last r tokens'
keys/values exactly as the model computed them when each token arrived:

- GPT-NeoX and the Llama family: an attention function registered with transformers'
  ``AttentionInterface`` (``sinklm_stream``). The model rotates the chunk's queries and keys at their
  absolute positions (we pass them); window scores are then already right, and sink scores take the
  query rotated back by max(0, t - s - r) (the sink keys stay at 0 .. s - 1). Blocks of queries see
  only their band of the window, as in :mod:`inference.cache`.
- MPT and Falcon (no registry): we call their embeddings, decoder blocks, final norm and head
  ourselves, handing each block a cache object whose ``update`` returns the kept keys plus the
  chunk's, and the mask / bias the per-token protocol implies: ALiBi by slot distance per (query,
  key) for MPT and Falcon-ALiBi; for rotary Falcon, each query past s + r gets its own copy of the
  sink keys rotated to its slot distance (its attention runs on a shared key set).

No library module is changed; the model's own attention, MLP and norms compute every number.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface

from inference.hf_families import (
    INTERFACE_TYPES,
    AlibiBias,
    KeyShift,
    input_device,
    key_shift_of,
    model_parts,
    uses_alibi,
)

ATTENTION_NAME = "sinklm_stream"
QUERY_BLOCK = 128  # queries per explicit-score block on the registry route (bounds the score matrix)
BLOCK_CHUNK = 256  # most tokens per forward on the block route (its masks are chunk x kept keys)


class SinkStream:
    """Each layer's kept keys/values (sinks, then the window in stream order) and the tokens seen."""

    def __init__(self, start_size: int, recent_size: int, key_shift: KeyShift | None):
        if start_size < 0 or recent_size < 1:
            raise ValueError(f"need start_size >= 0 and recent_size >= 1; got {start_size}, {recent_size}")
        self.start_size, self.recent_size, self.key_shift = start_size, recent_size, key_shift
        self.seen = 0
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.chunk_length = 0

    # -- where the chunk's tokens go -----------------------------------------------------------------

    def begin(self, length: int) -> None:
        self.chunk_length = length

    def end(self) -> None:
        self.seen += self.chunk_length

    @property
    def old_sinks(self) -> int:
        return min(self.start_size, self.seen)

    @property
    def old_window(self) -> int:
        return min(self.recent_size, max(0, self.seen - self.start_size))

    @property
    def new_sinks(self) -> int:
        return max(0, min(self.start_size, self.seen + self.chunk_length) - self.seen)

    def positions(self, device) -> torch.Tensor:
        return torch.arange(self.seen, self.seen + self.chunk_length, device=device)

    def sink_shift(self, positions: torch.Tensor) -> torch.Tensor:
        """How much further than their slot distance each query is from the sinks: max(0, t - s - r)."""
        return (positions - self.start_size - self.recent_size).clamp(min=0)

    def past(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """(sink_k, sink_v, win_k, win_v) kept for ``layer``, empty before its first chunk."""
        if layer not in self.kept:
            empty_k, empty_v = k[:, :, :0], v[:, :, :0]
            return empty_k, empty_v, empty_k, empty_v
        return self.kept[layer]

    def keep(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the chunk's keys/values (as the model computed them): sinks first, then the last r."""
        sink_k, sink_v, win_k, win_v = self.past(layer, k, v)
        n = self.new_sinks
        sink_k, sink_v = torch.cat([sink_k, k[:, :, :n]], 2), torch.cat([sink_v, v[:, :, :n]], 2)
        win_k = torch.cat([win_k, k[:, :, n:]], 2)[:, :, -self.recent_size :]
        win_v = torch.cat([win_v, v[:, :, n:]], 2)[:, :, -self.recent_size :]
        self.kept[layer] = (sink_k, sink_v, win_k, win_v)

    # -- the registry route: GPT-NeoX and the Llama family ---------------------------------------------

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        """q (B, H, T, D) and k, v (B, H_kv, T, D) of the chunk, rotated at absolute positions ->
        the attention output (B, T, H, D)."""
        s, r = self.start_size, self.recent_size
        sink_k, sink_v, win_k, win_v = self.past(layer, k, v)
        n_new = self.new_sinks
        sink_k, sink_v = torch.cat([sink_k, k[:, :, :n_new]], 2), torch.cat([sink_v, v[:, :, :n_new]], 2)
        all_win_k, all_win_v = torch.cat([win_k, k[:, :, n_new:]], 2), torch.cat([win_v, v[:, :, n_new:]], 2)
        self.keep(layer, k, v)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            sink_k, sink_v, all_win_k, all_win_v = (t.repeat_interleave(rep, 1) for t in (sink_k, sink_v, all_win_k, all_win_v))
        pos = self.positions(q.device)
        shift = self.sink_shift(pos)
        q_sink = self.key_shift(q, -shift) if bool(shift.any()) else q
        q, q_sink = q * scaling, q_sink * scaling  # scale the (T, D) queries, not the (T, K) scores
        t0, T = self.seen, q.shape[-2]
        first = t0 - self.old_window if t0 >= s else s  # stream position of window index 0
        sink_pos = torch.arange(sink_k.shape[-2], device=q.device)
        win_pos = torch.arange(first, first + all_win_k.shape[-2], device=q.device)
        outs = []
        for a in range(0, T, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, T)
            lo, hi = max(0, t0 + a - r - first), max(0, t0 + b - first)
            query = pos[a:b, None]
            window = win_pos[None, lo:hi]
            visible = torch.cat([sink_pos[None] <= query, (window <= query) & (window >= query - r)], 1)
            scores = torch.cat(
                [q_sink[:, :, a:b] @ sink_k.transpose(-1, -2), q[:, :, a:b] @ all_win_k[:, :, lo:hi].transpose(-1, -2)], -1
            ).float()
            probs = scores.masked_fill_(~visible, float("-inf")).softmax(-1).to(v.dtype)
            n = sink_k.shape[-2]
            outs.append(probs[..., :n] @ sink_v + probs[..., n:] @ all_win_v[:, :, lo:hi])
        return torch.cat(outs, 2).transpose(1, 2).contiguous()


def sink_stream_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sink_stream=None, **kwargs):
    """The ``AttentionInterface`` entry: a chunk's attention under the sink + window protocol."""
    if sink_stream is None:
        raise ValueError(f"attention {ATTENTION_NAME!r} needs sink_stream=SinkStream(...) in the forward's kwargs")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return sink_stream.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(ATTENTION_NAME, sink_stream_attention)


@contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Run ``model`` with the attention function registered as ``name`` (transformers' public
    ``set_attn_implementation``), restoring the one it had afterwards."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# -- the block route: MPT and Falcon ------------------------------------------------------------------


class _BlockCache:
    """What a decoder block's attention sees as its cache during one chunk: ``update`` returns the kept
    keys/values in the chunk's key layout (and keeps the new ones)."""

    def __init__(self, stream: SinkStream, copies: torch.Tensor | None):
        self.stream = stream
        self.copies = copies  # per sink copy: the extra rotation (rotary Falcon), or None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.stream.seen

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        stream = self.stream
        sink_k, sink_v, win_k, win_v = stream.past(layer_idx, key_states, value_states)
        keys = [sink_k, win_k, key_states]
        values = [sink_v, win_v, value_states]
        if self.copies is not None:
            n_new = stream.new_sinks
            sinks_k = torch.cat([sink_k, key_states[:, :, :n_new]], 2)
            sinks_v = torch.cat([sink_v, value_states[:, :, :n_new]], 2)
            copies = self.copies.numel() // max(1, sinks_k.shape[-2])
            keys.append(stream.key_shift(sinks_k.repeat(1, 1, copies, 1), self.copies))
            values.append(sinks_v.repeat(1, 1, copies, 1))
        stream.keep(layer_idx, key_states, value_states)
        return torch.cat(keys, 2), torch.cat(values, 2)


def _block_layout(stream: SinkStream, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(visible (T, K), key slots (T, K), sink-copy rotations or None, query slots (T,)) for the chunk's keys
    [old sinks | old window | chunk | sink copies (rotary)]."""
    s, r = stream.start_size, stream.recent_size
    pos = stream.positions(device)
    kpos = torch.cat([
        torch.arange(stream.old_sinks, device=device),
        torch.arange(stream.seen - stream.old_window, stream.seen, device=device),
        pos,
    ])
    query = pos[:, None]
    is_sink = kpos[None] < s
    shift = stream.sink_shift(pos)
    direct = is_sink if stream.key_shift is None else is_sink & (shift[:, None] == 0)  # rotary: later ones via copies
    visible = (kpos[None] <= query) & (direct | (kpos[None] >= query - r))
    q_slots = pos.clamp(max=s + r)
    k_slots = torch.where(is_sink, kpos[None], q_slots[:, None] - (query - kpos[None]))
    copies = None
    if stream.key_shift is not None:
        late = torch.nonzero(shift > 0).flatten()
        if late.numel():
            n_sinks = min(s, stream.seen + stream.chunk_length)
            copies = shift[late].repeat_interleave(n_sinks)
            own = torch.zeros(pos.shape[0], late.numel() * n_sinks, dtype=torch.bool, device=device)
            own[late.repeat_interleave(n_sinks), torch.arange(own.shape[1], device=device)] = True
            visible = torch.cat([visible, own], 1)
            k_slots = torch.cat([k_slots, torch.zeros_like(own, dtype=k_slots.dtype)], 1)
    return visible, k_slots, copies, q_slots


def _forward_blocks(model: nn.Module, ids: torch.Tensor, stream: SinkStream, alibi: AlibiBias | None) -> torch.Tensor:
    """Logits (B, T, V) of one chunk through the model's own blocks with the protocol's mask / bias."""
    parts = model_parts(model)
    hidden = parts.embed(ids)
    dtype, device = hidden.dtype, hidden.device
    visible, k_slots, copies, q_slots = _block_layout(stream, device)
    cache = _BlockCache(stream, copies)
    mpt = model.config.model_type == "mpt"
    kwargs = {}
    if mpt:
        kwargs = {"position_bias": alibi(q_slots, k_slots, torch.float32), "attention_mask": ~visible[None, None]}
    elif alibi is not None:
        bias = alibi(q_slots, k_slots, dtype).masked_fill(~visible[None], torch.finfo(dtype).min)
        heads = bias.shape[0]
        flag = torch.zeros(ids.shape[0] * heads, 1, bias.shape[-1], dtype=dtype, device=device)  # the bias is in the mask
        kwargs = {"attention_mask": bias[None], "alibi": flag}
    else:
        positions = stream.positions(device)[None]
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
        kwargs = {"attention_mask": mask[None, None], "alibi": None, "position_ids": positions,
                  "position_embeddings": parts.rotary(hidden, position_ids=positions)}
    for block in parts.blocks:
        hidden = block(hidden, layer_past=cache, **kwargs)[0]
    return parts.head(parts.norm(hidden))


# -- the evaluation --------------------------------------------------------------------------------


def new_stream(model: nn.Module, start_size: int, recent_size: int) -> SinkStream:
    return SinkStream(start_size, recent_size, key_shift_of(model))  # checks the family first


@torch.inference_mode()
def hf_chunked_nll(
    model: nn.Module,
    ids: torch.Tensor,  # (N,) token ids of one stream
    start_size: int,
    recent_size: int,
    chunk_size: int = 512,
    progress: bool = False,
) -> torch.Tensor:
    """Per-token NLL (N - 1,) of a HF causal LM under the sink + window protocol, ``chunk_size`` tokens
    per forward (at most :data:`BLOCK_CHUNK` for MPT / Falcon); the same numbers as
    :func:`inference.hf_cache.hf_streaming_nll` (token by token)."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (one stream), got shape {tuple(ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    stream = new_stream(model, start_size, recent_size)
    device = input_device(model)
    inputs, targets = ids[None, :-1].to(device), ids[1:].to(device)
    registry = model.config.model_type in INTERFACE_TYPES
    alibi = AlibiBias(model) if uses_alibi(model.config) else None
    if not registry:
        chunk_size = min(chunk_size, BLOCK_CHUNK)
    nll = []
    pieces = list(range(0, inputs.shape[1], chunk_size))
    context = attention_implementation(model, ATTENTION_NAME) if registry else nullcontext()
    with context:
        for a in tqdm(pieces, desc="chunks", disable=not progress):
            chunk = inputs[:, a : a + chunk_size]
            stream.begin(chunk.shape[1])
            if registry:
                logits = model(input_ids=chunk, position_ids=stream.positions(device)[None], use_cache=False,
                               sink_stream=stream).logits
            else:
                logits = _forward_blocks(model, chunk, stream, alibi)
            stream.end()
            # logits come back on the head's device (another GPU under a device_map)
            nll.append(F.cross_entropy(logits[0].float(), targets[a : a + chunk.shape[1]].to(logits.device), reduction="none"))
    return torch.cat(nll).cpu()
