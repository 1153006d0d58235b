"""Compare trained variants under StreamingLLM caching: the paper's Table 3 as one command.

``sinklm compare vanilla=runs/vanilla sink=runs/sink1 --cache-size 1024 --output-dir cmp/`` streams
one long text through every model with cache configurations ``s + (W - s)`` for each start size s
(default 0, 1, 2, 4), plus a dense and a sliding-window-with-re-computation baseline, and writes:

- ``table.md`` / ``table.csv``: perplexity, rows = models, columns = cache configurations
- ``ppl_curves.png``: log-perplexity against tokens streamed, per model and configuration (Figs. 3/5)
- ``attention_<model>.png``: per-layer attention averaged over short inputs (Fig. 7)
- ``sinks.json`` / ``sinks.csv``: Gu et al.'s sink metric per model (threshold 0.3, 64-token inputs)
- ``nll/<model>.npz``: per-token NLL of every run; ``summary.json``: everything in machine form
- ``index.md``: ties them together

Our checkpoints (run folders, HF exports, init checkpoints; each knows its variant and sink tokens)
go through ``pretrain.convert.load_model`` and the exact fast streaming evaluation
(:func:`inference.perplexity.streaming_nll`), so each cell is what ``sinklm stream-ppl`` reports.
Llama-family Hugging Face models (Llama, Mistral, Qwen2, SmolLM: local folder or hub name) stream
through :class:`inference.hf_cache.SinkCache` token by token instead.

Python API: :func:`compare_models` returns a :class:`CompareResult` (``.table``, ``.to_markdown()``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from inference import hf_cache
from inference.perplexity import dense_nll, perplexity, recompute_nll, streaming_nll
from inference.plots import plot_attention_maps, plot_stream_curves
from inference.sink_metric import (
    GU_INPUT_LENGTH,
    GU_THRESHOLD,
    MAP_INPUT_LENGTH,
    SinkMetric,
    average_attention_maps,
    measure_sinks,
    summarise_sinks,
)
from inference.stream import DTYPES, StreamError, add_text_args, fail, read_stream_tokens
from pretrain.config import ModelConfig

DEFAULT_START_SIZES = (0, 1, 2, 4)
BASELINES = ("dense", "recompute")


class CompareError(StreamError):
    """Bad compare options or inputs; the message names the problem."""


# -- the models under comparison ----------------------------------------------------------------------


@dataclass
class Entry:
    """One model row: ours (``GPTNeoX``, exact chunked streaming) or a Llama-family HF model."""

    name: str
    model: nn.Module
    kind: str  # "sinklm" | "hf"
    tokenizer: Any = None
    config: ModelConfig | None = None
    source: str = ""

    @property
    def sink_ids(self) -> list[int]:
        return list(self.config.sink_token_ids) if self.config is not None else []

    @property
    def description(self) -> str:
        if self.config is not None:
            return f"{self.config.variant} ({self.config.attention}, {self.config.sink_tokens} sink tokens)"
        return f"HF {getattr(self.model.config, 'model_type', '?')} (SinkCache route)"

    def stream(self, ids: torch.Tensor, start: int, recent: int, chunk_size: int, progress: bool) -> torch.Tensor:
        if self.kind == "hf":
            return hf_cache.hf_streaming_nll(self.model, ids, start, recent, progress=progress)
        with warnings.catch_warnings():
            # start sizes below / above a sink-token model's k are the point of the table, not a mistake
            warnings.filterwarnings("ignore", message=r".*sink token\(s\).*")
            return streaming_nll(self.model, ids, start, recent, mode="fast", chunk_size=chunk_size, progress=progress)

    def dense(self, ids: torch.Tensor, max_len: int, chunk_size: int, progress: bool) -> torch.Tensor:
        if self.kind == "hf":
            return hf_cache.hf_dense_nll(self.model, ids, max_len)
        return dense_nll(self.model, ids, max_len, chunk_size=chunk_size, progress=progress)

    def recompute(self, ids: torch.Tensor, window: int, batch_size: int, progress: bool) -> torch.Tensor:
        if self.kind == "hf":
            return hf_cache.hf_recompute_nll(self.model, ids, window, batch_size, progress)
        return recompute_nll(self.model, ids, window, batch_size=batch_size, progress=progress)

    def tokenize(self, args: argparse.Namespace) -> tuple[torch.Tensor, str]:
        """The stream's text ids for this model's tokenizer (HF models get their BOS first, if any)."""
        ids, name = read_stream_tokens(args, self.tokenizer)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if self.kind == "hf" and bos is not None and getattr(self.tokenizer, "add_bos_token", False):
            ids = torch.cat([torch.tensor([bos]), ids])
        return ids, name


def _local_hf_model_type(spec: str) -> str | None:
    """model_type from a local folder's config.json, else None."""
    path = Path(spec).expanduser()
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _looks_like_hub_name(spec: str) -> bool:
    """``org/name`` that is not a local path (nor inside an existing local folder such as ``runs/``)."""
    path = Path(spec).expanduser()
    if path.exists() or Path(path.parts[0]).is_dir():
        return False
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None


