"""Everything ``sinklm train`` decides before DeepSpeed starts, so bad input fails in a second:
the data and its vocabulary, the splits, the probe, ``train.init_from``, the precision, the
gradient accumulation, and the checkpoint to resume (with its compatibility checks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.shards import read_manifest
from pretrain.checkpoints.init_format import check_init_for_training
from pretrain.checkpoints.training import ResumePoint, check_same_shape, find_resume_point, read_latest
from pretrain.config import ConfigError
from pretrain.distributed import DistEnv, gradient_accumulation_steps, read_dist_env, resolve_precision
from pretrain.train_config import ProbeConfig, RunConfig

ProbeFn = Callable[[torch.nn.Module, torch.Tensor, ProbeConfig], dict[str, float]]
"""The training probe's evaluation: (model, 1-D validation token ids, ``probe`` section) -> the
values logged as ``probe`` in metrics.jsonl. ``sinklm train`` passes ``inference.probe.streaming_probe``."""


@dataclass
class Plan:
    """Everything decided before DeepSpeed starts."""

    run: RunConfig
    env: DistEnv
    precision: str
    grad_accum: int
    manifest: dict[str, Any]
    resume: ResumePoint | None
    has_validation: bool


def _resume_point(run: RunConfig) -> ResumePoint | None:
    mode, run_dir = run.train.resume, Path(run.train.run_dir)
    if mode == "never":
        if read_latest(run_dir):
            raise ConfigError(
                f"train.resume=never but {run_dir} already holds checkpoints (latest: {read_latest(run_dir)}); "
                "choose another train.run_dir or resume"
            )
        return None
    if mode == "auto":
        return find_resume_point(run_dir) if run_dir.is_dir() else None
    point = find_resume_point(mode)
    if point is None:
        raise ConfigError(f"train.resume: {mode} holds no complete checkpoint (no `latest` file)")
    return point


def _check_resume_compatible(run: RunConfig, point: ResumePoint, manifest: dict[str, Any], world_size: int) -> None:
    where = str(point.load_dir / point.tag)
    saved = point.state.get("config", {})
    check_same_shape(saved.get("model", {}), run.model, where)
    saved_tok = point.state.get("tokenizer", {}).get("fingerprint")
    if saved_tok and saved_tok != manifest["tokenizer"].get("fingerprint"):
        raise ConfigError(
            f"{where} was trained on data tokenized with fingerprint {saved_tok}, but {run.data.path} uses "
            f"{manifest['tokenizer'].get('fingerprint')}"
        )
    saved_text = point.state.get("text_tokens")
    if saved_text is not None and saved_text != run.text_tokens:
        raise ConfigError(f"{where} was trained with {saved_text} text tokens per sample; this config has {run.text_tokens}")
    saved_data = saved.get("data", {})
    for key in ("seed", "shuffle", "train_split"):
        if key in saved_data and saved_data[key] != getattr(run.data, key):
            raise ConfigError(f"{where} was trained with data.{key}={saved_data[key]!r}; this config has {getattr(run.data, key)!r}")
    saved_world = point.state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise ConfigError(
            f"{where} was written by {saved_world} process(es); this run has {world_size}. Resume with the "
            f"same number of processes (ZeRO shards and each rank's data position depend on it)"
        )


def check_probe(run: RunConfig, probe: ProbeFn | None) -> None:
    """``probe.every > 0`` needs the evaluation function (pretrain has none of its own)."""
    if run.probe.every and probe is None:
        raise ConfigError(
            f"probe.every={run.probe.every} needs an evaluation function: run `sinklm train` (python -m pretrain.train has none)"
        )


def plan_run(run: RunConfig, probe: ProbeFn | None = None) -> Plan:
    """Validate data, tokenizer, vocabulary, probe and resume folder; raise ConfigError / DataError.
    ``probe`` is the evaluation function the trainer will get (``probe.every > 0`` needs one)."""
    env = read_dist_env()
    data_dir = Path(run.data.path)
    if not data_dir.exists():
        raise ConfigError(
            f"data.path: {data_dir} does not exist; prepare it first, e.g. `sinklm data prepare --out {data_dir}`"
        )
    manifest = read_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab != run.model.vocab_size:
        raise ConfigError(
            f"vocabulary mismatch: {data_dir}/manifest.json was tokenized with a {vocab}-token vocabulary "
            f"({manifest['tokenizer'].get('spec')}) but model.vocab_size is {run.model.vocab_size}"
        )
    splits = manifest["splits"]
    if run.data.train_split not in splits:
        raise ConfigError(f"data.train_split: {data_dir} has no split {run.data.train_split!r} (has {', '.join(splits)})")
    has_validation = run.data.validation_split in splits
    if run.probe.every and not has_validation:
        raise ConfigError(f"probe.every: the probe streams the validation split, but {data_dir} has no {run.data.validation_split!r}")
    check_probe(run, probe)
    if run.train.init_from:
        check_init_for_training(Path(run.train.init_from))
    precision = resolve_precision(run.train.precision, env.device)
    grad_accum = gradient_accumulation_steps(run, env.world_size)
    point = _resume_point(run)
    if point is not None:
        _check_resume_compatible(run, point, manifest, env.world_size)
    return Plan(run, env, precision, grad_accum, manifest, point, has_validation)
