"""The model is GPT-NeoX: logits parity with Hugging Face, init, sink tokens, positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.hf_keymap import KEY_MAP, from_hf_config, from_hf_state_dict, load_into_hf_model, to_hf_config, to_hf_state_dict
from pretrain.model import DenseCache, GPTNeoX, VocabHead, rotary_matrix, rotary_tables, rotate_half


def _hf_model(cfg: ModelConfig):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_cfg = GPTNeoXConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")})
    return GPTNeoXForCausalLM(hf_cfg).eval()


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random LayerNorm/bias values too, so a swapped or transposed key cannot pass by luck."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    "preset, parallel, rotary_pct",
    [
        ("tiny", True, 0.25),
        ("tiny", False, 0.25),
        ("tiny", True, 1.0),
        ("tiny", False, 1.0),
        ("pythia-14m", True, 0.25),
        ("pythia-70m", True, 0.25),
    ],
)
def test_logits_match_hf_gpt_neox(preset, parallel, rotary_pct):
    """Prevents: any drift from GPT-NeoX (QKV interleave, partial rotary, residual order, LN eps)
    that would make exported checkpoints load into HF with different predictions."""
    cfg = ModelConfig.from_preset(preset, use_parallel_residual=parallel, rotary_pct=rotary_pct, max_seq_len=64)
    ours = GPTNeoX(cfg).eval()
    _randomise(ours)
    hf = _hf_model(cfg)
    load_into_hf_model(hf, to_hf_state_dict(ours.state_dict()))
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = ours(ids).logits
        hf_logits = hf(ids).logits
    assert ours_logits.shape == hf_logits.shape == (2, 48, cfg.padded_vocab_size)
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-5


def test_key_map_is_one_to_one_and_round_trips(tiny_config):
    """Prevents: a key map that loses or duplicates a tensor in either direction."""
    cfg = ModelConfig.from_preset("tiny", attention="sink_logit")
    state = GPTNeoX(cfg).state_dict()
    hf_state = to_hf_state_dict(state)
    assert len(hf_state) == len(state)
    back = from_hf_state_dict(hf_state)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)
    assert len({ours for ours, _ in KEY_MAP}) == len({hf for _, hf in KEY_MAP}) == len(KEY_MAP)


def test_hf_config_round_trip():
    cfg = ModelConfig.from_preset("pythia-160m")
    back = from_hf_config(to_hf_config(cfg), text_vocab_size=cfg.vocab_size, name=cfg.name)
    assert back == cfg


def test_pythia_shapes_and_padding():
    """Pythia's published sizes: the 14m..410m presets must count the same parameters."""
    expected = {"pythia-14m": 14_067_712, "pythia-70m": 70_426_624, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016}
    for name, count in expected.items():
        cfg = ModelConfig.from_preset(name)
        assert cfg.padded_vocab_size == 50304
        assert cfg.num_params() == count, name
    assert GPTNeoX(ModelConfig.from_preset("pythia-14m")).num_params() == expected["pythia-14m"]


def test_pythia_init_stds():
    """small_init for inputs, wang_init for output projections (gpt-neox init_functions)."""
    cfg = ModelConfig.from_preset("pythia-70m")
    model = GPTNeoX(cfg)
    d, L = cfg.hidden_size, cfg.num_layers
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx((2 / (5 * d)) ** 0.5, rel=0.02)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(2 / (L * d**0.5), rel=0.02)
    assert model.blocks[0].attn.qkv.bias.abs().max().item() == 0.0


def test_explicit_positions_shift_invariance(tiny_config):
    """RoPE depends on relative positions only: shifting all positions leaves logits unchanged.
    Prevents: caches that assign positions inside the cache getting different results."""
    model = GPTNeoX(tiny_config).eval()
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, position_ids=torch.arange(20) + 37).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "softmax1", "sink_logit"])
def test_dense_cache_decoding_equals_full_forward(kind):
    """Incremental decoding through the cache interface equals one full forward pass."""
    cfg = ModelConfig.from_preset("tiny", attention=kind, sink_logit_init=0.7)
    model = GPTNeoX(cfg).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = DenseCache()
        first = model(ids[:, :5], cache=cache).logits
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=1e-5)


def test_gradients_reach_sink_logit_and_sink_token_rows():
    """Prevents: a sink logit or a sink-token embedding that never trains."""
    cfg = ModelConfig.from_preset("tiny", attention="sink_logit", sink_tokens=1)
    model = GPTNeoX(cfg)
    sink = cfg.sink_token_ids[0]
    ids = torch.cat([torch.full((2, 1), sink), torch.randint(0, 1000, (2, 15))], dim=1)
    logits = model(ids).logits
    logits[:, 1:].logsumexp(-1).mean().backward()
    for block in model.blocks:
        assert block.attn.sink_logit.grad is not None and block.attn.sink_logit.grad.abs().sum() > 0
    assert model.embed.weight.grad[sink].abs().sum() > 0


