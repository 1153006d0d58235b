"""``sinklm compare`` end to end on two tiny models trained briefly on real bundled text.

The models are byte-level (a 257-token tokenizer: <|endoftext|> + the 256 bytes) so a few hundred CPU
steps fit the test budget; everything else -- export, loading, tokenizing, streaming -- is the real path.
"""

from __future__ import annotations

import csv
import json
import time
import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from data.corpora import bundled_books, stream_test_text
from inference import compare
from inference.perplexity import perplexity, streaming_nll
from inference.plots import moving_average
from inference.backends import load_backend
from inference.stream import TextSettings, read_stream_tokens
from pretrain.config import ModelConfig
from pretrain.checkpoints import Checkpoint, export_hf, load_model
from pretrain.model import GPTNeoX, lm_loss

CACHE = 48
MAX_TOKENS = 700
STEPS, BATCH, SEQ = 200, 8, 64


def _byte_tokenizer(path) -> str:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return str(path)


def _train(cfg: ModelConfig, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A plain AdamW loop on random windows; sink-token samples are k sink ids + text (docs/design.md)."""
    torch.manual_seed(0)
    model = GPTNeoX(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    k, sinks = cfg.sink_tokens, torch.tensor(cfg.sink_token_ids, dtype=torch.long)
    text = SEQ - k
    for _ in range(STEPS):
        starts = torch.randint(0, ids.numel() - text - 1, (BATCH,), generator=gen)
        rows = torch.stack([ids[s : s + text + 1] for s in starts.tolist()])  # (B, text + 1)
        inputs = torch.cat([sinks.expand(BATCH, k), rows[:, :-1]], dim=1)
        # labels[t] = input t + 1; targets that are sink ids are ignored (-100)
        labels = torch.cat([torch.full((BATCH, k - 1), -100), rows], dim=1) if k else rows[:, 1:]
        loss = lm_loss(model(inputs).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k_: v.detach() for k_, v in model.state_dict().items()}



@pytest.fixture(scope="module")
def exported_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tok_path = _byte_tokenizer(root / "bytes.json")
    tok = Tokenizer.from_file(tok_path)
    text = bundled_books("train")[0][1][:120_000]
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    began = time.perf_counter()
    folders = {}
    for name, k in (("vanilla", 0), ("sink", 1)):
        cfg = ModelConfig.from_dict({**ModelConfig.from_preset("tiny").to_dict(), "name": name, "vocab_size": 257, "sink_tokens": k})
        state = _train(cfg, ids)
        ckpt = Checkpoint(config=cfg, state=state, format="init", source="test", tokenizer_spec=tok_path)
        folders[name] = export_hf(ckpt, root / name)
    print(f"trained + exported 2 models in {time.perf_counter() - began:.1f}s")
    return root, folders


@pytest.fixture(scope="module")
def compare_run(exported_models):
    root, folders = exported_models
    out = root / "out"
    # the stream: the start of the bundled stream-test book (held out from training)
    (root / "moby.txt").write_text(stream_test_text()[:4000])
    argv = [
        f"vanilla={folders['vanilla']}", "--model", f"sink={folders['sink']}", "--output-dir", str(out),
        "--cache-size", str(CACHE), "--start-sizes", "0,1,2,4", "--max-tokens", str(MAX_TOKENS),
        "--dense-max-tokens", "200", "--recompute-max-tokens", "160", "--sink-inputs", "16", "--map-inputs", "16",
        "--text", str(root / "moby.txt"), "--no-progress",
    ]
    assert compare.main(argv) == 0
    return out, folders


def test_result_reads_back_from_its_files(compare_run):
    """CompareResult.load gives what the run wrote: the table, columns, sinks and per-token NLL."""
    out, _ = compare_run
    result = compare.CompareResult.load(out)
    rows = {r["model"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert list(result.table) == ["vanilla", "sink"]
    assert [c.label for c in result.columns] == ["0+48", "1+47", "2+46", "4+44", "dense", "recompute"]
    assert result.to_csv() == (out / "table.csv").read_text()
    assert float(rows["sink"]["1+47"]) == result.table["sink"]["1+47"]
    assert result.sinks["sink"].sink_tokens == 1 and result.settings["cache_size"] == CACHE
    assert result.nll["sink"]["1+47"].shape == (MAX_TOKENS - 1,)
    assert result.files["index.md"] == str(out / "index.md")


def test_compare_writes_every_file(compare_run):
    """The command must produce the whole report: a missing plot or table breaks the issue-9 report."""
    out, _ = compare_run
    for rel in ("table.md", "table.csv", "ppl_curves.png", "attention_vanilla.png", "attention_sink.png",
                "sinks.json", "sinks.csv", "nll/vanilla.npz", "nll/sink.npz", "summary.json", "index.md"):
        path = out / rel
        assert path.is_file() and path.stat().st_size > 0, rel
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (out / "index.md").read_text()
    for link in ("table.csv", "ppl_curves.png", "attention_vanilla.png", "attention_sink.png", "sinks.json"):
        assert link in index
    rows = list(csv.reader((out / "table.csv").open()))
    assert rows[0] == ["model", "0+48", "1+47", "2+46", "4+44", "dense", "recompute"]
    assert [r[0] for r in rows[1:]] == ["vanilla", "sink"]
    sinks = json.loads((out / "sinks.json").read_text())
    assert set(sinks) == {"vanilla", "sink"} and sinks["sink"]["sink_tokens"] == 1
    assert 0.0 <= sinks["vanilla"]["sink_rate"] <= 1.0 and len(sinks["vanilla"]["per_layer"]) == 2
    npz = np.load(out / "nll" / "sink.npz")
    assert npz["1+47"].shape == (MAX_TOKENS - 1,) and npz["recompute"].shape == (159,) and npz["dense"].shape == (199,)


def test_table_cells_equal_stream_ppl(compare_run, tmp_path):
    """Each cell must be the perplexity stream-ppl reports for that model and cache (no different
    tokenization, scoring offset or cache semantics hiding in compare)."""
    from inference import stream_ppl

    out, folders = compare_run
    table = {r["model"]: r for r in csv.DictReader((out / "table.csv").open())}
    for name in ("vanilla", "sink"):
        loaded = load_model(folders[name])
        text_args = TextSettings(text=str(out.parent / "moby.txt"), max_tokens=MAX_TOKENS)
        ids, _ = read_stream_tokens(text_args, loaded.tokenizer)
        for start in (0, 1, 2, 4):
            label = f"{start}+{CACHE - start}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # start sizes other than the model's sink count warn
                expected = perplexity(streaming_nll(loaded.model, ids, start, CACHE - start, progress=False))
            assert float(table[name][label]) == pytest.approx(expected, rel=1e-9), (name, label)
        # and literally what the stream-ppl command writes (1+47: the sink model's own sink token)
        summary_dir = tmp_path / name
        argv = [str(folders[name]), "--start-size", "1", "--cache-size", str(CACHE), "--max-tokens",
                str(MAX_TOKENS), "--text", text_args.text, "--output-dir", str(summary_dir), "--no-progress"]
        assert stream_ppl.main(argv) == 0
        reported = json.loads((summary_dir / "summary.json").read_text())["results"][0]["ppl"]
        assert float(table[name][f"1+{CACHE - 1}"]) == pytest.approx(reported, rel=1e-9)


def test_python_api_returns_the_table(exported_models):
    """run_compare is the notebook / report API: same numbers as the CLI, no files needed."""
    _, folders = exported_models
    entry = load_backend(folders["sink"], "sink")
    ids = torch.tensor(entry.tokenizer("Call me Ishmael. " * 40, add_special_tokens=False)["input_ids"])
    # recompute over fewer tokens than one window: every target is scored from the plain prefix
    settings = compare.CompareSettings(cache_size=32, start_sizes=[0, 1], baselines=["dense", "recompute"],
                                       recompute_max_tokens=20, sink_inputs=4, map_inputs=4, progress=False)
    result = compare.run_compare({"sink": entry}, settings, ids=ids)
    expected = perplexity(streaming_nll(entry.model, ids, 1, 31, progress=False))
    assert result.table["sink"]["1+31"] == pytest.approx(expected, rel=1e-9)
    assert list(result.table["sink"]) == ["0+32", "1+31", "dense", "recompute"]
    assert result.tokens["sink"]["recompute"] == 19
    torch.testing.assert_close(result.nll["sink"]["recompute"], result.nll["sink"]["dense"][:19])
    assert "| sink |" in result.to_markdown()
    assert result.maps["sink"].shape == (2, 16, 16)


def test_llama_family_hf_folder_streams_through_hf_cache(exported_models, tmp_path):
    """A Llama-family HF folder cannot go through load_model (GPT-NeoX only): compare must take the
    hf_cache route, and its cells must equal hf_streaming_nll's perplexity for the same ids."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from inference.hf_cache import hf_streaming_nll

    root, _ = exported_models
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, bos_token_id=0, eos_token_id=0))
    folder = tmp_path / "llama"
    llama.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(root / "bytes.json"), eos_token="<|endoftext|>").save_pretrained(folder)
    (tmp_path / "text.txt").write_text(stream_test_text()[:2000])
    out = tmp_path / "out"
    argv = [f"llama={folder}", "-o", str(out), "--cache-size", "16", "--start-sizes", "0,4", "--max-tokens", "120",
            "--baselines", "dense,recompute", "--recompute-max-tokens", "40", "--sink-inputs", "2", "--map-inputs", "2",
            "--text", str(tmp_path / "text.txt"), "--no-progress"]
    assert compare.main(argv) == 0
    row = next(csv.DictReader((out / "table.csv").open()))
    entry = load_backend(folder, "llama")
    assert entry.kind == "hf"
    ids = torch.tensor(entry.tokenizer(stream_test_text()[:2000], add_special_tokens=False)["input_ids"][:120])
    expected = perplexity(hf_streaming_nll(entry.model, ids, 4, 12, progress=False))
    assert float(row["4+12"]) == pytest.approx(expected, rel=1e-6)
    assert (out / "attention_llama.png").is_file()

    # `sinklm stream-ppl` takes the same route and reports the same number
    from inference.stream_ppl import main as stream_ppl_main

    ppl_dir = tmp_path / "ppl"
    assert stream_ppl_main([str(folder), "--start-size", "4", "--recent-size", "12", "--max-tokens", "120",
                            "--text", str(tmp_path / "text.txt"), "--baselines", "window",
                            "--output-dir", str(ppl_dir), "--no-progress"]) == 0
    results = {r["method"]: r for r in json.loads((ppl_dir / "summary.json").read_text())["results"]}
    assert results["stream_4+12"]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert results["window_0+16"]["ppl"] == pytest.approx(float(row["0+16"]), rel=1e-6)


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    """User errors print one line naming the problem and return 2, not a traceback."""
    assert compare.main([str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert compare.main(["a=x", "--start-sizes", "0,64", "--cache-size", "64", "-o", str(tmp_path)]) == 2
    assert "start size 64" in capsys.readouterr().err
    assert compare.main(["a=x", "--baselines", "oracle", "-o", str(tmp_path)]) == 2
    assert "unknown baseline" in capsys.readouterr().err


def test_by_step_errors_are_one_line(tmp_path, capsys):
    """--steps-of / --revisions-of: a hub revision cannot load offline (the error path, one line, no
    files), a revision that names no step, a run without checkpoints and stray options are refused."""
    out = tmp_path / "o"
    cases = [
        (["--revisions-of", "EleutherAI/pythia-70m", "--revisions", "step1000,step2000"], "EleutherAI/pythia-70m@step1000"),
        (["--revisions-of", "EleutherAI/pythia-70m", "--revisions", "main"], "'main' names no training step"),
        (["--revisions-of", "EleutherAI/pythia-70m"], "--revisions-of needs --revisions"),
        (["--steps-of", str(tmp_path)], "no complete global_stepN checkpoint"),
        (["--steps", "3"], "--steps needs --steps-of"),
        (["m=x", "--steps-of", str(tmp_path)], "take no model arguments"),
    ]
    for argv, message in cases:
        assert compare.main([*argv, "-o", str(out), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_moving_average():
    """The curve smoothing must be a trailing mean (a centred or cumulative one misplaces the blow-up)."""
    values = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert moving_average(values, 2).tolist() == [1.0, 2.0, 4.0, 6.0]

