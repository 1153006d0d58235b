"""Shared fixtures: tiny configs, and making sure nothing reaches a hub."""

from __future__ import annotations

import os

import pytest

# Tests never download: any hub access must fail loudly instead of hanging on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_config():
    from pretrain.config import ModelConfig

    return ModelConfig.from_preset("tiny")
