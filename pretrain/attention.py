"""Attention kernels: how scores become weights, kept apart from the attention module.

Three kinds, each an exact formula (no approximation):

- ``softmax``:    p_i = e^{x_i} / sum_j e^{x_j}
- ``softmax1``:   p_i = e^{x_i} / (1 + sum_j e^{x_j})      (softmax-off-by-one, the paper's "zero sink":
                  ordinary attention over the keys plus one key of logit 0 and value 0)
- ``sink_logit``: p_i = e^{x_i} / (e^{b_h} + sum_j e^{x_j}) (a learnable logit b_h per head, as in
                  gpt-oss; b_h = 0 is softmax1)

Each has a reference path (explicit scores, always available, optionally returning the weights)
and a fast path through ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU,
the fused kernel on CPU). The extra denominator term is realised exactly as one extra key whose
logit is ``b_h`` and whose value is zero: keys and queries get a few extra dimensions so that
q'.k0' * scale = b_h for every query while real scores are untouched. Gradients reach b_h.

Shapes: q (B, H, Tq, D), k and v (B, H, Tk, D); ``mask`` is boolean, broadcastable to
(B, H, Tq, Tk), True where a query may attend; ``causal`` aligns the Tq queries with the last Tq keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("softmax", "softmax1", "sink_logit")
# extra head dims that carry the sink logit in the fast path; 8 keeps flash kernels' alignment
_SINK_DIMS = 8


def causal_mask(tq: int, tk: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (tq, tk) mask: query i (aligned with key tk - tq + i) sees keys 0..tk - tq + i."""
    rows = torch.arange(tq, device=device)[:, None] + (tk - tq)
    cols = torch.arange(tk, device=device)[None, :]
    return cols <= rows


def extra_logit(kind: str, num_heads: int, sink_logit: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The logit of the implicit extra key per head, shape (H,), or None for ``softmax``."""
    if kind == "softmax":
        return None
    if kind == "softmax1":
        return torch.zeros(num_heads, dtype=like.dtype, device=like.device)
    if kind == "sink_logit":
        if sink_logit is None:
            raise ValueError("attention kind 'sink_logit' needs the per-head sink_logit parameter")
        return sink_logit.to(like.dtype)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {', '.join(KINDS)}")


def attention_probs(scores: torch.Tensor, kind: str, sink_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Attention weights from scores (B, H, Tq, Tk); masked scores are ``-inf``.

    For softmax1/sink_logit the extra key's logit joins the softmax and its weight is dropped, so
    rows sum to less than 1. Stable for any finite scores (the softmax subtracts the row max,
    which includes the extra logit, i.e. max(b_h, max_j x_j)).
    """
    extra = extra_logit(kind, scores.shape[1], sink_logit, scores)
    if extra is None:
        return torch.softmax(scores, dim=-1)
    column = extra.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]


def attend_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    sink_logit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit-math attention; returns (output (B, H, Tq, D), weights (B, H, Tq, Tk))."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    keep = _combined_mask(mask, causal, q.shape[-2], k.shape[-2], q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = attention_probs(scores.float(), kind, sink_logit).to(q.dtype)
    return probs @ v, probs


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    sink_logit: torch.Tensor | None = None,
    need_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention output (and weights if ``need_probs``): the fast path unless weights are needed."""
    if need_probs:
        return attend_reference(q, k, v, kind, mask, causal, sink_logit)
    scale = 1.0 / math.sqrt(q.shape[-1])
    extra = extra_logit(kind, q.shape[1], sink_logit, q)
    if extra is None:
        if mask is None and causal and _square(q, k):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), None
        keep = _combined_mask(mask, causal, q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale), None
    return _attend_with_extra_key(q, k, v, extra, mask, causal, scale), None


def _square(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[-2] == k.shape[-2]


def _combined_mask(mask: torch.Tensor | None, causal: bool, tq: int, tk: int, device) -> torch.Tensor | None:
    if not causal:
        return mask
    band = causal_mask(tq, tk, device)
    return band if mask is None else (mask & band)


def _attend_with_extra_key(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """softmax1 / sink_logit through SDPA: one extra key at index 0 with logit ``extra[h]``, value 0.

    Queries get ``_SINK_DIMS`` extra dims holding 1/scale in the first one; real keys hold 0 there
    and the extra key holds ``extra[h]``, so q'.k0' * scale = extra[h] and q'.k_j' = q.k_j.
    In the square causal case (training) a dummy query row is prepended as well, so the problem
    stays square with ``is_causal=True`` and no explicit mask: that keeps flash kernels eligible
    (they need equal q/k/v head dims, hence v is padded too, and no boolean mask).
    """
    B, H, Tq, D = q.shape
    Tk, Dv = k.shape[-2], v.shape[-1]
    square_causal = mask is None and causal and Tq == Tk
    pad_q = q.new_zeros(B, H, Tq, _SINK_DIMS)
    pad_q[..., 0] = 1.0 / scale
    q_ext = torch.cat([q, pad_q], dim=-1)
    k_ext = torch.cat([k, k.new_zeros(B, H, Tk, _SINK_DIMS)], dim=-1)
    sink_key = torch.cat(
        [k.new_zeros(1, H, 1, D), extra.view(1, H, 1, 1), k.new_zeros(1, H, 1, _SINK_DIMS - 1)], dim=-1
    ).expand(B, H, 1, D + _SINK_DIMS)
    k_ext = torch.cat([sink_key, k_ext], dim=2)
    if square_causal:
        q_ext = torch.cat([q_ext.new_zeros(B, H, 1, D + _SINK_DIMS), q_ext], dim=2)
        v_ext = torch.cat([v, v.new_zeros(B, H, Tk, D + _SINK_DIMS - Dv)], dim=-1)
        v_ext = torch.cat([v_ext.new_zeros(B, H, 1, D + _SINK_DIMS), v_ext], dim=2)
        out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, is_causal=True, scale=scale)
        return out[:, :, 1:, :Dv]
    # values stay Dv wide (SDPA's math/efficient kernels allow Dv != Dqk); the extra key's value is 0
    v_ext = torch.cat([v.new_zeros(B, H, 1, Dv), v], dim=2)
    keep = _combined_mask(mask, causal, Tq, Tk, q.device)
    if keep is None:
        return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=scale)
    keep = torch.cat([torch.ones(*keep.shape[:-1], 1, dtype=torch.bool, device=keep.device), keep], dim=-1)
    return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, attn_mask=keep, scale=scale)
