"""How much attention goes to the first token: Gu et al.'s sink metric and averaged attention maps.

Sink metric (Gu et al., "When Attention Sink Emerges in Language Models", ICLR 2025, Sec. 3): for
layer l and head h, the first key's average attention score over the queries that see it,

    alpha^{l,h} = 1/T * sum_{i=0}^{T-1} A^{l,h}[i, 0]

and the metric is the share of heads with alpha^{l,h} > eps (eps = 0.3), averaged over layers:

    Sink^eps = 1/L sum_l 1/H sum_h 1[alpha^{l,h} > eps]

on inputs of T = 64 tokens. With several inputs the metric is computed per input and averaged (the
paper reports the mean over sampled sequences). For a sink-token model each input is its k sink ids
followed by 64 - k text tokens (the training format), so the "first key" is its first sink token;
for softmax1 / sink_logit rows sum to less than 1 and the metric uses the real keys' weights.

Alongside, per layer and averaged over heads, inputs and queries like alpha: the weight on the k
sink tokens (keys 0..k-1 of a sink-token model) and the weight the implicit extra key of softmax1 /
sink_logit takes (its "no-op" share: 1 minus the row's sum over the real keys, since the kernel's
reference path drops exactly that column; 0 for softmax).

Attention maps (StreamingLLM Fig. 7): per layer, attention weights averaged over heads and over
many short inputs (16 tokens there), one (T, T) map per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pretrain.model import GPTNeoX

GU_THRESHOLD = 0.3
GU_INPUT_LENGTH = 64
MAP_INPUT_LENGTH = 16


@dataclass
class SinkMetric:
    """Gu et al.'s sink metric for one model, with the per-layer pieces behind it."""

    sink_rate: float  # share of heads with first-key score > threshold, averaged over layers (0..1)
    per_layer: list[float]  # the share per layer
    first_key_score: list[list[float]]  # alpha[l][h], averaged over inputs
    threshold: float = GU_THRESHOLD
    input_length: int = GU_INPUT_LENGTH
    num_inputs: int = 0
    sink_tokens: int = 0
    notes: dict = field(default_factory=dict)
    sink_token_mass: list[float] = field(default_factory=list)  # per layer: weight on keys 0..k-1 (k sink tokens)
    extra_key_mass: list[float] = field(default_factory=list)  # per layer: weight of softmax1/sink_logit's extra key

    def to_dict(self) -> dict:
        return asdict(self)


def first_key_scores(attentions: list[torch.Tensor]) -> torch.Tensor:
    """alpha (B, L, H): mean over the T queries of each head's weight on key 0.

    ``attentions``: one (B, H, T, T) tensor of attention weights per layer (causal, so every query
    sees key 0).
    """
    return torch.stack([probs[..., :, 0].float().mean(dim=-1) for probs in attentions], dim=1)


