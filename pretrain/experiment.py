"""``sinklm experiment CONFIG``: the paper's experiment end to end, with one report folder.

Stages, each run with identical settings for every variant, each skipped on a re-run once done
(a marker in ``<report>/stages/`` records its inputs; changing them redoes the stage):

1. ``prepare``   tokenize the corpus (default: the bundled books) with ``sinklm data prepare``
2. ``train``     ``sinklm train`` per variant through DeepSpeed: one process on a CPU, every GPU
                 via ``launch/torchrun.sh`` when GPUs are present; interrupted runs resume
3. ``export``    ``sinklm convert`` each run to a Hugging Face folder
4. ``compare``   ``sinklm compare``: s+(W-s) caches, dense, sliding-window recompute, sink metric,
                 attention maps, perplexity curves
5. ``zeroshot``  ``sinklm zeroshot`` on the bundled validation sets
6. ``report``    ``index.md``: what ran, how long, on what, the tables, the plots, and a summary
                 derived from the measurements (:func:`pretrain.report.summarise`)

Each stage calls the same tool a user would, so the report's tables are the tools' own outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pretrain.config import ConfigError, from_dict, load_yaml
from pretrain.report import ModelResult, summarise

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CompareSection:
    """Settings of the streaming comparison (``sinklm compare``)."""

    cache_size: int = 256
    """W: total cache size; columns are s+(W-s) for each start size."""
    start_sizes: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    """Start (sink) sizes s to test."""
    max_tokens: int = 20000
    """Tokens of the stream-test text streamed through every model and cache."""
    dense_max_tokens: int = 4096
    """The dense baseline attends to everything, so it runs over this prefix only."""
    recompute_max_tokens: int = 2048
    """The sliding-window-with-recompute baseline costs W tokens per scored token; this prefix only."""
    chunk_size: int = 1024
    """Tokens per chunk in the fast exact streaming evaluation."""
    extra_args: list[str] = field(default_factory=list)
    """More ``sinklm compare`` flags, passed through (e.g. ``[--dtype, bfloat16]``)."""


@dataclass
class ZeroShotSection:
    """Settings of the zero-shot evaluation (``sinklm zeroshot``)."""

    enabled: bool = True
    """Run it at all."""
    tasks: list[str] = field(default_factory=list)
    """Task names; empty = all bundled tasks (ARC-e/c, HellaSwag, OpenBookQA, PIQA, Winogrande)."""
    limit: int | None = None
    """Documents per task (None = all; the quickstart uses a small number)."""
    extra_args: list[str] = field(default_factory=list)
    """More ``sinklm zeroshot`` flags, passed through (e.g. ``[--online]``)."""


@dataclass
class ExperimentConfig:
    """One experiment: which variants to train on what, and how to evaluate them."""

    name: str = "experiment"
    """Name shown in the report."""
    report_dir: str = "reports/experiment"
    """Everything goes here: runs/, exports/, compare/, zeroshot/, stages/, index.md."""
    data_path: str = ""
    """Prepared data folder (``manifest.json``); default ``<report_dir>/data``."""
    prepare: bool = True
    """Run ``sinklm data prepare`` into ``data_path`` first (false: the folder is prepared already)."""
    prepare_args: list[str] = field(default_factory=list)
    """Flags for ``sinklm data prepare``; empty = the bundled books (offline default)."""
    variants: dict[str, str] = field(default_factory=dict)
    """Variant name -> training config (relative to this file), e.g. ``vanilla: quickstart-vanilla.yaml``."""
    train_overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to every variant (e.g. ``train.max_steps=20``)."""
    launcher: str = "auto"
    """``auto`` (torchrun over all GPUs if any, else one process), ``python`` or ``torchrun``."""
    export_dtype: str = "fp32"
    """Weights dtype of the Hugging Face exports."""
    compare: CompareSection = field(default_factory=CompareSection)
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("experiment.variants: at least one variant (name: training config) is required")
        if self.launcher not in ("auto", "python", "torchrun"):
            raise ConfigError(f"experiment.launcher: expected auto, python or torchrun, found {self.launcher!r}")
        for name in self.variants:
            if not name or any(c in name for c in "/= "):
                raise ConfigError(f"experiment.variants: bad variant name {name!r} (no '/', '=', spaces)")


