"""SinkCache against an independent, plain implementation of the StreamingLLM protocol."""

from __future__ import annotations

import math

import pytest
import torch

from inference.cache import SinkCache
from inference.stream import StreamError, check_start_size, resolve_cache_sizes
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX, rotate_half



class PaperCache:
    """The paper's own implementation, with no optimisation (the test's reference).

    Per layer it keeps the un-rotated keys and values of the kept tokens as they were computed when
    each token was processed, appends the new token's, re-applies rotary with positions 0..len-1 at
    every step (the query at the last position), attends with the kind's explicit formula, then
    trims to the first ``start`` and the last ``recent`` tokens. One token per call.
    """

    def __init__(self, start: int, recent: int):
        self.start, self.recent = start, recent
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def attend(self, layer_idx, q, k, v, attention, position_ids, need_probs):
        assert q.shape[-2] == 1, "the reference feeds one token at a time"
        keys = torch.cat([self.keys[layer_idx], k], dim=2) if layer_idx in self.keys else k
        values = torch.cat([self.values[layer_idx], v], dim=2) if layer_idx in self.values else v
        n = keys.shape[2]
        positions = torch.arange(n)
        q_rot = attention.rotary.rotate(q, positions[-1:])
        k_rot = attention.rotary.rotate(keys, positions)
        scores = (q_rot @ k_rot.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])  # (B, H, 1, n)
        if attention.kind == "softmax":
            weights = torch.softmax(scores, dim=-1)
        else:  # one extra logit (0, or the learned b_h) in the denominator, with a zero value
            extra = torch.zeros(q.shape[1]) if attention.kind == "softmax1" else attention.sink_logit.float()
            extended = torch.cat([scores, extra.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
            weights = torch.softmax(extended, dim=-1)[..., :-1]
        out = weights.to(values.dtype) @ values
        if n > self.start + self.recent:
            keys = torch.cat([keys[:, :, : self.start], keys[:, :, n - self.recent :]], dim=2)
            values = torch.cat([values[:, :, : self.start], values[:, :, n - self.recent :]], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return out, None


def make_model(attention: str = "softmax", sink_tokens: int = 0, layers: int = 3, seed: int = 0) -> GPTNeoX:
    # init_std 0.3 makes attention peaked, so a wrong position or a wrongly kept token shows up in the logits
    config = ModelConfig.from_preset(
        "tiny", attention=attention, sink_tokens=sink_tokens, num_layers=layers,
        init_method="normal", init_std=0.3, sink_logit_init=0.7,
    )
    torch.manual_seed(seed)
    model = GPTNeoX(config).eval()
    if attention == "sink_logit":
        with torch.no_grad():  # distinct per-head logits, so a head mix-up would show
            for block in model.blocks:
                block.attn.sink_logit.copy_(torch.linspace(-1.0, 2.0, config.num_heads))
    return model


@pytest.fixture(scope="module")
def text_ids() -> torch.Tensor:
    """Real text: the start of the bundled stream-test book, GPT-NeoX tokens."""
    from data.corpora import stream_test_text
    from data.tokenizer import load_tokenizer

    ids = load_tokenizer()(stream_test_text()[:6000], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def stream_of(model: GPTNeoX, text: torch.Tensor, n: int, batch: int = 2) -> torch.Tensor:
    """(batch, n) streams: the model's sink ids, then text (row b shifted by 50 tokens)."""
    prefix = torch.tensor(model.config.sink_token_ids, dtype=torch.long)
    rows = [torch.cat([prefix, text[50 * b : 50 * b + n - prefix.numel()]]) for b in range(batch)]
    return torch.stack(rows)


@torch.no_grad()
def logits_token_by_token(model, cache, ids) -> torch.Tensor:
    return torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)


@torch.no_grad()
def logits_in_chunks(model, cache, ids, chunk) -> torch.Tensor:
    return torch.cat([model(ids[:, i : i + chunk], cache=cache).logits for i in range(0, ids.shape[1], chunk)], dim=1)


VARIANTS = [("softmax", 0), ("softmax1", 0), ("sink_logit", 0), ("softmax", 1)]


@pytest.mark.parametrize("attention,sink_tokens", VARIANTS, ids=["vanilla", "softmax1", "sink_logit", "sink1"])
@pytest.mark.parametrize("start", [0, 1, 4])
def test_cache_equals_paper_reference(text_ids, attention, sink_tokens, start):
    """Token by token and in chunks, SinkCache gives the paper implementation's logits before and
    after eviction starts. Guards against wrong sink/window positions once the cache is full, off-by-one
    window edges, chunk masks leaking evicted tokens, and kernels (softmax1 / sink_logit) mis-applied."""
    recent = 9
    n = start + recent + 16  # eviction starts at token start + recent + 1
    model = make_model(attention, sink_tokens)
    ids = stream_of(model, text_ids, n)
    expected = logits_token_by_token(model, PaperCache(start, recent), ids)

    got = logits_token_by_token(model, SinkCache(start, recent), ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for chunk in (3, 16, n):  # chunks that straddle the eviction point, and the whole stream at once
        got = logits_in_chunks(model, SinkCache(start, recent), ids, chunk)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    got = logits_in_chunks(model, SinkCache(start, recent, use_sdpa=True), ids, 16)  # the GPU's fused path
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    blocked = SinkCache(start, recent)
    blocked.query_block = 4  # chunks split into query blocks, each scoring only its band of keys
    for chunk in (16, n):
        blocked.reset()
        torch.testing.assert_close(logits_in_chunks(model, blocked, ids, chunk), expected, atol=1e-4, rtol=1e-4)

    # the comparison can see a mistake: dense attention differs clearly after eviction starts
    dense = model(ids).logits
    full = start + recent + 1
    assert (dense[:, :full] - expected[:, :full]).abs().max() < 1e-4
    assert (dense[:, full:] - expected[:, full:]).abs().max() > 0.1


def test_unbounded_cache_is_dense_attention(text_ids):
    """recent_size=None keeps everything: chunked streaming equals one dense forward (buffer growth
    by doubling must not lose or reorder tokens)."""
    model = make_model("softmax1")
    ids = stream_of(model, text_ids, 300, batch=1)
    cache = SinkCache(0, None)
    got = logits_in_chunks(model, cache, ids, 70)
    torch.testing.assert_close(got, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert len(cache) == 300


def test_batch_rows_stream_independently(text_ids):
    """A batch of streams gives each row the logits it gets alone (no mixing across the batch)."""
    model = make_model("sink_logit")
    ids = stream_of(model, text_ids, 40, batch=3)
    together = logits_in_chunks(model, SinkCache(2, 8), ids, 7)
    for b in range(3):
        alone = logits_token_by_token(model, SinkCache(2, 8), ids[b : b + 1])
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_float32(text_ids, dtype):
    """bf16/fp16 models stream with buffers in their dtype and stay close to the fp32 reference."""
    model = make_model("softmax", layers=2)
    ids = stream_of(model, text_ids, 40, batch=1)
    expected = logits_token_by_token(model, PaperCache(4, 8), ids)
    cache = SinkCache(4, 8)
    got = logits_in_chunks(model.to(dtype), cache, ids, 6)
    assert all(s.win_k.dtype == dtype and s.sink_v.dtype == dtype for s in cache.layers.values())
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() / scale < 0.05


def test_memory_stays_at_start_plus_recent(tiny_config):
    """Streaming 100k tokens (chunks and single tokens) never grows the cache: its tensors stay at
    exactly start + recent slots per layer, at the same addresses (no reallocation, no copies)."""
    start, recent = 4, 60
    model = GPTNeoX(tiny_config).eval()
    cache = SinkCache(start, recent)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 100_000), generator=torch.Generator().manual_seed(0))
    H, D, L = tiny_config.num_heads, tiny_config.head_dim, tiny_config.num_layers
    per_layer = 2 * H * (start + recent) * D * 4 + recent * 8  # fp32 keys + values, int64 slot positions
    model.hidden_states(ids[:, :250], cache=cache)
    addresses = [(s.sink_k.data_ptr(), s.win_k.data_ptr(), s.win_v.data_ptr()) for s in cache.layers.values()]
    for offset in range(250, ids.shape[1], 250):
        model.hidden_states(ids[:, offset : offset + 250], cache=cache)
        assert cache.nbytes() == L * per_layer
    for t in range(200):  # decoding token by token wraps the ring many times
        model.hidden_states(ids[:, t : t + 1], cache=cache)
    assert cache.nbytes() == L * per_layer
    assert len(cache) == start + recent and cache.seen == 100_200
    assert addresses == [(s.sink_k.data_ptr(), s.win_k.data_ptr(), s.win_v.data_ptr()) for s in cache.layers.values()]


def test_rotation_exact_far_into_the_stream():
    """Window keys sit at absolute stream positions, so rotary angles must stay exact at millions of
    tokens: q at P + 5 against k at P scores like q at 5 against k at 0. (float32 angles, as the
    model's own rotate uses, are off by ~0.1 rad there; the check shows the test can tell.)"""
    model = make_model("softmax", layers=1)
    rotary = model.blocks[0].attn.rotary
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16)

    def rotate_at(rotary, x, positions):  # the cache's rotation: float64 angles
        return rotate_half(x, *rotary.tables(positions, x.dtype, torch.float64))

    near = rotate_at(rotary, q, torch.tensor([5])) @ rotate_at(rotary, k, torch.tensor([0])).transpose(-1, -2)
    far_pos = 3_000_017
    far = rotate_at(rotary, q, torch.tensor([far_pos + 5])) @ rotate_at(rotary, k, torch.tensor([far_pos])).transpose(-1, -2)
    torch.testing.assert_close(far, near, atol=1e-4, rtol=1e-4)
    fp32 = rotary.rotate(q, torch.tensor([far_pos + 5])) @ rotary.rotate(k, torch.tensor([far_pos])).transpose(-1, -2)
    assert (fp32 - near).abs().max() > 1e-3


def test_bad_cache_sizes_are_clear_errors():
    """recent_size < 1, negative start, and a start that fills the whole cache are refused with
    messages naming the option."""
    with pytest.raises(ValueError, match="recent_size must be an integer >= 1"):
        SinkCache(4, 0)
    with pytest.raises(ValueError, match="start_size must be an integer >= 0"):
        SinkCache(-1, 8)
    with pytest.raises(StreamError, match="--start-size 8 leaves no room"):
        resolve_cache_sizes(8, None, 8)
    with pytest.raises(StreamError, match="--recent-size must be >= 1"):
        resolve_cache_sizes(4, 0, None)
    assert resolve_cache_sizes(4, None, 1024) == (4, 1020)


def test_cache_refuses_caller_positions_and_a_changed_batch(tiny_config):
    """The cache owns positions (slot semantics); reusing one cache for a differently shaped stream
    is a clear error rather than silent garbage."""
    model = GPTNeoX(tiny_config).eval()
    cache = SinkCache(1, 4)
    with pytest.raises(ValueError, match="assigns positions itself"):
        model(torch.zeros(1, 3, dtype=torch.long), position_ids=torch.arange(3), cache=cache)
    cache = SinkCache(1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="use a fresh cache"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)


def test_start_size_mismatch_with_sink_tokens_warns():
    """A sink-token model streamed with fewer start slots than its sinks (they would be evicted)
    or more (text tokens kept as sinks) gets a warning naming both numbers."""
    config = ModelConfig.from_preset("tiny", sink_tokens=2)
    with pytest.warns(UserWarning, match="2 sink token.*start_size=1"):
        check_start_size(config, 1)
    with pytest.warns(UserWarning, match="start_size=4 also keeps the first 2 text"):
        check_start_size(config, 4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_start_size(config, 2)
        check_start_size(ModelConfig.from_preset("tiny"), 4)
