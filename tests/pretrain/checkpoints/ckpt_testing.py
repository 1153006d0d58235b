"""Shared constants and helpers of the checkpoint-layer tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[3]
RUNS = [
    "3:vanilla", "3:sink1", "3:softmax1", "3:sink_logit",
    "1:vanilla", "1:sink2", "1:softmax1", "1:sink_logit",
    "0:sink1",
]  # fmt: skip
REMOTE = {"softmax1", "sink_logit"}
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_name(spec: str) -> str:
    """``"3:sink1"`` -> ``"zero3-sink1"``, the run folder make_ds_runs.py writes."""
    return "zero{}-{}".format(*spec.split(":"))


def variant(name: str) -> str:
    return name.split("-", 1)[1]


def hf_load(folder: Path, remote: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
    return load_file(str(folder / "model.safetensors"))


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
