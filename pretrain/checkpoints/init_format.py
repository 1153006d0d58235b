"""An *initial* checkpoint: a model to start ``sinklm train`` from (e.g. a converted Pythia).

Folder layout: ``model.yaml`` (a :class:`ModelConfig`) and ``model.safetensors`` (our parameter
names, fp32). Written by ``sinklm convert --to init`` and read by ``sinklm train`` when
``train.init_from`` is set; unlike a DeepSpeed run folder it carries no optimizer state.

The weights file's metadata records where the weights came from (``source``: JSON with ``hub_name`` +
``revision`` + ``commit`` for a hub model, or ``path`` for a local one, plus ``from``: the record of
an initial checkpoint converted again). A Pythia revision ``stepN`` there tells ``sinklm train``
the step the weights were trained to, so ``data.format: pythia`` continues at step N
(:func:`start_step_from_init`).
"""

from __future__ import annotations

from pathlib import Path

import json
import re
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pretrain.checkpoints.integrity import safetensors_problem
from pretrain.checkpoints.training import check_same_shape
from pretrain.config import ConfigError, ModelConfig, load_yaml

CONFIG_FILE = "model.yaml"
WEIGHTS_FILE = "model.safetensors"
SOURCE_KEY = "source"
_PYTHIA_STEP = re.compile(r"step(\d+)")


def save_init_checkpoint(
    folder: str | Path, config: ModelConfig, state: dict[str, torch.Tensor], source: dict[str, Any] | None = None
) -> Path:
    """Write the folder; ``source`` (JSON-able) goes into the weights' metadata (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    metadata = {"format": "sinklm-init", **({SOURCE_KEY: json.dumps(source, sort_keys=True)} if source else {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return folder


def is_init_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read_init_config(folder: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of an initial checkpoint (its ``model.yaml``); no weights read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"initial checkpoint folder not found: {folder}")
    if not is_init_checkpoint(folder):
        raise ConfigError(f"{folder} is not an initial checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return ModelConfig.from_dict(load_yaml(folder / CONFIG_FILE))
    except ConfigError as err:
        raise ConfigError(f"{folder / CONFIG_FILE}: {err}") from None


def load_init_checkpoint(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = read_init_config(folder)
    weights = Path(folder) / WEIGHTS_FILE
    problem = safetensors_problem(weights)
    if problem:
        raise ConfigError(problem)
    return config, load_file(str(weights))


def check_init_for_training(path: str | Path) -> None:
    """``train.init_from`` must name an initial checkpoint (checked before any work)."""
    if not is_init_checkpoint(path):
        raise ConfigError(f"train.init_from: {path} is not an initial checkpoint (needs {CONFIG_FILE} + {WEIGHTS_FILE})")
    problem = safetensors_problem(Path(path) / WEIGHTS_FILE)
    if problem:
        raise ConfigError(f"train.init_from: {problem}")


def load_init_for_training(path: str | Path, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights ``train.init_from`` starts from, refused (ConfigError naming the fields) when the
    checkpoint's shape differs from the run's model config."""
    check_init_for_training(path)
    init_config, state = load_init_checkpoint(path)
    check_same_shape(init_config.to_dict(), model_config, f"train.init_from {path}")
    return state


def read_init_source(folder: str | Path) -> dict[str, Any] | None:
    """The source record of an initial checkpoint (its weights' metadata; the header alone is read),
    or None when it has none (written before sources were recorded) or is not readable."""
    try:
        with safe_open(str(Path(folder) / WEIGHTS_FILE), "pt") as f:
            text = (f.metadata() or {}).get(SOURCE_KEY)
        record = json.loads(text) if text else None
    except (OSError, ValueError, RuntimeError):  # missing / truncated: check_init_for_training names it
        return None
    return record if isinstance(record, dict) else None


def describe_source(record: dict[str, Any]) -> str:
    """``owner/name@revision`` or the local path (and what that one came from)."""
    if record.get("hub_name"):
        text = f"{record['hub_name']}@{record.get('revision') or 'main'}"
    else:
        text = str(record.get("path"))
    inner = record.get("from")
    return f"{text} (from {describe_source(inner)})" if isinstance(inner, dict) else text


def pythia_step_of(record: dict[str, Any] | None) -> int | None:
    """N when the weights are a hub revision ``stepN`` (as EleutherAI names Pythia's checkpoints),
    directly or through the initial checkpoints converted from it; else None."""
    while isinstance(record, dict):
        match = _PYTHIA_STEP.fullmatch(str(record.get("revision") or ""))
        if record.get("hub_name") and match:
            return int(match.group(1))
        record = record.get("from")
    return None


def start_step_from_init(init_from: str | None, start_step: int | None) -> tuple[int | None, str | None]:
    """``data.start_step`` for a ``data.format: pythia`` run and a line saying where it came from:
    left unset, it is N of ``train.init_from``'s recorded revision ``stepN``; set, it must agree
    (ConfigError naming both keys otherwise). Unknown (no init_from, no recorded step): unchanged."""
    if not init_from or not is_init_checkpoint(init_from):
        return start_step, None
    record = read_init_source(init_from)
    step = pythia_step_of(record)
    if step is None:
        return start_step, None
    origin = f"train.init_from={init_from} records its weights as {describe_source(record)}"  # type: ignore[arg-type]
    if start_step is None:
        return step, f"data.start_step={step}: from {origin}"
    if start_step != step:
        raise ConfigError(
            f"data.start_step={start_step} disagrees with {origin} (step {step}): set data.start_step={step} "
            "or leave it unset, or convert the revision you mean to continue"
        )
    return start_step, f"data.start_step={start_step} agrees with {origin}"
