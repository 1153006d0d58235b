"""Attention kernels: reference math, fast paths equal to it, causality, stability, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.attention import attend, attend_reference, attention_probs, causal_mask

KINDS = ["softmax", "softmax1", "sink_logit"]


def _qkv(b=2, h=3, t=7, d=16, seed=0, tk=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    tk = tk or t
    return (torch.randn(b, h, t, d, generator=g) * scale, torch.randn(b, h, tk, d, generator=g) * scale, torch.randn(b, h, tk, d, generator=g))


def test_softmax1_is_softmax_over_an_extra_zero_key_and_value():
    """softmax1 = vanilla attention with one more key of logit 0 and value 0 (the "zero sink")."""
    q, k, v = _qkv()
    out, probs = attend_reference(q, k, v, "softmax1", causal=True)
    # explicit: scores with an extra column of 0 (a key orthogonal to every query), value 0
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~causal_mask(7, 7), float("-inf"))
    scores = torch.cat([torch.zeros(*scores.shape[:-1], 1), scores], dim=-1)
    p = torch.softmax(scores, -1)
    expected = p[..., 1:] @ v
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(probs, p[..., 1:], atol=1e-6)
    assert (probs.sum(-1) < 1).all()


def test_sink_logit_formula_and_zero_logit_equals_softmax1():
    q, k, v = _qkv()
    b = torch.tensor([-1.0, 0.5, 2.0])
    _, probs = attend_reference(q, k, v, "sink_logit", causal=True, sink_logit=b)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(16)).masked_fill(~causal_mask(7, 7), float("-inf"))
    e = scores.exp()
    expected = e / (b.view(1, 3, 1, 1).exp() + e.sum(-1, keepdim=True))
    assert torch.allclose(probs, expected, atol=1e-6)
    out0, _ = attend_reference(q, k, v, "sink_logit", causal=True, sink_logit=torch.zeros(3))
    out1, _ = attend_reference(q, k, v, "softmax1", causal=True)
    assert torch.allclose(out0, out1, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["causal", "mask", "causal+mask", "decode"])
def test_fast_path_equals_reference(kind, layout):
    """Prevents: the SDPA fast path (used in training) drifting from the defining formula."""
    tk = 11 if layout == "decode" else 7
    q, k, v = _qkv(t=3 if layout == "decode" else 7, tk=tk)
    b = torch.tensor([0.3, -2.0, 1.5])
    mask = torch.rand(1, 1, q.shape[2], tk, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    kwargs = dict(
        causal=layout in ("causal", "causal+mask", "decode"),
        mask=mask if "mask" in layout else None,
        sink_logit=b if kind == "sink_logit" else None,
    )
    ref, _ = attend_reference(q, k, v, kind, **kwargs)
    fast, none = attend(q, k, v, kind, **kwargs)
    assert none is None
    assert torch.allclose(fast, ref, atol=1e-5), (fast - ref).abs().max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fast", [True, False])
def test_causal(kind, fast):
    """A future token never changes a past output."""
    q, k, v = _qkv()
    b = torch.tensor([0.3, -2.0, 1.5])
    fn = attend if fast else (lambda *a, **kw: attend_reference(*a, **kw))
    out, _ = fn(q, k, v, kind, causal=True, sink_logit=b)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] -= 3.0
    out2, _ = fn(q, k2, v2, kind, causal=True, sink_logit=b)
    assert torch.allclose(out[:, :, :-1], out2[:, :, :-1], atol=1e-6)
    assert not torch.allclose(out[:, :, -1], out2[:, :, -1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_finite_for_huge_logits(kind, magnitude):
    """exp(1e4) overflows; the kernels must subtract the right max (including the extra logit)."""
    scores = torch.full((1, 3, 4, 4), magnitude)
    scores[..., 0] = magnitude / 2
    probs = attention_probs(scores, kind, torch.tensor([1e4, -1e4, 0.0]))
    assert torch.isfinite(probs).all()
    q = torch.full((1, 3, 4, 8), 100.0) * (1 if magnitude > 0 else -1)
    k = torch.full((1, 3, 4, 8), 100.0)
    v = torch.randn(1, 3, 4, 8)
    for fn in (attend, attend_reference):
        out, _ = fn(q, k, v, kind, causal=True, sink_logit=torch.tensor([1e4, -1e4, 0.0]))
        assert torch.isfinite(out).all()
    if kind == "softmax1" and magnitude > 0:
        # all scores huge and positive: the zero key gets ~0 weight, so rows sum to ~1
        assert torch.allclose(probs.sum(-1), torch.ones(1, 3, 4))


def test_gradient_reaches_sink_logit_through_fast_path():
    q, k, v = _qkv()
    b = torch.zeros(3, requires_grad=True)
    out, _ = attend(q, k, v, "sink_logit", causal=True, sink_logit=b)
    out.square().sum().backward()
    b_ref = torch.zeros(3, requires_grad=True)
    ref, _ = attend_reference(q, k, v, "sink_logit", causal=True, sink_logit=b_ref)
    ref.square().sum().backward()
    assert b.grad.abs().sum() > 0
    assert torch.allclose(b.grad, b_ref.grad, atol=1e-5)


def test_unknown_kind_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention kind 'softmax2'"):
        attend(q, k, v, "softmax2", causal=True)
