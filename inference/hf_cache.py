"""A StreamingLLM sink + window cache for Hugging Face ``transformers`` 5.x models.

transformers 5 removed its ``SinkCache``, and the public StreamingLLM code pins transformers 4.33.
:class:`HFSinkCache` here plugs into the current ``Cache`` API, so it works both with
``model.generate(..., past_key_values=cache)`` (``cache=`` in newer releases) and with a manual loop
``model(ids, cache=cache)``, for the families of :mod:`inference.hf_families`: rotate-half RoPE
(GPT-NeoX / Pythia, the Llama family, Falcon) and ALiBi (MPT, Falcon with ``alibi=True``). Exact
chunked evaluation of the same protocol: :mod:`inference.hf_chunked`.

Semantics are the paper's (``docs/design.md``, "Streaming semantics"): token t attends to the first
``start_size`` tokens and the last ``recent_size`` tokens before it, with positions assigned by slot
in the cache. How that is achieved with HF's already-rotated keys:

- ``get_seq_length()`` reports the number of tokens *seen*, so HF rotates token t's query and key at
  absolute position t, both in a manual loop (positions = past length + arange) and in ``generate``
  (which counts positions itself). Cached keys are kept as HF rotated them.
- RoPE scores depend only on position differences. A window token j must be at distance t - j from
  query t: it already is. A sink i must be at distance min(t, S + R) - i, so before attending the
  sink keys are rotated by ``shift = max(0, t - S - R)`` more -- always from their stored form, so
  no rotation error accumulates over a long stream. The window's keys are never touched.
- ALiBi (MPT): keys carry no position and MPT biases each key by its distance from the last key
  slot, which is the query's slot: the kept keys in cache order are all it needs.
- ALiBi (Falcon): FalconModel biases key j by slope * j, j counted over ``ones(T + get_seq_length())``
  (or the attention mask it is given). ALiBi is shift-invariant along a query row, so that is the slot
  distance exactly when j *is* the key's slot: for Falcon the cache counts positions by slot --
  ``get_seq_length()`` is the number of tokens kept and the mask sizes are the slots -- and the tokens
  seen are :attr:`HFSinkCache.tokens_seen`. ``model.generate`` drops an all-ones mask, so it streams
  too (unpadded rows; a padded mask is as long as the stream and no longer matches the slots).

One forward with T > 1 tokens is exact while no token of it needs an eviction first, i.e. while
``seen + T - 1 <= S + R`` (a prompt that fits the cache). A longer chunk is processed densely and then
trimmed -- what transformers 4.x's SinkCache did -- with a warning; :func:`stream_prefill` feeds a
long prompt exactly (first chunk up to the cache size, then one token at a time).

Limitations: batch rows must be unpadded (the cache keeps one position count for the batch), and
rotary kinds that interleave pairs (GPT-J) or rescale with the sequence length ("dynamic") are
refused, since shifting a key by a fixed angle is only right for fixed rotate-half frequencies.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn as nn
from tqdm.auto import tqdm

try:  # transformers >= 5: the layered Cache API
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    raise ImportError("inference.hf_cache needs transformers >= 5.0 (Cache / CacheLayerMixin API)") from exc

from inference.hf_families import SUPPORTED_MODEL_TYPES, KeyShift, input_device, key_shift_of, text_config, uses_alibi

class HFSinkCacheLayer(CacheLayerMixin):
    """One layer's keys/values: the first ``start_size`` tokens and the last ``recent_size``.

    ``keys``/``values`` are (B, H_kv, L, D), sinks first, each key rotated at its absolute position
    exactly as the model produced it. ``slot_positions``: positions count slots, not tokens seen
    (Falcon's ALiBi, see the module notes).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, start_size: int, recent_size: int, key_shift: KeyShift | None, on_dense_chunk=None,
                 slot_positions: bool = False):
        super().__init__()
        self.start_size = start_size
        self.recent_size = recent_size
        self.key_shift = key_shift
        self.slot_positions = slot_positions
        self.seen = 0  # tokens fed so far; HF derives positions from it (by slot: from the tokens kept)
        self.on_dense_chunk = on_dense_chunk

    @property
    def capacity(self) -> int:
        return self.start_size + self.recent_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        B, H, _, D = key_states.shape
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Add T new (rotated) keys/values; return what the T queries attend to, then evict."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[-2]
        if T > 1 and self.seen + T - 1 > self.capacity and self.on_dense_chunk is not None:
            self.on_dense_chunk(self.seen, T)
        # the first query of this chunk sits at position `seen`; its sinks sit `shift` further on
        shift = max(0, self.seen - self.capacity)
        num_sinks = min(self.start_size, self.keys.shape[-2])
        past_keys = self.keys
        if shift and num_sinks and self.key_shift is not None:  # ALiBi keys carry no position
            sinks = self.key_shift(self.keys[:, :, :num_sinks], shift)
            past_keys = torch.cat([sinks, self.keys[:, :, num_sinks:]], dim=-2)
        keys = torch.cat([past_keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        # keep un-shifted sinks (shifts are always applied from the stored form) + the last R tokens
        self.keys = self._evict(torch.cat([self.keys, key_states], dim=-2))
        self.values = self._evict(values)
        self.seen += T
        return keys, values

    def _evict(self, states: torch.Tensor) -> torch.Tensor:
        length = states.shape[-2]
        if length <= self.capacity:
            return states
        sinks = states[:, :, : self.start_size]
        if self.recent_size == 0:
            return sinks.contiguous()
        return torch.cat([sinks, states[:, :, length - self.recent_size :]], dim=-2)

    @property
    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.kept if self.slot_positions else self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the cached keys plus the new ones, the new ones aligned with the
        queries' positions (``get_seq_length()`` onwards) so HF's causal mask is right inside a chunk."""
        return self.kept + query_length, self.get_seq_length() - self.kept

    def get_max_length(self) -> int:
        return -1  # no limit on how many tokens can be streamed

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("HFSinkCache cannot be cropped (evicted tokens are gone); start a new cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]


class HFSinkCache(Cache):
    """StreamingLLM cache (``start_size`` attention sinks + ``recent_size`` window) for a HF model.

    >>> cache = HFSinkCache(model, start_size=4, recent_size=1020)
    >>> out = model.generate(input_ids, past_key_values=cache, max_new_tokens=2000)

    A fresh cache per stream; for prompts longer than the cache use :func:`stream_prefill` first.
    MPT configs default to ``use_cache=False``: pass ``use_cache=True`` to ``generate`` for them.
    Falcon with ``alibi=True`` counts positions by slot (:attr:`tokens_seen` counts the tokens).
    """

    def __init__(self, model: nn.Module, start_size: int, recent_size: int, warn_dense_chunks: bool = True):
        if start_size < 0 or recent_size < 0 or start_size + recent_size == 0:
            raise ValueError(f"need start_size, recent_size >= 0 with a positive sum; got {start_size}, {recent_size}")
        config = text_config(model)
        key_shift = key_shift_of(model)  # checks the family first
        by_slot = config.model_type == "falcon" and uses_alibi(config)
        self.start_size, self.recent_size = start_size, recent_size
        self._warned = not warn_dense_chunks
        layers = [
            HFSinkCacheLayer(start_size, recent_size, key_shift, on_dense_chunk=self._warn_dense, slot_positions=by_slot)
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)

    @property
    def tokens_seen(self) -> int:
        """Tokens of the stream fed so far (``get_seq_length()`` is the tokens kept where positions are slots)."""
        return self.layers[0].seen

    def _warn_dense(self, seen: int, length: int) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"HFSinkCache: a forward of {length} tokens after {seen} overruns the cache "
                f"({self.start_size}+{self.recent_size}); it is processed densely, then trimmed (not the "
                "per-token streaming protocol). Use inference.hf_cache.stream_prefill for long prompts.",
                stacklevel=3,
            )

    def __repr__(self) -> str:
        return f"HFSinkCache(start_size={self.start_size}, recent_size={self.recent_size}, seen={self.tokens_seen})"


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes a cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model: nn.Module, ids: torch.Tensor, cache: Cache, key: str) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=True, **{key: cache})
    return out.logits


@torch.inference_mode()
def stream_prefill(model: nn.Module, input_ids: torch.Tensor, cache: HFSinkCache, progress: bool = False) -> torch.Tensor:
    """Feed ``input_ids`` (B, T) into ``cache`` exactly as the streaming protocol would.

    The longest prefix that fits the cache goes in one forward, the rest one token per forward.
    Returns the logits (B, T, V). To generate after a long prompt: ``stream_prefill(model,
    ids[:, :-1], cache)`` then ``model.generate(ids[:, -1:], attention_mask=torch.ones_like(ids),
    past_key_values=cache, ...)`` (a mask longer than the ids tells ``generate`` they are the new ones;
    given the whole ``ids``, it would slice off ``get_seq_length()`` tokens, the slots kept for Falcon-ALiBi).
    """
    key = cache_kwarg(model)
    first = max(0, cache.start_size + cache.recent_size + 1 - cache.tokens_seen)
    pieces = [input_ids[:, :first]] if first else []
    pieces += list(input_ids[:, first:].split(1, dim=1))
    pieces = [p for p in pieces if p.shape[1]]
    logits = [_forward(model, p, cache, key) for p in tqdm(pieces, desc="prefill", disable=not progress)]
    return torch.cat(logits, dim=1)


@torch.inference_mode()
def hf_streaming_nll(
    model: nn.Module,
    ids: torch.Tensor,  # (N,) token ids of one stream
    start_size: int,
    recent_size: int,
    progress: bool = True,
) -> torch.Tensor:
    """Per-token NLL (N - 1,) of a HF causal LM streamed through :class:`HFSinkCache`.

    Same contract as ``inference.perplexity.streaming_nll``: element i scores token i + 1 after
    feeding tokens 0..i. Exact per-token protocol (:func:`stream_prefill`), so O(N) forwards.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (one stream), got shape {tuple(ids.shape)}")
    cache = HFSinkCache(model, start_size, recent_size)
    logits = stream_prefill(model, ids[None, :-1].to(input_device(model)), cache, progress=progress)[0]
    return torch.nn.functional.cross_entropy(logits.float(), ids[1:].to(logits.device), reduction="none").cpu()


@torch.inference_mode()
def hf_dense_nll(model: nn.Module, ids: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Per-token NLL (N - 1,) with full attention over the first ``max_len`` tokens (all by default)."""
    if max_len is not None:
        ids = ids[:max_len]
    logits = model(input_ids=ids[None].to(input_device(model)), use_cache=False).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[1:].to(logits.device), reduction="none").cpu()


def streams_natively(model_type: str | None) -> bool:
    """True for a HF ``model_type`` this module streams but our GPT-NeoX cannot load (Llama, MPT, Falcon);
    stock GPT-NeoX / Pythia converts to our model and takes the exact chunked path instead."""
    return model_type in SUPPORTED_MODEL_TYPES and model_type != "gpt_neox"
