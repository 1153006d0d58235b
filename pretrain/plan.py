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

from data.indexed import open_indexed
from data.outputs import check_output_file
from data.pythia_batches import PYTHIA_GLOBAL_BATCH, PythiaBatchLoader
from data.shards import DataError, read_manifest
from data.token_source import INDEXED_TOKENIZER, is_megatron_source, open_token_source
from data.verify import split_identity, verify_data
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
    for key in ("format", "seed", "shuffle", "train_split"):
        if key in saved_data and saved_data[key] != getattr(run.data, key):
            raise ConfigError(f"{where} was trained with data.{key}={saved_data[key]!r}; this config has {getattr(run.data, key)!r}")
    saved_global = (saved.get("train") or {}).get("global_batch_size")
    if run.data.format == "pythia" and saved_global not in (None, run.train.global_batch_size):
        raise ConfigError(f"{where} was trained with train.global_batch_size={saved_global}; this config has {run.train.global_batch_size}")
    saved_data = point.state.get("train_data")
    if saved_data and "splits" in manifest and run.data.train_split in manifest["splits"]:
        data_now = split_identity(manifest, run.data.train_split)
        if saved_data != data_now:
            raise ConfigError(
                f"{where} was trained on other data: split {saved_data.get('split')!r} of {saved_data.get('tokens')} tokens "
                f"(sha256 {str(saved_data.get('sha256'))[:12]}), but {run.data.path} holds {data_now['tokens']} tokens "
                f"(sha256 {data_now['sha256'][:12]}); resume with the same data or start a new train.run_dir"
            )
    saved_world = point.state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise ConfigError(
            f"{where} was written by {saved_world} process(es); this run has {world_size}. Resume with the "
            f"same number of processes (ZeRO shards and each rank's data position depend on it)"
        )


def _read_prepared(folder: Path, key: str, run: RunConfig) -> dict[str, Any]:
    """The manifest of the prepared folder ``key`` names, its vocabulary checked against the model; for
    a Megatron dataset of documents its record (:meth:`data.token_source.TokenSource.record`, ids
    checked against ``model.vocab_size``: such data names no tokenizer, the bundled one is assumed)."""
    if is_megatron_source(folder):
        try:
            return open_token_source(folder, run.data.train_split, run.model.vocab_size).record()
        except DataError as err:
            raise ConfigError(f"{key}: {err}") from None
    if not folder.exists():
        raise ConfigError(f"{key}: {folder} does not exist; prepare it first, e.g. `sinklm data prepare --out {folder}`")
    manifest = read_manifest(folder)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab != run.model.vocab_size:
        raise ConfigError(
            f"vocabulary mismatch: {folder}/manifest.json was tokenized with a {vocab}-token vocabulary "
            f"({manifest['tokenizer'].get('spec')}) but model.vocab_size is {run.model.vocab_size}"
        )
    return manifest


def _has_validation(run: RunConfig, manifest: dict[str, Any]) -> bool:
    folder = run.validation_dir
    if folder is None:
        return False
    if folder != run.data.path or run.data.format != "shards":
        manifest = _read_prepared(Path(folder), "data.validation_path", run)
        if "indexed" in manifest:  # a Megatron dataset: validation reads all of it
            return True
        if run.data.validation_split not in manifest["splits"]:
            raise ConfigError(
                f"data.validation_path: {folder} has no split {run.data.validation_split!r} "
                f"(has {', '.join(manifest['splits'])}); set data.validation_split"
            )
    return run.data.validation_split in manifest.get("splits", ())  # none in data.path's Megatron dataset


def pythia_loader(run: RunConfig, rank: int, world_size: int) -> PythiaBatchLoader:
    """The ``data.format: pythia`` training loader at ``data.start_step`` (``plan_run`` builds one to
    check the data; the trainer builds its own)."""
    return PythiaBatchLoader(
        run.data.path,
        run.train.micro_batch_size,
        run.model.sink_token_ids,
        rank,
        world_size,
        global_batch_size=run.train.global_batch_size or PYTHIA_GLOBAL_BATCH,
        sample_tokens=run.text_tokens + 1,
        start_step=run.data.start_step or 0,
        model_vocab_size=run.model.padded_vocab_size,
    )


def _check_pythia_data(run: RunConfig, env: DistEnv) -> dict[str, Any]:
    """Sample length, global batch, start step and run length against the dataset (a header and one
    size read); returns the tokenizer record a checkpoint keeps in place of a manifest's."""
    gradient_accumulation_steps(run, env.world_size)  # the global batch splits into whole micro-batches
    try:
        dataset = open_indexed(run.data.path)
    except DataError as err:
        raise ConfigError(f"data.path (data.format=pythia): {err}") from None
    if not len(dataset):
        raise ConfigError(f"data.path (data.format=pythia): {dataset.idx_path} holds no samples")
    k, have = run.model.sink_tokens, int(dataset.sizes[0])
    if have != run.text_tokens + 1:
        raise ConfigError(
            f"data.text_tokens: {run.text_tokens} text tokens per sample need samples of {run.text_tokens + 1} tokens, "
            f"but {dataset.idx_path} holds samples of {have} (set data.text_tokens={have - 1}, data.seq_len={k + have - 1} "
            f"and model.max_seq_len >= {k + have - 1})"
        )
    loader = pythia_loader(run, env.rank, env.world_size)
    if run.train.max_steps > loader.num_steps:
        raise ConfigError(
            f"train.max_steps={run.train.max_steps} exceeds the {loader.num_steps} whole steps of "
            f"{loader.global_batch_size} samples in {dataset.idx_path}"
        )
    return {"tokenizer": dict(INDEXED_TOKENIZER, vocab_size=run.model.vocab_size)}


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
    try:
        check_output_file(run.train.run_dir, "train.run_dir folder")  # a file there failed only after DeepSpeed start-up
    except DataError as err:
        raise ConfigError(str(err)) from None
    if run.data.format == "pythia":
        manifest = _check_pythia_data(run, env)
    else:
        manifest = _read_prepared(Path(run.data.path), "data.path", run)
        splits = manifest.get("splits", {})
        if "indexed" not in manifest and run.data.train_split not in splits:
            raise ConfigError(f"data.train_split: {run.data.path} has no split {run.data.train_split!r} (has {', '.join(splits)})")
    has_validation = _has_validation(run, manifest)
    if run.probe.every and not has_validation:
        raise ConfigError(
            f"probe.every: the probe streams the validation split, but {run.validation_dir or 'data.validation_path (unset)'} "
            f"has no {run.data.validation_split!r}"
        )
    check_probe(run, probe)
    if run.train.init_from:
        check_init_for_training(Path(run.train.init_from))
    precision = resolve_precision(run.train.precision, env.device)
    grad_accum = gradient_accumulation_steps(run, env.world_size)
    point = _resume_point(run)
    if point is not None:
        _check_resume_compatible(run, point, manifest, env.world_size)
    if run.data.format != "pythia" and "indexed" not in manifest:  # the first expensive step, after every cheap check: shards vs sha256 (cached)
        verify_data(run.data.path, [run.data.train_split, run.data.validation_split], manifest, progress=env.is_main)
    return Plan(run, env, precision, grad_accum, manifest, point, has_validation)
