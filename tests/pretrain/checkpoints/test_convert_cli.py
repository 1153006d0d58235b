"""``sinklm convert`` as a command: bad input, help, and the whole path with the real trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_testing import REPO, TEXT, free_port
from pretrain.checkpoints import load_model
from pretrain.checkpoints.init_format import load_init_checkpoint
from pretrain.config import ModelConfig
from pretrain.convert import main


@pytest.mark.slow
def test_pythia_like_to_sink_token_training_to_export(stock_hf, prepared_corpus, tmp_path):
    """The whole path the issue asks for, with the real ``sinklm train``: a released HF GPT-NeoX ->
    initial checkpoint with one sink token -> continued pretraining (2 ranks, ZeRO-1, init_from) ->
    HF export. Prevents: a run-folder layout, client state or tokenizer record of the real trainer
    that convert misreads, and init checkpoints that training cannot start from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    init, run, export = tmp_path / "init", tmp_path / "run", tmp_path / "export"
    assert main([str(stock_hf), str(init), "--add-sink-tokens", "1"]) == 0
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "sinklm.cli", "train", str(REPO / "configs" / "experiments" / "quickstart-sink1.yaml"),
        f"--data.path={prepared_corpus}", f"--train.run_dir={run}", f"--train.init_from={init}",
        "--model.hidden_size=32", "--model.max_seq_len=64", "--train.max_steps=2", "--data.seq_len=32",
        "--data.text_tokens=31", "--train.micro_batch_size=2", "--train.eval_every=0", "--checkpoint.every=2",
        "--deepspeed.config=zero1", "--logging.plot=false",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and (run / "latest").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    assert main([str(run), str(export)]) == 0
    loaded = load_model(run)
    assert loaded.config.sink_tokens == 1 and "ZeRO-1, 2 ranks" in loaded.source
    tok = AutoTokenizer.from_pretrained(export)
    enc = tok(TEXT, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == loaded.config.sink_token_ids[0]
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(export).eval()(**enc).logits
        ours = loaded.model(enc["input_ids"]).logits
    assert (hf_logits - ours).abs().max().item() <= 1e-5
    # training moved the weights away from the initial checkpoint
    assert not torch.equal(loaded.model.state_dict()["blocks.0.attn.qkv.weight"], load_init_checkpoint(init)[1]["blocks.0.attn.qkv.weight"])
    card = (export / "README.md").read_text()
    assert "step 2" in card and "init_from" in card




# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def _fake_run(tmp_path: Path, model: dict) -> Path:
    import yaml

    run = tmp_path / "run"
    (run / "global_step2").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    return run


def test_bad_input_errors(tmp_path, capsys, stock_hf):
    """Prevents: tracebacks or silent fallbacks on the mistakes users make: a folder that is not a
    checkpoint, a missing tag, an unknown variant, an existing output folder."""

    def run(*argv: str) -> str:
        assert main([str(a) for a in argv]) == 2
        return capsys.readouterr().err

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    err = run(tmp_path / "notes", tmp_path / "out")
    assert "is not a checkpoint" in err and "todo.txt" in err
    assert "checkpoint not found" in run(tmp_path / "missing", tmp_path / "out")
    assert "hub" in run("nobody-here/no-such-model", tmp_path / "out")  # tests are offline: a clear error
    (tmp_path / "fresh-run").mkdir()
    (tmp_path / "fresh-run" / "config.yaml").write_text("model: {}\n")
    assert "nothing saved yet" in run(tmp_path / "fresh-run", tmp_path / "out")

    tiny = ModelConfig.from_preset("tiny").to_dict()
    ds = _fake_run(tmp_path, tiny)
    err = run(ds, tmp_path / "out", "--tag", "global_step9")
    assert "tag 'global_step9' not found" in err and "global_step2" in err
    assert "no 'latest' file" in run(ds, tmp_path / "out")

    bad = _fake_run(tmp_path / "b", dict(tiny, attention="softmax2"))
    err = run(bad, tmp_path / "out", "--tag", "global_step2")
    assert "model.attention" in err and "softmax2" in err and "config.yaml" in err

    config = json.loads((stock_hf / "config.json").read_text())
    config["sinklm"] = {"attention": "softmax2"}
    (stock_hf / "config.json").write_text(json.dumps(config))
    err = run(stock_hf, tmp_path / "out")
    assert "sinklm.attention" in err and "softmax2" in err
    config["sinklm"] = {"attention": "softmax"}
    (stock_hf / "config.json").write_text(json.dumps(config))

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    assert "--overwrite" in run(stock_hf, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    # --overwrite never deletes what convert did not write (issue 13): a folder holding keep.txt is refused
    err = run(stock_hf, tmp_path / "taken", "--overwrite")
    assert "refusing to --overwrite" in err and "keep.txt" in err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    assert main([str(stock_hf), str(tmp_path / "init-out")]) == 0
    assert main([str(stock_hf), str(tmp_path / "init-out"), "--overwrite"]) == 0  # an earlier export is replaced
    assert (tmp_path / "init-out" / "model.yaml").is_file()

    assert "inside the input folder" in run(stock_hf, stock_hf / "sub")
    assert "only applies to a DeepSpeed run" in run(stock_hf, tmp_path / "o2", "--tag", "global_step1")
    assert "always fp32" in run(stock_hf, tmp_path / "o3", "--dtype", "bf16")
    with pytest.raises(SystemExit):
        main([str(stock_hf), str(tmp_path / "o4"), "--attention", "softmax2"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_help_runs_without_a_traceback():
    """Prevents: `sinklm convert --help` and `python -m pretrain.convert --help` breaking."""
    for cmd in ([sys.executable, "-m", "sinklm", "convert", "--help"], [sys.executable, "-m", "pretrain.convert", "--help"]):
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "--add-sink-tokens" in result.stdout, result.stderr