def sink_rate(attentions: list[torch.Tensor], threshold: float = GU_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input sink metric (B,) and per-input, per-layer share of sink heads (B, L)."""
    alpha = first_key_scores(attentions)  # (B, L, H)
    per_layer = (alpha > threshold).float().mean(dim=-1)  # (B, L)
    return per_layer.mean(dim=-1), per_layer


def key_mass(attentions: list[torch.Tensor], keys: int) -> torch.Tensor:
    """(B, L): the weight on keys 0..keys-1, averaged over heads and queries, per input and layer."""
    return torch.stack([probs[..., :, :keys].float().sum(dim=-1).mean(dim=(-2, -1)) for probs in attentions], dim=1)


def extra_key_share(attentions: list[torch.Tensor]) -> torch.Tensor:
    """(B, L): 1 - the row sum over the real keys (the extra key's weight), averaged over heads and queries."""
    return torch.stack([(1.0 - probs.float().sum(dim=-1)).mean(dim=(-2, -1)) for probs in attentions], dim=1)


def sample_windows(ids: torch.Tensor, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """``count`` windows (count, length) of the stream ``ids`` at evenly spread, seed-shuffled offsets."""
    if ids.numel() < length:
        raise ValueError(f"the text has {ids.numel()} tokens; need at least {length} for the attention inputs")
    span = ids.numel() - length
    gen = torch.Generator().manual_seed(seed)
    starts = torch.linspace(0, span, count).long()
    starts = starts[torch.randperm(count, generator=gen)]
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def with_sinks(windows: torch.Tensor, sink_ids: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Replace each window's first k tokens by the k sink ids (keeps the input length)."""
    if not sink_ids:
        return windows
    windows = windows.clone()
    windows[:, : len(sink_ids)] = torch.tensor(list(sink_ids), dtype=windows.dtype)
    return windows


@torch.no_grad()  # not inference_mode: under ZeRO-3 the parameters gathered here live on in training
def layer_attentions(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Attention weights per layer, each (B, H, T, T), for our GPTNeoX or a HF causal LM."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if isinstance(model, GPTNeoX):
        attentions: list[torch.Tensor] = []
        model.hidden_states(input_ids, attentions=attentions)  # the trunk only: no vocabulary head
        return [a.float().cpu() for a in attentions]
    # HF models return weights only from the eager kernel (SDPA / flash return None)
    if getattr(model.config, "_attn_implementation", "eager") != "eager" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    out = model(input_ids=input_ids, output_attentions=True, use_cache=False)
    if out.attentions is None or any(a is None for a in out.attentions):
        raise ValueError(f"{type(model).__name__} returned no attention weights; load it with attn_implementation='eager'")
    return [a.float().cpu() for a in out.attentions]


def measure_sinks(
    model: nn.Module,
    ids: torch.Tensor,
    sink_ids: tuple[int, ...] | list[int] = (),
    num_inputs: int = 64,
    length: int = GU_INPUT_LENGTH,
    threshold: float = GU_THRESHOLD,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> SinkMetric:
    """Gu et al.'s metric on ``num_inputs`` windows of ``length`` tokens from the stream ``ids``."""
    inputs = with_sinks(sample_windows(ids, num_inputs, length, seed), sink_ids)
    rates, layers, alphas, sinks, extras = [], [], [], [], []
    for batch in tqdm(inputs.split(batch_size), desc="sink metric", disable=not progress):
        attentions = layer_attentions(model, batch)
        rate, per_layer = sink_rate(attentions, threshold)
        rates.append(rate)
        layers.append(per_layer)
        alphas.append(first_key_scores(attentions))
        sinks.append(key_mass(attentions, len(sink_ids)))
        extras.append(extra_key_share(attentions))
    return SinkMetric(
        sink_rate=float(torch.cat(rates).mean()),
        per_layer=torch.cat(layers).mean(dim=0).tolist(),
        first_key_score=torch.cat(alphas).mean(dim=0).tolist(),
        threshold=threshold,
        input_length=length,
        num_inputs=num_inputs,
        sink_tokens=len(sink_ids),
        sink_token_mass=torch.cat(sinks).mean(dim=0).tolist() if sink_ids else [],
        extra_key_mass=torch.cat(extras).mean(dim=0).tolist(),
    )


def average_attention_maps(
    model: nn.Module,
    ids: torch.Tensor,
    sink_ids: tuple[int, ...] | list[int] = (),
    num_inputs: int = 64,
    length: int = MAP_INPUT_LENGTH,
    batch_size: int = 32,
    seed: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """(L, T, T): attention weights averaged over heads and ``num_inputs`` short inputs, per layer."""
    inputs = with_sinks(sample_windows(ids, num_inputs, length, seed), sink_ids)
    total: torch.Tensor | None = None
    for batch in tqdm(inputs.split(batch_size), desc="attention maps", disable=not progress):
        maps = torch.stack([a.mean(dim=1).sum(dim=0) for a in layer_attentions(model, batch)])  # (L, T, T)
        total = maps if total is None else total + maps
    return total / num_inputs


def summarise_sinks(metrics: dict[str, SinkMetric]) -> list[dict]:
    """Rows for a table: model, sink rate (%), the layer with most sink heads, mean first-key score."""
    rows = []
    for name, m in metrics.items():
        best = max(range(len(m.per_layer)), key=lambda i: m.per_layer[i]) if m.per_layer else -1
        mean_alpha = sum(sum(h) / len(h) for h in m.first_key_score) / max(1, len(m.first_key_score))
        rows.append(
            {
                "model": name,
                "sink_rate_pct": round(100 * m.sink_rate, 2),
                "top_layer": best,
                "top_layer_rate_pct": round(100 * m.per_layer[best], 2) if best >= 0 else 0.0,
                "mean_first_key_score": round(mean_alpha, 4),
                "sink_tokens": m.sink_tokens,
            }
        )
    return rows
