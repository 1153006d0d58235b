"""``sinklm zeroshot``: zero-shot accuracy of trained variants through lm-evaluation-harness (Table 4).

The paper's check that a sink token does not hurt quality: ARC-Challenge, ARC-Easy, HellaSwag,
LAMBADA, OpenBookQA, PIQA and Winogrande, zero-shot, with lm-eval's standard prompts and metrics.

- Offline (default): the six bundled validation splits (``data/zeroshot``), through the task
  configs in ``inference/lm_eval_tasks`` (lm-eval's own prompts/metrics, local data). LAMBADA is not
  bundled. Online (``--online``): lm-eval's standard tasks, downloading data, LAMBADA included.
- Models: HF folders (our exports, stock GPT-NeoX/Pythia, any causal LM) or hub names, our
  DeepSpeed run folders and initial checkpoints (rebuilt in memory as HF models). A sink-token
  model gets its sink ids in front of every context (:class:`inference.sink_hflm.SinkTokenHFLM`);
  softmax1 / sink_logit models run through their exported modelling code. A model whose variant
  cannot be run faithfully is refused.
- Output: ``table.md`` / ``table.csv`` (rows models, columns tasks; acc and acc_norm where lm-eval
  reports it) and ``raw/<model>.json`` (lm-eval's results, plus a ``sinklm`` record of what ran).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_KINDS = ("softmax", "softmax1", "sink_logit")


class ZeroShotError(ValueError):
    """Bad input to the zero-shot tool (unknown task, missing data, not a model, unsupported variant)."""


# ----------------------------------------------------------------------------------------- tasks


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
    from inference.lm_eval_tasks.bundled_data import archive_path

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

    from inference.lm_eval_tasks import TASKS_DIR

    if online:
        return TaskManager()
    metadata = {"data_dir": str(Path(data_dir).expanduser().resolve())} if data_dir else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


# ---------------------------------------------------------------------------------------- models


@dataclass
class ModelSource:
    """What a model spec on the command line resolved to."""

    name: str
    location: str  # a folder or a hub name
    kind: str  # "hf" (HF folder or hub name), "run" (our DeepSpeed run folder), "init" (initial checkpoint)
    attention: str = "softmax"
    sink_token_ids: list[int] = field(default_factory=list)
    variant: str = "vanilla"
    remote_code: bool = False  # the attention lives in the export's bundled modelling code


def _split_name(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare PATH -> (None, PATH)."""
    name, sep, location = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, location
    return None, spec


