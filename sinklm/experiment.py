"""``sinklm experiment CONFIG``: the paper's experiment end to end, with one report folder.

Stages, each run with identical settings for every variant, each skipped on a re-run once done
(:mod:`sinklm.stages`: a marker records its inputs; changing them redoes the stage):

1. ``prepare``   tokenize the corpus (default: the bundled books): :func:`data.prepare.prepare_with`
2. ``train``     ``sinklm train`` per trained variant through DeepSpeed: one process on a CPU, every
                 GPU via ``launch/torchrun.sh`` when GPUs are present; interrupted runs resume. The
                 only stage in a subprocess (torchrun/deepspeed need their own processes).
3. ``export``    each run to a Hugging Face folder: :func:`pretrain.checkpoints.convert`
4. ``compare``   :func:`inference.compare.run_compare`: s+(W-s) caches, dense, sliding-window
                 recompute, sink metric, attention maps, perplexity curves
5. ``zeroshot``  :func:`inference.zeroshot.run_zeroshot` on the bundled validation sets
6. ``report``    ``index.md`` (:mod:`sinklm.report`) from the stages' typed results

Each section of the experiment config is the settings dataclass of the API its stage calls (the same
one the tool's CLI flags are derived from), so the report's tables are the tools' own outputs.

A variant is trained here (a training config) or is an existing checkpoint (``checkpoint:``, e.g.
EleutherAI's released Pythia at the step the sink variants reached): that one skips ``train`` and
``export`` and enters ``compare``, ``zeroshot`` and the report as it is, described (and checked, before
any stage runs) by the one checkpoint layer, :func:`pretrain.checkpoints.describe`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data.indexed import is_indexed_dataset
from data.prepare import PrepareSettings, prepare_with
from data.settings import ArgumentParser, ConfigError, apply_override, from_dict, load_yaml, parse_override, to_dict
from data.shards import DataError
from inference.backends import check_streamable
from inference.compare import CompareSettings, run_compare
from inference.compare_report import CompareResult
from inference.stream import StreamError
from inference.zeroshot import ZeroShotSettings, run_zeroshot
from pretrain.checkpoints import CheckpointError, CheckpointInfo, ExportSettings, convert, describe
from pretrain.checkpoints.init_format import start_step_from_init
from pretrain.train_config import RunConfig, resolve_config
from sinklm.report import write_report
from sinklm.stages import Stages

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PrepareStage(PrepareSettings):
    """The ``prepare`` stage: :class:`data.prepare.PrepareSettings` (default: the bundled books)."""

    enabled: bool = True
    """Run the preparation into ``data_path`` (false: the folder is prepared already)."""
    overwrite: bool = True
    """Re-prepare ``data_path`` when the stage's inputs changed."""


@dataclass
class ExportStage(ExportSettings):
    """The ``export`` stage: :class:`pretrain.checkpoints.ExportSettings` for every run."""

    to: Literal["hf", "init"] | None = "hf"
    """Hugging Face folders (what compare and zeroshot read)."""
    overwrite: bool = True
    """Replace the experiment's own earlier export of a retrained variant."""


@dataclass
class CompareStage(CompareSettings):
    """The ``compare`` stage: :class:`inference.compare.CompareSettings` with the experiment's defaults."""

    cache_size: int = 256
    """W: total cache size; columns are s+(W-s) for each start size."""
    max_tokens: int | None = 20000
    """Tokens of the stream-test text streamed through every model and cache."""


@dataclass
class ZeroShotStage(ZeroShotSettings):
    """The ``zeroshot`` stage: :class:`inference.zeroshot.ZeroShotSettings`."""

    enabled: bool = True
    """Run it at all."""
    trust_remote_code: bool = True
    """softmax1 / sink_logit exports run through their bundled modelling code (ours)."""


@dataclass
class VariantSpec:
    """One variant: trained here from a training config, or an existing checkpoint evaluated as it is.
    In YAML a bare string is a training config; a mapping names one of the two."""

    config: str = ""
    """Training config (relative to the experiment file, else as given): the variant is trained,
    exported, then evaluated."""
    checkpoint: str = ""
    """An existing model, evaluated without training or export: a hub name with an optional
    ``@revision`` (``EleutherAI/pythia-160m-deduped@step101000``), a Hugging Face folder, a run folder
    of ``sinklm train`` (the checkpoint its ``latest`` names) or one of its ``global_stepN`` folders,
    or an initial checkpoint; a local path is relative to the working directory."""

    @property
    def trained(self) -> bool:
        return bool(self.config)


