"""The training probe's curves offline: ``sinklm compare --steps-of RUN`` / ``--revisions-of HUB``.

Every saved checkpoint of one run (its complete ``global_stepN`` folders, or those ``--steps``
names), or hub revisions of one model (``--revisions step1000,step2000,...`` of e.g.
``EleutherAI/pythia-70m``), gets the probe record (:func:`inference.probe.backend_probe`: sink
metric, attention on the first key / sink tokens / extra key, perplexity under s + (W - s) caches).
Written to the output folder: ``sinks_by_step.csv`` (one row per checkpoint), ``sinks_by_step.json``
(the records) and ``sinks_by_step.png`` (:func:`pretrain.metrics.plot_probe_curves`, the figure of a
run's ``sinks.png``).

A run is probed exactly as it was during training: the probe settings of its ``config.yaml`` and the
start of its validation split, so each row equals the run's ``probe`` record at that step (unless
``--text`` / ``--dataset`` names another text). Hub revisions take compare's options: W =
``--cache-size``, ``--start-sizes``, ``--sink-inputs``, the text options.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from data.shards import DataError
from inference.backends import Backend, load_backend
from inference.probe import backend_probe
from inference.stream import StreamError, TextSettings
from pretrain.checkpoints.training import STATE_FILE, list_checkpoints
from pretrain.config import ConfigError
from pretrain.metrics import plot_probe_curves
from pretrain.train_config import ProbeConfig, RunConfig, resolve_config

FILES = ("sinks_by_step.csv", "sinks_by_step.json", "sinks_by_step.png")
REVISION_STEP = re.compile(r"step(\d+)")


class ProbeStepsError(StreamError):
    """Bad --steps-of / --revisions-of input; the message names it."""


def parse_list(text: str | None, option: str, number: bool = False) -> list[Any] | None:
    """``"100,200"`` -> [100, 200] (``number``) or ["100", "200"]; None stays None."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ProbeStepsError(f"{option} is empty")
    if number:
        bad = [t for t in items if not t.isdigit()]
        if bad:
            raise ProbeStepsError(f"{option}: expected step numbers like 100,200, found {bad[0]!r}")
        return [int(t) for t in items]
    return items


def run_steps(run_dir: Path, wanted: list[int] | None) -> list[tuple[int, Path]]:
    """The run's complete checkpoints (``global_stepN`` with its state file), or the ``wanted`` ones."""
    complete = [(step, folder) for step, folder in list_checkpoints(run_dir) if (folder / STATE_FILE).is_file()]
    if not complete:
        raise ProbeStepsError(f"--steps-of {run_dir}: no complete global_stepN checkpoint there")
    if wanted is None:
        return complete
    have = dict(complete)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise ProbeStepsError(f"--steps: {run_dir} has no complete checkpoint at step(s) {', '.join(map(str, missing))} "
                              f"(has {', '.join(str(s) for s, _ in complete)})")
    return [(s, have[s]) for s in sorted(set(wanted))]


def _run_config(run_dir: Path) -> RunConfig:
    try:
        return resolve_config([run_dir / "config.yaml"])
    except (ConfigError, FileNotFoundError, OSError) as err:
        raise ProbeStepsError(f"--steps-of {run_dir}: cannot read its config.yaml ({err})") from None


def _validation_text(run: RunConfig, run_dir: Path) -> torch.Tensor:
    folder = run.validation_dir
    try:
        return torch.from_numpy(run.validation_text(run.probe.num_tokens).astype("int64"))
    except (DataError, FileNotFoundError, OSError, TypeError) as err:
        raise ProbeStepsError(f"--steps-of {run_dir}: its validation split {run.data.validation_split!r} in {folder} is not "
                              f"readable ({err}); give the text with --text or --dataset") from None


def _has_text(settings: TextSettings) -> bool:
    return bool(settings.text or settings.dataset)


def probe_run(run_dir: str | Path, settings, steps: list[int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """{run name: one probe record per checkpoint}, as the training probe computed them."""
    run_dir = Path(run_dir)
    points = run_steps(run_dir, steps)
    run = _run_config(run_dir)
    ids = None if _has_text(settings) else _validation_text(run, run_dir)
    records = []
    for step, folder in points:
        backend = _load(run_dir, settings, tag=folder.name)
        if ids is None:
            ids, _ = backend.tokenize_stream(settings)
        state = json.loads((folder / STATE_FILE).read_text())
        print(f"[compare] {run_dir.name} step {step}", file=sys.stderr)
        records.append({"step": step, "tokens_seen": state.get("tokens_seen"), **backend_probe(backend, ids, run.probe, settings.chunk_size)})
    return {run_dir.name: records}


def probe_revisions(hub_name: str, revisions: list[str], settings) -> dict[str, list[dict[str, Any]]]:
    """{hub name: one probe record per revision ``stepN``} with compare's cache and sink options."""
    steps = []
    for rev in revisions:
        match = REVISION_STEP.search(rev)
        if not match:
            raise ProbeStepsError(f"--revisions: {rev!r} names no training step (expected stepN, e.g. step1000)")
        steps.append(int(match.group(1)))
    starts = sorted(settings.start_sizes)
    probe = ProbeConfig(start_size=starts[-1], recent_size=settings.cache_size - starts[-1], eviction_starts=starts,
                        sink_inputs=settings.sink_inputs, sink_length=settings.sink_length)
    records, ids = [], None
    for rev, step in sorted(zip(revisions, steps), key=lambda pair: pair[1]):
        backend = _load(hub_name, settings, revision=rev)
        if ids is None:
            ids, _ = backend.tokenize_stream(settings)
        print(f"[compare] {hub_name}@{rev}", file=sys.stderr)
        records.append({"step": step, "revision": rev, **backend_probe(backend, ids, probe, settings.chunk_size)})
    return {hub_name: records}


def _load(spec: str | Path, settings, tag: str | None = None, revision: str | None = None) -> Backend:
    try:
        return load_backend(spec, None, settings.dtype, settings.device, settings.tokenizer, tag=tag, revision=revision,
                            device_map=getattr(settings, "device_map", None))
    except (ValueError, OSError) as err:
        where = f"{spec}@{revision}" if revision else f"{spec} {tag or ''}".strip()
        raise ProbeStepsError(f"{where}: {err}") from None


def write_step_curves(curves: dict[str, list[dict[str, Any]]], output_dir: str | Path) -> dict[str, Path]:
    """``sinks_by_step.{csv,json,png}`` in ``output_dir``, each through a temporary sibling."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for rows in curves.values():
        for r in rows:
            columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["model", *columns], lineterminator="\n")
    writer.writeheader()
    for name, rows in curves.items():
        writer.writerows({"model": name, **r} for r in rows)
    paths = {name: out / name for name in FILES}
    for name, text in (("sinks_by_step.csv", buf.getvalue()), ("sinks_by_step.json", json.dumps(curves, indent=2) + "\n")):
        tmp = paths[name].with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[name])
    plot_probe_curves(curves, paths["sinks_by_step.png"], "sink metric and eviction gap by training step")
    return paths


def summary_lines(curves: dict[str, list[dict[str, Any]]]) -> str:
    """A small markdown table: step, sink metric, the eviction perplexities."""
    lines = []
    for name, rows in curves.items():
        keys = [k for k in rows[0] if k.startswith("ppl_")]
        lines += [f"{name}:", "| step | sink metric (%) | " + " | ".join(k[4:] for k in keys) + " |",
                  "|---:|---:|" + "---:|" * len(keys)]
        for r in rows:
            lines.append(f"| {r['step']} | {100 * r.get('sink_rate', float('nan')):.1f} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"
