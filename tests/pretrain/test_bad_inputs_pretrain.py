"""Bad input to `sinklm convert` and `sinklm train` (the battery of issue 13: see tests/bad_input_battery.py).
Prevents `convert --overwrite` deleting what it did not write (the training run itself), tracebacks on
truncated checkpoints, and errors that came only after DeepSpeed start-up."""

from __future__ import annotations

import pytest

from bad_input_battery import QUICKSTART, Battery, train_argv, truncate, data_corrupt, data_out_of_vocab, data_without_vocab, run_for_training

battery = Battery()
case = battery.case


# ---- sinklm convert ----------------------------------------------------------------------


@case("convert: source inside the output with --overwrite (deleted the run)")
def _(ws):
    nest = ws.root / "nest"
    ws.get("run", "nest/run_copy")
    ws.file("nest/notes.txt", "my notes")
    return ["convert", str(nest / "run_copy"), str(nest), "--overwrite"], ["nest/run_copy", "inside the output folder"]


@case("convert: output inside the source")
def _(ws):
    run = ws.get("run")
    return ["convert", str(run), str(run / "export")], ["inside the input folder", str(run)]


@case("convert: output is the source")
def _(ws):
    run = ws.get("run")
    return ["convert", str(run), str(run), "--overwrite"], ["is the input", str(run)]


@case("convert: --overwrite on a prepared data folder")
def _(ws):
    return ["convert", str(ws.get("run")), str(ws.get("data")), "--overwrite"], ["refusing to --overwrite", "manifest.json", "train-00000.bin"]


@case("convert: --overwrite on a folder of the user's files")
def _(ws):
    ws.file("mine/thesis.tex", "years of work")
    return ["convert", str(ws.get("run")), str(ws.root / "mine"), "--overwrite"], ["refusing to --overwrite", "thesis.tex"]


@case("convert: --overwrite on an export holding a file of the user's")
def _(ws):
    export = ws.get("export")
    ws.file("export/my_eval_results.csv", "a,b")
    return ["convert", str(ws.get("run")), str(export), "--overwrite"], ["refusing to --overwrite", "my_eval_results.csv"]


@case("convert: output exists without --overwrite")
def _(ws):
    return ["convert", str(ws.get("run")), str(ws.get("export"))], ["already exists", "--overwrite"]


@case("convert: output is a file")
def _(ws):
    target = ws.file("taken.bin", "x")
    return ["convert", str(ws.get("run")), str(target)], [str(target), "is a file"]


@case("convert: --max-shard-size not a size (before reading the checkpoint)")
def _(ws):
    return ["convert", str(ws.get("run")), str(ws.root / "out"), "--max-shard-size", "lots"], ["--max-shard-size", "'lots'", "5GB"]


@case("convert: --max-shard-size 0")
def _(ws):
    return ["convert", str(ws.get("run")), str(ws.root / "out"), "--max-shard-size", "0"], ["--max-shard-size", "'0'"]


@case("convert: truncated model.safetensors in an export")
def _(ws):
    export = ws.get("export")
    truncate(export / "model.safetensors")
    return ["convert", str(export), str(ws.root / "out")], [str(export / "model.safetensors"), "truncated or corrupt"]


@case("convert: truncated DeepSpeed model states, other tags listed")
def _(ws):
    run = ws.get("run")
    truncate(run / "global_step2" / "mp_rank_00_model_states.pt")
    return ["convert", str(run), str(ws.root / "out")], ["mp_rank_00_model_states.pt", "truncated or corrupt", "--tag global_step1"]


@case("convert: unknown tag")
def _(ws):
    return ["convert", str(ws.get("run")), str(ws.root / "out"), "--tag", "global_step9"], ["'global_step9' not found", "global_step1"]


@case("convert: --add-sink-tokens 0")
def _(ws):
    return ["convert", str(ws.get("run")), str(ws.root / "out"), "--add-sink-tokens", "0"], ["--add-sink-tokens", ">= 1", "0"]


@case("convert: --dtype not a dtype (argparse, one line)")
def _(ws):
    return ["convert", str(ws.get("run")), str(ws.root / "out"), "--dtype", "fp12"], ["--dtype", "'fp12'", "fp32"]


@case("convert: source missing")
def _(ws):
    return ["convert", str(ws.root / "no_such_run"), str(ws.root / "out")], ["not found", "no_such_run"]


# ---- sinklm train -------------------------------------------------------------------------


@case("train: manifest without tokenizer.vocab_size (KeyError)")
def _(ws):
    data = data_without_vocab(ws)
    return train_argv(ws, data), [str(data / "manifest.json"), "'tokenizer.vocab_size'", "missing"]


@case("train: same-size shard corruption (trained on garbage)")
def _(ws):
    data = data_corrupt(ws)
    return train_argv(ws, data), [str(data / "train-00000.bin"), "sha256", "does not match"]


@case("train: shard ids outside the vocabulary (IndexError)")
def _(ws):
    data = data_out_of_vocab(ws)
    return train_argv(ws, data), [str(data / "train-00000.bin"), "60000", "vocabulary of 50277"]


@case("train: resume with different data (failed after DeepSpeed start-up)")
def _(ws):
    run_dir = run_for_training(ws, train_data={"split": "train", "tokens": 123, "sha256": "f" * 64}, truncate_latest=False)
    return ["train", QUICKSTART, f"--data.path={ws.get('data')}", f"--train.run_dir={run_dir}"], ["trained on other data", "123 tokens", str(ws.root / "data")]


@case("train: resume from truncated model states lists the other tags")
def _(ws):
    run_dir = run_for_training(ws, train_data=None, truncate_latest=True)
    return ["train", QUICKSTART, f"--data.path={ws.get('data')}", f"--train.run_dir={run_dir}"], ["global_step4/mp_rank_00_model_states.pt", "truncated or corrupt", "--resume", "global_step2"]


@case("train: truncated train.init_from weights")
def _(ws):
    init = ws.get("init")
    truncate(init / "model.safetensors")
    return train_argv(ws, ws.get("data"), f"--train.init_from={init}"), ["train.init_from", str(init / "model.safetensors"), "truncated or corrupt"]


@case("train: typo in an override")
def _(ws):
    return train_argv(ws, ws.get("data"), "--train.max_stepz=3"), ["train.max_stepz", "max_steps"]


@case("train: a config path that is a folder")
def _(ws):
    (ws.root / "configs").mkdir()
    return ["train", str(ws.root / "configs")], [str(ws.root / "configs"), "is a folder", "YAML file"]


@case("train: a missing base: file names the config that refers to it")
def _(ws):
    config = ws.file("mine.yaml", "base: no_such_base.yaml\ntrain: {max_steps: 3}\n")
    return ["train", str(config)], [str(config), "base:", "no_such_base.yaml", "no such file"]


@case("train: train.run_dir is a file (failed after DeepSpeed start-up)")
def _(ws):
    target = ws.file("run.log", "x")
    return ["train", QUICKSTART, f"--data.path={ws.get('data')}", f"--train.run_dir={target}"], ["train.run_dir", str(target), "is a file"]


@pytest.mark.parametrize("name", list(battery.cases))
def test_bad_input_is_one_clean_line_and_changes_nothing(name, tmp_path, tmp_path_factory, capsys, monkeypatch):
    battery.check(name, tmp_path, tmp_path_factory, capsys, monkeypatch)
