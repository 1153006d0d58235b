"""GPT-NeoX blocks re-laid for one-token decode steps: fewer, larger products.

A decode step multiplies one row per stream by every weight, so on a CPU its time goes to the
number of small kernels and to fetching each weight from memory, not to arithmetic. This module
folds a :class:`pretrain.model.Block`'s parameters, once, into the products a step needs:

- each LayerNorm's affine into the projection that follows it: ``LN(x) @ W.T + b`` equals
  ``x_hat @ (g * W).T + (W @ beta + b)`` with ``x_hat`` the normalised x, so the step normalises
  without an affine;
- with the parallel residual (Pythia), both LayerNorms read the same x, so the QKV and MLP-up
  projections become one product, ``x_hat @ w_in + b_in`` (C, 3C + M);
- the attention output and MLP-down projections, and both their biases, become one product over
  ``[y, gelu(u), 1]``: ``x + [y, gelu(u), 1] @ w_out`` (C + M + 1, C) is the block's output. The
  sequential residual, where the MLP reads the attention's output, keeps four products (QKV, the
  attention output with its bias row, MLP-up, MLP-down with its bias row), its LayerNorms folded.

The folded weights are copies, so a decode step holds the blocks' weights a second time (pythia-160m
in float32: 340 MB more; a session with ``decode="none"`` keeps every token on SinkCache's module path
and holds none). :meth:`FoldedBlocks.refresh` (called before every step) rebuilds
them, in place, whenever a source parameter's storage or version changed (an optimizer step, a
checkpoint load), so a step never runs on stale weights and a captured CUDA graph keeps its
addresses. Folding runs in float64 and rounds once to the model's dtype; the folded step equals the
module path to float32 rounding (the decode-step tests hold it to SinkCache's logits at 1e-5 of
their scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pretrain.model import column_blocks, few_rows_product

__all__ = ["FoldedBlock", "FoldedBlocks"]


@dataclass
class FoldedBlock:
    """One block's products (see the module docstring); ``w_up``/``b_up``/``w_down`` only for the
    sequential residual, where the MLP reads the attention's output. Shapes are those of the (K, N)
    products; with column blocks a weight is held as (b, K, N / b) and its bias as (b, 1, N / b)."""

    w_in: torch.Tensor  # (C, 3C [+ M]): ln_attn folded into qkv [| ln_mlp folded into up]
    b_in: torch.Tensor  # (3C [+ M],)
    w_out: torch.Tensor  # (C [+ M] + 1, C): [proj.T; down.T (parallel); bias row]
    w_up: torch.Tensor | None = None  # (C, M): ln_mlp folded into up (sequential residual)
    b_up: torch.Tensor | None = None  # (M,)
    w_down: torch.Tensor | None = None  # (M + 1, C): [down.T; bias row] (sequential residual)


def _fold_norm(norm: nn.LayerNorm, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, N) weight and (N,) bias with ``x_hat @ w + b == linear(norm(x))`` (float64)."""
    weight = linear.weight.double()
    return (weight * norm.weight.double()).t(), weight @ norm.bias.double() + linear.bias.double()


def _with_bias_row(*parts: nn.Linear) -> torch.Tensor:
    """Stacked (K1 + K2 + ... + 1, N) for ``[x1, x2, ..., 1] @ w == sum_i linear_i(x_i)`` (float64)."""
    bias = sum(p.bias.double() for p in parts)
    return torch.cat([*(p.weight.double().t() for p in parts), bias[None]], dim=0)


def fold_block(block: nn.Module) -> FoldedBlock:
    """The folded float64 products of one :class:`pretrain.model.Block`."""
    attn, mlp = block.attn, block.mlp
    w_qkv, b_qkv = _fold_norm(block.ln_attn, attn.qkv)
    w_up, b_up = _fold_norm(block.ln_mlp, mlp.up)
    if block.parallel:
        return FoldedBlock(torch.cat([w_qkv, w_up], dim=1), torch.cat([b_qkv, b_up]), _with_bias_row(attn.proj, mlp.down))
    return FoldedBlock(w_qkv, b_qkv, _with_bias_row(attn.proj), w_up, b_up, _with_bias_row(mlp.down))


class FoldedBlocks:
    """Every block of ``model`` folded for decode steps, kept in step with the model's parameters.

    Each product's weight is stored as nn.Linear stores its own, (N, K) contiguous: the BLAS then
    sums each output as one dot product over K, which rounds as the module path does (a (K, N)-
    contiguous copy is ~5% faster on a pythia-14m CPU step but sums term by term along K, ~2.5x the
    rounding error). ``layers`` hold views of that storage in the form :meth:`product` takes: on a
    CPU :attr:`BLOCKS` column blocks for :func:`pretrain.model.few_rows_product` (against addmm on
    the 2-core EPYC, interleaved in one process: pythia-14m step 2.28 -> 2.03 ms, 160m 43 -> 31 ms),
    elsewhere the (K, N) transpose for addmm.
    """

    BLOCKS = 4

    def __init__(self, model: nn.Module, blocked: bool | None = None):
        self.blocks = list(model.blocks)
        # the folded modules' parameter dicts, read directly: a step checks them for changes, and
        # nn.Module's attribute lookup would cost more than the check (~90 us per pythia-14m step)
        self._params = [
            module._parameters
            for block in self.blocks
            for module in (block.ln_attn, block.attn.qkv, block.attn.proj, block.ln_mlp, block.mlp.up, block.mlp.down)
        ]
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.blocked = self.device.type == "cpu" if blocked is None else blocked  # column blocks, or addmm
        self.layers: list[FoldedBlock] = []
        self._storage: list[dict[str, torch.Tensor]] = []  # per layer: each weight (N, K), each bias (N,)
        self._key: list[tuple[int, int]] | None = None
        self.refresh()

    @staticmethod
    def product(rows: torch.Tensor, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``base + rows @ weight`` for a weight of ``layers`` (``base``: a bias, or the residual)."""
        if weight.dim() == 3:
            return few_rows_product(rows, weight, base)
        return torch.addmm(base, rows, weight)

    def _views(self, stored: dict[str, torch.Tensor]) -> FoldedBlock:
        if not self.blocked:
            return FoldedBlock(**{name: t.t() if t.dim() == 2 else t for name, t in stored.items()})
        views = {name: column_blocks(t, self.BLOCKS) for name, t in stored.items() if t.dim() == 2}
        for name in ("b_in", "b_up"):  # each bias cut as its product's columns, for few_rows_product
            if name in stored:
                blocks = views["w" + name[1:]]
                views[name] = stored[name].view(blocks.shape[0], 1, blocks.shape[2])
        return FoldedBlock(**views)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-fold, in place, if any source parameter changed since the last fold: its storage (a
        replaced Parameter, a ``.data`` swap) or its version (any in-place write). ~10 us a check."""
        key = [(p.data_ptr(), p._version) for params in self._params for p in params.values()]
        if key == self._key:
            return
        for i, block in enumerate(self.blocks):
            # weights (K, N) -> stored (N, K); biases as they are
            folded = {name: t.t() if t.dim() == 2 else t for name, t in vars(fold_block(block)).items() if t is not None}
            if i == len(self.layers):
                stored = {name: t.to(self.device, self.dtype).contiguous() for name, t in folded.items()}
                self._storage.append(stored)
                self.layers.append(self._views(stored))
                continue
            for name, t in folded.items():
                self._storage[i][name].copy_(t)
        self._key = key