def uses_hf_route(spec: str) -> bool:
    """True when ``spec`` is a Llama-family Hugging Face model, which streams through
    :mod:`inference.hf_cache` rather than our exact chunked path (that needs our GPT-NeoX)."""
    model_type = _local_hf_model_type(str(spec))
    if model_type is None and _looks_like_hub_name(str(spec)):
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(str(spec)).model_type
        except (OSError, ValueError):
            return False  # let the regular loader report the problem
    return model_type in hf_cache.SUPPORTED_MODEL_TYPES and model_type != "gpt_neox"


def load_entry(
    name: str,
    spec: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
) -> Entry:
    """Load one checkpoint for comparison.

    Llama-family HF folders (or hub names) load with ``AutoModelForCausalLM``; everything else
    (our run folders, exports, init checkpoints, stock GPT-NeoX/Pythia) with ``load_model``.
    """
    spec = str(spec)
    model_type = _local_hf_model_type(spec)
    if model_type is None and _looks_like_hub_name(spec):
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(spec).model_type
        except (OSError, ValueError) as err:
            raise CompareError(f"model {name!r}: {spec!r} is not a local path, nor loadable from the hub ({err})") from None
    elif model_type is None and not Path(spec).expanduser().exists():
        raise CompareError(f"model {name!r}: checkpoint not found: {spec}")
    if model_type in hf_cache.SUPPORTED_MODEL_TYPES and model_type != "gpt_neox":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device).eval()
        tok = AutoTokenizer.from_pretrained(tokenizer or spec)
        return Entry(name, model, "hf", tokenizer=tok, source=spec)
    from pretrain.convert import load_model  # lazy: DeepSpeed / transformers

    folder = spec
    if _looks_like_hub_name(spec):  # e.g. EleutherAI/pythia-160m: fetch the folder, convert locally
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    loaded = load_model(folder, dtype=dtype, tokenizer=tokenizer)
    tok = loaded.tokenizer
    if tok is None:  # an initial checkpoint names no tokenizer: the bundled GPT-NeoX one
        from data.tokenizer import load_tokenizer

        tok = load_tokenizer(None, num_sink_tokens=loaded.config.sink_tokens, padded_vocab_size=loaded.config.padded_vocab_size)
    return Entry(name, loaded.model.to(device).eval(), "sinklm", tokenizer=tok, config=loaded.config, source=spec)


