"""The fixed-shape HF decode step (inference/hf_decode_step.py) against HFSinkCache's per-token path.

Prevents a static step that drifts from the streaming protocol on stock transformers models: a wrong
ring slot when the window wraps (the ring holds r + 1, the window with the new token), sinks not
shifted (or shifted by the wrong amount) once eviction starts, an empty slot left unmasked while the
cache fills, a lost state hand-over between HFSinkCache's prompt path and the step (both ways), a
compiled step that differs from the eager one, and a hot path that syncs with the host or moves its
buffers. The reference is HFSinkCache itself (tested against an independent reference in
test_hf_cache.py); initializer_range 0.1 makes attention peaked enough that never shifting the sinks
moves the logits by ~1, against ~1e-6 of float32 noise.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

from inference.hf_cache import HFSinkCache, cache_kwarg, stream_prefill
from inference.hf_decode_step import HFDecodeStep, HFStaticCache
from inference.session import HFStreamingSession, Sampler
from inference.stream import StreamError
from static_step_checks import assert_steady_state

RECENT, BATCH, VOCAB = 5, 2, 96


def make_model(family: str):
    torch.manual_seed(0)
    if family == "llama":  # grouped-query attention: 4 query heads on 2 key/value heads
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                             initializer_range=0.1)
        return LlamaForCausalLM(config).eval()
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, rotary_pct=0.25, max_position_embeddings=256, initializer_range=0.1)
    return GPTNeoXForCausalLM(config).eval()  # partial rotary: only a quarter of each head is shifted


def stream_ids(length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def sink_cache_logits(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    cache = HFSinkCache(model, start, RECENT)
    key = cache_kwarg(model)
    return torch.stack([model(input_ids=ids[:, t : t + 1], **{key: cache}).logits[:, -1] for t in range(ids.shape[1])], 1)


@torch.no_grad()
def step_logits(model, ids: torch.Tensor, start: int, mode: str = "eager") -> torch.Tensor:
    step = HFDecodeStep(model, HFStaticCache(model, BATCH, start, RECENT), mode)
    return torch.stack([step(ids[:, t]).clone() for t in range(ids.shape[1])], 1)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("start", [0, 4])
def test_static_step_equals_hf_sink_cache_across_eviction(family, start):
    """From the first token, through filling, to well past eviction (3 x the cache), B=2 in lockstep."""
    model = make_model(family)
    ids = stream_ids(3 * (start + RECENT) + 2)
    torch.testing.assert_close(step_logits(model, ids, start), sink_cache_logits(model, ids, start), atol=1e-5, rtol=1e-5)


def test_bf16_step_equals_hf_sink_cache_within_bf16_noise():
    """In bf16 (buffers, mask and re-rotated sinks in the model's dtype) the step stays within bf16 noise
    of HFSinkCache past eviction: a sink shift or mask formed in the wrong dtype would not."""
    model = make_model("llama").to(torch.bfloat16)
    ids = stream_ids(3 * (4 + RECENT) + 2)
    torch.testing.assert_close(step_logits(model, ids, 4).bfloat16(), sink_cache_logits(model, ids, 4))


def test_compiled_step_equals_eager():
    """torch.compile of the whole forward (inductor on this CPU) gives the eager step's and HFSinkCache's
    logits to 1e-5, before and after eviction starts."""
    model = make_model("llama")
    ids = stream_ids(2 * (4 + RECENT) + 1)
    compiled = step_logits(model, ids, 4, "compile")
    torch.testing.assert_close(compiled, step_logits(model, ids, 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled, sink_cache_logits(model, ids, 4), atol=1e-5, rtol=1e-5)


def test_steady_state_step_has_no_host_sync_and_fixed_buffers():
    """A step after eviction started reads no device value on the host (the whole transformers forward
    included), and every buffer it touches (keys, values, stored sinks, mask, position, slots, angles,
    the logits it returns) keeps its address."""
    model = make_model("llama")
    assert_steady_state(HFDecodeStep(model, HFStaticCache(model, BATCH, 4, RECENT)), stream_ids(40), warm=20)


@torch.no_grad()
def test_hand_over_from_and_back_to_hf_sink_cache():
    """Prompt in a chunk (HFSinkCache), decode with the step, write back, another prompt: the same logits
    as HFSinkCache all the way (positions, ring order, stored sinks and fill state survive both ways)."""
    model = make_model("llama")
    ids = stream_ids(30)
    want = sink_cache_logits(model, ids, 2)
    cache = HFSinkCache(model, 2, RECENT)
    got = [stream_prefill(model, ids[:, :4], cache)[:, -1]]  # 4 tokens: the window is not full yet
    static = HFStaticCache.from_hf_sink_cache(model, cache)
    step = HFDecodeStep(model, static)
    got += [step(ids[:, t]).clone() for t in range(4, 20)]
    static.write_back(cache)
    assert cache.get_seq_length() == 20 and cache.layers[0].keys.shape[-2] == 2 + RECENT
    got.append(stream_prefill(model, ids[:, 20:30], cache)[:, -1])
    torch.testing.assert_close(got[0], want[:, 3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(got[1:-1], 1), want[:, 4:20], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[-1], want[:, 29], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_session_decodes_through_the_static_step_exactly():
    """HFStreamingSession generates through the static step (greedy, B=2, past eviction, two turns) and
    yields the same tokens as with the step off (every token through HFSinkCache)."""
    model = make_model("llama")
    prompt = stream_ids(5)
    runs = {}
    for decode in ("auto", "none"):
        session = HFStreamingSession(model, 2, RECENT, batch_size=BATCH, decode=decode)
        first = [t.clone() for t in session.generate(prompt, 12, Sampler())]
        assert (session._step is not None) == (decode == "auto")
        second = [t.clone() for t in session.generate(prompt[:, :3], 6, Sampler())]  # the next turn: a chunk
        runs[decode] = (torch.stack(first + second), session.tokens_seen, session.tokens_kept)
    assert torch.equal(runs["auto"][0], runs["none"][0])
    assert runs["auto"][1:] == runs["none"][1:] == (5 + 12 + 3 + 5, 2 + RECENT)


def test_refuses_block_families_split_models_and_bad_modes():
    """MPT / Falcon run their own attention blocks (no 4-D mask route) and a model split or offloaded by a
    device map has layers on several devices (one buffer cannot serve them): refused by name, and their
    sessions decode through HFSinkCache; graph mode needs CUDA; an unknown decode value is refused."""
    mpt = MptForCausalLM(MptConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))
    with pytest.raises(ValueError, match="'mpt'"):
        HFStaticCache(mpt, 1, 2, 4)
    assert HFStreamingSession(mpt, 2, 4).decode == "none"
    split = make_model("llama")
    split.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    with pytest.raises(ValueError, match="split by a device map"):
        HFStaticCache(split, 1, 2, 4)
    assert HFStreamingSession(split, 2, 4).decode == "none"
    model = make_model("llama")
    assert HFStreamingSession(model, 2, 4).decode == "eager"
    with pytest.raises(ValueError, match="'graph' needs a CUDA device"):
        HFDecodeStep(model, HFStaticCache(model, 1, 2, 4), "graph")
    with pytest.raises(StreamError, match="decode must be"):
        HFStreamingSession(model, 2, 4, decode="fast")