def _looks_like_hub_name(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.startswith((".", "/", "~"))


def variant_of_hf_config(
    config: dict[str, Any], where: str, trust_remote_code: bool
) -> tuple[str, list[int], str, bool]:
    """(attention, sink ids, variant, needs remote code) from a ``config.json`` mapping, or refuse.

    Our exports carry a ``sinklm`` field; a folder without one is an ordinary model (vanilla).
    """
    model_type = config.get("model_type")
    sinklm = config.get("sinklm")
    if sinklm is None:
        if model_type == "sinklm_gpt_neox":
            raise ZeroShotError(
                f"{where}: model_type 'sinklm_gpt_neox' but no 'sinklm' field naming its attention kind and "
                f"sink tokens; refusing to guess the variant"
            )
        return "softmax", [], "vanilla", False
    if not isinstance(sinklm, dict):
        raise ZeroShotError(f"{where}: field 'sinklm' must be a mapping, found {type(sinklm).__name__}")
    attention = sinklm.get("attention", "softmax")
    if attention not in ATTENTION_KINDS:
        raise ZeroShotError(
            f"{where}: sinklm.attention is {attention!r}; expected one of {', '.join(ATTENTION_KINDS)}"
        )
    ids = sinklm.get("sink_token_ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ZeroShotError(f"{where}: sinklm.sink_token_ids must be a list of ints, found {ids!r}")
    count = sinklm.get("sink_tokens", len(ids))
    if count != len(ids):
        raise ZeroShotError(
            f"{where}: sinklm.sink_tokens is {count} but sinklm.sink_token_ids lists {len(ids)} id(s) {ids}"
        )
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and any(not 0 <= i < vocab for i in ids):
        raise ZeroShotError(f"{where}: sink token ids {ids} are outside vocab_size {vocab}")
    remote_code = attention != "softmax"
    if remote_code:
        if model_type == "gpt_neox" or not config.get("auto_map"):
            raise ZeroShotError(
                f"{where}: sinklm.attention is {attention!r} but the folder would load as stock "
                f"{model_type!r} (model_type / auto_map), which runs plain softmax attention; refusing to "
                f"evaluate it as vanilla. Re-export it with `sinklm convert`."
            )
        if not trust_remote_code:
            raise ZeroShotError(
                f"{where}: a {attention} model runs through the modelling code bundled in its folder; "
                f"rerun with --trust-remote-code to allow that code"
            )
    variant = sinklm.get("variant") or _variant_name(attention, len(ids))
    return attention, list(ids), str(variant), remote_code


def _variant_name(attention: str, sinks: int) -> str:
    if sinks:
        return ("" if attention == "softmax" else f"{attention}+") + f"sink{sinks}"
    return "vanilla" if attention == "softmax" else attention


_SINK_TOKEN = re.compile(r"^<\|sink(_\d+)?\|>$")


def _check_tokenizer_sinks(folder: Path, sink_ids: list[int]) -> None:
    """A folder whose tokenizer has sink tokens must declare exactly those ids as the model's sinks:
    otherwise config.json and tokenizer disagree on what the model was trained with."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return
    try:
        added = json.loads(file.read_text()).get("added_tokens") or []
    except (OSError, json.JSONDecodeError) as err:
        raise ZeroShotError(f"{file}: not readable JSON ({err})") from None
    tokenizer_sinks = sorted(t["id"] for t in added if isinstance(t, dict) and _SINK_TOKEN.match(str(t.get("content"))))
    if tokenizer_sinks and tokenizer_sinks != sorted(sink_ids):
        raise ZeroShotError(
            f"{folder}: the tokenizer has sink tokens at ids {tokenizer_sinks} but config.json declares sink "
            f"token ids {sink_ids} (field sinklm.sink_token_ids); refusing to guess which the model was trained with"
        )


def resolve_model(spec: str, trust_remote_code: bool = False) -> ModelSource:
    """``[NAME=]PATH_OR_HUB_NAME`` -> a :class:`ModelSource`; clear errors for anything else."""
    name, location = _split_name(spec)
    path = Path(location).expanduser()
    if path.is_dir():
        default_name = path.resolve().name
        if (path / "config.json").is_file():
            try:
                config = json.loads((path / "config.json").read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ZeroShotError(f"{path / 'config.json'}: not readable JSON ({err})") from None
            if not isinstance(config, dict):
                raise ZeroShotError(f"{path / 'config.json'}: expected a JSON object")
            attention, ids, variant, remote = variant_of_hf_config(config, str(path / "config.json"), trust_remote_code)
            _check_tokenizer_sinks(path, ids)
            return ModelSource(name or default_name, str(path), "hf", attention, ids, variant, remote)
        kind = _checkpoint_kind(path)
        config = _our_model_config(path, kind)
        return ModelSource(
            name or default_name, str(path), kind, config.attention, config.sink_token_ids, config.variant, False
        )
    if path.exists():
        raise ZeroShotError(f"{path}: is a file, not a model folder")
    if not _looks_like_hub_name(location):
        raise ZeroShotError(f"{location}: no such model folder")
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(location)
    except OSError as err:
        raise ZeroShotError(
            f"{location}: not a local folder and its config.json could not be fetched from the hub ({err})"
        ) from None
    attention, ids, variant, remote = variant_of_hf_config(config, f"{location} config.json", trust_remote_code)
    return ModelSource(name or location.split("/")[-1], location, "hf", attention, ids, variant, remote)


def _checkpoint_kind(path: Path) -> str:
    """``run`` (a DeepSpeed run folder, or one of its ``global_stepN`` folders) or ``init``."""
    from pretrain.init_checkpoint import is_init_checkpoint

    if is_init_checkpoint(path):
        return "init"
    if (path / "config.yaml").is_file() and ((path / "latest").is_file() or any(path.glob("global_step*"))):
        return "run"
    if path.name.startswith("global_step") and (path.parent / "config.yaml").is_file():
        return "run"
    raise ZeroShotError(
        f"{path}: not a model folder; expected config.json (a Hugging Face model / sinklm export), "
        f"config.yaml + latest (a sinklm training run, or one of its global_stepN folders) or model.yaml + "
        f"model.safetensors (an initial checkpoint)"
    )


def _our_model_config(path: Path, kind: str):
    """The ModelConfig of a run folder (config.yaml's ``model`` section) or of an init checkpoint."""
    from pretrain.config import ConfigError, ModelConfig, load_yaml

    if kind == "init":
        file = path / "model.yaml"
    else:
        file = path / "config.yaml" if (path / "config.yaml").is_file() else path.parent / "config.yaml"
    try:
        data = load_yaml(file)
        section = data if kind == "init" else data.get("model")
        if not isinstance(section, dict):
            raise ConfigError(f"no 'model' section (found keys {sorted(data)})")
        return ModelConfig.from_dict(section)
    except (ConfigError, OSError, ValueError) as err:
        raise ZeroShotError(f"{file}: {err}") from None


def _hf_model_from_ours(config, state: dict) -> Any:
    """An in-memory HF model with our weights: stock GPT-NeoX for softmax attention, the bundled
    export code (imported from the package, so no remote code is involved) for softmax1 / sink_logit."""
    from pretrain.hf_keymap import load_into_hf_model, to_hf_config, to_hf_state_dict

    hf_config = to_hf_config(config)
    if config.attention == "softmax":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        model = GPTNeoXForCausalLM(GPTNeoXConfig(**hf_config))
    else:
        from pretrain.hf_export.configuration_sinklm import SinkLMGPTNeoXConfig
        from pretrain.hf_export.modeling_sinklm import SinkLMGPTNeoXForCausalLM

        fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
        sinklm = {
            "attention": config.attention,
            "sink_tokens": config.sink_tokens,
            "sink_token_ids": config.sink_token_ids,
            "variant": config.variant,
        }
        model = SinkLMGPTNeoXForCausalLM(SinkLMGPTNeoXConfig(**fields, sinklm=sinklm))
    load_into_hf_model(model, to_hf_state_dict(state))
    return model.eval()


def _load_ours(source: ModelSource, tokenizer: str | None):
    """(ModelConfig, our state dict, tokenizer | None) of a run folder or initial checkpoint."""
    try:
        from pretrain.convert import load_model
    except ImportError as err:
        raise ZeroShotError(f"{source.location}: reading a sinklm checkpoint needs pretrain.convert ({err})") from None
    try:
        loaded = load_model(source.location, tokenizer=tokenizer)
    except (OSError, ValueError, KeyError) as err:  # ConvertError / ConfigError are ValueErrors
        raise ZeroShotError(f"{source.location}: {err}") from None
    return loaded.config, loaded.model.state_dict(), loaded.tokenizer


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
    import torch

    from data.tokenizer import load_tokenizer
    from inference.sink_hflm import SinkTokenHFLM

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
        )
    config, state, tok = _load_ours(source, tokenizer)
    model = _hf_model_from_ours(config, state)
    if dtype not in (None, "auto"):
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model = model.to(device)
    if tok is None:  # an initial checkpoint names no tokenizer: the bundled one, as training uses by default
        tok = load_tokenizer(num_sink_tokens=config.sink_tokens, padded_vocab_size=config.padded_vocab_size)
    return SinkTokenHFLM(pretrained=model, sink_token_ids=source.sink_token_ids, tokenizer=tok, batch_size=batch_size)


# ---------------------------------------------------------------------------------------- running


@dataclass
class ModelResult:
    source: ModelSource
    scores: dict[str, dict[str, float]]  # task key -> {"acc": .., "acc_stderr": .., "acc_norm": .., ...}
    raw: dict[str, Any]


METRICS = ("acc", "acc_norm")


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


def evaluate(
    models: list[str],
    tasks: list[str] | None = None,
    online: bool = False,
    limit: int | float | None = None,
    device: str | None = None,
    batch_size: int | str | None = None,
    dtype: str = "auto",
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    data_dir: str | Path | None = None,
) -> list[ModelResult]:
    """Evaluate each model on the tasks; every model is resolved (and refused if need be) before any runs."""
    import torch

    chosen = select_tasks(tasks, online)
    if not online:
        check_bundled_data(chosen, data_dir)
    sources = [resolve_model(spec, trust_remote_code) for spec in models]
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ZeroShotError(f"several models are named {duplicates}; name them with NAME=PATH")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = batch_size or ("auto" if device.startswith("cuda") else 8)

    import lm_eval

    logging.getLogger("lm_eval.api.task").addFilter(_QUIET_NOTE)  # adding the same filter twice is a no-op
    manager = task_manager(online, data_dir)
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
            lm = build_lm(source, device=device, batch_size=batch_size, dtype=dtype, tokenizer=tokenizer)
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
    parser = argparse.ArgumentParser(
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
    parser.add_argument(
        "--tasks", default=None, help="comma-separated: " + ",".join(t.key for t in TASKS) + " (default: all available)"
    )
    parser.add_argument("--limit", type=float, default=None, help="only the first N documents per task (quick runs)")
    parser.add_argument("--online", action="store_true", help="lm-eval's standard tasks, downloading their data")
    parser.add_argument(
        "--data-dir", default=None, help="folder with the bundled <task>.tar.gz (default: data/zeroshot)"
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--batch-size", default=None, help="int or 'auto' (default: auto on GPU, 8 on CPU)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype (auto: as stored in the checkpoint)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder/file/hub name (default: the model's)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a softmax1/sink_logit export's bundled modelling code to run (needed for those variants)",
    )
    return parser


def _parse_limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    if value <= 0:
        raise ZeroShotError(f"--limit must be positive, got {value}")
    return int(value) if value >= 1 else value  # lm-eval: a fraction < 1 means that share of each task


def _parse_batch_size(value: str | None) -> int | str | None:
    if value is None or value.startswith("auto"):
        return value
    try:
        size = int(value)
    except ValueError:
        raise ZeroShotError(f"--batch-size must be an int or 'auto', got {value!r}") from None
    if size < 1:
        raise ZeroShotError(f"--batch-size must be >= 1, got {size}")
    return size


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tasks = [t for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        chosen = select_tasks(tasks, args.online)
        limit = _parse_limit(args.limit)
        results = evaluate(
            args.models,
            tasks=[t.key for t in chosen],
            online=args.online,
            limit=limit,
            device=args.device,
            batch_size=_parse_batch_size(args.batch_size),
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            trust_remote_code=args.trust_remote_code,
            data_dir=args.data_dir,
        )
    except ZeroShotError as err:
        print(f"sinklm zeroshot: {err}", file=sys.stderr)
        return 2
    out = write_outputs(results, chosen, args.out, limit)
    print(markdown_table(results, chosen, limit))
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'} and {out / 'raw'}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
