"""Bad input to `sinklm stream-ppl` (the battery of issue 13: see tests/bad_input_battery.py). Prevents
tracebacks on truncated checkpoints and an --output-dir that failed only after the whole computation."""

from __future__ import annotations

import pytest

from bad_input_battery import BAD_UTF8_JSONL, RANDOM_BYTES, Battery, truncate

battery = Battery()
case = battery.case


# ---- sinklm stream-ppl --------------------------------------------------------------------


@case("stream-ppl: --output-dir is a file (failed after the whole computation)")
def _(ws):
    target = ws.file("results", "x")
    return ["stream-ppl", str(ws.get("export")), "--output-dir", str(target), "--max-tokens", "40"], ["--output-dir", str(target), "is a file"]


@case("stream-ppl: --output-dir below a file")
def _(ws):
    target = ws.file("results", "x")
    return ["stream-ppl", str(ws.get("export")), "--output-dir", str(target / "sub")], ["--output-dir", str(target), "is a file"]


@case("stream-ppl: truncated model.safetensors in an export (SafetensorError)")
def _(ws):
    export = ws.get("export")
    truncate(export / "model.safetensors")
    return ["stream-ppl", str(export), "--max-tokens", "40"], [str(export / "model.safetensors"), "truncated or corrupt"]


@case("stream-ppl: truncated DeepSpeed model states lists --tag choices")
def _(ws):
    run = ws.get("run")
    truncate(run / "global_step2" / "mp_rank_00_model_states.pt")
    return ["stream-ppl", str(run), "--max-tokens", "40"], ["mp_rank_00_model_states.pt", "truncated or corrupt", "--tag global_step1"]


@case("stream-ppl: --text with bad UTF-8 (before the model loads)")
def _(ws):
    bad = ws.file("bad.jsonl", BAD_UTF8_JSONL)
    return ["stream-ppl", str(ws.get("export")), "--text", str(bad)], [f"{bad}:2", "not valid UTF-8"]


@case("stream-ppl: --text is a binary file")
def _(ws):
    noise = ws.file("noise.txt", RANDOM_BYTES)
    return ["stream-ppl", str(ws.get("export")), "--text", str(noise)], [str(noise), "binary file"]


@case("stream-ppl: --text missing")
def _(ws):
    return ["stream-ppl", str(ws.get("export")), "--text", str(ws.root / "gone.txt")], ["input not found", "gone.txt"]


@case("stream-ppl: --max-tokens 1")
def _(ws):
    return ["stream-ppl", str(ws.get("export")), "--max-tokens", "1"], ["--max-tokens", ">= 2", "1"]


@case("stream-ppl: unknown baseline")
def _(ws):
    return ["stream-ppl", str(ws.get("export")), "--baselines", "dense,oracle"], ["--baselines", "'oracle'", "recompute"]


@case("stream-ppl: --start-size -1")
def _(ws):
    return ["stream-ppl", str(ws.get("export")), "--start-size", "-1"], ["--start-size", ">= 0", "-1"]


@case("stream-ppl: --chunk-size not a number (argparse, one line)")
def _(ws):
    return ["stream-ppl", str(ws.get("export")), "--chunk-size", "big"], ["--chunk-size", "'big'"]


@pytest.mark.parametrize("name", list(battery.cases))
def test_bad_input_is_one_clean_line_and_changes_nothing(name, tmp_path, tmp_path_factory, capsys, monkeypatch):
    battery.check(name, tmp_path, tmp_path_factory, capsys, monkeypatch)
