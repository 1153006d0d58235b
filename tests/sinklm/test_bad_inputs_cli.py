"""Bad input to `sinklm experiment` and the `sinklm` command itself (the battery of issue 13: see
tests/bad_input_battery.py). Prevents a typo in train_overrides reported only after data preparation, and a
bad checkpoint variant (unknown key, also a training config, a missing folder, a hub model not available
offline) found only after hours of training the other variants."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from bad_input_battery import EXPERIMENT, Battery

battery = Battery()
case = battery.case


# ---- sinklm experiment and the command itself ----------------------------------------------


@case("experiment: typo in train_overrides (reported only after data preparation)")
def _(ws):
    return ["experiment", EXPERIMENT, "train_overrides=[train.max_stepz=3]", f"report_dir={ws.root / 'report'}"], ["train_overrides", "train.max_stepz", "max_steps"]


@case("experiment: the config path is a folder")
def _(ws):
    (ws.root / "experiments").mkdir()
    return ["experiment", str(ws.root / "experiments")], [str(ws.root / "experiments"), "is a folder", "YAML file"]


def _checkpoint_experiment(ws, vanilla: str) -> str:
    """An experiment whose vanilla arm is the existing checkpoint ``vanilla`` (a YAML mapping)."""
    text = f"experiment:\n  report_dir: {ws.root / 'report'}\n  variants:\n    vanilla: {vanilla}\n    sink1: {EXPERIMENT.replace('.yaml', '-sink1.yaml')}\n"
    return str(ws.file("checkpoint-arm.yaml", text))


@case("experiment: a checkpoint variant with an unknown key")
def _(ws):
    config = _checkpoint_experiment(ws, "{checkpoint: EleutherAI/pythia-160m-deduped, revison: step101000}")
    return ["experiment", config], [config, "experiment.variants.vanilla", "unknown config key revison", "checkpoint, config"]


@case("experiment: a variant with both a checkpoint and a training config")
def _(ws):
    config = _checkpoint_experiment(ws, "{checkpoint: EleutherAI/pythia-160m-deduped@step101000, config: quickstart-vanilla.yaml}")
    return ["experiment", config], [config, "experiment.variants.vanilla", "both checkpoint", "config (quickstart-vanilla.yaml"]


@case("experiment: a checkpoint variant naming a missing local folder")
def _(ws):
    config = _checkpoint_experiment(ws, f"{{checkpoint: {ws.root / 'runs' / 'vanilla'}}}")
    return ["experiment", config], [config, "experiment.variants.vanilla.checkpoint", f"checkpoint not found: {ws.root / 'runs' / 'vanilla'}"]


@case("experiment: a checkpoint variant naming a hub model not in the offline cache")
def _(ws):
    config = _checkpoint_experiment(ws, "{checkpoint: sinklm-tests/no-such-model@step101000}")
    return ["experiment", config], [config, "experiment.variants.vanilla.checkpoint", "sinklm-tests/no-such-model at revision step101000"]


@case("experiment: a checkpoint variant of a family that cannot stream (found only after training before)")
def _(ws):
    folder = ws.root / "gpt2-tiny"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    config = _checkpoint_experiment(ws, f"{{checkpoint: {folder}}}")
    return ["experiment", config], [config, "experiment.variants.vanilla.checkpoint", "model_type 'gpt2' cannot stream", "llama"]


@case("sinklm: unknown command")
def _(ws):
    return ["prepare-data"], ["'prepare-data'", "data prepare"]


@pytest.mark.parametrize("name", list(battery.cases))
def test_bad_input_is_one_clean_line_and_changes_nothing(name, tmp_path, tmp_path_factory, capsys, monkeypatch):
    battery.check(name, tmp_path, tmp_path_factory, capsys, monkeypatch)