def _variant_spec(name: str, value: Any) -> VariantSpec:
    where = f"experiment.variants.{name}"
    if isinstance(value, str):
        value = {"config": value}
    if isinstance(value, VariantSpec):
        spec = value
    elif isinstance(value, dict):
        try:
            spec = from_dict(VariantSpec, value)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    else:
        raise ConfigError(f"{where}: expected a training config file or a mapping such as "
                          f"{{checkpoint: owner/name@revision}}, found {value!r}")
    if spec.config and spec.checkpoint:
        raise ConfigError(f"{where}: both checkpoint ({spec.checkpoint}: an existing model, not trained) and config "
                          f"({spec.config}: a training config) are given; keep one")
    if not spec.config and not spec.checkpoint:
        raise ConfigError(f"{where}: expected config (a training config) or checkpoint (an existing model), found neither")
    return spec


@dataclass
class ExperimentConfig:
    """One experiment: which variants to train on what, and how to evaluate them."""

    name: str = "experiment"
    """Name shown in the report."""
    report_dir: str = "reports/experiment"
    """Everything goes here: runs/, exports/, compare/, zeroshot/, stages/, index.md."""
    data_path: str = ""
    """Data of the trained variants: a prepared folder (``manifest.json``; default ``<report_dir>/data``)
    or a Megatron indexed dataset (e.g. Pythia's pre-shuffled Pile for ``data.format: pythia``)."""
    prepare: PrepareStage = field(default_factory=PrepareStage)
    """What to tokenize (the ``sinklm data prepare`` settings); empty = the bundled books (offline default)."""
    variants: dict[str, VariantSpec] = field(default_factory=dict)
    """Variant name -> training config (relative to this file), e.g. ``sink1: quickstart-sink1.yaml``, or
    an existing checkpoint (:class:`VariantSpec`), e.g. ``vanilla: {checkpoint: EleutherAI/pythia-160m-deduped@step101000}``."""
    train_overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to every trained variant (e.g. ``train.max_steps=20``)."""
    launcher: str = "auto"
    """``auto`` (torchrun over all GPUs if any, else one process), ``python`` or ``torchrun``."""
    export: ExportStage = field(default_factory=ExportStage)
    """How every run is exported (the ``sinklm convert`` settings; ``dtype: bf16`` halves the files)."""
    compare: CompareStage = field(default_factory=CompareStage)
    """The streaming comparison (the ``sinklm compare`` settings)."""
    zeroshot: ZeroShotStage = field(default_factory=ZeroShotStage)
    """The zero-shot evaluation (the ``sinklm zeroshot`` settings)."""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("experiment.variants: at least one variant (name: training config) is required")
        if self.launcher not in ("auto", "python", "torchrun"):
            raise ConfigError(f"experiment.launcher: expected auto, python or torchrun, found {self.launcher!r}")
        for name in self.variants:
            if not name or any(c in name for c in "/= "):
                raise ConfigError(f"experiment.variants: bad variant name {name!r} (no '/', '=', spaces)")
        self.variants = {name: _variant_spec(name, value) for name, value in self.variants.items()}

    @property
    def trained(self) -> list[str]:
        """The variants trained here, in order."""
        return [name for name, spec in self.variants.items() if spec.trained]

    @property
    def checkpoints(self) -> dict[str, str]:
        """Variant name -> checkpoint spec of the variants that are existing checkpoints."""
        return {name: spec.checkpoint for name, spec in self.variants.items() if not spec.trained}


def load_experiment(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, Path]:
    """Read an experiment YAML (``experiment:`` section or top level) plus ``key=value`` overrides;
    every variant's training config (with ``train_overrides``) is resolved and every checkpoint
    variant described (a hub model: its config files only), so a typo or a missing model anywhere is
    reported before the first expensive stage."""
    path = Path(path)
    data = load_yaml(path)
    data = data.get("experiment", data)
    for text in overrides:
        keys, value = parse_override(text)
        data = apply_override(data, keys, value)
    try:
        cfg = from_dict(ExperimentConfig, data, where="experiment")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    base = path.resolve().parent
    for name in cfg.trained:
        config_file = variant_config(cfg, base, name)
        if not config_file.is_file():
            raise ConfigError(f"{path}: experiment.variants.{name}: training config not found: {cfg.variants[name].config}")
        try:
            variant_run(cfg, base, name)
        except ConfigError as err:
            raise ConfigError(f"{path}: experiment.variants.{name} with train_overrides: {err}") from None
    for name, spec in cfg.checkpoints.items():
        try:
            check_streamable(spec, describe_checkpoint(cfg, name))  # before training, not at the compare stage
        except (CheckpointError, StreamError) as err:
            raise ConfigError(f"{path}: experiment.variants.{name}.checkpoint: {err}") from None
    return cfg, base


def variant_config(cfg: ExperimentConfig, base: Path, name: str) -> Path:
    """A variant's training config: relative to the experiment file, else as given."""
    file = cfg.variants[name].config
    return (base / file) if (base / file).is_file() else Path(file)


