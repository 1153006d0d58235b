"""The fixed-shape decode step (inference/decode_step.py) against SinkCache's eager path.

Prevents a decode step that drifts from the cache semantics: a wrong write slot when the ring wraps,
a sink query rotated at the wrong position before or after eviction starts, an empty slot that is
not masked while the cache fills, a lost state hand-over between the chunked prompt path and the
step (both ways), a compiled step that differs from the eager one, and a hot path that syncs with
the host (``.item()`` and friends) or moves its buffers.
"""

from __future__ import annotations

import pytest
import torch

from inference.cache import SinkCache
from inference.decode_step import DecodeStep, StaticSinkCache
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX
from static_step_checks import assert_steady_state

START, RECENT, BATCH = 2, 5, 2
VARIANTS = [("softmax", 0), ("softmax1", 0), ("sink_logit", 0), ("softmax", 1)]


def make_model(attention: str, sink_tokens: int, parallel: bool = True) -> GPTNeoX:
    # init_std 0.3: peaked attention, so a wrong position or a wrongly kept key shows in the logits
    config = ModelConfig.from_preset(
        "tiny", attention=attention, sink_tokens=sink_tokens, num_layers=2, vocab_size=120,
        init_method="normal", init_std=0.3, sink_logit_init=0.7, use_parallel_residual=parallel,
    )
    torch.manual_seed(0)
    model = GPTNeoX(config).eval()
    with torch.no_grad():  # LayerNorm affines and biases off their unit/zero init: the step folds them
        for name, param in model.named_parameters():
            if param.dim() == 1 and not name.endswith("sink_logit"):
                param.add_(torch.randn_like(param), alpha=0.3)
    return model


def stream_ids(model: GPTNeoX, length: int) -> torch.Tensor:
    ids = torch.randint(0, 120, (BATCH, length), generator=torch.Generator().manual_seed(3))
    ids[:, : model.config.sink_tokens] = torch.tensor(model.config.sink_token_ids)
    return ids


