"""Every paper family streams: tiny random MPT (ALiBi), Falcon (both decoder layouts, multi-query,
ALiBi) and Llama against the independent per-token reference (``hf_reference.py``), across the point
where eviction starts, for start sizes 0, 1 and 4; the chunked path against the per-token one; and
``model.generate`` with the cache against a manual loop."""

from __future__ import annotations

import re

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
)

from hf_reference import ReferenceStream
from inference.backends import HFBackend, as_backend
from inference.hf_cache import HFSinkCache, cache_kwarg, hf_streaming_nll, stream_prefill
from inference.hf_chunked import hf_chunked_nll

RECENT = 6
STREAM = 20  # capacity start + 6 <= 10: eviction starts well inside the stream
VOCAB = 96


def _falcon(**layout) -> FalconForCausalLM:
    return FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **layout))


FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=128)),
    "mpt": lambda: MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)),
    "falcon-new": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2),
    "falcon-new-1ln": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    "falcon-mq-parallel": lambda: _falcon(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    "falcon-sequential": lambda: _falcon(new_decoder_architecture=False, multi_query=False, parallel_attn=False),
    "falcon-alibi": lambda: _falcon(new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True),
}


def _model(name: str):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    for p in model.parameters():  # larger weights than the default init: attention far from uniform
        p.data.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (STREAM,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, ids):
    """(name, model, {start: reference NLL}) with the reference computed once per start size."""
    model = _model(request.param)
    expected = {}
    for start in (0, 1, 4):
        ref = ReferenceStream(model, start, RECENT)
        logits = torch.stack([ref.step(int(t)) for t in ids[:-1]])
        expected[start] = F.cross_entropy(logits, ids[1:], reduction="none")
    return request.param, model, expected


def test_reference_is_the_dense_model_before_eviction(family, ids):
    """Guards the reference itself (head splits, layouts, ALiBi slopes): before any eviction it must
    be the ordinary dense model."""
    _, model, expected = family
    n = RECENT + 1
    with torch.no_grad():
        logits = model(input_ids=ids[None, :n], use_cache=False).logits[0, :-1]
    torch.testing.assert_close(expected[4][: n - 1], F.cross_entropy(logits, ids[1:n], reduction="none"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("start", [0, 1, 4])
def test_per_token_cache_is_the_reference(family, ids, start):
    """HFSinkCache token by token: wrong slot distances after eviction (sink keys left at stale positions,
    an ALiBi bias by stream distance instead of slot distance -- Falcon sizes its bias by get_seq_length(),
    which must count slots there -- evicted sinks) change the NLL or fail on mismatched shapes."""
    _, model, expected = family
    nll = hf_streaming_nll(model, ids, start, RECENT, progress=False)
    torch.testing.assert_close(nll, expected[start], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("start", [0, 1, 4])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_is_the_reference(family, ids, start, chunk):
    """The exact chunked path at any chunk size (one token, chunks that straddle the eviction point,
    one chunk for the whole stream) must be the per-token protocol."""
    _, model, expected = family
    nll = hf_chunked_nll(model, ids, start, RECENT, chunk_size=chunk)
    torch.testing.assert_close(nll, expected[start], atol=1e-4, rtol=1e-4)


def test_backend_streams_chunked_by_default_and_per_token_on_request(family, ids):
    """HFBackend: ``fast`` is the chunked path, ``reference`` the per-token cache (Falcon-ALiBi: its
    one-token chunks); both the protocol's numbers."""
    name, model, expected = family
    backend = as_backend(name, model)
    assert isinstance(backend, HFBackend)
    assert backend.stream_mode("fast") == "hf-chunked" and backend.stream_mode("reference") == "hf-per-token"
    for mode in ("fast", "reference"):
        torch.testing.assert_close(backend.streaming_nll(ids, 4, RECENT, mode, chunk_size=5), expected[4], atol=1e-4, rtol=1e-4)


def test_generate_with_the_cache_is_a_manual_loop(family, ids):
    """model.generate(..., past_key_values=HFSinkCache) far past the eviction point must produce the
    greedy continuation of a manual loop model(token, cache=...) (generate counts positions itself;
    Falcon-ALiBi sizes its bias by the cache's slots)."""
    _, model, _ = family
    prompt, new_tokens = ids[:5], 16
    cache, key = HFSinkCache(model, 2, RECENT), cache_kwarg(model)
    expected = []
    with torch.no_grad():
        logits = model(input_ids=prompt[None], **{key: cache}).logits[0, -1]
        for _ in range(new_tokens):
            expected.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[expected[-1]]]), **{key: cache}).logits[0, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(prompt[None], past_key_values=HFSinkCache(model, 2, RECENT), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)  # MPT: off by default
    assert out[0, len(prompt):].tolist() == expected


def test_generate_continues_a_prefilled_cache(family, ids):
    """The documented way to generate after a long prompt (stream_prefill past the eviction point, then
    generate from the last id with the whole stream's mask) must continue exactly as a manual loop: for
    Falcon-ALiBi, get_seq_length() counts slots, so generate given the whole ids would re-feed tokens."""
    _, model, _ = family
    prompt, new_tokens = ids[None, :14], 8
    cache, key = HFSinkCache(model, 2, RECENT), cache_kwarg(model)
    logits, expected = stream_prefill(model, prompt, cache)[0, -1], []
    with torch.no_grad():
        for _ in range(new_tokens):
            expected.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[expected[-1]]]), **{key: cache}).logits[0, -1]
    cache = HFSinkCache(model, 2, RECENT)
    stream_prefill(model, prompt[:, :-1], cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(prompt[:, -1:], attention_mask=torch.ones_like(prompt), past_key_values=cache,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
    assert out[0, 1:].tolist() == expected and cache.tokens_seen == 14 + new_tokens - 1


def test_unsupported_family_is_refused_by_name():
    """No silent dense run: a family the cache cannot stream names itself and the supported ones."""
    model = GPTJForCausalLM(GPTJConfig(vocab_size=32, n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=64))
    for run in (lambda: HFSinkCache(model, 1, 4), lambda: hf_chunked_nll(model, torch.arange(8), 1, 4)):
        with pytest.raises(ValueError, match=r"'gptj'.*|.*mpt, falcon.*"):
            run()


# -- the command-line tools on Hugging Face folders of the new families ---------------------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Saved tiny MPT, Falcon (new layout) and Falcon-ALiBi folders with the bundled tokenizer (its full vocabulary)."""
    from data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    vocab = len(tokenizer)
    made = {}
    for name, model in {
        "mpt": MptForCausalLM(MptConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_seq_len=128)),
        "falcon": FalconForCausalLM(FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_kv_heads=2, new_decoder_architecture=True)),
        "falcon-alibi": FalconForCausalLM(FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       alibi=True, new_decoder_architecture=False)),
    }.items():
        folder = tmp_path_factory.mktemp("hf") / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        made[name] = folder
    return made


