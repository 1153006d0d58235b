"""Streaming decode of a stock transformers model, one token per step, with fixed shapes: the twin of
:mod:`inference.decode_step` for the Hugging Face route.

:class:`~inference.hf_cache.HFSinkCache` is general (chunks, any family) and rebuilds each layer's
keys with ``torch.cat`` every token, with its bookkeeping in Python ints: per token on a GPU that is
bound by launches and host work. Here the same protocol (``docs/design.md``, "Streaming semantics";
the key handling of :mod:`inference.hf_cache`: keys as the model rotated them at absolute positions,
sinks shifted by max(0, t - s - r) from their stored form) is laid out for one token per step, for the
families whose attention is the library's own with a 4-D mask (GPT-NeoX and the Llama family):

- per layer, one key and one value buffer of ``s`` sink slots and a ring of ``r + 1`` slots, which
  holds exactly the window (tokens max(s, t - r) .. t) once the new token is written: the cache layer's
  ``update`` writes the token in place at its slot *before* the attention and returns the whole buffer;
- the sinks' stored (un-shifted) keys in their own buffer; each step writes them, rotated by the
  step's shift, into the sink slots (a shift of 0 leaves them bit for bit);
- the stream position (passed as ``position_ids``), the slot, the shift's rotary angles and the
  additive mask over slots (passed as ``attention_mask``, 4-D, which transformers uses as it is) are
  device tensors updated in place.

So the model's own projections, rotary, MLP and norms compute every number, through public hooks only
(a ``Cache`` of ``CacheLayerMixin`` layers, ``position_ids``, ``attention_mask``, and an attention function
registered with ``AttentionInterface``, set on the model only while a step runs: SDPA over the buffer with
grouped-query heads as rows, as transformers does for one query), and every step runs the same kernels on
the same addresses, B streams in lockstep, from the first token on and across the point where eviction
starts. :class:`HFDecodeStep` runs the whole forward eagerly,
compiled or from a captured CUDA graph (:mod:`inference.static_step`). Prompts still go through
HFSinkCache (:func:`~inference.hf_cache.stream_prefill`): :meth:`HFStaticCache.from_hf_sink_cache`
takes over its state and :meth:`HFStaticCache.write_back` returns it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from inference.hf_cache import HFSinkCache, cache_kwarg
from inference.hf_chunked import attention_implementation
from inference.hf_families import INTERFACE_TYPES, check_supported, key_shift_of, text_config
from inference.static_step import StaticStep, ring_slot


ATTENTION_NAME = "sinklm_decode"


def static_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``AttentionInterface`` entry for one query per row against the whole static buffer.

    What transformers' own sdpa does for one query outside ``torch.compile``: the query heads of a
    grouped-query model as rows of their key/value head (no repeated keys), the 4-D mask over slots;
    under ``torch.compile`` transformers repeats every key and value instead, a copy of the whole cache
    per layer per token.
    """
    batch, heads, length, dim = query.shape
    rows = query.reshape(batch, key.shape[1], heads // key.shape[1] * length, dim)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, static_decode_attention)


def has_static_step(model: nn.Module) -> bool:
    """GPT-NeoX or the Llama family, on one device: a model that a device map splits or offloads streams
    through HFSinkCache, whose layers live where the model puts them."""
    placed = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    return text_config(model).model_type in INTERFACE_TYPES and len(placed) <= 1


class HFStaticLayer(CacheLayerMixin):
    """One layer's buffers (allocated by :class:`HFStaticCache`); ``update`` writes in place."""

    is_sliding = False
    is_compileable = True
    is_croppable = False

    def __init__(self, owner: "HFStaticCache", index: int):
        super().__init__()
        self.owner = owner
        self.keys, self.values, self.sinks = owner.keys[index], owner.values[index], owner.sinks[index]
        self.device = self.keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # preallocated by the owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the token's key/value (B, H_kv, 1, D) at its slot; return the whole buffers (sinks shifted)."""
        owner = self.owner
        self.keys.index_copy_(2, owner.slot, key_states)
        self.values.index_copy_(2, owner.slot, value_states)
        s = owner.start_size
        if s:
            self.sinks.index_copy_(2, owner.sink_slot, key_states)
            shifted = owner.key_shift.rotate(self.sinks[:, :, :s], owner.cos, owner.sin)  # the stored form, shifted
            self.keys.index_copy_(2, owner.sink_slots, shifted)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.owner.position)  # a host read: never called on the step's path (positions are passed)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return -1


