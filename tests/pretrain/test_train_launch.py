"""The launch scripts: valid shell, and they hand the config and every override to `sinklm train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = ["deepspeed.sh", "multinode.sh", "torchrun.sh", "slurm.sbatch"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_valid_bash_and_need_a_config(name):
    """A syntax error in a launcher only shows on the cluster; each must also refuse to start
    without a config instead of launching N processes that all fail."""
    path = LAUNCH / name
    assert path.is_file() and os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if name != "slurm.sbatch":  # sbatch scripts need SLURM's environment to run at all
        result = subprocess.run(["bash", str(path)], capture_output=True, text=True)
        assert result.returncode == 2 and "usage" in result.stderr


def test_torchrun_script_passes_overrides_through(prepared_corpus, tmp_path):
    """`launch/torchrun.sh CONFIG --a.b=c` must reach `sinklm train` in every process unchanged."""
    env = {**os.environ, "NPROC": "1", "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        [
            "bash",
            str(LAUNCH / "torchrun.sh"),
            "configs/experiments/quickstart-sink2.yaml",
            f"--data.path={prepared_corpus}",
            "--train.max_steps=3",
            "--optimizer.lr",
            "5e-4",
            "--print-config",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["max_steps"] == 3 and printed["optimizer"]["lr"] == 5e-4
    assert printed["model"]["sink_tokens"] == 2 and printed["data"]["path"] == str(prepared_corpus)