def as_entry(name: str, model: Any, tokenizer: Any = None) -> Entry:
    """Wrap what compare_models was given: an :class:`Entry`, a checkpoint path (loaded with
    :func:`load_entry`), our ``GPTNeoX``, a ``LoadedModel`` (``.model/.config/.tokenizer``) or a
    Llama-family HF model."""
    from pretrain.model import GPTNeoX

    if isinstance(model, Entry):
        return model
    if isinstance(model, (str, Path)):
        return load_entry(name, model, tokenizer=tokenizer)
    if isinstance(model, GPTNeoX):
        return Entry(name, model.eval(), "sinklm", tokenizer=tokenizer, config=model.config, source="in-memory")
    inner = getattr(model, "model", None)
    if isinstance(inner, GPTNeoX):
        return Entry(name, inner.eval(), "sinklm", tokenizer=tokenizer or getattr(model, "tokenizer", None),
                     config=inner.config, source=str(getattr(model, "source", "in-memory")))
    if hasattr(model, "config") and getattr(model.config, "model_type", None) in hf_cache.SUPPORTED_MODEL_TYPES:
        return Entry(name, model.eval(), "hf", tokenizer=tokenizer, source="in-memory")
    raise CompareError(f"model {name!r}: cannot compare a {type(model).__name__}")


# -- results --------------------------------------------------------------------------------------------


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

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["model"] + [c.label for c in self.columns])
        for name, row in self.table.items():
            writer.writerow([name] + [repr(row[c.label]) if c.label in row else "" for c in self.columns])
        return buf.getvalue()


def parse_start_sizes(text: str | Sequence[int], cache_size: int) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()] if isinstance(text, str) else [int(s) for s in text]
    if not sizes:
        raise CompareError("--start-sizes is empty")
    for s in sizes:
        if s < 0 or s >= cache_size:
            raise CompareError(f"start size {s} must be in 0..{cache_size - 1} for --cache-size {cache_size}")
    return sizes


def _columns(cache_size: int, start_sizes: Sequence[int], baselines: Sequence[str]) -> list[Column]:
    cols = [Column(f"{s}+{cache_size - s}", "stream", s, cache_size - s) for s in start_sizes]
    for name in baselines:
        if name not in BASELINES:
            raise CompareError(f"unknown baseline {name!r}; expected any of {', '.join(BASELINES)}")
        cols.append(Column(name, name))
    return cols


