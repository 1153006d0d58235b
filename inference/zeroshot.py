"""``sinklm zeroshot``: zero-shot accuracy of trained variants through lm-evaluation-harness (Table 4).

The paper's check that a sink token does not hurt quality: ARC-Challenge, ARC-Easy, HellaSwag,
LAMBADA, OpenBookQA, PIQA and Winogrande, zero-shot, with lm-eval's standard prompts and metrics.

- Offline (default): the six bundled validation splits (``data/zeroshot``), through the task
  configs in ``inference/lm_eval_tasks`` (lm-eval's own prompts/metrics, local data). LAMBADA is not
  bundled. Online (``--online``): lm-eval's standard tasks, downloading data, LAMBADA included.
- Models: any checkpoint :mod:`pretrain.checkpoints` resolves: HF folders (our exports, stock
  GPT-NeoX/Pythia, any causal LM) or hub names, our DeepSpeed run folders and initial checkpoints
  (rebuilt in memory as HF models). A sink-token model gets its sink ids in front of every context
  (:class:`inference.sink_hflm.SinkTokenHFLM`); softmax1 / sink_logit models run through their
  exported modelling code. A model whose variant cannot be run faithfully is refused.
- Output: ``table.md`` / ``table.csv`` (rows models, columns tasks; acc and acc_norm where lm-eval
  reports it) and ``raw/<model>.json`` (lm-eval's results, plus a ``sinklm`` record of what ran).

API: :func:`run_zeroshot` with :class:`ZeroShotSettings` (the CLI's flags are derived from it).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from data.settings import ArgumentParser, add_settings_args, settings_from_args
from inference.zeroshot_tasks import (
    METRICS,
    TASKS,
    ZeroShotError,
    ZeroShotTask,
    check_bundled_data,
    lm_eval_name,
    quiet_custom_dataset_notes,
    scores_from_results,
    select_tasks,
    task_manager,
)
from pretrain.checkpoints import DTYPES, CheckpointError, describe, dtype_name, load_model, parse_dtype, to_hf_model

__all__ = ["TASKS", "ModelResult", "ModelSource", "ZeroShotError", "ZeroShotSettings", "ZeroShotTask", "build_lm",
           "main", "markdown_table", "resolve_model", "run_zeroshot", "select_tasks", "write_outputs"]  # fmt: skip

# ---------------------------------------------------------------------------------------- settings

DtypeChoice = Literal[("auto", *DTYPES)]  # type: ignore[valid-type]


@dataclass
class ZeroShotSettings:
    """Everything ``sinklm zeroshot`` takes besides the models and the output folder."""

    tasks: list[str] = field(default_factory=list)
    """arc_challenge, arc_easy, hellaswag, lambada, openbookqa, piqa, winogrande or lm-eval task names
    (comma-separated on the command line); empty = all available."""
    limit: float | int | None = None
    """Only the first N documents per task (quick runs); a fraction < 1 is that share of each task."""
    online: bool = False
    """lm-eval's standard tasks, downloading their data."""
    data_dir: str | None = None
    """Folder with the bundled <task>.tar.gz (default: data/zeroshot)."""
    device: str | None = None
    """cuda, cuda:1, cpu (default: cuda if available)."""
    batch_size: int | str | None = None
    """Int or 'auto' (default: auto on GPU, 8 on CPU)."""
    dtype: DtypeChoice = "auto"
    """Weights' dtype (auto: as stored in the checkpoint)."""
    tokenizer: str | None = None
    """Tokenizer folder/file/hub name (default: the model's)."""
    trust_remote_code: bool = False
    """Allow a softmax1/sink_logit export's bundled modelling code to run (needed for those variants)."""

    def __post_init__(self) -> None:
        if self.limit is not None:
            if self.limit <= 0:
                raise ZeroShotError(f"--limit must be positive, got {self.limit}")
            if self.limit >= 1:  # lm-eval: a fraction < 1 means that share of each task
                self.limit = int(self.limit)
        if isinstance(self.batch_size, str) and not self.batch_size.startswith("auto"):
            try:
                self.batch_size = int(self.batch_size)
            except ValueError:
                raise ZeroShotError(f"--batch-size must be an int or 'auto', got {self.batch_size!r}") from None
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ZeroShotError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dtype != "auto":
            try:
                self.dtype = dtype_name(self.dtype)  # the name HF understands: float32, bfloat16, float16
            except CheckpointError as err:
                raise ZeroShotError(f"--dtype: {err}") from None
        select_tasks(self.tasks, self.online)  # unknown / not-bundled tasks fail here, before anything runs


# ---------------------------------------------------------------------------------------- models


