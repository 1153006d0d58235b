"""Stage bookkeeping for ``sinklm experiment``: a marker per finished stage in ``<report>/stages/``.

A stage is done when its marker records the same inputs (a hash of them); changing the inputs redoes it,
and later stages include earlier stages' keys in theirs, so retraining a variant also redoes what
depends on it. A marker cut short (a kill while it was written, a full disk) counts as not finished.

Progress lines carry an ETA: a training stage is its configured steps (less those its run folder
already logged) times the measured seconds per step, plus the measured start-up cost of a training
stage; both are read from the ``metrics.jsonl`` of runs that trained already, so there is no estimate
before the first training stage has run. Other stages count what stages of their kind took; a stage that
has not run yet and whose forward-pass workload is known (``forward_tokens``: compare, zeroshot) takes
that many tokens at three times the measured training throughput (a forward pass is about a third of a
training step's work); else a conservative constant. Every stage start and finish recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretrain.metrics import read_metrics

# seconds assumed for a stage kind none of which has run yet (on the high side: a CPU quickstart
# takes well under these, a 160m model on a GPU about this for compare and zeroshot)
DEFAULT_SECONDS = {"prepare": 120.0, "export": 60.0, "compare": 900.0, "zeroshot": 900.0}


class Stages:
    """Markers in ``<report>/stages/``: a stage is done when its marker holds the same inputs.

    ``planned``: every stage name in order; ``train_runs``: train stage name -> (run folder, the step it
    starts from, its last step), what the ETA of training is computed from."""

    def __init__(self, report: Path, planned: list[str] = (), train_runs: dict[str, tuple[Path, int, int]] | None = None,
                 forward_tokens: dict[str, int] | None = None):
        self.folder = report / "stages"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.planned = list(planned)
        self.train_runs = dict(train_runs or {})
        self.forward_tokens = dict(forward_tokens or {})
        self.started = time.time()
        self.ran: dict[str, float] = {}  # stages run (not skipped) in this invocation

    # ---- the estimate ------------------------------------------------------------------------

    def _step_costs(self) -> tuple[float, float] | None:
        """(seconds per training step, start-up seconds per training stage), measured, or None."""
        per_step, startup = [], []
        for name, (run_dir, _, _) in self.train_runs.items():
            times = [r["step_time"] for r in read_metrics(run_dir) if r.get("kind") == "train" and r.get("step_time")]
            if len(times) < 2:
                continue
            per_step.append(sum(times[1:]) / len(times[1:]))  # the first step pays for warm-up
            if name in self.ran:
                startup.append(max(0.0, self.ran[name] - sum(times)))
        if not per_step:
            return None
        return sum(per_step) / len(per_step), (sum(startup) / len(startup) if startup else 0.0)

    def _training_tokens_per_second(self) -> float | None:
        """The measured training throughput (mean of the logged tokens/s after the warm-up step), or None."""
        rates = [r["tokens_per_s"] for run_dir, _, _ in self.train_runs.values() for r in read_metrics(run_dir)[1:]
                 if r.get("kind") == "train" and r.get("tokens_per_s")]
        return sum(rates) / len(rates) if rates else None

    def _estimate(self, name: str, costs: tuple[float, float] | None) -> float | None:
        kind = name.split("-")[0]
        if name in self.train_runs:
            if costs is None:
                return None
            run_dir, first, last = self.train_runs[name]
            logged = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
            return costs[1] + max(0, last - max(logged, default=first)) * costs[0]
        same = [s for n, s in self.timings.items() if n.split("-")[0] == kind and n not in self.train_runs]
        if same:
            return sum(same) / len(same)
        rate = self._training_tokens_per_second() if name in self.forward_tokens else None
        return self.forward_tokens[name] / (3 * rate) if rate else DEFAULT_SECONDS.get(kind, 300.0)

    def eta(self) -> str:
        """', about H:MM:SS left' for the stages not finished yet ('' when none are left)."""
        remaining = [n for n in self.planned if n not in self.timings]
        if not remaining:
            return ""
        costs = self._step_costs()
        guesses = [self._estimate(n, costs) for n in remaining]
        if any(g is None for g in guesses):
            return ", ETA after the first training stage"
        return f", about {_clock(sum(guesses))} left"

    def _progress(self, name: str) -> str:
        done = len(self.timings) + 1
        total = max(len(self.planned), done)
        return f"[{done}/{total}, elapsed {_clock(time.time() - self.started)}{self.eta()}]"

    # ---- markers -----------------------------------------------------------------------------

    def _marker(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _read_marker(self, name: str) -> dict[str, Any] | None:
        """The finished stage's record, or None: no marker, or one cut short (said in one line)."""
        marker = self._marker(name)
        if not marker.is_file():
            return None
        try:
            record = json.loads(marker.read_text())
            if isinstance(record, dict) and "key" in record:
                return record
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        print(f"[experiment] {name}: marker {marker} is unreadable (cut short?); treating the stage as not finished", flush=True)
        return None

    @staticmethod
    def _key(inputs: Any) -> str:
        return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def key_of(self, name: str) -> str:
        """The recorded inputs key of a finished stage: later stages depend on it, so retraining a
        variant also redoes the comparison and the zero-shot evaluation."""
        record = self._read_marker(name)
        if record is None:
            raise RuntimeError(f"stage {name} has not finished (no readable marker in {self.folder})")
        return record["key"]

    def run(self, name: str, inputs: Any, work: Callable[[], None]) -> None:
        marker = self._marker(name)
        key = self._key(inputs)
        previous = self._read_marker(name)
        if previous is not None and previous.get("key") == key:
            self.timings[name] = float(previous.get("seconds", 0.0))
            print(f"[experiment] {name}: done earlier ({self.timings[name]:.0f} s), skipped", flush=True)
            return
        print(f"[experiment] {name}: starting {self._progress(name)}", flush=True)
        start = time.time()
        work()
        seconds = time.time() - start
        self.timings[name] = self.ran[name] = seconds
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "inputs": inputs, "seconds": seconds, "finished": time.ctime()}, default=str))
        os.replace(tmp, marker)
        print(f"[experiment] {name}: finished in {seconds:.0f} s{self.eta()}", flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
