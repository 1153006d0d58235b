"""The transformers HFSinkCache against a plain per-token reference of the streaming protocol.

The reference (``hf_reference.py`` beside this file) is written from the HF modules' weights,
independent of the cache: it keeps *un-rotated* keys, trims them to the first S and last R tokens
after every step, and re-rotates them with positions 0..len-1 each step (query at the last slot) --
docs/design.md's semantics verbatim. MPT and Falcon: ``test_hf_families.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from inference.backends import as_backend
from hf_reference import ReferenceStream
from inference.hf_cache import HFSinkCache, cache_kwarg, hf_dense_nll, hf_streaming_nll, stream_prefill

START, RECENT = 2, 10  # capacity 12: tokens 13.. are fed after the first eviction
STREAM = 40



def _tiny_neox() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.25, max_position_embeddings=256, use_parallel_residual=True,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, rope_theta=10000.0,
    )
    return LlamaForCausalLM(cfg).eval()


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, rope_theta=10000.0,
    )
    return Qwen2ForCausalLM(cfg).eval()


def _stream_tokens() -> torch.Tensor:
    return torch.randint(0, 96, (STREAM,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["gpt_neox", "llama", "qwen2"])
def model_and_reference_logits(request):
    model = {"gpt_neox": _tiny_neox, "llama": _tiny_llama, "qwen2": _tiny_qwen2}[request.param]()
    ref = ReferenceStream(model, START, RECENT)
    ids = _stream_tokens()
    logits = torch.stack([ref.step(int(t)) for t in ids])  # (N, V)
    return model, ids, logits


def test_reference_matches_dense_model_before_eviction(model_and_reference_logits):
    """Guards the reference itself: before any eviction it must be the ordinary dense model."""
    model, ids, ref_logits = model_and_reference_logits
    n = START + RECENT + 1
    with torch.no_grad():
        dense = model(input_ids=ids[None, :n], use_cache=False).logits[0]
    torch.testing.assert_close(ref_logits[:n], dense, atol=1e-5, rtol=1e-4)


def test_per_token_loop_matches_reference_across_eviction(model_and_reference_logits):
    """Manual loop model(ids, cache=HFSinkCache): wrong sink positions or window after eviction
    (e.g. keys left at stale positions, sinks evicted, off-by-one capacity) change the logits."""
    model, ids, ref_logits = model_and_reference_logits
    cache = HFSinkCache(model, START, RECENT)
    key = cache_kwarg(model)
    with torch.no_grad():
        logits = torch.stack([model(input_ids=ids[None, t : t + 1], **{key: cache}).logits[0, 0] for t in range(STREAM)])
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == STREAM
    assert cache.layers[0].keys.shape[-2] == START + RECENT


def test_stream_prefill_and_nll_match_reference(model_and_reference_logits):
    """The exact prefill (one chunk up to the cache size, then single tokens) and hf_streaming_nll
    must be the per-token protocol, not a dense pass over the prompt."""
    model, ids, ref_logits = model_and_reference_logits
    cache = HFSinkCache(model, START, RECENT)
    logits = stream_prefill(model, ids[None], cache)[0]
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    nll = hf_streaming_nll(model, ids, START, RECENT, progress=False)
    expected = torch.nn.functional.cross_entropy(ref_logits[:-1], ids[1:], reduction="none")
    torch.testing.assert_close(nll, expected, atol=1e-4, rtol=1e-4)


def test_generate_with_sink_cache_is_greedy_reference(model_and_reference_logits):
    """model.generate(..., past_key_values=HFSinkCache) past the eviction point must produce the
    reference's greedy continuation (generate counts positions itself; the cache must agree)."""
    model, ids, _ = model_and_reference_logits
    prompt = ids[:8]
    new_tokens = 24  # 8 + 24 = 32 > capacity 12: many evictions while generating
    ref = ReferenceStream(model, START, RECENT)
    for t in prompt[:-1]:
        ref.step(int(t))
    expected, token = [], int(prompt[-1])
    for _ in range(new_tokens):
        token = int(ref.step(token).argmax())
        expected.append(token)
    cache = HFSinkCache(model, START, RECENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values -> cache rename notice
        out = model.generate(
            prompt[None], past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
            min_new_tokens=new_tokens, pad_token_id=0,
        )
    assert out[0, len(prompt) :].tolist() == expected


def test_hf_recompute_baseline():
    """Sliding window with re-computation: inside the first window it is the dense model; beyond it
    each token sees exactly the previous W tokens at positions 0..W-1 (checked against one fresh pass)."""
    model, ids = _tiny_llama(), _stream_tokens()
    window = 8
    recompute = as_backend("llama", model).recompute_nll
    nll = recompute(ids, window, batch_size=5)
    torch.testing.assert_close(nll[:window], hf_dense_nll(model, ids)[:window])
    i = 30  # target token 30 from tokens 22..29
    with torch.no_grad():
        logits = model(input_ids=ids[None, i - window : i]).logits[0, -1]
    assert nll[i - 1].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, ids[i]).item(), abs=1e-5)
    short = recompute(ids[:6], window)  # text shorter than one window
    torch.testing.assert_close(short, hf_dense_nll(model, ids[:6]))


def test_overlong_chunk_warns():
    """A single forward longer than the cache cannot follow the per-token protocol; the user must be told."""
    model = _tiny_neox()
    cache = HFSinkCache(model, START, RECENT)
    with pytest.warns(UserWarning, match="stream_prefill"):
        with torch.no_grad():
            model(input_ids=_stream_tokens()[None, :20], **{cache_kwarg(model): cache})


def test_rejects_unsupported_models():
    """Interleaved-RoPE families would be silently wrong under a rotate-half key shift."""
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(vocab_size=32, n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=64))
    with pytest.raises(ValueError, match="gptj"):
        HFSinkCache(model, 1, 4)
