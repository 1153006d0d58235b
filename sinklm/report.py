"""The experiment's report folder: ``index.md`` (what ran, on what, the tables, the plots, the summary)."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

from data.settings import load_yaml
from inference.compare_report import CompareResult, same_tokens_table, table_markdown
from pretrain.metrics import SINKS_PLOT_FILE, plot_probe_curves, read_metrics
from sinklm.summary import ModelResult, summarise


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


def collect_results(compared: CompareResult) -> list[ModelResult]:
    """The per-model measurements the summary is derived from, from the comparison's typed result."""
    stream_labels = [c.label for c in compared.columns if c.kind == "stream"]
    results = []
    for name, row in compared.table.items():
        sink = compared.sinks.get(name)
        results.append(
            ModelResult(
                name=name,
                variant=compared.models.get(name, {}).get("variant", name),
                sink_metric=float(sink.sink_rate) if sink is not None else 0.0,
                stream_ppl={label: row[label] for label in stream_labels if label in row},
                dense_ppl=row.get("dense"),
                recompute_ppl=row.get("recompute"),
            )
        )
    return results


def plot_all_losses(runs: dict[str, Path], out: Path) -> Path | None:
    """One figure with every variant's training and validation loss, for side-by-side reading."""
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
    records = read_metrics(run)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    tokens = int(train[-1].get("tokens_seen", 0)) if train else 0
    return (train[-1]["loss"] if train else None, val[-1]["loss"] if val else None, train[-1]["step"] if train else 0, tokens)


def _sinks_during_training(runs: dict[str, Path], plots: Path) -> list[str]:
    """The probe's curves of every variant in one figure (and each run's own ``sinks.png``)."""
    curves = {name: [r for r in read_metrics(run) if r.get("kind") == "probe"] for name, run in runs.items()}
    if not plot_probe_curves(curves, plots / "sinks_curves.png", "attention sinks during training, every variant"):
        return []
    for name, run in runs.items():
        if (run / SINKS_PLOT_FILE).is_file():
            shutil.copyfile(run / SINKS_PLOT_FILE, plots / f"sinks_{name}.png")
    lines = ["## Attention sinks during training", "",
             "The training probe on the start of the validation split: Gu et al.'s sink metric, the attention on the first "
             "key (on the sink tokens, dashed; on the extra key of softmax1 / sink_logit, dotted) and the perplexity under "
             "caches s+(W-s), against training step (tokens seen on the top axis).", "",
             "![probe curves](plots/sinks_curves.png)", ""]
    last = {name: rows[-1] for name, rows in curves.items() if rows}
    if last:
        lines += ["| variant | step | sink metric | eviction gap (ppl 0+W over the largest s) |", "|---|---:|---:|---:|"]
        for name, r in last.items():
            rate = f"{r['sink_rate']:.1%}" if "sink_rate" in r else "-"
            gap = f"{r['eviction_gap']:+.2%}" if "eviction_gap" in r else "-"
            lines.append(f"| {name} | {r['step']} | {rate} | {gap} |")
        lines.append("")
    return lines


def _checkpoint_rows(checkpoints: dict[str, dict[str, Any]]) -> list[str]:
    """The variants that are existing checkpoints: where each came from (hub name, revision and the
    commit it resolved to; or the local folder) and what it is."""
    if not checkpoints:
        return []
    lines = ["Existing checkpoints, evaluated as they are (not trained here):", "",
             "| variant | checkpoint | source | revision | model |", "|---|---|---|---|---|"]
    for name, c in checkpoints.items():
        if c.get("hub_name"):
            source, revision = f"Hugging Face hub `{c['hub_name']}`", f"{c.get('revision') or 'main'} (commit `{c['commit'][:12]}`)"
        else:
            source, revision = f"{c['format']} folder `{c['path']}`", "-"
        model = f"{c['variant']}, attention={c['attention']}, sink_tokens={c['sink_tokens']}"
        lines.append(f"| {name} | `{c['checkpoint']}` | {source} | {revision} | {model} |")
    return [*lines, ""]


def write_report(cfg, report: Path, compared: CompareResult, timings: dict[str, float], wall: float,
                 checkpoints: dict[str, dict[str, Any]] | None = None) -> Path:
    """``<report>/index.md`` for experiment ``cfg`` (a :class:`sinklm.experiment.ExperimentConfig`);
    ``checkpoints``: variant -> record of each variant that is an existing checkpoint
    (:func:`sinklm.experiment.checkpoint_record`)."""
    runs = {name: report / "runs" / name for name in cfg.trained}
    plots = report / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# Experiment report: {cfg.name}", ""]
    results = collect_results(compared)
    lines += ["## Summary", "", summarise(results), ""]

    lines += ["## What ran", "", f"- hardware: {hardware_description()}", f"- total wall time of this invocation: {wall:.0f} s", ""]
    if runs:
        lines += ["| variant | training config | model | steps | tokens seen | final train loss | final val loss |", "|---|---|---|---:|---:|---:|---:|"]
    for name, run in runs.items():
        resolved = load_yaml(run / "config.yaml") if (run / "config.yaml").is_file() else {}
        model = resolved.get("model", {})
        shape = f"{model.get('name', '?')}, attention={model.get('attention', '?')}, sink_tokens={model.get('sink_tokens', '?')}"
        train_loss, val_loss, steps, tokens = _final_losses(run)
        fmt = lambda x: f"{x:.4f}" if x is not None else "-"  # noqa: E731
        lines.append(f"| {name} | `{cfg.variants[name].config}` | {shape} | {steps} | {tokens:,} | {fmt(train_loss)} | {fmt(val_loss)} |")
    lines += [""] + _checkpoint_rows(checkpoints or {})
    lines += ["Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]

    loss_plot = plot_all_losses(runs, plots / "loss_curves.png")
    for name, run in runs.items():
        if (run / "loss.png").is_file():
            shutil.copyfile(run / "loss.png", plots / f"loss_{name}.png")
    if loss_plot:
        lines += ["## Training", "", "![loss curves](plots/loss_curves.png)", ""]
        lines += ["Per variant: " + ", ".join(f"[{n}](plots/loss_{n}.png)" for n in runs if (plots / f"loss_{n}.png").is_file()), ""]

    lines += _sinks_during_training(runs, plots)

    compare = report / "compare"
    lines += ["## Streaming perplexity (the paper's Table 3)", ""]
    like_for_like = same_tokens_table(compared)
    if like_for_like:
        lines += ["### Like for like: every column on the same tokens", "", *like_for_like,
                  "### Full length: each column on the tokens it scored (not comparable across columns)", ""]
    lines += [table_markdown(compared).strip(), ""]
    lines += [f"Cache size W = {compared.settings['cache_size']}; columns s+(W-s) keep s initial tokens; "
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
              "- `exports/<variant>/`: Hugging Face exports (checkpoint variants are read where they are)", "- `compare/`: tables, CSVs, per-token NLL, plots",
              "- `zeroshot/`: accuracy tables and raw lm-eval JSON", "- `stages/`: what finished (a re-run skips it)", ""]
    index = report / "index.md"
    index.write_text("\n".join(lines))
    return index