def load_experiment(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, Path]:
    """Read an experiment YAML (``experiment:`` section or top level) plus ``key=value`` overrides."""
    from pretrain.train_config import apply_override, parse_override

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
    for name, file in cfg.variants.items():
        if not (base / file).is_file() and not Path(file).is_file():
            raise ConfigError(f"{path}: experiment.variants.{name}: training config not found: {file}")
    return cfg, base


# --------------------------------------------------------------------------------------------
# stage bookkeeping
# --------------------------------------------------------------------------------------------


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


class StageFailed(RuntimeError):
    pass


def _call_tool(module: str, argv: list[str]) -> None:
    """Run a tool's ``main(argv)`` in this process; a non-zero exit stops the experiment."""
    import importlib

    print(f"[experiment] sinklm {module.split('.')[-1]} {' '.join(argv)}", flush=True)
    code = importlib.import_module(module).main(argv)
    if code:
        raise StageFailed(f"{module} exited with status {code}")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as no GPU
        return 0


def train_command(cfg: ExperimentConfig, config_file: Path, run_dir: Path, data_path: Path) -> list[str]:
    """The command that trains one variant: the launch script over all GPUs, or one process."""
    args = [str(config_file), f"--train.run_dir={run_dir}", f"--data.path={data_path}"]
    args += [f"--{o.lstrip('-')}" for o in cfg.train_overrides]
    gpus = _gpu_count()
    launcher = cfg.launcher if cfg.launcher != "auto" else ("torchrun" if gpus > 0 else "python")
    if launcher == "torchrun":
        script = REPO_ROOT / "launch" / "torchrun.sh"
        if script.is_file():
            return ["bash", str(script), *args]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={max(gpus, 1)}", "-m", "pretrain.train", *args]
    return [sys.executable, "-m", "pretrain.train", *args]


