"""Streaming perplexity: fast == reference, the baselines mean what they say, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inference.perplexity import dense_nll, perplexity, recompute_nll, streaming_nll
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX



@pytest.fixture(scope="module")
def book_text() -> str:
    from data.corpora import stream_test_text

    return stream_test_text()[20_000:26_000]


@pytest.fixture(scope="module")
def text_ids(book_text) -> torch.Tensor:
    """Real text: an excerpt of the bundled stream-test book, GPT-NeoX tokens."""
    from data.tokenizer import load_tokenizer

    return torch.tensor(load_tokenizer()(book_text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def make_model(attention="softmax", sink_tokens=0, layers=3) -> GPTNeoX:
    config = ModelConfig.from_preset(
        "tiny", attention=attention, sink_tokens=sink_tokens, num_layers=layers, init_method="normal", init_std=0.3,
        sink_logit_init=0.5,
    )
    torch.manual_seed(0)
    return GPTNeoX(config).eval()


@pytest.mark.parametrize(
    "attention,sink_tokens,start", [("softmax", 0, 4), ("softmax1", 0, 4), ("sink_logit", 0, 0), ("softmax", 1, 1)]
)
def test_fast_mode_equals_reference_mode(text_ids, attention, sink_tokens, start):
    """The chunked fast mode scores every token exactly as the token-by-token protocol does
    (|delta ppl|/ppl <= 1e-4), with chunks that straddle the eviction point. Guards the banded mask and
    the sink-position rotation of the fast path."""
    model = make_model(attention, sink_tokens)
    ids = text_ids[:150]
    reference = streaming_nll(model, ids, start, 20, mode="reference", progress=False)
    fast = streaming_nll(model, ids, start, 20, mode="fast", chunk_size=37, progress=False)
    assert reference.shape == fast.shape == (149,)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)
    assert abs(perplexity(fast) - perplexity(reference)) / perplexity(reference) <= 1e-4


def test_dense_nll_is_one_full_forward(text_ids):
    """dense_nll (chunked, unbounded cache) equals a single dense forward over sinks + text, scoring
    the same tokens as the streaming runs (the sink prefix fed, never scored)."""
    model = make_model("softmax1", sink_tokens=2)
    ids = text_ids[:200]
    stream = torch.cat([torch.tensor(model.config.sink_token_ids), ids])
    with torch.no_grad():
        logits = model(stream[None]).logits[0]
    expected = F.cross_entropy(logits[2:-1], stream[3:], reduction="none")
    torch.testing.assert_close(dense_nll(model, ids, chunk_size=64), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dense_nll(model, ids, max_len=50), expected[:49], atol=1e-4, rtol=1e-4)


def test_recompute_runs_each_window_from_scratch(text_ids):
    """recompute_nll equals a plain loop that runs a fresh forward on the previous W tokens for every
    target (batching and the short first windows must not change a number)."""
    model = make_model("sink_logit")
    ids, window = text_ids[:60], 16
    expected = []
    with torch.no_grad():
        for i in range(1, ids.numel()):
            context = ids[max(0, i - window) : i]
            expected.append(F.cross_entropy(model(context[None]).logits[0, -1:], ids[i : i + 1]))
    torch.testing.assert_close(recompute_nll(model, ids, window, batch_size=7), torch.stack(expected), atol=1e-4, rtol=1e-4)


def test_recompute_equals_streaming_only_for_one_layer(text_ids):
    """With one layer, a 0+r window cache (which sees r + 1 tokens) equals re-computation over r + 1
    tokens; with more layers the cached deeper states differ (docs/design.md), so recompute is a
    different baseline and never a stand-in for the streaming reference."""
    ids, recent = text_ids[:90], 12
    one = make_model(layers=1)
    torch.testing.assert_close(
        streaming_nll(one, ids, 0, recent, progress=False), recompute_nll(one, ids, recent + 1), atol=1e-4, rtol=1e-4
    )
    three = make_model(layers=3)
    gap = (streaming_nll(three, ids, 0, recent, progress=False) - recompute_nll(three, ids, recent + 1)).abs()
    assert gap[: recent + 1].max() < 1e-4  # identical before anything is evicted
    assert gap[recent + 2 :].max() > 1e-2


def test_bad_api_input_is_a_clear_error(text_ids):
    """Wrong shapes, modes and sizes name the problem instead of failing deep inside torch."""
    model = make_model(layers=1)
    with pytest.raises(ValueError, match="mode"):
        streaming_nll(model, text_ids[:20], 4, 8, mode="turbo")
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        streaming_nll(model, text_ids[:20][None], 4, 8)
    with pytest.raises(ValueError, match="recent_size must be"):
        streaming_nll(model, text_ids[:20], 4, 0)
    with pytest.raises(ValueError, match="no room for text"):
        recompute_nll(make_model(layers=1, sink_tokens=2), text_ids[:20], 2)


# -- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink_checkpoint(tmp_path_factory):
    """A tiny 1-sink-token model saved as an initial checkpoint (read by pretrain.checkpoints.load_model)."""
    from pretrain.checkpoints.init_format import save_init_checkpoint

    model = make_model("softmax1", sink_tokens=1, layers=2)
    folder = tmp_path_factory.mktemp("ckpt") / "sink1"
    save_init_checkpoint(folder, model.config, model.state_dict())
    return folder, model


def test_cli_writes_per_token_nll_and_summary(sink_checkpoint, book_text, text_ids, tmp_path, capsys):
    """``sinklm stream-ppl`` on a text file: the table, per-token NLL files and summary.json agree with
    the Python API, and reference mode reports the same perplexity as fast mode."""
    from sinklm.cli import main

    folder, model = sink_checkpoint
    text = tmp_path / "excerpt.txt"
    text.write_text(book_text, encoding="utf-8")
    out = tmp_path / "out"
    common = [str(folder), "--text", str(text), "--max-tokens", "160", "--start-size", "1", "--recent-size", "23", "--no-progress"]
    assert main(["stream-ppl", *common, "--chunk-size", "50", "--baselines", "dense,window,recompute", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["results"]}
    assert set(rows) == {"stream_1+23", "dense_160", "window_0+24", "recompute_24"}
    for name, row in rows.items():
        nll = np.load(out / f"{name}.nll.npy")
        assert nll.shape == (159,) and math.isclose(row["ppl"], math.exp(nll.astype(np.float64).mean()), rel_tol=1e-9)
        assert name in printed
    api = streaming_nll(model, text_ids[:160], 1, 23, progress=False)
    assert math.isclose(rows["stream_1+23"]["ppl"], perplexity(api), rel_tol=1e-5)

    assert main(["stream-ppl", *common, "--mode", "reference", "--output-dir", str(tmp_path / "ref")]) == 0
    reference = json.loads((tmp_path / "ref" / "summary.json").read_text())["results"][0]
    assert abs(reference["ppl"] - rows["stream_1+23"]["ppl"]) / reference["ppl"] <= 1e-4


@pytest.mark.parametrize(
    "args,message",
    [
        (["{missing}"], "checkpoint not found"),
        (["{ckpt}", "--recent-size", "0"], "--recent-size must be >= 1"),
        (["{ckpt}", "--start-size", "8", "--cache-size", "8"], "--start-size 8 leaves no room"),
        (["{ckpt}", "--text", "{missing}"], "not found"),
        (["{ckpt}", "--baselines", "dense,oracle"], "unknown baseline 'oracle'"),
    ],
    ids=["missing-checkpoint", "recent-0", "start-fills-cache", "missing-text", "bad-baseline"],
)
def test_cli_bad_input(sink_checkpoint, tmp_path, capsys, args, message):
    """Bad options and missing files exit with status 2 and one clear line on stderr, no traceback."""
    from inference.stream_ppl import main

    folder, _ = sink_checkpoint
    argv = [a.format(missing=tmp_path / "nope", ckpt=folder) for a in args]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_warns_when_start_size_drops_sinks(sink_checkpoint, tmp_path, capsys):
    """Streaming a 1-sink-token model with start_size 0 runs but warns that its sink will be evicted."""
    from inference.stream_ppl import main

    folder, _ = sink_checkpoint
    with pytest.warns(UserWarning, match="trained with 1 sink token"):
        assert main([str(folder), "--start-size", "0", "--recent-size", "16", "--max-tokens", "40", "--no-progress"]) == 0