def test_attention_probabilities_output(tiny_config):
    model = GPTNeoX(tiny_config).eval()
    out = model(torch.randint(0, 1000, (1, 10)), output_attentions=True)
    assert len(out.attentions) == tiny_config.num_layers
    probs = out.attentions[0]
    assert probs.shape == (1, tiny_config.num_heads, 10, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(1, tiny_config.num_heads, 10), atol=1e-5)
    assert probs.triu(1).abs().max() == 0


def test_flops_per_token_is_palm_accounting():
    """6N for the weight matmuls (incl. the output layer) plus 12 L T d for attention (PaLM, App. B)."""
    cfg = ModelConfig.from_preset("pythia-160m")
    n = cfg.num_params(include_embeddings=False) + cfg.hidden_size * cfg.padded_vocab_size
    assert cfg.flops_per_token(2048) == pytest.approx(6 * n + 12 * cfg.num_layers * 2048 * cfg.hidden_size, rel=0.01)


def test_module_api_is_not_shadowed(tiny_config):
    """Prevents: a submodule method named like an nn.Module method (e.g. ``apply``), which breaks
    DeepSpeed and other libraries that walk the module tree with ``model.apply(fn)``."""
    model = GPTNeoX(tiny_config)
    seen = []
    model.apply(lambda m: seen.append(type(m).__name__))
    assert "RotaryEmbedding" in seen and "GPTNeoX" in seen


def test_hidden_states_is_the_trunk_of_forward():
    """forward = lm_head(hidden_states): inference applies the head to the positions it scores only,
    so the trunk must be exactly what forward runs (with a cache, and with attention weights)."""
    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig.from_preset("tiny", num_layers=2)).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
        attentions: list[torch.Tensor] = []
        hidden = model.hidden_states(ids, attentions=attentions)
        cached = DenseCache()
        stepped = torch.cat([model.hidden_states(ids[:, :5], cache=cached), model.hidden_states(ids[:, 5:], cache=cached)], 1)
    assert torch.equal(out.hidden_states, hidden) and torch.equal(out.logits, model.lm_head(hidden))
    assert len(attentions) == 2 and all(torch.equal(a, b) for a, b in zip(attentions, out.attentions))
    torch.testing.assert_close(stepped, hidden, atol=1e-5, rtol=1e-5)


def test_decode_head_follows_weight_changes():
    """The CPU decode head multiplies up to FEW_ROWS rows by a copy of the weight cut into column
    blocks (several times faster than F.linear there); prevents stale logits from that copy after an
    in-place update (an optimizer step), a load_state_dict, or a new weight tensor, rows put back in
    the wrong order (leading dims, a vocabulary that BLOCKS does not divide), and checks it equals
    F.linear on both sides of FEW_ROWS."""
    torch.manual_seed(0)
    for vocab in (96, 90):  # 4 blocks; 90 is cut into 2
        head = VocabHead(16, vocab, bias=False)
        with torch.no_grad():
            for shape in ((1, 16), (2, 16), (2, 3, 16), (VocabHead.FEW_ROWS, 16), (VocabHead.FEW_ROWS + 1, 16)):
                h = torch.randn(shape)
                torch.testing.assert_close(head(h), F.linear(h, head.weight), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        h = torch.randn(1, 1, 16)
        head(h)  # builds the copy
        head.weight.add_(1.0)  # in place, as an optimizer step
        torch.testing.assert_close(head(h), F.linear(h, head.weight), rtol=1e-6, atol=1e-6)
        head.load_state_dict({"weight": torch.randn(vocab, 16)})
        torch.testing.assert_close(head(h), F.linear(h, head.weight), rtol=1e-6, atol=1e-6)
        head.weight = torch.nn.Parameter(torch.randn(vocab, 16))
        torch.testing.assert_close(head(h), F.linear(h, head.weight), rtol=1e-6, atol=1e-6)
    h.requires_grad_(True)
    head(h).sum().backward()  # with grad: the module's own path, gradients reach the input
    assert h.grad is not None


@pytest.mark.parametrize("head_dim, ndims", [(32, 8), (16, 16), (64, 16)])
def test_rotary_matrix_is_rotate_half(head_dim, ndims):
    """The decode step rotates by one product with rotary_matrix instead of rotate_half's slices;
    prevents a sign, a swapped half or a pass-through dim lost in that matrix (partial and full
    rotary, float64 angles of a position in the millions, one matrix per row)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, ndims, 2, dtype=torch.float64) / ndims))
    positions = torch.tensor([0, 7, 3_000_001])
    cos, sin = rotary_tables(inv_freq, positions, torch.float32, torch.float64)  # (3, ndims)
    x = torch.randn(2, 4, 3, head_dim, generator=torch.Generator().manual_seed(0))
    rotated = (x.unsqueeze(-2) @ rotary_matrix(cos, sin, head_dim)).squeeze(-2)
    torch.testing.assert_close(rotated, rotate_half(x, cos, sin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rotated[..., ndims:], x[..., ndims:], rtol=0, atol=0)
