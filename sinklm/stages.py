"""Stage bookkeeping for ``sinklm experiment``: a marker per finished stage in ``<report>/stages/``.

A stage is done when its marker records the same inputs (a hash of them); changing the inputs redoes it,
and later stages include earlier stages' keys in theirs, so retraining a variant also redoes what
depends on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Stages:
    """Markers in ``<report>/stages/``: a stage is done when its marker holds the same inputs."""

    def __init__(self, report: Path, planned: list[str] = ()):
        self.folder = report / "stages"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.planned = list(planned)
        self.started = time.time()
        self.ran: dict[str, float] = {}  # stages run (not skipped) in this invocation

    def _eta(self) -> str:
        """Time left, guessed from stages of the same kind (``train-*``...) run so far."""
        remaining = [n for n in self.planned if n not in self.timings]
        if not self.ran or not remaining:
            return ""
        by_kind: dict[str, list[float]] = {}
        for name, seconds in self.ran.items():
            by_kind.setdefault(name.split("-")[0], []).append(seconds)
        guesses = [sum(v) / len(v) for k, v in by_kind.items()]
        default = sum(guesses) / len(guesses)
        left = sum((lambda v: sum(v) / len(v))(by_kind[n.split("-")[0]]) if n.split("-")[0] in by_kind else default for n in remaining)
        return f", about {_clock(left)} left"

    def _progress(self, name: str) -> str:
        done = len(self.timings) + 1
        total = max(len(self.planned), done)
        return f"[{done}/{total}, elapsed {_clock(time.time() - self.started)}{self._eta()}]"

    def _marker(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    @staticmethod
    def _key(inputs: Any) -> str:
        return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def key_of(self, name: str) -> str:
        """The recorded inputs key of a finished stage: later stages depend on it, so retraining a
        variant also redoes the comparison and the zero-shot evaluation."""
        return json.loads(self._marker(name).read_text())["key"]

    def run(self, name: str, inputs: Any, work: Callable[[], None]) -> None:
        marker = self._marker(name)
        key = self._key(inputs)
        if marker.is_file():
            previous = json.loads(marker.read_text())
            if previous.get("key") == key:
                self.timings[name] = previous.get("seconds", 0.0)
                print(f"[experiment] {name}: done earlier ({previous['seconds']:.0f} s), skipped", flush=True)
                return
        print(f"[experiment] {name}: starting {self._progress(name)}", flush=True)
        start = time.time()
        work()
        seconds = time.time() - start
        self.timings[name] = self.ran[name] = seconds
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "inputs": inputs, "seconds": seconds, "finished": time.ctime()}, default=str))
        os.replace(tmp, marker)
        print(f"[experiment] {name}: finished in {seconds:.0f} s", flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"