def _run_subprocess(command: list[str]) -> None:
    print(f"[experiment] $ {' '.join(command)}", flush=True)
    env = dict(os.environ, PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise StageFailed(f"command failed with status {result.returncode}: {' '.join(command)}")


# --------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------


def run_experiment(cfg: ExperimentConfig, config_base: Path) -> Path:
    report = Path(cfg.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    planned = (["prepare"] if cfg.prepare else []) + [f"{kind}-{n}" for n in cfg.variants for kind in ("train", "export")]
    planned += ["compare"] + (["zeroshot"] if cfg.zeroshot.enabled else [])
    stages = Stages(report, planned)
    data_path = Path(cfg.data_path) if cfg.data_path else report / "data"
    started = time.time()

    if cfg.prepare:
        stages.run(
            "prepare",
            {"args": cfg.prepare_args, "out": str(data_path)},
            lambda: _call_tool("data.prepare", [*cfg.prepare_args, "--out", str(data_path), "--overwrite"]),
        )
    elif not (data_path / "manifest.json").is_file():
        raise ConfigError(f"experiment.data_path: {data_path} has no manifest.json and experiment.prepare is false")

    runs, exports = report / "runs", report / "exports"
    for name, file in cfg.variants.items():
        config_file = (config_base / file) if (config_base / file).is_file() else Path(file)
        run_dir = runs / name
        command = train_command(cfg, config_file, run_dir, data_path)
        inputs = {"config": load_yaml(config_file), "overrides": cfg.train_overrides, "data": str(data_path)}
        stages.run(f"train-{name}", inputs, lambda c=command: _run_subprocess(c))
        stages.run(
            f"export-{name}",
            {"run": str(run_dir), "dtype": cfg.export_dtype, "trained": inputs},
            lambda r=run_dir, n=name: _call_tool(
                "pretrain.convert", [str(r), str(exports / n), "--to", "hf", "--dtype", cfg.export_dtype, "--overwrite"]
            ),
        )

    models = [f"{name}={exports / name}" for name in cfg.variants]
    c = cfg.compare
    compare_args = [
        *models,
        "--output-dir", str(report / "compare"),
        "--cache-size", str(c.cache_size),
        "--start-sizes", ",".join(str(s) for s in c.start_sizes),
        "--max-tokens", str(c.max_tokens),
        "--dense-max-tokens", str(c.dense_max_tokens),
        "--recompute-max-tokens", str(c.recompute_max_tokens),
        "--chunk-size", str(c.chunk_size),
        *c.extra_args,
    ]
    trained = {n: stages.key_of(f"export-{n}") for n in cfg.variants}
    stages.run("compare", {"args": compare_args, "models": trained}, lambda: _call_tool("inference.compare", compare_args))

    if cfg.zeroshot.enabled:
        z = cfg.zeroshot
        zeroshot_args = [*models, "--out", str(report / "zeroshot"), "--trust-remote-code"]
        if z.tasks:
            zeroshot_args += ["--tasks", ",".join(z.tasks)]
        if z.limit is not None:
            zeroshot_args += ["--limit", str(z.limit)]
        zeroshot_args += z.extra_args
        stages.run("zeroshot", {"args": zeroshot_args, "models": trained}, lambda: _call_tool("inference.zeroshot", zeroshot_args))

    index = write_report(cfg, report, stages.timings, time.time() - started)
    print(f"[experiment] report: {index}", flush=True)
    return index


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def hardware_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu} ({os.cpu_count()} cores)", f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.insert(1, f"{len(names)} x {names[0]}")
    else:
        parts.insert(1, "no GPU")
    try:
        import deepspeed

        parts.append(f"deepspeed {deepspeed.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def collect_results(report: Path) -> list[ModelResult]:
    """The per-model measurements the summary is derived from, read from ``compare/summary.json``."""
    summary = json.loads((report / "compare" / "summary.json").read_text())
    columns = summary["columns"]
    stream_labels = [c["label"] for c in columns if c.get("kind") == "stream"]
    results = []
    for name, row in summary["ppl"].items():
        sinks = summary["sinks"].get(name, {})
        variant = summary["models"].get(name, {}).get("variant", name)
        results.append(
            ModelResult(
                name=name,
                variant=variant,
                sink_metric=float(sinks.get("sink_rate", 0.0)),
                stream_ppl={label: row[label] for label in stream_labels if label in row},
                dense_ppl=row.get("dense"),
                recompute_ppl=row.get("recompute"),
            )
        )
    return results


def plot_all_losses(runs: dict[str, Path], out: Path) -> Path | None:
    """One figure with every variant's training and validation loss, for side-by-side reading."""
    from pretrain.metrics import read_metrics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    drew = False
    for i, (name, run) in enumerate(runs.items()):
        records = read_metrics(run)
        train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
        val = [(r["step"], r["loss"]) for r in records if r.get("kind") == "val"]
        color = f"C{i}"
        if train:
            steps, losses = zip(*train)
            window = max(1, len(losses) // 30)
            smooth = [sum(losses[max(0, j - window + 1) : j + 1]) / len(losses[max(0, j - window + 1) : j + 1]) for j in range(len(losses))]
            ax.plot(steps, smooth, color=color, lw=1.4, label=f"{name} train")
            drew = True
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, "o--", color=color, ms=3, lw=1, label=f"{name} validation")
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training and validation loss per variant")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _final_losses(run: Path) -> tuple[float | None, float | None, int, int]:
    from pretrain.metrics import read_metrics

    records = read_metrics(run)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    tokens = int(train[-1].get("tokens_seen", 0)) if train else 0
    return (train[-1]["loss"] if train else None, val[-1]["loss"] if val else None, train[-1]["step"] if train else 0, tokens)


def write_report(cfg: ExperimentConfig, report: Path, timings: dict[str, float], wall: float) -> Path:
    runs = {name: report / "runs" / name for name in cfg.variants}
    plots = report / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# Experiment report: {cfg.name}", ""]
    results = collect_results(report)
    lines += ["## Summary", "", summarise(results), ""]

    lines += ["## What ran", "", f"- hardware: {hardware_description()}", f"- total wall time of this invocation: {wall:.0f} s"]
    lines += ["", "| variant | training config | model | steps | tokens seen | final train loss | final val loss |", "|---|---|---|---:|---:|---:|---:|"]
    for name, run in runs.items():
        resolved = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
        model = resolved.get("model", {})
        shape = f"{model.get('name', '?')}, attention={model.get('attention', '?')}, sink_tokens={model.get('sink_tokens', '?')}"
        train_loss, val_loss, steps, tokens = _final_losses(run)
        fmt = lambda x: f"{x:.4f}" if x is not None else "-"  # noqa: E731
        lines.append(f"| {name} | `{cfg.variants[name]}` | {shape} | {steps} | {tokens:,} | {fmt(train_loss)} | {fmt(val_loss)} |")
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]

    loss_plot = plot_all_losses(runs, plots / "loss_curves.png")
    for name, run in runs.items():
        if (run / "loss.png").is_file():
            shutil.copyfile(run / "loss.png", plots / f"loss_{name}.png")
    if loss_plot:
        lines += ["## Training", "", "![loss curves](plots/loss_curves.png)", ""]
        lines += ["Per variant: " + ", ".join(f"[{n}](plots/loss_{n}.png)" for n in runs if (plots / f"loss_{n}.png").is_file()), ""]

    compare = report / "compare"
    lines += ["## Streaming perplexity (the paper's Table 3)", "", (compare / "table.md").read_text().strip(), ""]
    summary = json.loads((compare / "summary.json").read_text())
    settings = summary.get("settings", {})
    lines += [f"Cache size W = {settings.get('cache_size', cfg.compare.cache_size)}; columns s+(W-s) keep s initial tokens; "
              "`dense` attends to everything (over a prefix), `recompute` is the sliding window with re-computation.", ""]
    lines += ["![log-perplexity against tokens streamed](compare/ppl_curves.png)", ""]
    lines += ["## Attention sinks", "", "| model | sink metric (share of heads with > 0.3 attention on the first token) |", "|---|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.sink_metric:.1%} |")
    lines.append("")
    for name in cfg.variants:
        for candidate in sorted(compare.glob(f"attention_{name}*.png")):
            lines += [f"![attention maps of {name}](compare/{candidate.name})", ""]
    lines += ["Details: [compare/index.md](compare/index.md)", ""]

    if cfg.zeroshot.enabled and (report / "zeroshot" / "table.md").is_file():
        limit = f" (first {cfg.zeroshot.limit} documents per task)" if cfg.zeroshot.limit else ""
        lines += [f"## Zero-shot accuracy (the paper's Table 4){limit}", "", (report / "zeroshot" / "table.md").read_text().strip(), ""]
        lines += ["Raw lm-eval output: `zeroshot/raw/`.", ""]

    lines += ["## Files", "", "- `runs/<variant>/`: DeepSpeed run folders (checkpoints, `config.yaml`, `metrics.jsonl`, `loss.png`)",
              "- `exports/<variant>/`: Hugging Face exports", "- `compare/`: tables, CSVs, per-token NLL, plots",
              "- `zeroshot/`: accuracy tables and raw lm-eval JSON", "- `stages/`: what finished (a re-run skips it)", ""]
    index = report / "index.md"
    index.write_text("\n".join(lines))
    return index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    except (ConfigError, StageFailed, FileNotFoundError) as err:
        print(f"sinklm experiment: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
