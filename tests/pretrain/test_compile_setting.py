"""``train.compile``: ``auto`` (the default) compiles on CUDA only; ``true``/``false`` still force it.

Prevents a default that compiles on a CPU (minutes of compiling for nothing), an ``auto`` that is
truthy everywhere (a plain ``if run.train.compile:`` would compile on a CPU too), and the old
booleans or a typo slipping through unchecked.
"""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError
from pretrain.train_config import resolve_config

QUICKSTART = "configs/experiments/quickstart-vanilla.yaml"


def test_auto_is_the_default_and_means_cuda_only():
    run = resolve_config([QUICKSTART])
    assert run.train.compile == "auto"
    assert run.train.compile_on("cuda") and not run.train.compile_on("cpu")
    assert run.to_dict()["train"]["compile"] == "auto"  # the saved config.yaml reproduces the run


@pytest.mark.parametrize("text, on", [("true", True), ("false", False)])
def test_booleans_force_it_on_every_device(text, on):
    run = resolve_config([QUICKSTART], [f"train.compile={text}"])
    assert run.train.compile is on
    assert run.train.compile_on("cpu") is on and run.train.compile_on("cuda") is on


def test_other_values_name_the_key():
    with pytest.raises(ConfigError, match="train.compile: expected one of 'auto', True, False, found 'maybe'"):
        resolve_config([QUICKSTART], ["train.compile=maybe"])
