"""The back-end protocol, once, over both back-ends: our GPT-NeoX and a stock transformers GPT-NeoX
holding the same weights must give the same numbers through every method the tools use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference.backends import HFBackend, SinkLMBackend, as_backend, load_backend
from inference.session import Sampler
from inference.stream import TextSettings
from pretrain.config import ModelConfig
from pretrain.hf_keymap import load_into_hf_model, to_hf_config, to_hf_state_dict
from pretrain.model import GPTNeoX

START, RECENT = 2, 10  # capacity 12: the 40-token stream evicts for most of its length
STREAM = 40


def _ours() -> GPTNeoX:
    config = ModelConfig.from_preset("tiny", num_layers=2, init_method="normal", init_std=0.3)
    torch.manual_seed(0)
    return GPTNeoX(config).eval()


def _stock_hf(model: GPTNeoX):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    fields = {k: v for k, v in to_hf_config(model.config).items() if k not in ("architectures", "model_type")}
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**fields)).eval()
    load_into_hf_model(hf, to_hf_state_dict(model.state_dict()))
    return hf


@pytest.fixture(scope="module")
def ours() -> GPTNeoX:
    return _ours()


@pytest.fixture(scope="module", params=["sinklm", "hf"])
def backend(request, ours):
    obj = ours if request.param == "sinklm" else _stock_hf(ours)
    made = as_backend(request.param, obj)
    assert made.kind == request.param
    return made


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 200, (STREAM,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense_reference(ours, ids) -> torch.Tensor:
    """NLL of tokens 1..N-1 from one dense forward of our model (no cache)."""
    with torch.no_grad():
        logits = ours(ids[None]).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[1:], reduction="none")


def test_streaming_nll_is_the_same_on_both_backends(backend, ours, ids):
    """Same weights, same stream, same cache: the chunked fast path of ours and the per-token HF
    cache route must agree (and the protocol's shape and dtype contract holds)."""
    nll = backend.streaming_nll(ids, START, RECENT, mode="fast", chunk_size=7)
    assert nll.shape == (STREAM - 1,) and nll.dtype == torch.float32 and nll.device.type == "cpu"
    expected = SinkLMBackend("ref", ours).streaming_nll(ids, START, RECENT, mode="reference")
    torch.testing.assert_close(nll, expected, atol=1e-4, rtol=1e-4)


def test_dense_nll_is_one_full_forward(backend, ids, dense_reference):
    torch.testing.assert_close(backend.dense_nll(ids, STREAM), dense_reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(backend.dense_nll(ids, 15), dense_reference[:14], atol=1e-4, rtol=1e-4)


def test_recompute_nll_runs_each_window_from_scratch(backend, ours, ids, dense_reference):
    window = 8
    nll = backend.recompute_nll(ids, window, batch_size=5)
    assert nll.shape == (STREAM - 1,)
    torch.testing.assert_close(nll[:window], dense_reference[:window], atol=1e-4, rtol=1e-4)
    i = 30  # token 30 from tokens 22..29 at positions 0..7
    with torch.no_grad():
        logits = ours(ids[None, i - window : i]).logits[0, -1]
    assert nll[i - 1].item() == pytest.approx(F.cross_entropy(logits, ids[i]).item(), abs=1e-4)


def test_generation_session_is_the_same_on_both_backends(backend, ours, ids):
    """Greedy generation past the eviction point: both sessions produce the same tokens."""
    def run(b):
        session = b.new_session(START, RECENT)
        tokens = [int(t[0]) for t in session.generate(ids[:8], 20, Sampler())]
        return tokens, session.tokens_seen, session.tokens_kept

    tokens, seen, kept = run(backend)
    assert (tokens, seen, kept) == run(SinkLMBackend("ref", ours))
    assert seen == 8 + 19 and kept == START + RECENT


def test_tokenize_stream_and_description(backend):
    from data.tokenizer import load_tokenizer

    backend.tokenizer = load_tokenizer()
    ids, name = backend.tokenize_stream(TextSettings(max_tokens=50))
    assert ids.shape == (50,) and name.startswith("bundled:")
    assert backend.sink_ids == [] and backend.description


def test_load_backend_picks_the_route(tmp_path, ours):
    """A stock GPT-NeoX folder becomes our model (exact chunked path); a Llama folder stays HF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from data.tokenizer import load_tokenizer

    neox = tmp_path / "neox"
    _stock_hf(ours).save_pretrained(neox)
    load_tokenizer().save_pretrained(neox)
    loaded = load_backend(neox, "neox", dtype="fp32")
    assert isinstance(loaded, SinkLMBackend) and loaded.name == "neox" and loaded.source == str(neox)
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).save_pretrained(llama)
    load_tokenizer().save_pretrained(llama)
    assert isinstance(load_backend(llama, dtype="bfloat16"), HFBackend)
    with pytest.raises(ValueError, match="not found"):
        load_backend(tmp_path / "missing")
