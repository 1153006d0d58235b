"""Fixtures of the checkpoint-layer tests: real DeepSpeed runs (torchrun, slow) and tiny folders of
every format made in process (fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_layouts import tiny_checkpoints
from ckpt_testing import REPO, RUNS, free_port, randomise, run_name
from pretrain.config import ModelConfig
from pretrain.convert import main
from pretrain.hf_keymap import to_hf_config


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory) -> Path:
    """Real 2-rank DeepSpeed run folders (one torchrun for all of them, ~15 s)."""
    out = tmp_path_factory.mktemp("ds_runs")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(Path(__file__).with_name("make_ds_runs.py")), str(out), *RUNS,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and (out / "done.json").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def exports(ds_runs, tmp_path_factory) -> dict[str, Path]:
    """Each run converted once through the CLI with default options (fp32)."""
    out = tmp_path_factory.mktemp("exports")
    folders = {}
    for spec in RUNS:
        name = run_name(spec)
        assert main([str(ds_runs / name), str(out / name)]) == 0
        folders[name] = out / name
    return folders


@pytest.fixture
def stock_hf(tmp_path) -> Path:
    """A stock transformers GPT-NeoX folder, as a downloaded Pythia looks: save_pretrained + tokenizer."""
    return _stock_folder(tmp_path / "pythia-like", randomised=True)


def _stock_folder(folder: Path, randomised: bool) -> Path:
    """A tiny vanilla stock GPT-NeoX saved with save_pretrained, plus the bundled tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from data.tokenizer import load_tokenizer

    cfg = ModelConfig.from_preset("tiny", hidden_size=32, max_seq_len=64)
    hf_cfg = GPTNeoXConfig(**{k: v for k, v in to_hf_config(cfg).items() if k not in ("architectures", "model_type")})
    model = GPTNeoXForCausalLM(hf_cfg)
    if randomised:
        randomise(model)
    model.save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    """The same tiny sink1 weights in every local format, made in process (no torchrun): a ZeRO-0
    DeepSpeed run folder (config.yaml, latest, global_step1/ and global_step2/), an initial
    checkpoint, a HF export and a stock HF GPT-NeoX folder (vanilla weights)."""
    root = tmp_path_factory.mktemp("formats")
    folders = tiny_checkpoints(root)
    stock = _stock_folder(root / "stock", randomised=False)
    return {**folders, "stock": stock}
