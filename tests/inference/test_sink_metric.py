"""Gu et al.'s sink metric and the averaged attention maps, on hand-made attention and tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from inference.sink_metric import (
    average_attention_maps,
    first_key_scores,
    layer_attentions,
    measure_sinks,
    sink_rate,
    summarise_sinks,
)
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX



def _causal_probs(first_key: list[float], T: int) -> torch.Tensor:
    """(1, H, T, T) causal attention: query i>0 gives head h's ``first_key[h]`` to key 0 and spreads
    the rest evenly over keys 1..i; query 0 can only see key 0 (weight 1)."""
    rest = torch.tril(torch.ones(T, T))
    rest[:, 0] = 0.0
    rest[1:] /= torch.arange(1, T).float()[:, None]  # row i: 1/i on keys 1..i
    heads = []
    for w in first_key:
        head = rest * (1.0 - w)
        head[1:, 0] = w
        head[0, 0] = 1.0
        heads.append(head)
    return torch.stack(heads)[None]


def test_sink_rate_on_hand_made_attention():
    """The metric must average the first key's weight over all T queries (query 0 included, as in
    Gu et al.), threshold at 0.3 strictly, and average heads then layers. A variant that thresholds
    the last query only, skips query 0 or uses >= would give a different number here."""
    T = 64
    # alpha = (1 + 63 w) / 64: w=0.5 -> 0.508 (sink), w=0.29 -> 0.301 (sink: query 0 tips it over),
    # w=0.28 -> 0.291 (not), w=0.1 -> 0.114 (not); layer 1: w=0.9, 0.9, 0.0, 0.0
    layer0 = _causal_probs([0.5, 0.29, 0.28, 0.1], T)
    layer1 = _causal_probs([0.9, 0.9, 0.0, 0.0], T)
    alpha = first_key_scores([layer0, layer1])[0]
    expected_alpha = torch.tensor([[(1 + 63 * w) / 64 for w in ws] for ws in ([0.5, 0.29, 0.28, 0.1], [0.9, 0.9, 0.0, 0.0])])
    torch.testing.assert_close(alpha, expected_alpha)
    rate, per_layer = sink_rate([layer0, layer1], threshold=0.3)
    assert per_layer[0].tolist() == [0.5, 0.5]
    assert rate.item() == pytest.approx(0.5)
    # threshold is strict: a head exactly at 0.3 is not a sink head
    exact = torch.zeros(1, 1, 10, 10)
    exact[0, 0, :, 0] = 0.3
    assert sink_rate([exact], threshold=0.3)[0].item() == 0.0


def test_rows_summing_below_one_use_real_key_weights():
    """softmax1 / sink_logit rows sum to < 1: the metric reads key 0's weight as is (no renormalising)."""
    probs = _causal_probs([0.35, 0.35], 64) * 0.8  # alpha = 0.8 * (1 + 63 * 0.35) / 64 = 0.288 < 0.3
    assert sink_rate([probs])[0].item() == 0.0


def _uniform_model() -> GPTNeoX:
    """Zero QKV weights and biases: every score is 0, so causal attention is uniform over 0..i."""
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = GPTNeoX(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.zero_()
            block.attn.qkv.bias.zero_()
    return model


def test_measure_sinks_matches_direct_computation_on_a_model():
    """On a model with known attention (uniform: alpha = H_64 / 64 ~ 0.074 per head) the metric is 0
    and the reported first-key scores equal the closed form; a model whose attention is read from
    the wrong layer or the wrong axis would not give the harmonic number."""
    model = _uniform_model()
    ids = torch.randint(0, 50000, (400,), generator=torch.Generator().manual_seed(0))
    metric = measure_sinks(model, ids, num_inputs=4, progress=False)
    harmonic = sum(1.0 / (i + 1) for i in range(64)) / 64
    assert metric.sink_rate == 0.0
    for layer in metric.first_key_score:
        assert layer == pytest.approx([harmonic] * 4, abs=1e-5)
    # with a threshold below the closed form every head counts
    assert measure_sinks(model, ids, num_inputs=4, threshold=0.07, progress=False).sink_rate == 1.0


def test_measure_sinks_equals_metric_of_the_model_probabilities(tiny_config):
    """measure_sinks on a random model = the metric computed by hand from model(output_attentions)
    on the same windows (sink-token inputs start with the sink ids)."""
    cfg = ModelConfig.from_dict({**tiny_config.to_dict(), "sink_tokens": 1})
    torch.manual_seed(1)
    model = GPTNeoX(cfg).eval()
    ids = torch.randint(0, 50000, (300,), generator=torch.Generator().manual_seed(1))
    metric = measure_sinks(model, ids, sink_ids=cfg.sink_token_ids, num_inputs=3, threshold=0.05, progress=False)
    from inference.sink_metric import sample_windows, with_sinks

    inputs = with_sinks(sample_windows(ids, 3, 64, seed=0), cfg.sink_token_ids)
    assert (inputs[:, 0] == cfg.sink_token_ids[0]).all()
    with torch.no_grad():
        attentions = model(inputs, output_attentions=True).attentions
    by_hand = []
    for b in range(3):
        shares = [float((a[b, :, :, 0].mean(dim=-1) > 0.05).float().mean()) for a in attentions]
        by_hand.append(sum(shares) / len(shares))
    assert metric.sink_rate == pytest.approx(sum(by_hand) / 3)
    assert metric.sink_tokens == 1
    rows = summarise_sinks({"m": metric})
    assert rows[0]["sink_rate_pct"] == pytest.approx(round(100 * metric.sink_rate, 2))


def test_average_attention_maps_are_causal_means():
    """Maps average heads and inputs per layer: uniform attention gives row i = 1/(i+1) on keys 0..i."""
    model = _uniform_model()
    ids = torch.randint(0, 50000, (200,), generator=torch.Generator().manual_seed(2))
    maps = average_attention_maps(model, ids, num_inputs=5, length=16, progress=False)
    assert maps.shape == (2, 16, 16)
    expected = torch.tril(torch.ones(16, 16)) / torch.arange(1, 17).float()[:, None]
    torch.testing.assert_close(maps[0], expected, atol=1e-5, rtol=1e-5)


def test_hf_model_attentions_switch_to_eager():
    """HF models return attention weights only from the eager kernel; SDPA returns none."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64)).eval()
    attentions = layer_attentions(model, torch.randint(0, 64, (2, 12)))
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 12, 12)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(2, 2, 12))
    assert not math.isnan(float(attentions[1].sum()))
