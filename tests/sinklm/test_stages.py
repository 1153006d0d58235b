"""The experiment's stage markers and its ETA (sinklm/stages.py)."""

from __future__ import annotations

import json

from sinklm.stages import DEFAULT_SECONDS, Stages


def _log_steps(run_dir, steps: int, seconds: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": "train", "step": s, "loss": 1.0, "step_time": 3.0 if s == 1 else seconds} for s in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eta_comes_from_configured_steps_and_measured_step_time(tmp_path):
    """Prevents the old guess (every stage as long as the stages so far: "1:22 left" for a 12-minute
    run after a fast prepare): no ETA before a training stage has run, then steps x measured seconds
    per step (warm-up step excluded; steps a run folder already logged are not counted again), the
    other stages at their measured or default cost, refined as each stage finishes."""
    runs = tmp_path / "runs"
    planned = ["prepare", "train-a", "export-a", "train-b", "export-b", "compare"]
    stages = Stages(tmp_path, planned, {"train-a": (runs / "a", 0, 10), "train-b": (runs / "b", 0, 20)})
    stages.run("prepare", {}, lambda: None)
    assert stages.eta() == ", ETA after the first training stage"
    stages.run("train-a", {}, lambda: _log_steps(runs / "a", 10, 0.5))
    # export-a (default) + train-b (20 x 0.5 s) + export-b (default) + compare (default)
    left = 2 * DEFAULT_SECONDS["export"] + 20 * 0.5 + DEFAULT_SECONDS["compare"]
    assert stages.eta() == f", about {left // 60:.0f}:{left % 60:02.0f} left"
    stages.run("export-a", {}, lambda: None)  # measured: ~0 s, now the estimate for export-b too
    _log_steps(runs / "b", 6, 0.5)  # an interrupted earlier attempt at b: 14 steps to go
    left = 14 * 0.5 + DEFAULT_SECONDS["compare"]
    assert stages.eta() == f", about {left // 60:.0f}:{left % 60:02.0f} left"


def test_eta_of_a_continued_run_counts_from_its_start_step(tmp_path):
    """Prevents an ETA of 101,000 steps for continuing Pythia from step 100,000 to 101,000 (its steps
    count from data.start_step): a run not yet started costs last - first steps."""
    runs = tmp_path / "runs"
    stages = Stages(tmp_path, ["train-a", "train-b"], {"train-a": (runs / "a", 0, 10), "train-b": (runs / "b", 100, 110)})
    stages.run("train-a", {}, lambda: _log_steps(runs / "a", 10, 2.0))
    assert stages.eta() == ", about 0:20 left"  # 10 steps x 2 s, not 110 x 2 s


def test_eta_of_evaluation_stages_follows_measured_throughput(tmp_path):
    """Prevents the quickstart's "about 38:31 left" after its first training stage (compare and
    zeroshot at fixed 15-minute guesses for a job that took 52 s): a stage with a known forward-pass
    workload is estimated at three times the measured training tokens/s."""
    runs = tmp_path / "runs"
    stages = Stages(tmp_path, ["train-a", "compare"], {"train-a": (runs / "a", 0, 4)}, {"compare": 600_000})
    rows = [{"kind": "train", "step": s, "loss": 1.0, "step_time": 1.0, "tokens_per_s": 1000.0 if s > 1 else 10.0}
            for s in range(1, 5)]

    def train():
        (runs / "a").mkdir(parents=True)
        (runs / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    stages.run("train-a", {}, train)
    assert stages.eta() == ", about 3:20 left"  # 600,000 tokens / (3 x 1,000 tokens/s) = 200 s


def test_truncated_marker_is_not_finished(tmp_path, capsys):
    """A marker cut short by a kill must not crash the experiment (JSONDecodeError): one line says
    so, the stage runs again, and its new marker makes the next run skip it."""
    stages = Stages(tmp_path, ["prepare"])
    (tmp_path / "stages" / "prepare.json").write_text('{"key": "0123')
    ran = []
    stages.run("prepare", {"x": 1}, lambda: ran.append(1))
    out = capsys.readouterr().out
    assert ran == [1]
    assert out.count("unreadable (cut short?); treating the stage as not finished") == 1
    Stages(tmp_path, ["prepare"]).run("prepare", {"x": 1}, lambda: ran.append(2))
    assert ran == [1] and "done earlier" in capsys.readouterr().out
