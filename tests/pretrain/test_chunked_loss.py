"""The chunked cross-entropy through the head equals F.cross_entropy of the full logits.

Training no longer forms the (B x T x V) logits: the loss and both gradients are built chunk by
chunk (pretrain/chunked_loss.py). These tests prevent a chunked loss that drifts from the full one
(a wrong chunk boundary, a lost ignore_index row, a gradient scaled by the chunk instead of the
target count, a head-weight gradient accumulated in the wrong place) and a model whose
``labels=`` path stops matching its logits path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.chunked_loss import chunked_lm_loss
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX, lm_loss


def _full(hidden, weight, labels):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _grads(loss_fn, hidden, weight, labels, scale=1.0):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = loss_fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("rows", [1, 7, 16, 48, 1000])
def test_value_and_gradients_match_full_cross_entropy(rows):
    """Every chunking (one row, ragged last chunk, exact fit, one chunk) gives F.cross_entropy's
    value and gradients to 1e-6 in fp32, with ignored (-100) targets and a loss scale != 1."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 16, 24, dtype=torch.float32)
    weight = torch.randn(97, 24, dtype=torch.float32) * 0.3
    labels = torch.randint(0, 97, (3, 16))
    labels[0, :2] = -100  # sink positions carry no target
    labels[2, -3:] = -100
    want = _grads(_full, hidden, weight, labels, scale=2.5)
    got = _grads(lambda h, w, y: chunked_lm_loss(h, w, y, rows=rows), hidden, weight, labels, scale=2.5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_no_grad_skips_gradients_and_matches(monkeypatch):
    """Validation runs under no_grad with parameters that require grad: the same value, and no
    gradient matmul at all (autograd's needs_input_grad stays True under no_grad, so a loss that
    trusted it would do the backward's work in every validation pass)."""
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 9, 8, requires_grad=True), torch.randn(33, 8, requires_grad=True)
    labels = torch.randint(0, 33, (2, 9))
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(a[0].shape) or real_mm(*a, **k))
    with torch.no_grad():
        got = chunked_lm_loss(hidden, weight, labels, rows=4)
    assert len(calls) == 5  # one logits matmul per chunk of 4 out of 18 rows, nothing else
    torch.testing.assert_close(got, _full(hidden, weight, labels).detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attention, sinks", [("softmax", 0), ("softmax1", 0), ("sink_logit", 0), ("softmax", 1)])
def test_model_labels_path_equals_logits_path(attention, sinks):
    """GPTNeoX(ids, labels=...).loss (what training calls) equals lm_loss of the logits, and every
    parameter's gradient matches, for each variant (1e-6, fp32)."""
    cfg = ModelConfig.from_preset("tiny", attention=attention, sink_tokens=sinks, vocab_size=300)
    torch.manual_seed(2)
    model = GPTNeoX(cfg)
    ids = torch.randint(0, 300, (2, 20))
    labels = ids.roll(-1, 1)
    labels[:, :sinks] = -100
    labels[:, -1] = -100
    loss_full = lm_loss(model(ids).logits, labels)
    loss_full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss_full, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-6, rtol=1e-6, msg=name)


def test_bf16_autocast_close_to_full():
    """Under bf16 autocast (the GPU training dtype) the chunked loss follows autocast's matmul dtype
    like the full path does: same value and gradients within bf16 noise."""
    torch.manual_seed(3)
    hidden, weight = torch.randn(64, 32), torch.randn(200, 32) * 0.2
    labels = torch.randint(0, 200, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _grads(_full, hidden, weight, labels)
        got = _grads(lambda h, w, y: chunked_lm_loss(h, w, y, rows=10), hidden, weight, labels)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
