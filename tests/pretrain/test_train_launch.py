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
SCRIPTS = ["accelerate.sh", "deepspeed.sh", "multinode.sh", "torchrun.sh", "slurm.sbatch"]


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_losses(script: str, prepared_corpus: Path, run_dir: Path, stage: int) -> list[tuple[int, float]]:
    """(step, loss) of a 3-step 2-rank run under ``script`` with ZeRO ``stage``: torchrun.sh names the DeepSpeed
    JSON itself, accelerate.sh takes it from the plugin config configs/accelerate/zero{stage}.yaml."""
    extra_env = {"ACCELERATE_CONFIG": str(REPO / "configs" / "accelerate" / f"zero{stage}.yaml")} if script == "accelerate.sh" else {}
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "MASTER_PORT": str(_free_port()),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra_env}
    args = [
        "configs/experiments/quickstart-vanilla.yaml", f"--data.path={prepared_corpus}", f"--train.run_dir={run_dir}",
        "--train.max_steps=3", "--train.micro_batch_size=2", "--data.seq_len=64", "--data.text_tokens=62",
        "--train.eval_batches=1", "--checkpoint.every=0", "--logging.plot=false", "--probe.every=0",
    ]
    if script == "torchrun.sh":
        args.append(f"--deepspeed.config=zero{stage}")
    result = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert all(len(r["rank_loss"]) == 2 for r in rows), "not two ranks"
    assert yaml.safe_load((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == stage  # the resolved JSON
    return [(r["step"], r["loss"]) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_launch_trains_like_torchrun(prepared_corpus, tmp_path, stage):
    """`launch/accelerate.sh` (accelerate launch, DeepSpeed plugin config configs/accelerate/zero{2,3}.yaml)
    must run the same 2-rank ZeRO-2 / ZeRO-3 training as `launch/torchrun.sh`: the same losses at every step.
    A launcher that drops the plugin's DeepSpeed JSON, starts one rank, or lets ranks see other data
    shows up as different losses (or, for ZeRO-3's partitioned parameters, as a run that fails)."""
    torchrun = _two_rank_losses("torchrun.sh", prepared_corpus, tmp_path / "torchrun", stage)
    accelerate = _two_rank_losses("accelerate.sh", prepared_corpus, tmp_path / "accelerate", stage)
    assert [s for s, _ in torchrun] == [1, 2, 3]
    assert accelerate == pytest.approx(torchrun, rel=1e-6)