@torch.no_grad()
def eager_logits(model: GPTNeoX, ids: torch.Tensor, start: int = START) -> torch.Tensor:
    cache = SinkCache(start, RECENT)
    return torch.stack([model(ids[:, t : t + 1], cache=cache).logits[:, -1] for t in range(ids.shape[1])], 1)


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 rounding: 1e-5 of the logits' scale. The step multiplies by folded products
    in its own order, so its rounding differs from SinkCache's module path by ~1e-6 of the scale on
    these deliberately peaked models (logits ~10); a wrong slot, position or mask moves logits by
    ~1e-1 here."""
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@torch.no_grad()
def step_logits(model: GPTNeoX, ids: torch.Tensor, mode: str, start: int = START) -> torch.Tensor:
    step = DecodeStep(model, StaticSinkCache(model, BATCH, start, RECENT), mode)
    return torch.stack([step(ids[:, t]).clone() for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("attention, sinks", VARIANTS)
@pytest.mark.parametrize("start", [0, START])
def test_eager_step_equals_sink_cache_across_eviction(attention, sinks, start):
    """From the first token, through filling, to well past eviction (3 x the cache), B=2 in lockstep."""
    model = make_model(attention, sinks)
    ids = stream_ids(model, 3 * (start + RECENT) + 2)
    assert_same_logits(step_logits(model, ids, "eager", start), eager_logits(model, ids, start))


def test_sequential_residual_step_equals_sink_cache():
    """The sequential residual (x + attn(ln1(x)), then + mlp(ln2(.))) folds into its own products."""
    model = make_model("softmax1", 0, parallel=False)
    ids = stream_ids(model, 2 * (START + RECENT) + 3)
    assert_same_logits(step_logits(model, ids, "eager"), eager_logits(model, ids))


@torch.no_grad()
def test_step_follows_weight_changes():
    """The step multiplies by folded copies of the weights: an in-place update (an optimizer step, a
    load) and a replaced Parameter are both seen at the next token, not decoded with stale copies."""
    model = make_model("softmax", 0)
    ids = stream_ids(model, 12)
    step = DecodeStep(model, StaticSinkCache(model, BATCH, START, RECENT))
    cache = SinkCache(START, RECENT)
    for t in range(12):
        if t == 4:
            model.blocks[0].ln_mlp.weight.mul_(1.5)
            model.blocks[1].attn.qkv.bias.add_(0.2)
        if t == 8:  # a new Parameter at the old one's version: only its storage tells them apart
            old = model.blocks[1].mlp.down.weight
            replaced = torch.nn.Parameter(old * -1.0)
            while replaced._version < old._version:
                replaced.mul_(1.0)
            assert replaced._version == old._version
            model.blocks[1].mlp.down.weight = replaced
        want = model(ids[:, t : t + 1], cache=cache).logits[:, -1]
        assert_same_logits(step(ids[:, t]), want)


@torch.no_grad()
def test_cpu_step_leaves_onednn_as_it_found_it():
    """A float32 CPU step turns oneDNN off while it runs (its one-row GELU is ~10x ATen's) and back on
    after, also when the step raises; a caller that had it off finds it off."""
    model = make_model("softmax", 0)
    step = DecodeStep(model, StaticSinkCache(model, BATCH, START, RECENT))
    seen = []
    run = step._run

    def watched():
        seen.append(torch.backends.mkldnn.enabled)
        run()
        if len(seen) == 2:
            raise RuntimeError("a step that fails")

    step._run = watched
    step(torch.zeros(BATCH, dtype=torch.long))
    assert seen == [False] and torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError, match="a step that fails"):
        step(torch.zeros(BATCH, dtype=torch.long))
    assert torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        step(torch.zeros(BATCH, dtype=torch.long))
        assert not torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True


@pytest.mark.parametrize("attention, sinks", VARIANTS)
def test_compiled_step_equals_eager(attention, sinks):
    """torch.compile of the whole step (inductor on this CPU) gives the eager step's logits to 1e-5,
    before and after eviction starts (and so SinkCache's)."""
    model = make_model(attention, sinks)
    ids = stream_ids(model, 2 * (START + RECENT) + 1)
    compiled = step_logits(model, ids, "compile")
    torch.testing.assert_close(compiled, step_logits(model, ids, "eager"), atol=1e-5, rtol=1e-5)
    assert_same_logits(compiled, eager_logits(model, ids))


@torch.no_grad()
def test_hand_over_from_and_back_to_the_chunked_path():
    """Prompt in a chunk (SinkCache), decode with the step, write back, another chunk: the same
    logits as SinkCache all the way (positions, ring order and fill state survive both hand-overs)."""
    model = make_model("sink_logit", 1)
    ids = stream_ids(model, 30)
    want = eager_logits(model, ids)
    cache = SinkCache(START, RECENT)
    got = [model(ids[:, :4], cache=cache).logits[:, -1]]  # 4 tokens: the ring is not full yet
    static = StaticSinkCache.from_sink_cache(model, cache)
    step = DecodeStep(model, static)
    got += [step(ids[:, t]).clone() for t in range(4, 20)]
    static.write_back(cache)
    assert cache.seen == 20 and len(cache) == START + RECENT
    got.append(model(ids[:, 20:30], cache=cache).logits[:, -1])
    assert_same_logits(got[0], want[:, 3])
    assert_same_logits(torch.stack(got[1:-1], 1), want[:, 4:20])
    assert_same_logits(got[-1], want[:, 29])


@torch.no_grad()
def test_steady_state_step_has_no_host_sync_and_fixed_buffers():
    """A step after eviction started reads no device value on the host, and every buffer it
    touches (keys, values, mask, position, slot, angles, the logits it returns) keeps its address."""
    model = make_model("softmax1", 0)
    assert_steady_state(DecodeStep(model, StaticSinkCache(model, BATCH, START, RECENT)), stream_ids(model, 40), warm=20)


def test_bad_sizes_and_modes_are_refused():
    model = make_model("softmax", 0)
    with pytest.raises(ValueError, match="bounded window"):
        StaticSinkCache(model, 1, 4, None)
    with pytest.raises(ValueError, match="'graph' needs a CUDA device"):
        DecodeStep(model, StaticSinkCache(model, 1, 4, 8), "graph")


@torch.no_grad()
def test_session_decodes_through_the_step_exactly():
    """StreamingSession generates through the decode step (greedy, B=2, past eviction, two turns)
    and yields the same tokens as with the step off (every token through SinkCache)."""
    from inference.session import Sampler, StreamingSession

    model = make_model("softmax1", 1)
    prompt = stream_ids(model, 6)[:, 1:]
    runs = {}
    for decode in ("eager", "none"):
        session = StreamingSession(model, START, RECENT, batch_size=BATCH, decode=decode)
        first = [t.clone() for t in session.generate(prompt, 12, Sampler())]
        assert (session._step is not None) == (decode == "eager")
        second = [t.clone() for t in session.generate(prompt[:, :3], 6, Sampler())]  # the next turn's prompt: a chunk
        runs[decode] = (torch.stack(first + second), session.tokens_seen, session.tokens_kept)
    assert torch.equal(runs["eager"][0], runs["none"][0])
    assert runs["eager"][1:] == runs["none"][1:] == (1 + 5 + 12 + 3 + 5, START + RECENT)