def compare_models(
    models: Mapping[str, Any],
    ids: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    text_args: argparse.Namespace | None = None,
    cache_size: int = 1024,
    start_sizes: Sequence[int] = DEFAULT_START_SIZES,
    baselines: Sequence[str] = BASELINES,
    dense_max_tokens: int = 4096,
    recompute_max_tokens: int = 2048,
    recompute_batch: int = 8,
    chunk_size: int = 1024,
    sink_inputs: int = 64,
    sink_length: int = GU_INPUT_LENGTH,
    sink_threshold: float = GU_THRESHOLD,
    map_inputs: int = 64,
    map_length: int = MAP_INPUT_LENGTH,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> CompareResult:
    """Stream one text through every model under each cache configuration; return the table.

    ``models``: name -> a checkpoint path, an :class:`Entry` (see :func:`load_entry`), or an
    in-memory ``GPTNeoX`` / ``LoadedModel`` / Llama-family HF model. ``ids``: the text's token ids (N,) for every model, or
    a per-model mapping; when None the text is read with ``text_args`` (the ``--text/--dataset/
    --max-tokens`` options; default: the bundled stream-test book) through each model's tokenizer.
    Columns: ``s+(W-s)`` per start size, then the baselines: ``dense`` (full attention over the first
    ``dense_max_tokens`` tokens) and ``recompute`` (sliding window W with re-computation over the
    first ``recompute_max_tokens`` tokens). With ``output_dir`` every file is written too.
    """
    if not models:
        raise CompareError("no models to compare")
    start_sizes = parse_start_sizes(start_sizes, cache_size)
    columns = _columns(cache_size, start_sizes, baselines)
    entries = {name: as_entry(name, m) for name, m in models.items()}
    table: dict[str, dict[str, float]] = {}
    tokens: dict[str, dict[str, int]] = {}
    nlls: dict[str, dict[str, torch.Tensor]] = {}
    seconds: dict[str, dict[str, float]] = {}
    sinks: dict[str, SinkMetric] = {}
    maps: dict[str, torch.Tensor] = {}
    infos: dict[str, dict[str, Any]] = {}
    text_name = "given ids"
    for name, entry in entries.items():
        if ids is None:
            if entry.tokenizer is None:
                raise CompareError(f"model {name!r} has no tokenizer; pass ids= or load it with load_entry")
            model_ids, text_name = entry.tokenize(text_args or default_text_args())
        else:
            model_ids = ids[name] if isinstance(ids, Mapping) else ids
        if model_ids.numel() < 2:
            raise CompareError(f"model {name!r}: the text has {model_ids.numel()} token(s); need at least 2")
        print(f"[compare] {name}: {entry.description}, {model_ids.numel():,} tokens", file=sys.stderr)
        table[name], tokens[name], nlls[name], seconds[name] = {}, {}, {}, {}
        for col in columns:
            began = time.perf_counter()
            if col.kind == "stream":
                nll = entry.stream(model_ids, col.start_size, col.recent_size, chunk_size, progress)
            elif col.kind == "dense":
                nll = entry.dense(model_ids, min(model_ids.numel(), dense_max_tokens), chunk_size, progress)
            else:
                nll = entry.recompute(model_ids[:recompute_max_tokens], cache_size, recompute_batch, progress)
            seconds[name][col.label] = round(time.perf_counter() - began, 3)
            nlls[name][col.label] = nll
            table[name][col.label] = perplexity(nll)
            tokens[name][col.label] = nll.numel()
        sinks[name] = measure_sinks(
            entry.model, model_ids, entry.sink_ids, sink_inputs, sink_length, sink_threshold, progress=progress
        )
        maps[name] = average_attention_maps(entry.model, model_ids, entry.sink_ids, map_inputs, map_length, progress=progress)
        infos[name] = {"description": entry.description, "source": entry.source, "kind": entry.kind,
                       "text_tokens": int(model_ids.numel()), "sink_tokens": len(entry.sink_ids)}
    settings = {
        "text": text_name, "cache_size": cache_size, "start_sizes": list(start_sizes), "baselines": list(baselines),
        "dense_max_tokens": dense_max_tokens, "recompute_max_tokens": recompute_max_tokens, "chunk_size": chunk_size,
        "sink_inputs": sink_inputs, "sink_length": sink_length, "sink_threshold": sink_threshold,
        "map_inputs": map_inputs, "map_length": map_length,
    }
    result = CompareResult(columns, table, tokens, nlls, seconds, sinks, maps, infos, settings)
    if output_dir is not None:
        write_outputs(result, output_dir)
    return result


def default_text_args(max_tokens: int | None = None) -> argparse.Namespace:
    """The text options' defaults (the bundled stream-test book), for API callers."""
    parser = argparse.ArgumentParser(add_help=False)
    add_text_args(parser)
    args = parser.parse_args([])
    args.max_tokens = max_tokens
    return args


# -- files ------------------------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def write_outputs(result: CompareResult, output_dir: str | Path) -> dict[str, str]:
    """Write every file of the comparison into ``output_dir``; returns {what: path}."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    (out / "table.md").write_text(_table_markdown(result))
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

    summary = {
        "settings": result.settings,
        "columns": [c.__dict__ for c in result.columns],
        "models": result.models,
        "ppl": result.table,
        "tokens_scored": result.tokens,
        "seconds": result.seconds,
        "sinks": {n: m.to_dict() for n, m in result.sinks.items()},
        "files": files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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


def _table_markdown(result: CompareResult) -> str:
    return (f"Perplexity on {result.settings['text']} (rows: models, columns: cache configurations)\n\n"
            + result.to_markdown() + "\n" + "\n".join(_column_notes(result)) + "\n")


def _same_tokens_table(result: CompareResult) -> list[str]:
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
    lines += ["", "## Perplexity (the paper's Table 3 layout)", "", result.to_markdown(), *_column_notes(result), "",
              *_same_tokens_table(result),
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


# -- CLI ----------------------------------------------------------------------------------------------------


def _parse_model_specs(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) -> {name: path}, names unique."""
    out: dict[str, str] = {}
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
            if not name or not path:
                raise CompareError(f"--model {spec!r}: expected NAME=PATH")
        else:
            path = spec
            name = Path(spec.rstrip("/")).name or spec
        if name in out:
            raise CompareError(f"model name {name!r} given twice; use NAME=PATH to tell them apart")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinklm compare",
        description="Compare checkpoints under StreamingLLM caching: perplexity table (rows models, columns "
        "cache configs s+(W-s) and baselines), log-PPL curves, attention maps, sink metric, index.md.",
    )
    parser.add_argument("models", nargs="*", help="checkpoints as NAME=PATH or PATH (run folder, HF export/folder, hub name)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="another checkpoint (repeatable)")
    parser.add_argument("--output-dir", "-o", required=True, help="folder for table.md/csv, PNGs, sinks.json, index.md")
    parser.add_argument("--cache-size", type=int, default=1024, help="W: total cache size (default 1024)")
    parser.add_argument("--start-sizes", default="0,1,2,4", help="start sizes s for the columns s+(W-s) (default 0,1,2,4)")
    parser.add_argument("--baselines", default="dense,recompute", help="comma list of dense, recompute ('' for none)")
    parser.add_argument("--dense-max-tokens", type=int, default=4096, help="dense baseline over the first N tokens")
    parser.add_argument("--recompute-max-tokens", type=int, default=2048, help="recompute baseline (slow) over the first N tokens")
    parser.add_argument("--recompute-batch", type=int, default=8, help="windows per forward in the recompute baseline")
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk in the fast exact evaluation")
    parser.add_argument("--sink-inputs", type=int, default=64, help="inputs for the sink metric")
    parser.add_argument("--map-inputs", type=int, default=64, help="inputs averaged in the attention maps")
    parser.add_argument("--map-length", type=int, default=MAP_INPUT_LENGTH, help="tokens per attention-map input")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for every model (default: each checkpoint's, else bundled)")
    parser.add_argument("--no-progress", action="store_true")
    add_text_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        specs = _parse_model_specs(list(args.models) + list(args.model))
        if not specs:
            raise CompareError("give at least one checkpoint (NAME=PATH or PATH)")
        if args.cache_size < 2:
            raise CompareError(f"--cache-size must be >= 2, got {args.cache_size}")
        start_sizes = parse_start_sizes(args.start_sizes, args.cache_size)
        baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
        _columns(args.cache_size, start_sizes, baselines)  # validates the baseline names
        for flag in ("dense_max_tokens", "recompute_max_tokens", "recompute_batch", "chunk_size", "sink_inputs", "map_inputs",
                     "map_length"):
            if getattr(args, flag) < 1:
                raise CompareError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            raise CompareError(f"--device {args.device!r}: {err}") from None
        entries = {name: load_entry(name, path, DTYPES[args.dtype], device, args.tokenizer) for name, path in specs.items()}
        result = compare_models(
            entries, text_args=args, cache_size=args.cache_size, start_sizes=start_sizes, baselines=baselines,
            dense_max_tokens=args.dense_max_tokens, recompute_max_tokens=args.recompute_max_tokens,
            recompute_batch=args.recompute_batch, chunk_size=args.chunk_size, sink_inputs=args.sink_inputs,
            map_inputs=args.map_inputs, map_length=args.map_length, output_dir=args.output_dir,
            progress=not args.no_progress,
        )
    except (StreamError, ValueError, FileNotFoundError, OSError) as err:
        return fail(prog, err)
    print(result.to_markdown())
    print(f"wrote {result.files['index.md']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
