"""Ctrl-C during a 2-rank `sinklm train` (issue 13): SIGINT to the launcher's process group, as a
terminal sends it, makes every rank save a checkpoint at the end of its step and exit with a one-line
message; resuming from it gives exactly the losses of an uninterrupted run.

Prevents: a KeyboardInterrupt traceback that loses up to ``checkpoint.every`` steps of training, and
torchrun's own SignalException traceback after the ranks have stopped in order (the launcher here is
``python -m pretrain.torchrun``, what launch/torchrun.sh runs).
A process started in the background of a non-interactive shell (as pytest's children are) inherits
SIGINT as ignored, and the trainer respects an inherited ignore, so the launcher here restores the
default handler in the child first, as an interactive terminal would have it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from test_train_runs import SAVE_EVERY, SINKLM, STEPS, free_port, kill_group, records, run_to_end, train_args, wait_for, zero2_run  # noqa: F401


def _restore_default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_sigint_saves_and_resumes_exactly(prepared_corpus, zero2_run, tmp_path):  # noqa: F811
    run_dir, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    args = train_args(prepared_corpus, run_dir, "vanilla", "--deepspeed.config=zero2")
    torchrun = [sys.executable, "-m", "pretrain.torchrun", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = subprocess.Popen(
        [*torchrun, "--no-python", SINKLM, "train", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=_restore_default_sigint,
    )  # fmt: skip
    # after the step-4 checkpoint, while steps 5.. run (the last step saves anyway, so stop before it)
    wait_for(lambda: (run_dir / "latest").is_file() and any(r["step"] > SAVE_EVERY for r in _records(run_dir)), proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    text = log.read_text()
    saved = int((run_dir / "latest").read_text().strip().removeprefix("global_step"))
    assert SAVE_EVERY < saved < STEPS, f"no checkpoint after the interrupt (latest: step {saved}):\n{text[-3000:]}"
    assert f"SIGINT: saved step {saved}; exiting" in text, text[-3000:]
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, text[-3000:]
    assert proc.returncode == 128 + signal.SIGINT and "torchrun: stopped by SIGINT" in text, text[-3000:]
    assert [r["step"] for r in records(run_dir)] == list(range(1, saved + 1))  # no step past the save

    run_to_end(args, tmp_path / "resumed.log")
    assert f"resumed from {run_dir / f'global_step{saved}'} at step {saved}" in (tmp_path / "resumed.log").read_text()
    resumed, reference = records(run_dir), records(zero2_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for got, want in zip(resumed, reference):
        assert got["text_crc"] == want["text_crc"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-6), f"step {got['step']}"


def _records(run_dir):
    try:
        return records(run_dir)
    except (FileNotFoundError, ValueError):
        return []


def test_second_ctrl_c_aborts_at_once():
    """The first SIGINT only asks for a save at the end of the step; a second one (a user who will not
    wait for the save) exits at once with 130 and a one-line message, never a traceback."""
    script = textwrap.dedent("""
        import signal, types
        from pretrain.train import Trainer
        trainer = Trainer.__new__(Trainer)
        trainer.stop_requested, trainer.stop_signal, trainer.env = False, "", types.SimpleNamespace(is_main=True)
        trainer._on_stop_signal(signal.SIGINT, None)
        print(trainer.stop_requested, trainer.stop_signal, flush=True)
        trainer._on_stop_signal(signal.SIGINT, None)
        print("still running")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGINT
    assert result.stdout.split() == ["True", "SIGINT"]
    lines = result.stderr.strip().splitlines()
    assert lines[-2:] == ["sinklm train: SIGINT: saving after this step, then exiting (again to abort)",
                          "sinklm train: second SIGINT: aborting without saving"]  # fmt: skip
    assert "Traceback" not in result.stderr
