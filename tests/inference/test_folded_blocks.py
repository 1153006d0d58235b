"""The folded products of a decode step (inference/folded_blocks.py) against the blocks' modules.

Prevents a fold that drops a LayerNorm's bias, misorders the QKV and MLP columns, adds a bias twice
or forgets the residual; for both residual forms and both ways a product is taken (column blocks on
a CPU, addmm elsewhere, both checked here on the CPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference.folded_blocks import FoldedBlocks
from test_decode_step import make_model  # tiny, peaked, LayerNorm affines and biases off their init


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("blocked", [True, False])
@pytest.mark.parametrize("rows", [1, 3])  # one stream (few_rows_product's one-row path) and a batch
@torch.no_grad()
def test_folded_products_equal_the_modules(parallel, blocked, rows):
    model = make_model("softmax", 0, parallel)
    folded = FoldedBlocks(model, blocked=blocked)
    x, y = torch.randn(rows, model.config.hidden_size), torch.randn(rows, model.config.hidden_size)
    ones = torch.ones(rows, 1)
    eps = model.config.layer_norm_eps
    for block, f in zip(model.blocks, folded.layers):
        assert (f.w_in.dim() == 3) == blocked
        x_hat = F.layer_norm(x, x.shape[-1:], eps=eps)
        h = folded.product(x_hat, f.w_in, f.b_in)
        qkv = block.attn.qkv(block.ln_attn(x))
        if parallel:
            up = block.mlp.up(block.ln_mlp(x))
            torch.testing.assert_close(h, torch.cat([qkv, up], dim=1), atol=1e-5, rtol=1e-5)
            out = folded.product(torch.cat([y, F.gelu(up), ones], dim=1), f.w_out, x)
            torch.testing.assert_close(out, x + block.attn.proj(y) + block.mlp.down(F.gelu(up)), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(h, qkv, atol=1e-5, rtol=1e-5)
            mid = folded.product(torch.cat([y, ones], dim=1), f.w_out, x)
            torch.testing.assert_close(mid, x + block.attn.proj(y), atol=1e-5, rtol=1e-5)
            u = folded.product(F.layer_norm(mid, x.shape[-1:], eps=eps), f.w_up, f.b_up)
            torch.testing.assert_close(u, block.mlp.up(block.ln_mlp(mid)), atol=1e-5, rtol=1e-5)
            out = folded.product(torch.cat([F.gelu(u), ones], dim=1), f.w_down, mid)
            torch.testing.assert_close(out, mid + block.mlp.down(F.gelu(u)), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_refresh_refolds_in_place_only_after_a_change():
    """A step calls refresh() every token: without a change it keeps the same tensors (a captured
    CUDA graph reads them by address); after one it rewrites them where they are."""
    model = make_model("softmax", 0)
    folded = FoldedBlocks(model)
    weight = folded.layers[1].w_out
    before = weight.clone()
    folded.refresh()
    assert folded.layers[1].w_out is weight and torch.equal(weight, before)
    model.blocks[1].mlp.down.bias.add_(1.0)
    folded.refresh()
    assert folded.layers[1].w_out is weight
    torch.testing.assert_close(weight[:, -1:], before[:, -1:] + 1.0)  # the bias row of the blocks
    torch.testing.assert_close(weight[:, :-1], before[:, :-1])