def describe_checkpoint(cfg: ExperimentConfig, name: str) -> CheckpointInfo:
    """What checkpoint variant ``name`` is (no weights read; a hub model: its config and tokenizer
    files), refusing what the zero-shot stage could not run faithfully."""
    trust = cfg.zeroshot.trust_remote_code or not cfg.zeroshot.enabled
    return describe(cfg.checkpoints[name], trust_remote_code=trust)


def checkpoint_record(spec: str, info: CheckpointInfo) -> dict[str, Any]:
    """Where a checkpoint variant came from (for the report) and what identifies its weights (for the
    stage keys: a hub revision that moves, or a local folder rewritten, redoes compare and zeroshot)."""
    resolved = info.resolved
    record: dict[str, Any] = {"checkpoint": spec, "format": info.format, "variant": info.variant, "attention": info.attention,
                              "sink_tokens": len(info.sink_token_ids)}
    if resolved.hub_name:
        return {**record, "hub_name": resolved.hub_name, "revision": resolved.revision, "commit": resolved.path.name}
    folder = resolved.tag_dir if resolved.format == "deepspeed" else resolved.path
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return {**record, "path": str(folder.resolve()), "files": files}


def variant_run(cfg: ExperimentConfig, base: Path, name: str) -> RunConfig:
    """A variant's resolved training config, with the experiment's ``train_overrides``."""
    return resolve_config([variant_config(cfg, base, name)], [o.lstrip("-") for o in cfg.train_overrides])


class StageFailed(RuntimeError):
    pass


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as no GPU
        return 0


def sinklm_command() -> list[str]:
    """How to start ``sinklm`` in a child process without the working directory on ``sys.path``
    (a user's ``data.py`` there would shadow our package): the installed console script."""
    script = Path(sys.executable).parent / "sinklm"
    if script.is_file():
        return [str(script)]
    found = shutil.which("sinklm")
    if found:
        return [found]
    return [sys.executable, "-P", "-m", "sinklm"]  # Python >= 3.11: -P keeps the working directory off sys.path


def train_command(cfg: ExperimentConfig, config_file: Path, run_dir: Path, data_path: Path) -> list[str]:
    """The command that trains one variant: the launch script over all GPUs, or one process."""
    args = [str(config_file), f"--train.run_dir={run_dir}", f"--data.path={data_path}"]
    args += [f"--{o.lstrip('-')}" for o in cfg.train_overrides]
    gpus = _gpu_count()
    launcher = cfg.launcher if cfg.launcher != "auto" else ("torchrun" if gpus > 0 else "python")
    if launcher == "torchrun":
        return ["bash", str(REPO_ROOT / "launch" / "torchrun.sh"), *args]
    return [*sinklm_command(), "train", *args]


def _run_subprocess(command: list[str]) -> None:
    print(f"[experiment] $ {' '.join(command)}", flush=True)
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise StageFailed(f"command failed with status {result.returncode}: {' '.join(command)}")


def forward_tokens(cfg: ExperimentConfig) -> dict[str, int]:
    """Tokens the compare and zeroshot stages push through the models, for the ETA: every stream
    column over ``max_tokens``, dense over its prefix, recompute one window per scored token; zero-shot
    about four 128-token choices per document (2,000 documents per task when unlimited)."""
    c, z, models = cfg.compare, cfg.zeroshot, len(cfg.variants)  # checkpoint variants are evaluated too
    stream = len(c.start_sizes) * (c.max_tokens or 65536)
    compare = models * (stream + c.dense_max_tokens + c.recompute_max_tokens * c.cache_size)
    documents = (z.limit or 2000) * (len(z.tasks) or 6)
    return {"compare": int(compare), "zeroshot": int(models * documents * 4 * 128)}


