"""Rank-0 training telemetry: console lines, a progress bar, ``metrics.jsonl``, wandb, ``loss.png``
and ``sinks.png`` (the probe's records against step and tokens: :func:`plot_probe_curves`, which the
experiment report and ``sinklm compare --steps-of`` draw with too; it reads records, never the
evaluation code that made them).

Only rank 0 constructs a :class:`MetricsLogger`; the others pass ``None`` around, so no rank
but one ever writes a file. ``metrics.jsonl`` holds one JSON record per line, each with a
``kind`` (``train``, ``val``, ``probe``) and the ``step`` it belongs to. On resume, records past
the resumed step (written by the interrupted run after its last checkpoint) are dropped, so the
file always describes one consistent trajectory.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pretrain.train_config import LoggingConfig, WandbConfig

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SINKS_PLOT_FILE = "sinks.png"
EVICTION_KEY = re.compile(r"^ppl_(\d+)\+(\d+)$")  # a probe record's perplexity under an s + (W - s) cache

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU when logging.peak_tflops is not set.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0, "4090": 165.0}


def guess_peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak throughput of one device, or None when unknown (then MFU is not reported)."""
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            # fp32 matmuls run as TF32 on these parts: half the 16-bit peak
            return tflops if precision in ("bf16", "fp16") else tflops / 2
    return None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return records


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep only records with ``step <= last_step`` (a resumed run rewrites what follows)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def plot_losses(run_dir: str | Path, title: str = "") -> Path | None:
    """``loss.png``: training loss (per step and smoothed) and validation loss against step."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["loss"]) for r in records if r.get("kind") == "val"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train")
        window = max(1, len(losses) // 50)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", lw=1.5, label=f"train ({window}-step mean)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=1.5, ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = _save_figure(fig, Path(run_dir) / PLOT_FILE)
    plt.close(fig)
    return out


def _save_figure(fig, out: Path) -> Path:
    """Write ``out`` through a temporary sibling, so a reader never sees half a PNG."""
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out


def _tokens_per_step(records: list[dict[str, Any]]) -> float | None:
    for r in records:
        if r.get("tokens_seen") and r.get("step"):
            return r["tokens_seen"] / r["step"]
    return None


def plot_probe_curves(curves: dict[str, list[dict[str, Any]]], out: str | Path, title: str = "") -> Path | None:
    """Probe records (``kind: probe`` rows, or the same fields from ``sinklm compare --steps-of``)
    of one or more models against step, with tokens seen on the top axis: the sink metric, the
    attention on the first key (solid), on the sink tokens (dashed), on the extra key of softmax1 /
    sink_logit (dotted), and the eviction gap: the perplexity under each s + (W - s) cache relative
    to the one with the most start tokens, in percent. One colour per model."""
    curves = {name: sorted((r for r in rows if "step" in r), key=lambda r: r["step"]) for name, rows in curves.items()}
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_attn, ax_ppl) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    styles = {"first_key_attn": ("-", "first key"), "sink_token_attn": ("--", "sink tokens"), "noop_attn": (":", "extra key (no-op)")}
    for i, (name, rows) in enumerate(curves.items()):
        color = f"C{i}"
        steps = [r["step"] for r in rows]
        if any("sink_rate" in r for r in rows):
            ax_rate.plot(steps, [100 * r.get("sink_rate", math.nan) for r in rows], "o-", color=color, ms=3, label=name)
        for key, (style, what) in styles.items():
            if any(key in r for r in rows):
                ax_attn.plot(steps, [r.get(key, math.nan) for r in rows], style, color=color, marker="o", ms=2.5, label=f"{name}: {what}")
        configs = sorted({k for r in rows for k in r if EVICTION_KEY.match(k)}, key=lambda k: int(EVICTION_KEY.match(k).group(1)))
        for j, key in enumerate(configs[:-1]):
            base = configs[-1]
            gap = [100 * (r[key] / r[base] - 1) if key in r and base in r else math.nan for r in rows]
            ax_ppl.plot(steps, gap, ["-", "--", ":", "-."][j % 4], color=color, marker="o", ms=2.5, label=f"{name}: {key[4:]} vs {base[4:]}")
    ax_rate.set_ylabel("sink metric (% of heads, first key > 0.3)")
    ax_rate.set_ylim(-2, 102)
    ax_attn.set_ylabel("mean attention weight")
    ax_attn.set_ylim(bottom=0)
    ax_ppl.set_ylabel("perplexity change (%)")
    ax_ppl.axhline(0, color="grey", lw=0.8)
    per_step = _tokens_per_step(next(iter(curves.values())))
    for ax in (ax_rate, ax_attn, ax_ppl):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        if per_step:
            top = ax.secondary_xaxis("top", functions=(lambda x, k=per_step: x * k, lambda t, k=per_step: t / k))
            top.set_xlabel("tokens seen" + (f" ({next(iter(curves))})" if len(curves) > 1 else ""), fontsize=8)
    ax_rate.set_title("sink metric (Gu et al.)", fontsize=10)
    ax_attn.set_title("attention mass", fontsize=10)
    ax_ppl.set_title("eviction gap", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = _save_figure(fig, Path(out))
    plt.close(fig)
    return path


def plot_sinks(run_dir: str | Path, title: str = "") -> Path | None:
    """``sinks.png`` in the run folder from its probe records (None when it has none)."""
    probes = [r for r in read_metrics(run_dir) if r.get("kind") == "probe"]
    return plot_probe_curves({Path(run_dir).name: probes}, Path(run_dir) / SINKS_PLOT_FILE, title) if probes else None


def format_probe(values: dict[str, Any]) -> str:
    """The probe's console line: sink metric, attention shares, eviction perplexities, seconds."""
    parts = []
    if "sink_rate" in values:
        parts.append(f"sink metric {100 * values['sink_rate']:.1f}%")
    for key, what in (("first_key_attn", "first key"), ("sink_token_attn", "sink tokens"), ("noop_attn", "no-op")):
        if key in values:
            parts.append(f"{what} {values[key]:.3f}")
    ppl = [f"{k[4:]} {v:.2f}" for k, v in values.items() if EVICTION_KEY.match(k)]
    if ppl:
        gap = f" (gap {100 * values['eviction_gap']:+.1f}%)" if "eviction_gap" in values else ""
        parts.append("ppl " + ", ".join(ppl) + gap)
    if "seconds" in values:
        parts.append(f"{values['seconds']:.1f} s")
    return " | ".join(parts)


