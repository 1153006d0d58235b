"""The zero-shot tasks of ``sinklm zeroshot`` (the paper's Table 4) and their lm-eval plumbing.

Offline, a task runs through our bundled config (``inference/lm_eval_tasks``: lm-eval's own prompts
and metrics, data from ``data/zeroshot``); online, through lm-eval's standard task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.lm_eval_tasks import TASKS_DIR


class ZeroShotError(ValueError):
    """Bad input to the zero-shot tool (unknown task, missing data, not a model, unsupported variant)."""


@dataclass(frozen=True)
class ZeroShotTask:
    key: str  # what users type: arc_easy
    column: str  # the paper's column header
    online: str  # lm-eval's standard task
    local: str | None  # our bundled task (inference/lm_eval_tasks), None when not bundled
    archive: str | None  # data/zeroshot/<archive>.tar.gz


# In the paper's column order (Table 4).
TASKS: tuple[ZeroShotTask, ...] = (
    ZeroShotTask("arc_challenge", "ARC-c", "arc_challenge", "sinklm_arc_challenge", "arc_challenge"),
    ZeroShotTask("arc_easy", "ARC-e", "arc_easy", "sinklm_arc_easy", "arc_easy"),
    ZeroShotTask("hellaswag", "HellaSwag", "hellaswag", "sinklm_hellaswag", "hellaswag"),
    ZeroShotTask("lambada", "LAMBADA", "lambada_openai", None, None),
    ZeroShotTask("openbookqa", "OpenBookQA", "openbookqa", "sinklm_openbookqa", "openbookqa"),
    ZeroShotTask("piqa", "PIQA", "piqa", "sinklm_piqa", "piqa"),
    ZeroShotTask("winogrande", "Winogrande", "winogrande", "sinklm_winogrande", "winogrande"),
)

METRICS = ("acc", "acc_norm")


def select_tasks(names: list[str] | None, online: bool) -> list[ZeroShotTask]:
    """Tasks by key (``arc_easy``) or by lm-eval name (``lambada_openai``, ``sinklm_piqa``); all by default."""
    if not names:
        return [t for t in TASKS if online or t.local]
    by_name = {}
    for task in TASKS:
        for alias in (task.key, task.online, task.local):
            if alias:
                by_name[alias] = task
    chosen: list[ZeroShotTask] = []
    for name in names:
        task = by_name.get(name.strip())
        if task is None:
            known = ", ".join(t.key for t in TASKS)
            raise ZeroShotError(f"unknown task {name!r}; known tasks: {known}")
        if not online and task.local is None:
            raise ZeroShotError(
                f"task {name!r} ({task.online}) is not bundled for offline use; run with --online to use "
                f"lm-eval's standard task (downloads its data)"
            )
        if task not in chosen:
            chosen.append(task)
    return chosen


def lm_eval_name(task: ZeroShotTask, online: bool) -> str:
    return task.online if online else task.local  # type: ignore[return-value]


def check_bundled_data(tasks: list[ZeroShotTask], data_dir: str | Path | None) -> None:
    """Fail before loading any model when a bundled archive is missing."""
    from inference.lm_eval_tasks.bundled_data import archive_path  # imports datasets: only when needed

    missing = [str(archive_path(t.archive, data_dir)) for t in tasks if t.archive]
    missing = [path for path in missing if not Path(path).is_file()]
    if missing:
        raise ZeroShotError(
            "bundled zero-shot data missing: " + ", ".join(missing) + " (expected <task>.tar.gz files as in "
            "data/zeroshot/README.md; or run with --online)"
        )


def task_manager(online: bool, data_dir: str | Path | None):
    """lm-eval's TaskManager: our bundled tasks only (offline; fast to index) or lm-eval's own."""
    from lm_eval.tasks import TaskManager

    if online:
        return TaskManager()
    metadata = {"data_dir": str(Path(data_dir).expanduser().resolve())} if data_dir else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def scores_from_results(
    results: dict[str, Any], tasks: list[ZeroShotTask], online: bool
) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` -> {task key: {metric: value, metric_stderr: value}} (filter ``none``)."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        row = results["results"].get(lm_eval_name(task, online), {})
        scores = {}
        for metric in METRICS:
            for suffix in ("", "_stderr"):
                value = row.get(f"{metric}{suffix},none")
                if isinstance(value, (int, float)):
                    scores[metric + suffix] = float(value)
        out[task.key] = scores
    return out


class _QuietCustomDatasetNote(logging.Filter):
    """lm-eval logs a note on how to pass metadata for every task with a custom dataset loader."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_QUIET_NOTE = _QuietCustomDatasetNote()


def quiet_custom_dataset_notes() -> None:
    logging.getLogger("lm_eval.api.task").addFilter(_QUIET_NOTE)  # adding the same filter twice is a no-op