class HFStaticCache(Cache):
    """A transformers ``Cache`` for one token per step under the sink + window protocol, fixed shapes."""

    def __init__(self, model: nn.Module, batch_size: int, start_size: int, recent_size: int, dtype: torch.dtype | None = None):
        model_type = check_supported(model)
        if not has_static_step(model):
            split = " split by a device map" if model_type in INTERFACE_TYPES else ""
            raise ValueError(
                f"the static HF decode step supports {', '.join(INTERFACE_TYPES)} on one device; this model is "
                f"{model_type!r}{split} (it streams through HFSinkCache)"
            )
        if start_size < 0 or recent_size < 0 or start_size + recent_size == 0:
            raise ValueError(f"need start_size, recent_size >= 0 with a positive sum; got {start_size}, {recent_size}")
        config, param = text_config(model), next(model.parameters())
        device, dtype = param.device, dtype or param.dtype
        self.start_size, self.recent_size = start_size, recent_size
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        slots = start_size + recent_size + 1  # the ring holds r + 1: the window including the new token
        # one tensor per layer, each written only through index_copy_ (never a view of a larger tensor, never a
        # slice assignment), so a compiled step updates them in place instead of copying them whole
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(batch_size, heads, slots, head_dim, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        # the sinks' keys as the model rotated them (positions 0 .. s-1), plus one scratch slot for later tokens
        self.sinks = [torch.zeros(batch_size, heads, start_size + 1, head_dim, dtype=dtype, device=device) for _ in layers]
        self.sink_slots = torch.arange(start_size, device=device)
        self.bias = torch.full((slots,), torch.finfo(dtype).min, dtype=dtype, device=device)  # 0 once filled
        self.mask = self.bias.view(1, 1, 1, slots)  # the 4-D additive mask the model takes as it is
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # t, as position_ids
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.sink_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_shift = key_shift_of(model)
        rotary_dim = self.key_shift.rotary_dim
        self.cos = torch.ones(1, rotary_dim, dtype=torch.float32, device=device)
        self.sin = torch.zeros(1, rotary_dim, dtype=torch.float32, device=device)
        super().__init__(layers=[HFStaticLayer(self, i) for i in range(config.num_hidden_layers)])

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the step reads or writes in place (their addresses never change)."""
        return (*self.keys, *self.values, *self.sinks, self.bias, self.position, self.slot, self.sink_slot, self.cos, self.sin)

    # -- the step's bookkeeping, all on the device ----------------------------------------------

    def begin(self) -> None:
        """Slot, mask and sink shift for token ``position`` (before the layers run)."""
        s, r = self.start_size, self.recent_size
        t = self.position.view(())
        self.slot.copy_(ring_slot(t, s, r + 1).view(1))
        self.bias.index_fill_(0, self.slot, 0.0)
        if s:
            self.sink_slot.copy_(t.clamp(max=s).view(1))
            cos, sin = self.key_shift.tables((t - s - r).clamp(min=0).view(1))
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def advance(self) -> None:
        self.position.add_(1)

    # -- moving state to and from HFSinkCache (between prompts and decoding; not per token) ----------

    def _window_slots(self, seen: int) -> tuple[int, torch.Tensor]:
        """(sinks kept, slots of the window tokens in stream order) after ``seen`` tokens, as HFSinkCache keeps them."""
        s, r = self.start_size, self.recent_size
        kept = min(s, seen)
        window = torch.arange(seen - min(r, max(0, seen - s)), seen, device=self.bias.device)
        return kept, ring_slot(window, s, r + 1)

    @classmethod
    def from_hf_sink_cache(cls, model: nn.Module, cache: HFSinkCache, batch_size: int = 1) -> "HFStaticCache":
        """A static cache holding exactly what ``cache`` holds now."""
        first = cache.layers[0]
        if first.is_initialized:
            batch_size = first.keys.shape[0]
        static = cls(model, batch_size, cache.start_size, cache.recent_size, first.keys.dtype if first.is_initialized else None)
        seen = cache.layers[0].seen  # tokens fed (the same as get_seq_length() for these families)
        if not seen:
            return static
        kept, slots = static._window_slots(seen)
        for i, layer in enumerate(cache.layers):
            static.sinks[i][:, :, :kept] = layer.keys[:, :, :kept]
            static.keys[i][:, :, :kept] = layer.keys[:, :, :kept]
            static.values[i][:, :, :kept] = layer.values[:, :, :kept]
            static.keys[i][:, :, slots] = layer.keys[:, :, kept:]
            static.values[i][:, :, slots] = layer.values[:, :, kept:]
        static.bias[:kept] = 0.0
        static.bias[slots] = 0.0
        static.position.fill_(seen)
        return static

    def write_back(self, cache: HFSinkCache) -> None:
        """Put this cache's state into ``cache`` (an HFSinkCache of the same sizes), e.g. before a prompt."""
        if (cache.start_size, cache.recent_size) != (self.start_size, self.recent_size):
            raise ValueError("write_back needs an HFSinkCache of the same start and recent sizes")
        seen = int(self.position)
        kept, slots = self._window_slots(seen)
        for i, layer in enumerate(cache.layers):
            keys = torch.cat([self.sinks[i][:, :, :kept], self.keys[i][:, :, slots]], 2)
            values = torch.cat([self.values[i][:, :, :kept], self.values[i][:, :, slots]], 2)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values, layer.seen = keys, values, seen


class HFDecodeStep(StaticStep):
    """One whole forward of a stock transformers causal LM (embedding, every layer, the head) over an
    :class:`HFStaticCache`, per token; ``mode`` as in :class:`~inference.static_step.StaticStep`."""

    def __init__(self, model: nn.Module, cache: HFStaticCache, mode: str = "eager"):
        device = cache.bias.device
        self.check_mode(mode, device)
        self.model, self.cache = model, cache
        self.cache_key = cache_kwarg(model)
        self.input_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.logits = torch.zeros(cache.batch_size, text_config(model).vocab_size, dtype=torch.float32, device=device)
        self._init_mode(mode, device, cache.bias.dtype)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self._graph is not None:  # the captured kernels already hold the attention
            return super().__call__(ids)
        with attention_implementation(self.model, ATTENTION_NAME):
            return super().__call__(ids)

    def _step(self) -> None:  # called by StaticStep under inference_mode
        cache = self.cache
        cache.begin()
        out = self.model(input_ids=self.input_ids, position_ids=cache.position, attention_mask=cache.mask,
                         use_cache=True, **{self.cache_key: cache})
        self.logits.copy_(out.logits[:, -1])
        cache.advance()