@pytest.mark.parametrize("name", ["mpt", "falcon"])
def test_stream_ppl_cli_is_chunked_by_default_and_equals_per_token(hf_folders, tmp_path, name):
    """`sinklm stream-ppl FOLDER`: MPT / Falcon folders load as Hugging Face models (not refused, not
    converted), stream chunked by default and token by token with --mode reference, same perplexity."""
    import json

    from inference.stream_ppl import main

    ppl = {}
    for mode in ("fast", "reference"):
        out = tmp_path / mode
        args = [str(hf_folders[name]), "--cache-size", "12", "--max-tokens", "60", "--mode", mode, "--chunk-size", "16",
                "--no-progress", "--output-dir", str(out)]
        assert main(args) == 0
        row = json.loads((out / "summary.json").read_text())["results"][0]
        assert row["mode"] == {"fast": "hf-chunked", "reference": "hf-per-token"}[mode] and row["tokens_scored"] == 59
        ppl[mode] = row["ppl"]
    assert abs(ppl["fast"] - ppl["reference"]) / ppl["reference"] <= 1e-5


def test_device_map_loads_through_accelerate_with_the_same_numbers(hf_folders):
    """--device-map auto: accelerate's big-model loading (here all on the one CPU device) must stream
    the same numbers as an ordinary load; our own GPT-NeoX is told to use --device instead."""
    from inference.backends import load_backend

    plain = load_backend(hf_folders["falcon"])
    mapped = load_backend(hf_folders["falcon"], device_map="auto")
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    ids = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mapped.streaming_nll(ids, 2, 8), plain.streaming_nll(ids, 2, 8))
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from data.tokenizer import load_tokenizer

    neox = hf_folders["mpt"].parent / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(load_tokenizer()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)).save_pretrained(neox)
    load_tokenizer().save_pretrained(neox)
    with pytest.raises(ValueError, match="--device"):
        load_backend(neox, device_map="auto")


@pytest.mark.parametrize("name", ["mpt", "falcon-alibi"])
@pytest.mark.parametrize("tool", ["generate", "chat"])
def test_generate_and_chat_stream_alibi_families(hf_folders, name, tool, monkeypatch, capsys):
    """generate / chat on an MPT or Falcon-ALiBi folder run past the cache size through the HF sink cache
    (Falcon-ALiBi failed there once the cache evicted: its bias sized by the tokens seen, not the slots)."""
    import io

    if tool == "generate":
        from inference.generate import main

        args = [str(hf_folders[name]), "--prompt", "Call me Ishmael.", "--max-new-tokens", "30", "--cache-size", "12",
                "--ignore-eos"]
    else:
        from inference.chat import main

        monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nTell me more\n"))
        args = [str(hf_folders[name]), "--cache-size", "12", "--max-new-tokens", "20"]
    assert main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cache 12/4+8]" in err
    # the tokens fed, not the slots kept (Falcon-ALiBi counts positions by slot: it said "12")
    assert int(re.search(r"stream length (\d+)", err).group(1)) > 20


def test_unsupported_hf_folder_is_refused_with_the_supported_list(tmp_path, capsys):
    """A Hugging Face folder of a family that cannot stream: exit 2 and one line naming the supported
    model types, before any weights load (never a dense run or a traceback)."""
    from data.tokenizer import load_tokenizer
    from inference.stream_ppl import main

    folder = tmp_path / "gptj"
    GPTJForCausalLM(GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=64)).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    assert main([str(folder), "--cache-size", "12", "--max-tokens", "30"]) == 2
    err = capsys.readouterr().err
    assert "'gptj'" in err and "mpt" in err and "falcon" in err and "Traceback" not in err
