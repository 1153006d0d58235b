"""Generation sessions: one stream through a model and its bounded cache, fed and sampled in turn.

A session owns one cache for a whole stream: prompts are fed (exactly as if token by token), new
tokens are sampled one at a time, and the cache evicts the middle as the stream grows, so memory
and per-token time stay flat however long it runs. ``sinklm generate`` runs one session,
``sinklm chat`` keeps one across turns.

- :class:`StreamingSession`: our GPT-NeoX with :class:`~inference.cache.SinkCache` (prompts fed in
  chunks, exact).
- :class:`HFStreamingSession`: a stock transformers model with :class:`~inference.hf_cache.HFSinkCache`
  (prompts through :func:`~inference.hf_cache.stream_prefill`, exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from inference.cache import SinkCache
from inference.decode_step import MODES, DecodeStep, StaticSinkCache
from inference.hf_cache import HFSinkCache, stream_prefill
from inference.hf_decode_step import HFDecodeStep, HFStaticCache, has_static_step
from inference.hf_families import input_device
from inference.stream import StreamError, check_start_size, stream_prefix


@dataclass
class Sampler:
    """Next-token choice: greedy when ``temperature == 0``, else temperature / top-k / top-p sampling."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise StreamError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise StreamError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise StreamError(f"top_p must be in (0, 1], got {self.top_p}")
        self._generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> token ids (B,)."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # drop a token once the tokens before it already cover top_p (the first always stays)
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= self.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device)
            self._generator.manual_seed(0 if self.seed is None else self.seed)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator)[:, 0]


