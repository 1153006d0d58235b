"""Bad input to `sinklm data prepare` and `sinklm data verify` (the battery of issue 13: see
tests/bad_input_battery.py). Prevents tracebacks, silent successes (empty or binary files, corrupt
shards, ids outside the vocabulary) and `--overwrite` destroying the old data before a bad input fails."""

from __future__ import annotations

import pytest

from bad_input_battery import BAD_UTF8_JSONL, CONTROL_TEXT, RANDOM_BYTES, Battery, Case, truncate, data_corrupt, data_out_of_vocab, data_without_vocab

battery = Battery()
case = battery.case


# ---- sinklm data prepare ------------------------------------------------------------------


@case("prepare: --overwrite with bad UTF-8 input (deleted the old data)")
def _(ws):
    bad = ws.file("bad.jsonl", BAD_UTF8_JSONL)
    return ["data", "prepare", "--out", str(ws.get("data")), "--overwrite", "--workers", "1", str(bad)], [f"{bad}:2", "not valid UTF-8", "--encoding-errors replace"]


@case("prepare: bad UTF-8 inside a .json file")
def _(ws):
    bad = ws.file("records.json", b'[\n{"text": "ok"},\n{"text": "na\xefve"}\n]\n')
    return ["data", "prepare", "--out", str(ws.root / "out"), "--workers", "1", str(bad)], [f"{bad}:3", "not valid UTF-8"]


@case("prepare: a line that is not JSON")
def _(ws):
    bad = ws.file("broken.jsonl", '{"text": "ok"}\n{"text": \n')
    return ["data", "prepare", "--out", str(ws.root / "out"), "--workers", "1", str(bad)], [f"{bad}:2", "not valid JSON"]


@case("prepare: record without the text field")
def _(ws):
    bad = ws.file("fields.jsonl", '{"body": "ok"}\n')
    return ["data", "prepare", "--out", str(ws.root / "out"), "--workers", "1", str(bad)], [f"{bad}:1", "'text'", "body", "--text-field"]


@case("prepare: an empty .txt (was '1 document, 1 token')")
def _(ws):
    empty = ws.file("empty.txt", "")
    return ["data", "prepare", "--out", str(ws.root / "out"), "--workers", "1", str(empty)], [str(empty), "found none", "1 empty document"]


@case("prepare: random bytes named .txt (NUL bytes)")
def _(ws):
    noise = ws.file("noise.txt", RANDOM_BYTES)
    return ["data", "prepare", "--out", str(ws.root / "out"), "--workers", "1", str(noise)], [str(noise), "binary file", "NUL"]


@case("prepare: control characters in a .txt")
def _(ws):
    noise = ws.file("controls.txt", CONTROL_TEXT)
    return ["data", "prepare", "--out", str(ws.root / "out"), "--workers", "1", str(noise)], [str(noise), "binary file", "control characters"]


# option values refused before any input is read: (flag, value, what the message names)
PREPARE_OPTIONS = [
    ("--workers", "-2", [">= 1", "-2"]),
    ("--shard-tokens", "0", [">= 1", "0"]),
    ("--max-docs", "0", [">= 1", "0"]),
    ("--workers", "two", ["'two'"]),  # argparse's own error, on one line
    ("--encoding-errors", "ignore", ["'ignore'", "replace"]),
]


def _prepare_option_case(flag: str, value: str, names: list[str]) -> Case:
    def make(ws):
        good = ws.file("good.txt", "Call me Ishmael.")
        return ["data", "prepare", "--out", str(ws.root / "out"), flag, value, str(good)], [flag, *names]

    return make


for _flag, _value, _names in PREPARE_OPTIONS:
    case(f"prepare: {_flag} {_value}")(_prepare_option_case(_flag, _value, _names))


@case("prepare: --out is a file")
def _(ws):
    good, target = ws.file("good.txt", "Call me Ishmael."), ws.file("out.txt", "x")
    return ["data", "prepare", "--out", str(target), "--workers", "1", str(good)], [str(target), "is a file"]


@case("prepare: --overwrite on a folder of the user's files")
def _(ws):
    good = ws.file("good.txt", "Call me Ishmael.")
    ws.file("mine/notes.md", "keep me")
    return ["data", "prepare", "--out", str(ws.root / "mine"), "--overwrite", "--workers", "1", str(good)], ["refusing to --overwrite", "notes.md"]


@case("prepare: existing data without --overwrite")
def _(ws):
    good = ws.file("good.txt", "Call me Ishmael.")
    return ["data", "prepare", "--out", str(ws.get("data")), "--workers", "1", str(good)], [str(ws.root / "data"), "already exists", "--overwrite"]


@case("prepare: an input inside --out")
def _(ws):
    good = ws.file("books/a.txt", "Call me Ishmael.")
    return ["data", "prepare", "--out", str(ws.root / "books"), "--overwrite", "--workers", "1", str(good)], [str(good), "inside the output folder"]


@case("prepare: missing input leaves no empty --out behind")
def _(ws):
    return ["data", "prepare", "--out", str(ws.root / "new" / "data"), str(ws.root / "missing.txt")], ["input not found", "missing.txt"]


@case("prepare: failing input leaves no empty --out behind")
def _(ws):
    bad = ws.file("bad.jsonl", BAD_UTF8_JSONL)
    return ["data", "prepare", "--out", str(ws.root / "new" / "data"), "--workers", "1", str(bad)], [f"{bad}:2", "not valid UTF-8"]


@case("prepare: unsupported file type")
def _(ws):
    table = ws.file("table.csv", "a,b\n")
    return ["data", "prepare", "--out", str(ws.root / "out"), str(table)], [str(table), "'.csv'", ".txt"]


# ---- sinklm data verify -------------------------------------------------------------------


@case("verify: same-size corruption of a shard")
def _(ws):
    data = data_corrupt(ws)
    return ["data", "verify", str(data), "--no-progress"], [str(data / "train-00000.bin"), "sha256", "does not match"]


@case("verify: a shard with ids outside the vocabulary")
def _(ws):
    data = data_out_of_vocab(ws)
    return ["data", "verify", str(data), "--no-progress"], [str(data / "train-00000.bin"), "60000", "50277"]


@case("verify: manifest without tokenizer.vocab_size")
def _(ws):
    data = data_without_vocab(ws)
    return ["data", "verify", str(data)], [str(data / "manifest.json"), "'tokenizer.vocab_size'", "missing", "integer"]


@case("verify: a truncated shard")
def _(ws):
    data = ws.get("data")
    truncate(data / "validation-00000.bin")
    return ["data", "verify", str(data)], [str(data / "validation-00000.bin"), "truncated"]


@case("verify: not a folder")
def _(ws):
    return ["data", "verify", str(ws.root / "nothing")], [str(ws.root / "nothing"), "not a folder"]


@pytest.mark.parametrize("name", list(battery.cases))
def test_bad_input_is_one_clean_line_and_changes_nothing(name, tmp_path, tmp_path_factory, capsys, monkeypatch):
    battery.check(name, tmp_path, tmp_path_factory, capsys, monkeypatch)
