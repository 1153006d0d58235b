"""The training probe's evaluation: does a sink form, and does evicting the first tokens hurt?

``pretrain`` never imports ``inference``; ``sinklm train`` hands :func:`streaming_probe` to the
trainer (``pretrain.train.main(argv, probe=streaming_probe)``), which calls it every
``probe.every`` steps on the start of the validation split and logs what it returns (one flat
record of floats: metrics.jsonl, wandb, the console line and ``sinks.png`` read it). ``sinklm
compare --steps-of RUN`` / ``--revisions-of HUB`` (:mod:`inference.probe_steps`) compute the same
record for saved checkpoints through :func:`backend_probe`. Putting the model in eval mode (and
back) is the caller's job.

The record (``W = start_size + recent_size``; ``L{l}`` = per layer):

- ``loss``, ``ppl``, ``start_size``, ``recent_size``: mean streaming NLL under the probe's cache;
- ``ppl_{s}+{W-s}`` for each ``eviction_starts`` s and ``eviction_gap`` = ppl(0+W) / ppl(s_max +
  (W - s_max)) - 1 (what evicting every initial token costs), ``cache_size`` = W: computed by the
  one streaming evaluation stream-ppl and compare use (:func:`inference.perplexity.streaming_nll`
  through a back-end);
- ``sink_rate``: Gu et al.'s metric, by :func:`inference.sink_metric.measure_sinks` (compare's
  code, so the numbers are equal), ``first_key_attn`` (+ ``_L{l}``): the mean attention on key 0;
- ``sink_token_attn`` (+ ``_L{l}``): a sink-token model's attention on its sink tokens;
- ``noop_attn`` (+ ``_L{l}``): softmax1 / sink_logit: the weight its extra (zero-value) key takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from inference.backends import Backend, SinkLMBackend
from inference.perplexity import CHUNK_SIZE, perplexity
from inference.sink_metric import GU_THRESHOLD, measure_sinks
from inference.stream import sink_warnings_ignored


class ProbeSettings(Protocol):
    """What the probe reads of ``pretrain.train_config.ProbeConfig`` (the trainer cuts the text to ``num_tokens``)."""

    start_size: int
    recent_size: int
    eviction_starts: list[int]
    sink_inputs: int
    sink_length: int


def eviction_label(start: int, cache_size: int) -> str:
    """The record key of the perplexity under an ``start + (cache_size - start)`` cache."""
    return f"ppl_{start}+{cache_size - start}"


def _per_layer(name: str, values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else 0.0
    return {name: mean, **{f"{name}_L{layer}": v for layer, v in enumerate(values)}}


def probe_values(
    model: nn.Module,
    ids: torch.Tensor,
    probe: ProbeSettings,
    stream_nll: Callable[[int, int], torch.Tensor],
    sink_ids: list[int],
    attention_kind: str = "softmax",
) -> dict[str, float]:
    """The probe record for ``model`` on the stream ``ids`` (1-D); ``stream_nll(s, r)`` is the
    back-end's per-token streaming NLL under an ``s + r`` cache."""
    cache = probe.start_size + probe.recent_size
    ppl: dict[int, float] = {}
    out: dict[str, float] = {}
    with sink_warnings_ignored():  # start sizes other than the model's sink count are the point
        for start in sorted({*probe.eviction_starts, probe.start_size}):
            nll = stream_nll(start, cache - start)
            ppl[start] = perplexity(nll)
            if start == probe.start_size:
                loss = float(nll.double().mean())
                out.update(loss=loss, ppl=float(torch.exp(torch.tensor(loss))))
    out.update(start_size=probe.start_size, recent_size=probe.recent_size, cache_size=cache)
    for start in sorted(probe.eviction_starts):
        out[eviction_label(start, cache)] = ppl[start]
    if probe.eviction_starts:
        last = max(probe.eviction_starts)
        out["eviction_gap"] = ppl[min(probe.eviction_starts)] / ppl[last] - 1.0
    if ids.numel() >= probe.sink_length:
        sinks = measure_sinks(model, ids, sink_ids, probe.sink_inputs, probe.sink_length, GU_THRESHOLD, progress=False)
        out["sink_rate"] = sinks.sink_rate
        out.update(_per_layer("first_key_attn", [sum(h) / len(h) for h in sinks.first_key_score]))
        if sink_ids:
            out.update(_per_layer("sink_token_attn", sinks.sink_token_mass))
        if attention_kind != "softmax":
            out.update(_per_layer("noop_attn", sinks.extra_key_mass))
    return out


@torch.no_grad()
def backend_probe(backend: Backend, ids: torch.Tensor, probe: ProbeSettings, chunk_size: int = CHUNK_SIZE) -> dict[str, float]:
    """The probe record of a loaded checkpoint (any back-end: ours in the exact fast mode, a stock
    Llama-family model token by token), streamed exactly as ``sinklm stream-ppl`` streams it."""
    config = getattr(backend, "config", None)
    kind = getattr(config, "attention", "softmax")

    def stream(start: int, recent: int) -> torch.Tensor:
        return backend.streaming_nll(ids, start, recent, "fast", chunk_size, False)

    return probe_values(backend.model, ids, probe, stream, list(backend.sink_ids), kind)


def streaming_probe(model: nn.Module, text_ids: torch.Tensor, probe: ProbeSettings) -> dict[str, float]:
    """The trainer's probe (:data:`pretrain.plan.ProbeFn`): :func:`backend_probe` on our GPT-NeoX
    (wrapped as is: the caller's train/eval mode stays)."""
    return backend_probe(SinkLMBackend("training", model), text_ids, probe)
