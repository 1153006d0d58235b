"""Streaming generation and chat: one bounded cache for an unbounded stream, across turns."""

from __future__ import annotations

import io
import json

import pytest
import torch

from inference.cache import SinkCache
from inference.chat import chat, read_turns
from inference.generate import TextStreamer
from inference.session import Sampler, StreamingSession
from inference.stream import StreamError
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX



@pytest.fixture(scope="module")
def tokenizer():
    from data.tokenizer import load_tokenizer

    return load_tokenizer(num_sink_tokens=1)


def make_model(sink_tokens=0, attention="softmax") -> GPTNeoX:
    config = ModelConfig.from_preset("tiny", sink_tokens=sink_tokens, attention=attention, init_method="normal", init_std=0.3)
    torch.manual_seed(0)
    return GPTNeoX(config).eval()


@torch.no_grad()
def greedy_token_by_token(model, prompt, steps, start, recent):
    """Plain loop: every token (sinks, prompt, generated) fed alone through a fresh SinkCache."""
    cache = SinkCache(start, recent)
    ids = list(model.config.sink_token_ids) + prompt.tolist()
    out = []
    for t in range(len(ids) + steps - 1):
        logits = model(torch.tensor([[ids[t]]]), cache=cache).logits[0, -1]
        if t >= len(ids) - 1:
            logits[model.config.vocab_size :] = float("-inf")
            ids.append(int(logits.argmax()))
            out.append(ids[-1])
    return out


def test_generation_runs_past_the_cache_exactly_and_bounded(tokenizer):
    """Greedy generation for 4x the cache size equals the token-by-token loop (chunked prompt feeding
    changes nothing), and the cache stays at start + recent the whole way."""
    model = make_model(sink_tokens=1, attention="softmax1")
    prompt = torch.tensor(tokenizer("It was the best of times, it was the worst of times,", add_special_tokens=False)["input_ids"])
    start, recent, steps = 1, 15, 64
    session = StreamingSession(model, start, recent, chunk_size=5)
    got = [int(t[0]) for t in session.generate(prompt, steps, Sampler())]
    assert got == greedy_token_by_token(model, prompt, steps, start, recent)
    assert len(session.cache) == start + recent
    assert session.tokens_seen == 1 + prompt.numel() + steps - 1  # the last token waits to be fed
    cfg = model.config
    assert session.cache.nbytes() == cfg.num_layers * (2 * cfg.num_heads * (start + recent) * cfg.head_dim * 4 + recent * 8)


def test_sampling_never_emits_sink_or_padding_ids():
    """Sink ids and vocabulary padding are not text: even a head that prefers them never emits them;
    top_k=1 is greedy; a seed makes sampling reproducible."""
    model = make_model(sink_tokens=1)
    sink = model.config.sink_token_ids[0]
    with torch.no_grad():
        model.lm_head.weight[sink] = model.ln_f.weight.detach().sign() * 50  # the sink row wins every argmax
        model.lm_head.weight[-1] = model.ln_f.weight.detach().sign() * 40  # so would a padding row
    prompt = torch.tensor([510, 3158, 8516])
    for sampler in (Sampler(), Sampler(temperature=1.0, seed=3), Sampler(temperature=0.7, top_p=0.5, seed=1)):
        tokens = [int(t[0]) for t in StreamingSession(model, 1, 8).generate(prompt, 20, sampler)]
        assert all(t < model.config.vocab_size for t in tokens)
    greedy = [int(t[0]) for t in StreamingSession(model, 1, 8).generate(prompt, 10, Sampler())]
    top1 = [int(t[0]) for t in StreamingSession(model, 1, 8).generate(prompt, 10, Sampler(temperature=2.0, top_k=1))]
    assert greedy == top1
    first = [int(t[0]) for t in StreamingSession(model, 1, 8).generate(prompt, 10, Sampler(temperature=1.0, seed=5))]
    again = [int(t[0]) for t in StreamingSession(model, 1, 8).generate(prompt, 10, Sampler(temperature=1.0, seed=5))]
    assert first == again
    with pytest.raises(StreamError, match="top_p"):
        Sampler(top_p=0.0)


