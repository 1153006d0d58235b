"""`sinklm train` with the probe on: exact resume after SIGKILL with the probe rows continuing, the
run's sinks.png, and `sinklm compare --steps-of` reproducing the probe rows from the checkpoints."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inference.compare import main as compare_main
from pretrain.config import CONFIG_DIR

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SINKLM = shutil.which("sinklm", path=str(Path(sys.executable).parent)) or shutil.which("sinklm") or "sinklm"
STEPS, SAVE_EVERY, PROBE_EVERY = 8, 4, 2


def _args(data: Path, run_dir: Path) -> list[str]:
    return [
        str(CONFIG_DIR / "experiments" / "quickstart-sink1.yaml"), f"--data.path={data}", f"--train.run_dir={run_dir}",
        f"--train.max_steps={STEPS}", "--train.micro_batch_size=2", "--data.seq_len=64", "--data.text_tokens=62",
        "--train.eval_every=0", f"--checkpoint.every={SAVE_EVERY}", "--checkpoint.keep_last=2", "--logging.log_every=4",
        "--logging.progress_bar=false", f"--probe.every={PROBE_EVERY}", "--probe.num_tokens=256",
        "--probe.recent_size=28", "--probe.sink_inputs=8",
    ]


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """One `sinklm train` process (world of one) in a session of its own, so SIGKILL reaches all of it."""
    return subprocess.Popen([SINKLM, "train", *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(args: list[str], log: Path) -> None:
    assert _start(args, log).wait(timeout=300) == 0, log.read_text()[-3000:]


def _rows(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def reference(prepared_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("probe-train") / "reference"
    _finish(_args(prepared_corpus, run_dir), run_dir.with_suffix(".log"))
    return run_dir


def test_probe_rows_continue_after_sigkill(prepared_corpus, reference, tmp_path):
    """Kill after the step-6 probe (checkpoint at 4), resume: the probe rows are 2, 4, 6, 8 once each
    (the killed run's step-6 row is dropped and recomputed) and equal the uninterrupted run's, and
    training stays exact (the probe consumes no training randomness and leaves the mode as it was)."""
    run_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    args = _args(prepared_corpus, run_dir)
    proc = _start(args, log, env={"SINKLM_TEST_HOLD_BEFORE_LATEST": str(STEPS)})
    deadline = time.monotonic() + 240
    while not any(r["step"] == 6 for r in _rows(run_dir, "probe")):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no probe at step 6 in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (run_dir / "latest").read_text().strip() == f"global_step{SAVE_EVERY}"

    _finish(args, tmp_path / "resumed.log")
    got, want = _rows(run_dir, "probe"), _rows(reference, "probe")
    assert [r["step"] for r in got] == [2, 4, 6, 8]
    for a, b in zip(got, want):
        for key, value in b.items():
            if key != "seconds":
                assert a[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["step"], key)
    assert [r["loss"] for r in _rows(run_dir, "train")] == pytest.approx([r["loss"] for r in _rows(reference, "train")], rel=1e-6)


def test_run_folder_has_sinks_plot_and_compact_line(reference):
    """sinks.png sits beside loss.png; the console line is one compact probe summary."""
    assert (reference / "sinks.png").read_bytes()[:4] == b"\x89PNG"
    assert (reference / "loss.png").is_file()
    line = next(line for line in reference.with_suffix(".log").read_text().splitlines() if line.startswith("probe @ step 2:"))
    assert "sink metric" in line and "sink tokens" in line and "ppl 0+32" in line and len(line) < 200
    first = _rows(reference, "probe")[0]
    assert first["tokens_seen"] == 2 * 2 * 63 and {"sink_rate", "first_key_attn_L1", "sink_token_attn", "eviction_gap"} <= set(first)


def test_compare_steps_of_reproduces_the_probe_rows(reference, tmp_path, capsys):
    """`sinklm compare --steps-of RUN` probes each global_stepN as training did: its rows equal the
    run's probe records at those steps (the curves offline are the curves online)."""
    out = tmp_path / "by-step"
    assert compare_main(["--steps-of", str(reference), "-o", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "sinks_by_step.csv").open()))
    assert [int(r["step"]) for r in rows] == [4, 8]  # keep_last=2
    online = {r["step"]: r for r in _rows(reference, "probe")}
    for row in rows:
        want = online[int(row["step"])]
        for key in ("sink_rate", "first_key_attn", "sink_token_attn", "ppl_0+32", "ppl_1+31", "ppl_4+28", "tokens_seen"):
            assert float(row[key]) == pytest.approx(want[key], rel=1e-9), key
    assert (out / "sinks_by_step.png").read_bytes()[:4] == b"\x89PNG"
    assert compare_main(["--steps-of", str(reference), "--steps", "8", "-o", str(tmp_path / "one"), "--no-progress"]) == 0
    assert [r["step"] for r in json.loads((tmp_path / "one" / "sinks_by_step.json").read_text())["reference"]] == [8]
    capsys.readouterr()
    assert compare_main(["--steps-of", str(reference), "--steps", "5", "-o", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "no complete checkpoint at step(s) 5 (has 4, 8)" in capsys.readouterr().err