def step_range(run: RunConfig) -> tuple[int, int]:
    """(the step a run starts from, its last step): a run continuing Pythia counts from data.start_step,
    given or derived from train.init_from as ``sinklm train`` derives it."""
    first = 0
    if run.data.format == "pythia":
        first = start_step_from_init(run.train.init_from, run.data.start_step)[0] or 0
    return first, run.train.max_steps


def run_experiment(cfg: ExperimentConfig, config_base: Path) -> Path:
    report = Path(cfg.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    # checkpoint variants are described again here (config files only): the report shows where they
    # came from, and the stage keys hold what identifies their weights
    checkpoints = {name: checkpoint_record(spec, describe_checkpoint(cfg, name)) for name, spec in cfg.checkpoints.items()}
    prepare_data = cfg.prepare.enabled and bool(cfg.trained)  # only training reads the data
    planned = (["prepare"] if prepare_data else []) + [f"{kind}-{n}" for n in cfg.trained for kind in ("train", "export")]
    planned += ["compare"] + (["zeroshot"] if cfg.zeroshot.enabled else [])
    # the ETA of training: each trained variant's configured steps at the step time its runs measure
    train_runs = {f"train-{n}": (report / "runs" / n, *step_range(variant_run(cfg, config_base, n))) for n in cfg.trained}
    stages = Stages(report, planned, train_runs, forward_tokens(cfg))
    data_path = Path(cfg.data_path) if cfg.data_path else report / "data"
    started = time.time()

    if prepare_data:
        prepare = from_dict(PrepareSettings, {k: v for k, v in to_dict(cfg.prepare).items() if k != "enabled"})
        stages.run("prepare", {"settings": to_dict(prepare), "out": str(data_path)}, lambda: prepare_with(data_path, prepare))
    elif cfg.trained and not (data_path / "manifest.json").is_file() and not is_indexed_dataset(data_path):
        raise ConfigError(f"experiment.data_path: {data_path} has no manifest.json and is not a Megatron indexed dataset, "
                          "and experiment.prepare.enabled is false")

    runs, exports = report / "runs", report / "exports"
    for name in cfg.trained:
        config_file = variant_config(cfg, config_base, name)
        run_dir = runs / name
        command = train_command(cfg, config_file, run_dir, data_path)
        inputs = {"config": load_yaml(config_file), "overrides": cfg.train_overrides, "data": str(data_path)}
        stages.run(f"train-{name}", inputs, lambda c=command: _run_subprocess(c))
        stages.run(
            f"export-{name}",
            {"run": str(run_dir), "export": to_dict(cfg.export), "trained": inputs},
            lambda r=run_dir, n=name: convert(r, exports / n, cfg.export),
        )

    models = {name: str(exports / name) if spec.trained else spec.checkpoint for name, spec in cfg.variants.items()}
    model_keys = {n: stages.key_of(f"export-{n}") if spec.trained else checkpoints[n] for n, spec in cfg.variants.items()}
    compare_dir = report / "compare"
    stages.run("compare", {"settings": to_dict(cfg.compare), "models": model_keys},
               lambda: run_compare(models, cfg.compare, output_dir=compare_dir))
    compared = CompareResult.load(compare_dir)

    zeroshot_dir = report / "zeroshot"
    if cfg.zeroshot.enabled:
        stages.run("zeroshot", {"settings": to_dict(cfg.zeroshot), "models": model_keys},
                   lambda: run_zeroshot(models, cfg.zeroshot, zeroshot_dir))

    index = write_report(cfg, report, compared, stages.timings, time.time() - started, checkpoints)
    print(f"[experiment] report: {index}", flush=True)
    return index


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sinklm experiment",
        description="Run an experiment end to end (prepare, train every variant that is not an existing checkpoint, "
        "export, streaming comparison, zero-shot) and write a report; re-running skips finished stages.",
    )
    parser.add_argument("config", help="experiment YAML, e.g. configs/experiments/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. report_dir=out/r train_overrides=[train.max_steps=20]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    overrides = [*args.overrides, *(u.lstrip("-") for u in unknown)]
    try:
        cfg, base = load_experiment(args.config, overrides)
        run_experiment(cfg, base)
    except (ConfigError, DataError, CheckpointError, StageFailed, FileNotFoundError) as err:
        print(f"sinklm experiment: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
