"""The files of a comparison (``sinklm compare``) and reading them back: :class:`CompareResult`.

``table.md`` / ``table.csv`` (perplexity, rows models, columns cache configurations),
``ppl_curves.png``, ``attention_<model>.png``, ``sinks.json`` / ``sinks.csv``, ``nll/<model>.npz``,
``summary.json`` (everything in machine form; :meth:`CompareResult.summary` writes it and
:meth:`CompareResult.load` reads it) and ``index.md``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.perplexity import perplexity
from inference.plots import plot_attention_maps, plot_stream_curves
from inference.sink_metric import SinkMetric, summarise_sinks


@dataclass
class Column:
    """One table column: a cache configuration or a baseline."""

    label: str  # "4+1020", "dense", "recompute"
    kind: str  # "stream" | "dense" | "recompute"
    start_size: int | None = None
    recent_size: int | None = None


@dataclass
class CompareResult:
    """Everything one comparison measured. ``table[model][column]`` is a perplexity."""

    columns: list[Column]
    table: dict[str, dict[str, float]]
    tokens: dict[str, dict[str, int]]  # tokens scored per cell
    nll: dict[str, dict[str, torch.Tensor]]  # per-token NLL per cell
    seconds: dict[str, dict[str, float]]
    sinks: dict[str, SinkMetric]
    maps: dict[str, torch.Tensor]  # (L, T, T) per model
    models: dict[str, dict[str, Any]]  # description, source, text tokens
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def to_markdown(self, digits: int = 2) -> str:
        labels = [c.label for c in self.columns]
        lines = ["| model | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for name, row in self.table.items():
            cells = [f"{row[label]:.{digits}f}" if label in row else "" for label in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def summary(self, files: dict[str, str]) -> dict[str, Any]:
        """What ``summary.json`` holds (``files``: {what: path relative to the output folder})."""
        return {
            "settings": self.settings,
            "columns": [c.__dict__ for c in self.columns],
            "models": self.models,
            "ppl": self.table,
            "tokens_scored": self.tokens,
            "seconds": self.seconds,
            "sinks": {n: m.to_dict() for n, m in self.sinks.items()},
            "files": files,
        }

    @classmethod
    def load(cls, output_dir: str | Path) -> CompareResult:
        """A finished comparison read back from its files (``summary.json``, ``nll/*.npz``); the
        attention maps exist only as figures, so ``maps`` is empty."""
        out = Path(output_dir)
        file = out / "summary.json"
        try:
            summary = json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: no comparison here (run `sinklm compare --output-dir {out}` first)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not readable JSON ({err})") from None
        files = summary["files"]
        nll = {}
        for name in summary["ppl"]:
            with np.load(out / files[f"nll:{name}"]) as arrays:
                nll[name] = {label: torch.from_numpy(arrays[label]) for label in arrays.files}
        return cls(
            columns=[Column(**c) for c in summary["columns"]],
            table=summary["ppl"],
            tokens=summary["tokens_scored"],
            nll=nll,
            seconds=summary["seconds"],
            sinks={n: SinkMetric(**m) for n, m in summary["sinks"].items()},
            maps={},
            models=summary["models"],
            settings=summary["settings"],
            files={k: str(out / v) for k, v in {**files, "summary.json": "summary.json", "index.md": "index.md"}.items()},
        )

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["model"] + [c.label for c in self.columns])
        for name, row in self.table.items():
            writer.writerow([name] + [repr(row[c.label]) if c.label in row else "" for c in self.columns])
        return buf.getvalue()


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def write_outputs(result: CompareResult, output_dir: str | Path) -> dict[str, str]:
    """Write every file of the comparison into ``output_dir``; returns {what: path}."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    (out / "table.md").write_text(table_markdown(result))
    (out / "table.csv").write_text(result.to_csv())
    files["table.md"], files["table.csv"] = "table.md", "table.csv"

    plot_stream_curves(result.nll, out / "ppl_curves.png", cache_size=result.settings["cache_size"])
    files["ppl_curves"] = "ppl_curves.png"
    for name, maps in result.maps.items():
        rel = f"attention_{safe_name(name)}.png"
        plot_attention_maps(maps, out / rel, title=f"{name}: attention averaged over heads and "
                            f"{result.settings['map_inputs']} inputs of {result.settings['map_length']} tokens")
        files[f"attention:{name}"] = rel

    sink_rows = summarise_sinks(result.sinks)
    (out / "sinks.json").write_text(json.dumps({n: m.to_dict() for n, m in result.sinks.items()}, indent=2) + "\n")
    with open(out / "sinks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(sink_rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(sink_rows)
    files["sinks.json"], files["sinks.csv"] = "sinks.json", "sinks.csv"

    (out / "nll").mkdir(exist_ok=True)
    for name, runs in result.nll.items():
        rel = f"nll/{safe_name(name)}.npz"
        np.savez_compressed(out / rel, **{label: nll.numpy() for label, nll in runs.items()})
        files[f"nll:{name}"] = rel

    (out / "summary.json").write_text(json.dumps(result.summary(files), indent=2) + "\n")
    files["summary.json"] = "summary.json"
    (out / "index.md").write_text(_index_markdown(result, files, sink_rows))
    files["index.md"] = "index.md"
    result.files = {k: str(out / v) for k, v in files.items()}
    return result.files


def _column_notes(result: CompareResult) -> list[str]:
    s = result.settings
    notes = [f"- `s+r`: StreamingLLM cache with the first s tokens (sinks) and the last r tokens, cache size {s['cache_size']}; "
             "a sink-token model's own sink tokens count among the first s."]
    if "dense" in s["baselines"]:
        notes.append(f"- `dense`: full attention over the first {s['dense_max_tokens']:,} tokens (or the whole text if shorter).")
    if "recompute" in s["baselines"]:
        notes.append(f"- `recompute`: sliding window of {s['cache_size']} tokens with re-computation (the paper's oracle), "
                     f"first {s['recompute_max_tokens']:,} tokens.")
    return notes


def table_markdown(result: CompareResult) -> str:
    """``table.md``: the perplexity table with a title naming the text and a note per kind of column."""
    return (f"Perplexity on {result.settings['text']} (rows: models, columns: cache configurations)\n\n"
            + result.to_markdown() + "\n" + "\n".join(_column_notes(result)) + "\n")


def same_tokens_table(result: CompareResult) -> list[str]:
    """When baselines cover fewer tokens than the stream, the same table on the tokens all columns scored."""
    shortest = {name: min(counts.values()) for name, counts in result.tokens.items()}
    if all(min(c.values()) == max(c.values()) for c in result.tokens.values()):
        return []
    labels = [c.label for c in result.columns]
    lines = ["On the first tokens that every column scored (per model), so the columns compare like for like:", "",
             "| model | tokens | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for name, runs in result.nll.items():
        n = shortest[name]
        cells = [f"{perplexity(runs[label][:n]):.2f}" for label in labels]
        lines.append(f"| {name} | {n:,} | " + " | ".join(cells) + " |")
    return lines + [""]


def _index_markdown(result: CompareResult, files: dict[str, str], sink_rows: list[dict]) -> str:
    s = result.settings
    lines = ["# Streaming comparison", "",
             f"Text: {s['text']}. Cache size W = {s['cache_size']}, start sizes {', '.join(map(str, s['start_sizes']))}.", "",
             "## Models", "", "| model | variant | source | text tokens |", "|---|---|---|---:|"]
    for name, info in result.models.items():
        lines.append(f"| {name} | {info['description']} | `{info['source']}` | {info['text_tokens']:,} |")
    like_for_like = same_tokens_table(result)
    full = ["Full length, each column on the tokens it scored (not comparable across columns):", ""] if like_for_like else []
    lines += ["", "## Perplexity (the paper's Table 3 layout)", "", *like_for_like, *full, result.to_markdown(),
              *_column_notes(result), "",
              f"Files: [table.md]({files['table.md']}), [table.csv]({files['table.csv']}), per-token NLL in `nll/<model>.npz` "
              f"(one array per column), everything in [summary.json](summary.json).", "",
              "## Log perplexity while streaming", "",
              "Trailing mean of the per-token NLL against tokens streamed; the dotted line is where the cache fills.", "",
              f"![log perplexity]({files['ppl_curves']})", "",
              "## Attention sinks", "",
              f"Sink metric (Gu et al., ICLR 2025): share of heads whose first key gets more than {s['sink_threshold']} of the "
              f"attention on average, averaged over layers; {s['sink_inputs']} inputs of {s['sink_length']} tokens "
              "(a sink-token model's inputs start with its sink tokens).", "",
              "| model | sink rate (%) | top layer | its rate (%) | mean first-key score |", "|---|---:|---:|---:|---:|"]
    for row in sink_rows:
        lines.append(f"| {row['model']} | {row['sink_rate_pct']:.2f} | {row['top_layer']} | {row['top_layer_rate_pct']:.2f} | "
                     f"{row['mean_first_key_score']:.4f} |")
    lines += ["", f"Files: [sinks.json]({files['sinks.json']}), [sinks.csv]({files['sinks.csv']}).", "",
              "## Attention maps", "",
              f"Attention averaged over heads and {s['map_inputs']} inputs of {s['map_length']} tokens, per layer (like the "
              "paper's Figure 7).", ""]
    for name in result.maps:
        lines += [f"### {name}", "", f"![attention {name}]({files[f'attention:{name}']})", ""]
    return "\n".join(lines)