def test_chat_keeps_one_stream_across_turns(tokenizer):
    """Each turn continues the same stream: the second reply equals what one session produces after
    being fed turn 1, reply 1 and turn 2 as plain text; replies are printed as they are generated."""
    model = make_model(sink_tokens=1)
    turns = ["Hello, who are you?", "Tell me about whales."]
    printed = io.StringIO()
    session = StreamingSession(model, 1, 31)
    replies = chat(session, tokenizer, turns, Sampler(), max_new_tokens=12, out=printed, stop_at_eos=False)
    assert len(replies) == 2 and all(replies)
    text = printed.getvalue()
    assert "USER: Hello, who are you?" in text and "USER: Tell me about whales." in text
    assert replies[0] in text and replies[1] in text

    # the same conversation as one stream, built by hand
    manual = StreamingSession(model, 1, 31)
    first = tokenizer("USER: Hello, who are you?\n\nASSISTANT: ", add_special_tokens=False)["input_ids"]
    reply1 = [int(t[0]) for t in manual.generate(torch.tensor(first), 12, Sampler())]
    second = tokenizer("\n\nUSER: Tell me about whales.\n\nASSISTANT: ", add_special_tokens=False)["input_ids"]
    reply2 = [int(t[0]) for t in manual.generate(torch.tensor(second), 12, Sampler())]
    assert tokenizer.decode(reply1) == replies[0]
    assert tokenizer.decode(reply2) == replies[1]
    assert session.tokens_seen == manual.tokens_seen > 32  # the cache evicted along the way


def test_text_streamer_reassembles_multibyte_text(tokenizer):
    """Printing token by token gives exactly the decoded text, even where one character spans
    several byte-level tokens (no replacement characters leak out)."""
    text = "Naïve café — ☃ snow, 東京 and emoji 🐋 whales.\nNext line."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    streamer = TextStreamer(tokenizer)
    pieces = [streamer.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_read_turns_formats_and_errors(tmp_path):
    """MT-Bench question lines, one-turn objects and JSON strings are read in order; a bad line or a
    missing file is named."""
    path = tmp_path / "turns.jsonl"
    lines = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}, {"content": "Hi"}, "Bye"]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_turns(path) == ["Write a poem.", "Now shorter.", "Hi", "Bye"]
    path.write_text('{"turns": ["ok"]}\n{"speaker": "x"}\n')
    with pytest.raises(StreamError, match=r"turns.jsonl:2: expected a 'turns' list"):
        read_turns(path)
    with pytest.raises(StreamError, match="turns file not found"):
        read_turns(tmp_path / "none.jsonl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pretrain.checkpoints.init_format import save_init_checkpoint

    model = make_model(sink_tokens=1)
    folder = tmp_path_factory.mktemp("gen") / "tiny-sink1"
    save_init_checkpoint(folder, model.config, model.state_dict())
    return folder


def test_generate_and_chat_cli(checkpoint, tmp_path, capsys, monkeypatch):
    """``sinklm generate`` and ``sinklm chat`` (JSONL turns, and stdin) stream text past the cache
    size and report the bounded cache; bad input exits 2 with a clear message."""
    from sinklm.cli import main

    cache = ["--start-size", "1", "--recent-size", "15"]
    assert main(["generate", str(checkpoint), "--prompt", "Call me Ishmael.", "--max-new-tokens", "40", "--ignore-eos", *cache]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "40 tokens" in captured.err and "cache 16/1+15" in captured.err

    turns = tmp_path / "turns.jsonl"
    turns.write_text(json.dumps({"turns": ["Hello.", "And then?"]}) + "\n")
    assert main(["chat", str(checkpoint), "--turns", str(turns), "--max-new-tokens", "10", "--ignore-eos", *cache]) == 0
    out = capsys.readouterr().out
    assert out.count("USER: ") == 2 and out.count("ASSISTANT: ") == 2

    monkeypatch.setattr("sys.stdin", io.StringIO("first line\n\nsecond line\n"))
    assert main(["chat", str(checkpoint), "--max-new-tokens", "5", *cache]) == 0
    assert capsys.readouterr().out.count("USER: ") == 2

    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt-file", str(tmp_path / "none.txt")]) == 2
    assert "prompt file not found" in capsys.readouterr().err
    assert main(["chat", str(checkpoint), "--turns", str(tmp_path / "none.jsonl")]) == 2
    assert "turns file not found" in capsys.readouterr().err
    assert main(["generate", str(checkpoint), "--prompt", "x", "--recent-size", "0"]) == 2
    assert "--recent-size must be >= 1" in capsys.readouterr().err
