"""An *initial* checkpoint: a model to start ``sinklm train`` from (e.g. a converted Pythia).

Folder layout: ``model.yaml`` (a :class:`ModelConfig`) and ``model.safetensors`` (our parameter
names, fp32). Written by ``sinklm convert --to init`` and read by ``sinklm train`` when
``train.init_from`` is set; unlike a DeepSpeed run folder it carries no optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from pretrain.checkpoints.integrity import safetensors_problem
from pretrain.checkpoints.training import check_same_shape
from pretrain.config import ConfigError, ModelConfig, load_yaml

CONFIG_FILE = "model.yaml"
WEIGHTS_FILE = "model.safetensors"


def save_init_checkpoint(folder: str | Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata={"format": "sinklm-init"})
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
