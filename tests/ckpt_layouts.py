"""Tiny checkpoints of every local format, written in process (no torchrun), for any test package:
``import ckpt_layouts`` (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml


def tiny_checkpoints(root: Path) -> dict[str, Path]:
    """The same tiny sink1 weights as a ZeRO-0 DeepSpeed run folder (config.yaml, ``latest`` ->
    global_step2, global_step1/ and global_step2/ with their sinklm_state.json), an initial
    checkpoint and a Hugging Face export; {"run", "tag", "init", "export"} -> folder."""
    from pretrain.checkpoints import export_hf, read_checkpoint
    from pretrain.checkpoints.init_format import save_init_checkpoint
    from pretrain.config import ModelConfig
    from pretrain.model import GPTNeoX

    cfg = ModelConfig.from_preset("tiny", hidden_size=32, max_seq_len=64, sink_tokens=1)
    torch.manual_seed(0)
    state = GPTNeoX(cfg).state_dict()
    run = root / "run"
    for step in (1, 2):
        (run / f"global_step{step}").mkdir(parents=True)
        module_states = {"module": state, "ds_config": {"zero_optimization": {"stage": 0}}, "dp_world_size": 1, "step": step}
        torch.save(module_states, run / f"global_step{step}" / "mp_rank_00_model_states.pt")
        (run / f"global_step{step}" / "sinklm_state.json").write_text(json.dumps({"step": step}))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict(), "data": {"tokenizer": None}}))
    (run / "latest").write_text("global_step2")
    init = save_init_checkpoint(root / "init", cfg, state)
    export = export_hf(read_checkpoint(init), root / "export")
    return {"run": run, "tag": run / "global_step1", "init": init, "export": export}
