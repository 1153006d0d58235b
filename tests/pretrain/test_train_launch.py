"""The launch scripts: valid shell, and they hand the config and every override to `sinklm train`."""

from __future__ import annotations

import json
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


@pytest.mark.slow
def test_torchrun_script_ignores_a_users_data_py(prepared_corpus, tmp_path):
    """Users keep their configs (and often a `data.py` of their own) in the folder they launch
    from. `python -m` and torchrun put that folder first on sys.path, where it would shadow our
    `data` package; the scripts launch the installed `sinklm` entry point, so a tiny run started
    from such a folder trains to the end."""
    work = tmp_path / "my-project"
    work.mkdir()
    (work / "data.py").write_text('raise ImportError("user\'s data.py")\n')
    (work / "inference.py").write_text('raise ImportError("user\'s inference.py")\n')
    run_dir = work / "runs" / "tiny"
    env = {
        **os.environ,
        "NPROC": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            "bash",
            str(LAUNCH / "torchrun.sh"),
            str(REPO / "configs" / "experiments" / "quickstart-vanilla.yaml"),
            f"--data.path={prepared_corpus}",
            f"--train.run_dir={run_dir}",
            "--train.max_steps=2",
            "--train.micro_batch_size=2",
            "--data.seq_len=64",
            "--data.text_tokens=62",
            "--train.eval_batches=1",
            "--checkpoint.every=0",
            "--deepspeed.config=zero0",
            "--logging.plot=false",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "user's data.py" not in result.stdout + result.stderr
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert steps == [1, 2] and (run_dir / "latest").read_text().strip() == "global_step2"
