"""Bad input to `sinklm train` fails before any training step with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from pretrain.config import CONFIG_DIR
from pretrain.train import main

QUICKSTART = str(CONFIG_DIR / "experiments" / "quickstart-vanilla.yaml")


def run_main(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_missing_data_path(tmp_path, capsys):
    """A run pointed at data that was never prepared must say which folder and how to make it."""
    missing = tmp_path / "nothing-here"
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={missing}", f"--train.run_dir={tmp_path / 'run'}")
    assert rc == 2
    assert str(missing) in err and "sinklm data prepare" in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_folder_without_manifest(tmp_path, capsys):
    """An existing folder that is not a prepared corpus names the missing manifest."""
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={tmp_path}", f"--train.run_dir={tmp_path / 'run'}")
    assert rc == 2 and "manifest.json" in err


def test_unknown_key_on_command_line_and_in_file(prepared_corpus, tmp_path, capsys):
    """Typos in overrides or files must be errors naming the key, not silently ignored."""
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={prepared_corpus}", "--train.max_stepz=3")
    assert rc == 2 and "train.max_stepz" in err and "max_steps" in err  # lists the valid keys
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {QUICKSTART}\ncheckpoint: {{evrey: 5}}\n")
    rc, err = run_main(capsys, str(bad), f"--data.path={prepared_corpus}")
    assert rc == 2 and "checkpoint.evrey" in err
    rc, err = run_main(capsys, str(tmp_path / "nope.yaml"))
    assert rc == 2 and "nope.yaml" in err


def test_vocabulary_mismatch(prepared_corpus, tmp_path, capsys):
    """Data tokenized with one vocabulary and a model built for another must not train."""
    rc, err = run_main(
        capsys, QUICKSTART, f"--data.path={prepared_corpus}", "--model.vocab_size=32000", f"--train.run_dir={tmp_path / 'run'}"
    )
    assert rc == 2
    assert "vocabulary mismatch" in err and "50277" in err and "32000" in err


def test_tokenizer_changed_since_checkpoint(prepared_corpus, tmp_path, capsys):
    """Resuming on data re-tokenized with another tokenizer would silently scramble training."""
    run_dir = tmp_path / "run"
    step = run_dir / "global_step4"
    step.mkdir(parents=True)
    from pretrain.train_config import resolve_config

    run = resolve_config([QUICKSTART], [f"data.path={prepared_corpus}", f"train.run_dir={run_dir}"])
    state = {"step": 4, "config": run.to_dict(), "tokenizer": {"fingerprint": "0123456789abcdef"}, "text_tokens": run.text_tokens}
    (step / "sinklm_state.json").write_text(json.dumps(state))
    (run_dir / "latest").write_text("global_step4")
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={prepared_corpus}", f"--train.run_dir={run_dir}")
    assert rc == 2 and "0123456789abcdef" in err
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={prepared_corpus}", f"--train.run_dir={run_dir}", "--fresh")
    assert rc == 2 and "already holds checkpoints" in err
    shutil.rmtree(run_dir)
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={prepared_corpus}", f"--train.run_dir={run_dir}", "--resume")
    assert rc == 2 and "train.resume" in err


def test_bad_values_and_cpu_precision(prepared_corpus, capsys):
    """Values that cannot work are refused with the key: too long samples, fp16 on a CPU."""
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={prepared_corpus}", "--data.text_tokens=300")
    assert rc == 2 and "data.text_tokens" in err and "max_seq_len=256" in err
    import torch

    if not torch.cuda.is_available():
        rc, err = run_main(capsys, QUICKSTART, f"--data.path={prepared_corpus}", "--train.precision=fp16")
        assert rc == 2 and "train.precision=fp16 needs a GPU" in err


def test_overrides_in_both_forms(prepared_corpus, capsys):
    """`--a.b=c` and `--a.b c` are overrides; other flags (here --print-config) are left to argparse."""
    import yaml

    assert main([QUICKSTART, f"--data.path={prepared_corpus}", "--train.max_steps", "5", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 5
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={prepared_corpus}", "--train.max_steps")
    assert rc == 2 and "--train.max_steps has no value" in err


def test_probe_needs_an_evaluation_function(prepared_corpus, tmp_path, capsys):
    """`python -m pretrain.train` has no probe function (pretrain never imports inference): a run
    asking for the probe must stop before any work and say which command has one."""
    rc, err = run_main(capsys, QUICKSTART, f"--data.path={prepared_corpus}", f"--train.run_dir={tmp_path / 'run'}", "--probe.every=2")
    assert rc == 2 and "probe.every=2 needs an evaluation function" in err and "sinklm train" in err
    assert not (tmp_path / "run").exists()


def test_print_config(prepared_corpus, capsys):
    """--print-config shows the resolved config (full model mapping) and starts nothing."""
    import yaml

    assert main([QUICKSTART, f"--data.path={prepared_corpus}", "--model.sink_tokens=2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["sink_tokens"] == 2 and printed["model"]["num_layers"] == 2
    assert printed["optimizer"]["lr"] == pytest.approx(2e-3)