@dataclass
class ModelSource:
    """What a model spec resolved to (recorded in ``raw/<model>.json``)."""

    name: str
    location: str  # a folder or a hub name
    kind: str  # "hf" (HF folder or hub name), "run" (our DeepSpeed run folder), "init" (initial checkpoint)
    attention: str = "softmax"
    sink_token_ids: list[int] = field(default_factory=list)
    variant: str = "vanilla"
    remote_code: bool = False  # the attention lives in the export's bundled modelling code
    revision: str | None = None  # a hub model's revision (``owner/name@revision``)


_KIND_OF_FORMAT = {"hf": "hf", "deepspeed": "run", "init": "init"}


def _split_name(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare PATH -> (None, PATH)."""
    name, sep, location = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, location
    return None, spec


def resolve_model(spec: str, trust_remote_code: bool = False, name: str | None = None) -> ModelSource:
    """``[NAME=]PATH_OR_HUB_NAME`` -> a :class:`ModelSource` (no weights read); clear errors for anything else."""
    if name is None:
        name, spec = _split_name(spec)
    try:
        info = describe(spec, trust_remote_code=trust_remote_code)
    except CheckpointError as err:
        raise ZeroShotError(str(err)) from None
    return ModelSource(
        name or info.name,
        info.hub_name or str(info.path),
        _KIND_OF_FORMAT[info.format],
        info.attention,
        list(info.sink_token_ids),
        info.variant,
        info.remote_code,
        info.resolved.revision if info.resolved else None,
    )


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def build_lm(
    source: ModelSource,
    device: str,
    batch_size: int | str,
    dtype: str = "auto",
    tokenizer: str | None = None,
):
    """The lm-eval model object for ``source`` (a :class:`SinkTokenHFLM`; plain HFLM when no sinks)."""
    from data.tokenizer import load_tokenizer
    from inference.sink_hflm import SinkTokenHFLM  # imports lm_eval: only when a model runs

    if source.kind == "hf":
        folder = Path(source.location)
        if tokenizer is None and folder.is_dir() and not _has_tokenizer_files(folder):
            raise ZeroShotError(f"{folder}: no tokenizer files (tokenizer.json); pass --tokenizer")
        return SinkTokenHFLM(
            pretrained=source.location,
            sink_token_ids=source.sink_token_ids,
            tokenizer=load_tokenizer(tokenizer, num_sink_tokens=len(source.sink_token_ids)) if tokenizer else None,
            device=device,
            batch_size=batch_size,
            dtype=dtype,
            trust_remote_code=source.remote_code,
            **({"revision": source.revision} if source.revision else {}),
        )
    try:
        loaded = load_model(source.location, tokenizer=tokenizer)
    except CheckpointError as err:
        raise ZeroShotError(str(err)) from None
    model = to_hf_model(loaded.config, loaded.model.state_dict())
    if dtype not in (None, "auto"):
        model = model.to(parse_dtype(dtype))
    model = model.to(device)
    return SinkTokenHFLM(
        pretrained=model, sink_token_ids=source.sink_token_ids, tokenizer=loaded.tokenizer, batch_size=batch_size
    )


# ---------------------------------------------------------------------------------------- running


@dataclass
class ModelResult:
    source: ModelSource
    scores: dict[str, dict[str, float]]  # task key -> {"acc": .., "acc_stderr": .., "acc_norm": .., ...}
    raw: dict[str, Any]


def _resolve_all(models: dict[str, str] | list[str], trust_remote_code: bool) -> list[ModelSource]:
    if isinstance(models, dict):
        sources = [resolve_model(path, trust_remote_code, name=name) for name, path in models.items()]
    else:
        sources = [resolve_model(spec, trust_remote_code) for spec in models]
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ZeroShotError(f"several models are named {duplicates}; name them with NAME=PATH")
    return sources


def evaluate(models: dict[str, str] | list[str], settings: ZeroShotSettings) -> list[ModelResult]:
    """Evaluate each model on the tasks; every model is resolved (and refused if need be) before any runs."""
    online, limit = settings.online, settings.limit
    chosen = select_tasks(settings.tasks, online)
    if not online:
        check_bundled_data(chosen, settings.data_dir)
    sources = _resolve_all(models, settings.trust_remote_code)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = settings.batch_size or ("auto" if device.startswith("cuda") else 8)

    import lm_eval

    quiet_custom_dataset_notes()
    manager = task_manager(online, settings.data_dir)
    task_names = [lm_eval_name(t, online) for t in chosen]
    results = []
    for index, source in enumerate(sources, 1):
        print(
            f"[{index}/{len(sources)}] {source.name} ({source.variant}, {source.location}): "
            f"{', '.join(task_names)}" + (f", limit {limit}" if limit else ""),
            file=sys.stderr,
            flush=True,
        )
        try:
            lm = build_lm(source, device, batch_size, dtype=settings.dtype, tokenizer=settings.tokenizer)
        except ZeroShotError:
            raise
        except (OSError, ValueError, KeyError) as err:  # transformers' errors for unloadable folders
            raise ZeroShotError(f"{source.location}: could not load the model ({type(err).__name__}: {err})") from None
        try:
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=task_names, task_manager=manager, limit=limit, log_samples=False
            )
        except (ConnectionError, OSError) as err:
            if not online:
                raise
            raise ZeroShotError(
                f"lm-eval could not load the standard tasks' data ({type(err).__name__}: {err}); without network, "
                f"run without --online to use the bundled data"
            ) from None
        raw["sinklm"] = {
            "model": asdict(source),
            "tasks": {t.key: lm_eval_name(t, online) for t in chosen},
            "online": online,
            "limit": limit,
        }
        results.append(ModelResult(source, scores_from_results(raw, chosen, online), raw))
        del lm  # free this model's memory before the next one loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def run_zeroshot(
    models: dict[str, str] | list[str], settings: ZeroShotSettings, out_dir: str | Path
) -> list[ModelResult]:
    """Evaluate ``models`` ({name: spec} or ``[NAME=]SPEC`` strings) and write table.md, table.csv and
    raw/<model>.json into ``out_dir`` (nothing is written when any model or task is refused)."""
    results = evaluate(models, settings)
    write_outputs(results, select_tasks(settings.tasks, settings.online), out_dir, settings.limit)
    return results


# ----------------------------------------------------------------------------------------- tables


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(results: list[ModelResult], tasks: list[ZeroShotTask], limit: int | float | None = None) -> str:
    """Rows models, columns tasks (paper order); a cell is ``acc / acc_norm`` in %, or ``acc`` alone."""
    header = ["Model", "Variant"] + [t.column for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [result.source.name, result.source.variant]
        for task in tasks:
            scores = result.scores.get(task.key, {})
            cell = _pct(scores.get("acc"))
            if "acc_norm" in scores:
                cell += " / " + _pct(scores["acc_norm"])
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    note = "Zero-shot accuracy (%), `acc / acc_norm` where lm-eval reports both."
    if limit:
        note += f" Only the first {limit} documents of each task (--limit): not comparable to published numbers."
    return "\n".join(lines) + "\n\n" + note + "\n"


def csv_rows(results: list[ModelResult], tasks: list[ZeroShotTask]) -> list[dict[str, Any]]:
    """One row per model: ``<task>/<metric>`` and ``<task>/<metric>_stderr`` as fractions, for the
    metrics lm-eval reported (Winogrande has no acc_norm)."""
    columns = [
        f"{task.key}/{metric}{suffix}"
        for task in tasks
        for metric in METRICS
        if any(metric in r.scores.get(task.key, {}) for r in results)
        for suffix in ("", "_stderr")
    ]
    rows = []
    for result in results:
        source = result.source
        row: dict[str, Any] = {"model": source.name, "variant": source.variant, "path": source.location}
        for column in columns:
            task_key, metric = column.split("/")
            row[column] = result.scores.get(task_key, {}).get(metric, "")
        rows.append(row)
    return rows


def write_outputs(results: list[ModelResult], tasks: list[ZeroShotTask], out_dir: str | Path, limit=None) -> Path:
    from lm_eval.utils import handle_non_serializable

    out = Path(out_dir)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    for result in results:
        safe = re.sub(r"[^\w.-]+", "_", result.source.name)
        text = json.dumps(result.raw, indent=2, default=handle_non_serializable, ensure_ascii=False)
        (out / "raw" / f"{safe}.json").write_text(text + "\n")
    (out / "table.md").write_text(markdown_table(results, tasks, limit))
    rows = csv_rows(results, tasks)
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["model"])
        writer.writeheader()
        writer.writerows(rows)
    return out


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sinklm zeroshot",
        description="Zero-shot accuracy (the paper's Table 4) through lm-evaluation-harness. Offline by default "
        "on the bundled validation splits of ARC-c/e, HellaSwag, OpenBookQA, PIQA, Winogrande; --online uses "
        "lm-eval's standard tasks (LAMBADA included).",
    )
    parser.add_argument(
        "models",
        nargs="+",
        help="[NAME=]MODEL: an HF folder (sinklm export, Pythia, ...), a hub name, a sinklm run folder or an "
        "initial checkpoint",
    )
    parser.add_argument("--out", default="reports/zeroshot", help="output folder (table.md, table.csv, raw/*.json)")
    add_settings_args(parser, ZeroShotSettings, skip=("limit", "batch_size"))
    # text parsed by ZeroShotSettings (a count or a fraction; an int or 'auto')
    parser.add_argument("--limit", type=float, default=None, help="only the first N documents per task (quick runs)")
    parser.add_argument("--batch-size", default=None, help="int or 'auto' (default: auto on GPU, 8 on CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(ZeroShotSettings, args)
        results = run_zeroshot(args.models, settings, args.out)
    except ZeroShotError as err:
        print(f"sinklm zeroshot: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(markdown_table(results, select_tasks(settings.tasks, settings.online), settings.limit))
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'} and {out / 'raw'}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
