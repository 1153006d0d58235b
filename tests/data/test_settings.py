"""The one config engine (data/settings.py): dataclasses <-> YAML, base files, overrides, derived CLI flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from data.settings import (
    ConfigError,
    add_settings_args,
    apply_override,
    field_docs,
    from_dict,
    load_config_file,
    parse_override,
    settings_from_args,
    split_cli_overrides,
    to_dict,
)


@dataclass
class Text:
    max_tokens: int | None = None
    """Stream at most this many tokens."""


@dataclass
class Demo:
    cache_size: int = 1024
    """W: total cache size."""
    start_sizes: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    """Start sizes s."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights dtype."""
    progress: bool = True
    """Show progress bars."""
    lr: float = 1e-3
    """Peak learning rate (a % sign must not break argparse's help)."""
    text: Text = field(default_factory=Text)
    """Which text to stream."""


def _parse(argv: list[str]) -> Demo:
    parser = argparse.ArgumentParser(prog="demo")
    add_settings_args(parser, Demo)
    return settings_from_args(Demo, parser.parse_args(argv))


def test_flags_are_derived_from_the_fields():
    """Prevents: a CLI flag whose name, default or type drifts from the settings it sets."""
    assert _parse([]) == Demo()
    got = _parse(["--cache-size", "32", "--start-sizes", "0,4", "--dtype", "bfloat16", "--no-progress",
                  "--lr", "3e-4", "--max-tokens", "600"])
    assert got == Demo(32, [0, 4], "bfloat16", False, 3e-4, Text(600))


def test_bad_flag_values_exit_2(capsys):
    """Prevents: a bad flag value becoming a traceback instead of argparse's one-line error."""
    for argv in (["--start-sizes", "0,x"], ["--dtype", "fp64"], ["--cache-size", "many"]):
        with pytest.raises(SystemExit) as exc:
            _parse(argv)
        assert exc.value.code == 2
        assert argv[0] in capsys.readouterr().err


def test_help_comes_from_the_field_docstrings():
    """Prevents: undocumented flags (the docstring under each field is the help text)."""
    assert field_docs(Demo)["cache_size"] == "W: total cache size."
    parser = argparse.ArgumentParser()
    add_settings_args(parser, Demo)
    text = parser.format_help()
    assert "W: total cache size. (default: 1024)" in text and "0,1,2,4" in text


def test_from_dict_names_the_bad_key_and_type():
    """Prevents: a typo in a config silently falling back to a default."""
    with pytest.raises(ConfigError, match=r"unknown config key demo.cache_sise"):
        from_dict(Demo, {"cache_sise": 3}, where="demo")
    with pytest.raises(ConfigError, match=r"demo.text.max_tokens: expected"):
        from_dict(Demo, {"text": {"max_tokens": "lots"}}, where="demo")
    assert from_dict(Demo, to_dict(Demo(cache_size=8))) == Demo(cache_size=8)


def test_base_files_and_overrides(tmp_path):
    """Prevents: base chains that lose keys, loop forever, or overrides parsed as strings."""
    (tmp_path / "a.yaml").write_text("x: {lr: 3e-4, keep: 1}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nx: {lr: 1.0e-3}\n")
    assert load_config_file(tmp_path / "b.yaml") == {"x": {"lr": 1e-3, "keep": 1}}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config_file(tmp_path / "loop.yaml")
    keys, value = parse_override("x.lr=3e-4")
    assert (keys, value) == (["x", "lr"], 3e-4)
    assert apply_override({"x": {"keep": 1}}, keys, value) == {"x": {"keep": 1, "lr": 3e-4}}
    assert split_cli_overrides(["c.yaml", "--train.steps", "5", "--x.y=1", "--fresh"]) == (
        ["c.yaml", "--fresh"], ["train.steps=5", "x.y=1"])
