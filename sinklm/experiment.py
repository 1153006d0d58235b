"""``sinklm experiment CONFIG``: the paper's experiment end to end, with one report folder.

Stages, each run with identical settings for every variant, each skipped on a re-run once done
(:mod:`sinklm.stages`: a marker records its inputs; changing them redoes the stage):

1. ``prepare``   tokenize the corpus (default: the bundled books): :func:`data.prepare.prepare_with`
2. ``train``     ``sinklm train`` per variant through DeepSpeed: one process on a CPU, every GPU
                 via ``launch/torchrun.sh`` when GPUs are present; interrupted runs resume. The only
                 stage in a subprocess (torchrun/deepspeed need their own processes).
3. ``export``    each run to a Hugging Face folder: :func:`pretrain.checkpoints.convert`
4. ``compare``   :func:`inference.compare.run_compare`: s+(W-s) caches, dense, sliding-window
                 recompute, sink metric, attention maps, perplexity curves
5. ``zeroshot``  :func:`inference.zeroshot.run_zeroshot` on the bundled validation sets
6. ``report``    ``index.md`` (:mod:`sinklm.report`) from the stages' typed results

Each section of the experiment config is the settings dataclass of the API its stage calls (the same
one the tool's CLI flags are derived from), so the report's tables are the tools' own outputs.
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
from typing import Literal

from data.prepare import PrepareSettings, prepare_with
from data.settings import ArgumentParser, ConfigError, apply_override, from_dict, load_yaml, parse_override, to_dict
from data.shards import DataError
from inference.compare import CompareSettings, run_compare
from inference.compare_report import CompareResult
from inference.zeroshot import ZeroShotSettings, run_zeroshot
from pretrain.checkpoints import CheckpointError, ExportSettings, convert
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
class ExperimentConfig:
    """One experiment: which variants to train on what, and how to evaluate them."""

    name: str = "experiment"
    """Name shown in the report."""
    report_dir: str = "reports/experiment"
    """Everything goes here: runs/, exports/, compare/, zeroshot/, stages/, index.md."""
    data_path: str = ""
    """Prepared data folder (``manifest.json``); default ``<report_dir>/data``."""
    prepare: PrepareStage = field(default_factory=PrepareStage)
    """What to tokenize (the ``sinklm data prepare`` settings); empty = the bundled books (offline default)."""
    variants: dict[str, str] = field(default_factory=dict)
    """Variant name -> training config (relative to this file), e.g. ``vanilla: quickstart-vanilla.yaml``."""
    train_overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to every variant (e.g. ``train.max_steps=20``)."""
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


def load_experiment(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, Path]:
    """Read an experiment YAML (``experiment:`` section or top level) plus ``key=value`` overrides;
    every variant's training config (with ``train_overrides``) is resolved too, so a typo anywhere is
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
    for name in cfg.variants:
        config_file = variant_config(cfg, base, name)
        if not config_file.is_file():
            raise ConfigError(f"{path}: experiment.variants.{name}: training config not found: {cfg.variants[name]}")
        try:
            variant_run(cfg, base, name)
        except ConfigError as err:
            raise ConfigError(f"{path}: experiment.variants.{name} with train_overrides: {err}") from None
    return cfg, base


def variant_config(cfg: ExperimentConfig, base: Path, name: str) -> Path:
    """A variant's training config: relative to the experiment file, else as given."""
    file = cfg.variants[name]
    return (base / file) if (base / file).is_file() else Path(file)


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
    c, z, models = cfg.compare, cfg.zeroshot, len(cfg.variants)
    stream = len(c.start_sizes) * (c.max_tokens or 65536)
    compare = models * (stream + c.dense_max_tokens + c.recompute_max_tokens * c.cache_size)
    documents = (z.limit or 2000) * (len(z.tasks) or 6)
    return {"compare": int(compare), "zeroshot": int(models * documents * 4 * 128)}


def run_experiment(cfg: ExperimentConfig, config_base: Path) -> Path:
    report = Path(cfg.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    planned = (["prepare"] if cfg.prepare.enabled else []) + [f"{kind}-{n}" for n in cfg.variants for kind in ("train", "export")]
    planned += ["compare"] + (["zeroshot"] if cfg.zeroshot.enabled else [])
    # the ETA of training: each variant's configured steps at the step time its runs measure
    train_runs = {f"train-{n}": (report / "runs" / n, variant_run(cfg, config_base, n).train.max_steps) for n in cfg.variants}
    stages = Stages(report, planned, train_runs, forward_tokens(cfg))
    data_path = Path(cfg.data_path) if cfg.data_path else report / "data"
    started = time.time()

    if cfg.prepare.enabled:
        prepare = from_dict(PrepareSettings, {k: v for k, v in to_dict(cfg.prepare).items() if k != "enabled"})
        stages.run("prepare", {"settings": to_dict(prepare), "out": str(data_path)}, lambda: prepare_with(data_path, prepare))
    elif not (data_path / "manifest.json").is_file():
        raise ConfigError(f"experiment.data_path: {data_path} has no manifest.json and experiment.prepare.enabled is false")

    runs, exports = report / "runs", report / "exports"
    for name in cfg.variants:
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

    models = {name: str(exports / name) for name in cfg.variants}
    trained = {n: stages.key_of(f"export-{n}") for n in cfg.variants}
    compare_dir = report / "compare"
    stages.run("compare", {"settings": to_dict(cfg.compare), "models": trained},
               lambda: run_compare(models, cfg.compare, output_dir=compare_dir))
    compared = CompareResult.load(compare_dir)

    zeroshot_dir = report / "zeroshot"
    if cfg.zeroshot.enabled:
        stages.run("zeroshot", {"settings": to_dict(cfg.zeroshot), "models": trained},
                   lambda: run_zeroshot(models, cfg.zeroshot, zeroshot_dir))

    index = write_report(cfg, report, compared, stages.timings, time.time() - started)
    print(f"[experiment] report: {index}", flush=True)
    return index


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sinklm experiment",
        description="Run an experiment end to end (prepare, train every variant, export, streaming comparison, "
        "zero-shot) and write a report; re-running skips finished stages.",
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
