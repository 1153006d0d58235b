"""The one evaluation seam: a model back-end that stream-ppl, compare, generate and chat drive alike.

Two back-ends implement :class:`Backend`:

- :class:`SinkLMBackend`: our GPT-NeoX (run folders, HF exports, initial checkpoints, stock
  GPT-NeoX / Pythia, converted on load) with :class:`~inference.cache.SinkCache`: the exact chunked
  fast path, or token by token (``mode="reference"``).
- :class:`HFBackend`: a stock transformers model of a family :mod:`inference.hf_families` streams
  (GPT-NeoX, the Llama family, MPT, Falcon): the exact chunked path of :mod:`inference.hf_chunked`,
  or token by token through :class:`~inference.hf_cache.HFSinkCache` (``mode="reference"``).

:func:`load_backend` picks the back-end for a checkpoint spec; :func:`as_backend` wraps an object
already in memory. Both compute the sliding-window-with-re-computation baseline with the one
:func:`inference.perplexity.sliding_window_nll`, each scoring its windows its own way.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference import hf_cache, hf_chunked, hf_families
from inference.perplexity import CHUNK_SIZE, dense_nll, recompute_nll, sliding_window_nll, streaming_nll
from inference.session import GenerationSession, HFStreamingSession, StreamingSession
from inference.stream import StreamError, TextSettings, read_stream_tokens, stream_prefix
from pretrain.checkpoints import CheckpointInfo, describe, load_model, parse_dtype
from pretrain.checkpoints.resolve import split_revision
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX


class Backend(Protocol):
    """What the streaming tools need of a model. Every NLL method takes the text ids (N,) and
    returns per-token NLL (N - 1,) float32 on the CPU (entry t scores token t + 1)."""

    name: str
    source: str  # the spec it was loaded from, or "in-memory"
    kind: str  # "sinklm" | "hf"
    model: nn.Module
    tokenizer: Any

    @property
    def sink_ids(self) -> list[int]: ...  # fed before every stream and window, never scored

    @property
    def description(self) -> str: ...  # one line for tables and logs

    def tokenize_stream(self, text: TextSettings | argparse.Namespace) -> tuple[torch.Tensor, str]: ...

    def stream_mode(self, mode: str) -> str: ...  # the streaming mode that ``mode`` really runs

    def streaming_nll(self, ids: torch.Tensor, start_size: int, recent_size: int, mode: str = "fast",
                      chunk_size: int = CHUNK_SIZE, progress: bool = False) -> torch.Tensor: ...

    def dense_nll(self, ids: torch.Tensor, max_len: int, chunk_size: int = CHUNK_SIZE, progress: bool = False) -> torch.Tensor: ...

    def recompute_nll(self, ids: torch.Tensor, window: int, batch_size: int = 8, progress: bool = False) -> torch.Tensor: ...

    def new_session(self, start_size: int, recent_size: int, batch_size: int = 1) -> GenerationSession: ...


@dataclass
class _Named:
    """The fields both back-ends have."""

    name: str
    model: nn.Module
    tokenizer: Any = None
    source: str = "in-memory"


@dataclass
class SinkLMBackend(_Named):
    """Our GPT-NeoX: exact chunked streaming through :class:`~inference.cache.SinkCache`."""

    config: ModelConfig | None = None
    kind: str = "sinklm"

    def __post_init__(self) -> None:
        self.config = self.config or self.model.config

    @property
    def sink_ids(self) -> list[int]:
        return stream_prefix(self.config)

    @property
    def description(self) -> str:
        return f"{self.config.variant} ({self.config.attention}, {self.config.sink_tokens} sink tokens)"

    def tokenize_stream(self, text: TextSettings | argparse.Namespace) -> tuple[torch.Tensor, str]:
        return read_stream_tokens(text, self.tokenizer)

    def stream_mode(self, mode: str) -> str:
        return mode

    def streaming_nll(self, ids, start_size, recent_size, mode="fast", chunk_size=CHUNK_SIZE, progress=False):
        return streaming_nll(self.model, ids, start_size, recent_size, mode, chunk_size, progress)

    def dense_nll(self, ids, max_len, chunk_size=CHUNK_SIZE, progress=False):
        return dense_nll(self.model, ids, max_len, chunk_size=chunk_size, progress=progress)

    def recompute_nll(self, ids, window, batch_size=8, progress=False):
        return recompute_nll(self.model, ids, window, batch_size=batch_size, progress=progress)

    def new_session(self, start_size, recent_size, batch_size=1) -> StreamingSession:
        return StreamingSession(self.model, start_size, recent_size, batch_size)


@dataclass
class HFBackend(_Named):
    """A stock transformers causal LM: exact chunked streaming (:func:`~inference.hf_chunked.hf_chunked_nll`),
    or per token through :class:`~inference.hf_cache.HFSinkCache` with ``mode="reference"``."""

    kind: str = "hf"

    @property
    def sink_ids(self) -> list[int]:
        return []  # a stock model has no sink tokens

    @property
    def description(self) -> str:
        return f"HF {getattr(self.model.config, 'model_type', '?')} (sink cache route)"

    def tokenize_stream(self, text: TextSettings | argparse.Namespace) -> tuple[torch.Tensor, str]:
        """The stream's text ids, with the tokenizer's BOS first when it adds one."""
        ids, name = read_stream_tokens(text, self.tokenizer)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and getattr(self.tokenizer, "add_bos_token", False):
            ids = torch.cat([torch.tensor([bos]), ids])
        return ids, name

    def stream_mode(self, mode: str) -> str:
        return "hf-chunked" if mode == "fast" else "hf-per-token"

    def streaming_nll(self, ids, start_size, recent_size, mode="fast", chunk_size=CHUNK_SIZE, progress=False):
        if mode == "fast":
            return hf_chunked.hf_chunked_nll(self.model, ids, start_size, recent_size, chunk_size, progress)
        return hf_cache.hf_streaming_nll(self.model, ids, start_size, recent_size, progress=progress)

    def dense_nll(self, ids, max_len, chunk_size=CHUNK_SIZE, progress=False):
        return hf_cache.hf_dense_nll(self.model, ids, max_len)

    def recompute_nll(self, ids, window, batch_size=8, progress=False):
        """Sliding window of ``window`` tokens with re-computation (no sinks: windows start anywhere)."""
        model = self.model

        def score(rows: torch.Tensor, first: int, targets: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=rows, use_cache=False).logits[:, first:]  # on the head's device
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).to(logits.device),
                                   reduction="none")

        stream = ids.to(hf_families.input_device(model))
        return sliding_window_nll(stream, 0, window, score, batch_size, progress)

    def new_session(self, start_size, recent_size, batch_size=1) -> HFStreamingSession:
        return HFStreamingSession(self.model, start_size, recent_size, batch_size)


# -- choosing the back-end ---------------------------------------------------------------------------


def check_streamable(spec: str, info: CheckpointInfo) -> None:
    """Refuse (StreamError naming the supported ones) a Hugging Face family that cannot stream here; from
    a description alone (:func:`pretrain.checkpoints.describe`), so callers can check before any work."""
    if info.format == "hf" and info.model_type not in hf_families.SUPPORTED_MODEL_TYPES and not info.remote_code:
        raise StreamError(
            f"{spec}: model_type {info.model_type!r} cannot stream here; supported Hugging Face model types: "
            f"{', '.join(hf_families.SUPPORTED_MODEL_TYPES)}"
        )


def load_backend(
    spec: str | Path,
    name: str | None = None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
    tag: str | None = None,
    revision: str | None = None,
    device_map: str | None = None,
) -> Backend:
    """Load the checkpoint ``spec`` (any format :mod:`pretrain.checkpoints` reads, or a hub name) as
    a back-end named ``name`` (default: the spec).

    Llama-family, MPT and Falcon Hugging Face models load with ``AutoModelForCausalLM``
    (:class:`HFBackend`); ``device_map`` (e.g. ``"auto"``) loads them through accelerate's big-model
    path (low-memory loading, layers placed across the GPUs / CPU) instead of onto ``device``.
    Everything else -- our run folders, exports, initial checkpoints, stock GPT-NeoX / Pythia -- as
    our GPT-NeoX (:class:`SinkLMBackend`). A bad spec raises the checkpoint layer's one-line error; a
    Hugging Face family that cannot stream, a StreamError naming the supported ones.
    """
    spec = str(spec)
    name = name or spec
    spec, revision = split_revision(spec, revision)  # owner/name@revision
    dtype = parse_dtype(dtype)
    info = describe(spec, revision=revision, tag=tag)
    check_streamable(spec, info)
    if info.format == "hf" and hf_cache.streams_natively(info.model_type):
        placement = {"device_map": device_map, "low_cpu_mem_usage": True} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=dtype, **placement)
        model = (model if device_map else model.to(device)).eval()
        tok = AutoTokenizer.from_pretrained(tokenizer or spec, revision=None if tokenizer else revision)
        return HFBackend(name, model, tok, source=spec)
    if device_map:
        raise StreamError(f"--device-map applies to Hugging Face models of the Llama family, MPT and Falcon; "
                          f"{spec} loads as our GPT-NeoX: use --device")
    loaded = load_model(spec, tag=tag, dtype=dtype, tokenizer=tokenizer, revision=revision, device=device)
    return SinkLMBackend(name, loaded.model.eval(), loaded.tokenizer, source=spec, config=loaded.config)


def as_backend(name: str, obj: Any, tokenizer: Any = None) -> Backend:
    """Wrap what a caller handed over: a :class:`Backend`, a checkpoint path (:func:`load_backend`),
    our ``GPTNeoX``, a ``LoadedModel`` (``.model/.config/.tokenizer``) or a HF model of a streaming family."""
    if isinstance(obj, (SinkLMBackend, HFBackend)):
        return obj
    if isinstance(obj, (str, Path)):
        return load_backend(obj, name, tokenizer=tokenizer)
    if isinstance(obj, GPTNeoX):
        return SinkLMBackend(name, obj.eval(), tokenizer)
    inner = getattr(obj, "model", None)
    if isinstance(inner, GPTNeoX):
        return SinkLMBackend(name, inner.eval(), tokenizer or getattr(obj, "tokenizer", None),
                             source=str(getattr(obj, "source", "in-memory")), config=getattr(obj, "config", None))
    model_type = getattr(getattr(obj, "config", None), "model_type", None)
    if model_type in hf_families.SUPPORTED_MODEL_TYPES:
        return HFBackend(name, obj.eval(), tokenizer)
    supported = f" ({model_type!r}; supported Hugging Face model types: {', '.join(hf_families.SUPPORTED_MODEL_TYPES)})"
    raise StreamError(f"model {name!r}: cannot evaluate a {type(obj).__name__}" + (supported if model_type else ""))
