"""Bad input to `sinklm experiment` and the `sinklm` command itself (the battery of issue 13: see
tests/bad_input_battery.py). Prevents a typo in train_overrides reported only after data preparation."""

from __future__ import annotations

import pytest

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


@case("sinklm: unknown command")
def _(ws):
    return ["prepare-data"], ["'prepare-data'", "data prepare"]


@pytest.mark.parametrize("name", list(battery.cases))
def test_bad_input_is_one_clean_line_and_changes_nothing(name, tmp_path, tmp_path_factory, capsys, monkeypatch):
    battery.check(name, tmp_path, tmp_path_factory, capsys, monkeypatch)