@dataclass
class StepStats:
    step: int  # optimizer steps completed (1-based for the step just taken)
    loss: float
    lr: float
    grad_norm: float | None
    tokens_seen: int
    step_time: float  # seconds of this step
    tokens_per_step: int
    text_crc: list[int]  # per rank: CRC32 of the text tokens it trained on this step
    rank_losses: list[float]


class MetricsLogger:
    """Everything rank 0 reports. ``flops_per_token`` and ``peak_flops`` (all devices) give MFU."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LoggingConfig,
        wandb_cfg: WandbConfig,
        resolved_config: dict[str, Any],
        max_steps: int,
        start_step: int,
        flops_per_token: float,
        peak_flops: float | None,
        title: str = "",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.max_steps = max_steps
        self.start_step = start_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.title = title
        self.file = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        self._window: list[StepStats] = []
        self._time_started = time.perf_counter()
        self._steps_timed = 0
        self._time_timed = 0.0
        show_bar = cfg.progress_bar and (sys.stderr.isatty() or os.environ.get("SINKLM_PROGRESS") == "1")
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, disable=not show_bar)
        self.wandb = self._start_wandb(wandb_cfg, resolved_config)

    def _start_wandb(self, cfg: WandbConfig, resolved_config: dict[str, Any]):
        if cfg.mode == "disabled":
            return None
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError:
            print("wandb is not installed; continuing without it (pip install wandb)", file=sys.stderr)
            return None
        if cfg.mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()):
            # never prompt for a key: fall back to offline and say how to sync later
            print("wandb: no API key (WANDB_API_KEY / wandb login); logging offline instead (upload later with `wandb sync`)", file=sys.stderr)
            mode = "offline"
        else:
            mode = cfg.mode
        try:
            return self._wandb_init(wandb, cfg, mode, resolved_config)
        except Exception as err:  # wandb is optional: a broken setup must not stop training
            print(f"wandb: could not start ({type(err).__name__}: {err}); continuing without it", file=sys.stderr)
            return None

    def _wandb_init(self, wandb, cfg: WandbConfig, mode: str, resolved_config: dict[str, Any]):
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or self.run_dir.name,
            tags=cfg.tags or None,
            dir=cfg.dir or str(self.run_dir),
            mode=mode,
            config=resolved_config,
            resume="allow",
            id=_wandb_run_id(self.run_dir),
            settings=wandb.Settings(console="off"),
        )

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{record['kind']}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}, step=record["step"])

    def mfu(self, tokens_per_second: float) -> float | None:
        if not self.peak_flops:
            return None
        return tokens_per_second * self.flops_per_token / self.peak_flops

    def log_step(self, stats: StepStats) -> None:
        # skip the first step of a (re)started run in the speed figures: it pays for warm-up
        if stats.step > self.start_step + 1:
            self._steps_timed += 1
            self._time_timed += stats.step_time
        tokens_per_second = stats.tokens_per_step / stats.step_time if stats.step_time > 0 else 0.0
        record = {
            "kind": "train",
            "step": stats.step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens_seen": stats.tokens_seen,
            "step_time": round(stats.step_time, 6),
            "tokens_per_s": round(tokens_per_second, 2),
            "mfu": self.mfu(tokens_per_second),
            "rank_loss": stats.rank_losses,
            "text_crc": stats.text_crc,
        }
        self._write(record)
        self._window.append(stats)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", refresh=False)
        if stats.step % self.cfg.log_every == 0 or stats.step == self.max_steps:
            self._console(stats)
            self._window.clear()

    def _console(self, last: StepStats) -> None:
        window = self._window or [last]
        loss = sum(s.loss for s in window) / len(window)
        seconds = sum(s.step_time for s in window)
        tokens = sum(s.tokens_per_step for s in window)
        tps = tokens / seconds if seconds > 0 else 0.0
        mfu = self.mfu(tps)
        eta = self._eta(last.step)
        grad = f"{last.grad_norm:.3f}" if last.grad_norm is not None and math.isfinite(last.grad_norm) else "n/a"
        parts = [
            f"step {last.step:>{len(str(self.max_steps))}}/{self.max_steps}",
            f"loss {loss:.4f}",
            f"lr {last.lr:.3e}",
            f"grad {grad}",
            f"tok/s {tps:,.0f}",
        ]
        if mfu is not None:
            parts.append(f"mfu {100 * mfu:.1f}%")
        parts.append(f"eta {eta}")
        self.bar.write(" | ".join(parts), file=sys.stdout)
        sys.stdout.flush()

    def _eta(self, step: int) -> str:
        if self._steps_timed == 0:
            return "?"
        remaining = (self.max_steps - step) * self._time_timed / self._steps_timed
        return format_seconds(remaining)

    def log_eval(self, kind: str, step: int, values: dict[str, float]) -> None:
        record = {"kind": kind, "step": step, **values}
        self._write(record)
        if kind == "probe":
            text = format_probe(values)
        else:
            text = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        self.bar.write(f"{kind} @ step {step}: {text}", file=sys.stdout)
        sys.stdout.flush()

    def message(self, text: str) -> None:
        self.bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    def plot(self) -> None:
        if self.cfg.plot:
            self.file.flush()
            plot_losses(self.run_dir, self.title)
            plot_sinks(self.run_dir, self.title)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()

    def elapsed(self) -> float:
        return time.perf_counter() - self._time_started


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _wandb_run_id(run_dir: Path) -> str:
    """A stable id stored in the run folder, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id