class GenerationSession:
    """Feed prompts and generate replies on one stream; subclasses say how ids are fed (:meth:`_feed`)."""

    def __init__(self, prefix: list[int], batch_size: int, device: torch.device):
        self.device = device
        # ids waiting to be fed: a sink-token model's sinks at first, later the last generated token
        self.pending = torch.tensor(prefix, dtype=torch.long, device=device).expand(batch_size, -1).clone()
        self._cache = None  # the prompt path's cache
        self._step = None  # a fixed-shape decode step, holding the stream's state while tokens are decoded

    def _set_decode(self, decode: str, has_step: bool = True) -> None:
        """``decode``: ``auto`` (the eager step where the model has one), ``none`` or one of :data:`MODES`."""
        self.decode = ("eager" if has_step else "none") if decode == "auto" else decode
        if self.decode not in (*MODES, "none") or (self.decode != "none" and not has_step):
            kinds = f"auto, none or one of {', '.join(MODES)}" if has_step else "auto or none (no decode step for this model)"
            raise StreamError(f"decode must be {kinds}, got {decode!r}")

    @property
    def cache(self):
        """The prompt path's cache, holding everything fed so far (a decode step in use hands its state back)."""
        if self._step is not None:
            self._step.cache.write_back(self._cache)
            self._step = None
        return self._cache

    @property
    def tokens_seen(self) -> int:
        """Tokens of the stream fed so far."""
        raise NotImplementedError

    @property
    def tokens_kept(self) -> int:
        """Tokens the cache holds now (at most start + recent)."""
        raise NotImplementedError

    def _feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ids (B, T >= 1); return the next-token logits (B, V) (ids that may not be generated masked)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, max_new_tokens: int, sampler: Sampler, eos_id: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Feed ``prompt_ids`` (B, T) (may be empty when something is pending), then yield up to
        ``max_new_tokens`` new ids (B,) one at a time; stops early once every row has produced ``eos_id``."""
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        ids = torch.cat([self.pending, prompt_ids.to(self.device).long()], dim=1)
        if ids.shape[1] == 0:
            raise StreamError("nothing to condition on: empty prompt at the start of the stream")
        if max_new_tokens < 1:
            self.pending = ids  # fed with the next call
            return
        logits = self._feed(ids)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = sampler(logits)
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                finished |= token == eos_id
            self.pending = token[:, None]  # the newest token is fed on the next step (or next turn)
            yield token
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits = self._feed(self.pending)
            self.pending = self.pending[:, :0]


class StreamingSession(GenerationSession):
    """One stream through our GPT-NeoX with a :class:`~inference.cache.SinkCache`.

    A sink-token model's k sink ids go in first (they take the start slots). Only text ids
    (below ``config.vocab_size``) are ever generated: sink ids and vocabulary padding are masked.
    Prompts go through the cache's chunked path; generated tokens, one per step, through the
    fixed-shape :class:`~inference.decode_step.DecodeStep` (bounded caches; ``decode``: ``auto`` = the
    eager step everywhere -- ``graph`` (a replayed CUDA graph) is opt-in until benchmarks/gpu_check.sh has
    verified it on a GPU; ``none`` keeps every token on the chunked path).
    """

    def __init__(self, model: torch.nn.Module, start_size: int, recent_size: int | None, batch_size: int = 1,
                 chunk_size: int = 512, decode: str = "auto"):
        check_start_size(model.config, start_size)
        super().__init__(stream_prefix(model.config), batch_size, next(model.parameters()).device)
        self.model = model
        self._cache = SinkCache(start_size, recent_size)
        self.chunk_size = chunk_size
        self.vocab_limit = model.config.vocab_size
        self._set_decode(decode)

    @property
    def tokens_seen(self) -> int:
        return self.cache.seen

    @property
    def tokens_kept(self) -> int:
        return len(self.cache)

    @torch.no_grad()
    def _feed(self, ids: torch.Tensor) -> torch.Tensor:
        one_token = ids.shape[1] == 1 and self._cache.bounded and self.decode != "none"
        if one_token and (self._step is not None or self._cache.seen > 0):
            if self._step is None:
                self._step = DecodeStep(self.model, StaticSinkCache.from_sink_cache(self.model, self._cache), self.decode)
            logits = self._step(ids[:, 0]).float()
            logits[:, self.vocab_limit :] = float("-inf")
            return logits
        cache = self.cache
        hidden = None
        for start in range(0, ids.shape[1], self.chunk_size):
            hidden = self.model.hidden_states(ids[:, start : start + self.chunk_size], cache=cache)
        logits = self.model.lm_head(hidden[:, -1]).float()
        logits[:, self.vocab_limit :] = float("-inf")
        return logits


class HFStreamingSession(GenerationSession):
    """One stream through a stock transformers causal LM with an :class:`~inference.hf_cache.HFSinkCache`.

    Prompts go through :func:`~inference.hf_cache.stream_prefill`; generated tokens, one per step, for
    GPT-NeoX and the Llama family through the fixed-shape :class:`~inference.hf_decode_step.HFDecodeStep`
    (``decode`` as in :class:`StreamingSession`: ``auto`` = the eager step; ``compile``; ``graph``
    opt-in until benchmarks/gpu_check.sh has verified it on a GPU; ``none`` keeps every token on
    HFSinkCache, as MPT, Falcon and a model split by a device map always do).
    """

    def __init__(self, model: torch.nn.Module, start_size: int, recent_size: int, batch_size: int = 1,
                 decode: str = "auto"):
        super().__init__([], batch_size, input_device(model))  # the embedding's device (a device map may split the rest)
        self.model = model
        self._cache = HFSinkCache(model, start_size, recent_size)
        self._set_decode(decode, has_step=has_static_step(model))

    @property
    def tokens_seen(self) -> int:
        return self.cache.tokens_seen  # not get_seq_length(): Falcon-ALiBi counts positions by cache slot

    @property
    def tokens_kept(self) -> int:
        return self.cache.layers[0].kept

    def _feed(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == 1 and self.decode != "none" and (self._step is not None or self._cache.layers[0].seen):
            if self._step is None:
                self._step = HFDecodeStep(self.model, HFStaticCache.from_hf_sink_cache(self.model, self._cache), self.decode)
            return self._step(ids[:, 0]).clone()
        return stream_prefill(self.model, ids, self.cache)[:, -1].float()
