"""Compare trained variants under StreamingLLM caching: the paper's Table 3 as one command.

``sinklm compare vanilla=runs/vanilla sink=runs/sink1 --cache-size 1024 --output-dir cmp/`` streams
one long text through every model with cache configurations ``s + (W - s)`` for each start size s
(default 0, 1, 2, 4), plus a dense and a sliding-window-with-re-computation baseline, and writes
the files described in :mod:`inference.compare_report` (table, curves, attention maps, sink metric,
per-token NLL, ``summary.json``, ``index.md``).

Every model is a back-end (:mod:`inference.backends`): our checkpoints (run folders, HF exports,
init checkpoints; each knows its variant and sink tokens) stream through the exact fast evaluation
(:func:`inference.perplexity.streaming_nll`), so each cell is what ``sinklm stream-ppl`` reports;
Hugging Face models of the Llama family, MPT and Falcon (local folder or hub name) stream through
the same exact chunked protocol (:mod:`inference.hf_chunked`).

``sinklm compare --steps-of RUN [--steps 100,200] -o OUT`` (every checkpoint of one run) and
``sinklm compare --revisions-of HUB --revisions step1000,step2000 -o OUT`` (hub revisions of one
model) write the training probe's curves instead: sink metric and eviction gap against training
step (:mod:`inference.probe_steps`).

Python API: ``run_compare(models, CompareSettings(...), output_dir)`` returns a
:class:`~inference.compare_report.CompareResult` (``.table``, ``.to_markdown()``);
``CompareResult.load(output_dir)`` reads a finished comparison back.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from data.settings import ArgumentParser, add_settings_args, settings_from_args
from inference.backends import Backend, as_backend, load_backend
from inference.compare_report import Column, CompareResult, write_outputs
from inference.perplexity import CHUNK_SIZE, perplexity
from inference.probe_steps import parse_list, probe_revisions, probe_run, summary_lines, write_step_curves
from inference.sink_metric import (
    GU_INPUT_LENGTH,
    GU_THRESHOLD,
    MAP_INPUT_LENGTH,
    SinkMetric,
    average_attention_maps,
    measure_sinks,
)
from inference.stream import StreamError, TextSettings, add_text_args, fail, sink_warnings_ignored
from pretrain.checkpoints import DTYPE_CHOICES

DEFAULT_START_SIZES = (0, 1, 2, 4)
BASELINES = ("dense", "recompute")
# options the CLI does not offer (the metric's published settings)
_API_ONLY = ("sink_length", "sink_threshold")


class CompareError(StreamError):
    """Bad compare options or inputs; the message names the problem."""


@dataclass
class CompareSettings(TextSettings):
    """Every option of a comparison except the models and the output folder; the text options
    (:class:`~inference.stream.TextSettings`, shared with stream-ppl) come first."""

    cache_size: int = 1024
    """W: total cache size"""
    start_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_START_SIZES))
    """start sizes s for the columns s+(W-s)"""
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    """comma list of dense, recompute ('' for none)"""
    dense_max_tokens: int = 4096
    """dense baseline over the first N tokens"""
    recompute_max_tokens: int = 2048
    """recompute baseline (slow) over the first N tokens"""
    recompute_batch: int = 8
    """windows per forward in the recompute baseline"""
    chunk_size: int = CHUNK_SIZE
    """tokens per chunk in the fast exact evaluation"""
    sink_inputs: int = 64
    """inputs for the sink metric"""
    sink_length: int = GU_INPUT_LENGTH
    """tokens per sink-metric input"""
    sink_threshold: float = GU_THRESHOLD
    """first-key score above which a head counts as a sink head"""
    map_inputs: int = 64
    """inputs averaged in the attention maps"""
    map_length: int = MAP_INPUT_LENGTH
    """tokens per attention-map input"""
    dtype: Literal[DTYPE_CHOICES] = "float32"
    """weights dtype of every model loaded from a path"""
    device: str = "cpu"
    """device of every model loaded from a path: cpu, cuda, cuda:1, ..."""
    device_map: str | None = None
    """Hugging Face models: accelerate placement, e.g. auto (low-memory loading, split across GPUs / CPU)"""
    tokenizer: str | None = None
    """tokenizer for every model (default: each checkpoint's, else bundled)"""
    progress: bool = True
    """progress bars on stderr"""

    def columns(self) -> list[Column]:
        """The table's columns, after checking every option (a :class:`CompareError` names the bad one)."""
        if self.cache_size < 2:
            raise CompareError(f"--cache-size must be >= 2, got {self.cache_size}")
        if not self.start_sizes:
            raise CompareError("--start-sizes is empty")
        for s in self.start_sizes:
            if s < 0 or s >= self.cache_size:
                raise CompareError(f"start size {s} must be in 0..{self.cache_size - 1} for --cache-size {self.cache_size}")
        for name in ("dense_max_tokens", "recompute_max_tokens", "recompute_batch", "chunk_size", "sink_inputs",
                     "map_inputs", "map_length"):
            if getattr(self, name) < 1:
                raise CompareError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        W = self.cache_size
        cols = [Column(f"{s}+{W - s}", "stream", s, W - s) for s in self.start_sizes]
        for name in self.baselines:
            if name not in BASELINES:
                raise CompareError(f"unknown baseline {name!r}; expected any of {', '.join(BASELINES)}")
            cols.append(Column(name, name))
        return cols


def _backend(name: str, model: Any, settings: CompareSettings) -> Backend:
    if not isinstance(model, (str, Path)):
        return as_backend(name, model)
    try:
        return load_backend(model, name, settings.dtype, settings.device, settings.tokenizer, device_map=settings.device_map)
    except (ValueError, OSError) as err:
        raise CompareError(f"model {name!r}: {err}") from None


def run_compare(
    models: Mapping[str, Any],
    settings: CompareSettings | None = None,
    output_dir: str | Path | None = None,
    ids: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
) -> CompareResult:
    """Stream one text through every model under each cache configuration; return the table.

    ``models``: name -> a checkpoint spec (loaded with ``settings.dtype/device/tokenizer``), a
    :class:`~inference.backends.Backend`, or an in-memory ``GPTNeoX`` / ``LoadedModel`` / Llama-family
    HF model. ``ids``: the text's token ids (N,) for every model, or a per-model mapping; when None
    the text that ``settings`` names (``text``/``dataset``/...; default the bundled stream-test book)
    is read through each model's tokenizer. Columns: ``s+(W-s)`` per start size,
    then the baselines: ``dense`` (full attention over the first ``dense_max_tokens`` tokens) and
    ``recompute`` (sliding window W with re-computation over the first ``recompute_max_tokens``
    tokens). With ``output_dir`` every file is written too.
    """
    settings = settings or CompareSettings()
    if not models:
        raise CompareError("no models to compare")
    columns = settings.columns()
    backends = {name: _backend(name, m, settings) for name, m in models.items()}
    s = settings
    table: dict[str, dict[str, float]] = {}
    tokens: dict[str, dict[str, int]] = {}
    nlls: dict[str, dict[str, torch.Tensor]] = {}
    seconds: dict[str, dict[str, float]] = {}
    sinks: dict[str, SinkMetric] = {}
    maps: dict[str, torch.Tensor] = {}
    infos: dict[str, dict[str, Any]] = {}
    text_name = "given ids"
    for name, backend in backends.items():
        if ids is None:
            if backend.tokenizer is None:
                raise CompareError(f"model {name!r} has no tokenizer; pass ids= or give it as a checkpoint path")
            model_ids, text_name = backend.tokenize_stream(s)
        else:
            model_ids = ids[name] if isinstance(ids, Mapping) else ids
        if model_ids.numel() < 2:
            raise CompareError(f"model {name!r}: the text has {model_ids.numel()} token(s); need at least 2")
        print(f"[compare] {name}: {backend.description}, {model_ids.numel():,} tokens", file=sys.stderr)
        table[name], tokens[name], nlls[name], seconds[name] = {}, {}, {}, {}
        for col in columns:
            began = time.perf_counter()
            if col.kind == "stream":
                with sink_warnings_ignored():  # start sizes other than a model's sink count are the point
                    nll = backend.streaming_nll(model_ids, col.start_size, col.recent_size, "fast", s.chunk_size, s.progress)
            elif col.kind == "dense":
                nll = backend.dense_nll(model_ids, min(model_ids.numel(), s.dense_max_tokens), s.chunk_size, s.progress)
            else:
                nll = backend.recompute_nll(model_ids[: s.recompute_max_tokens], s.cache_size, s.recompute_batch, s.progress)
            seconds[name][col.label] = round(time.perf_counter() - began, 3)
            nlls[name][col.label] = nll
            table[name][col.label] = perplexity(nll)
            tokens[name][col.label] = nll.numel()
        sinks[name] = measure_sinks(backend.model, model_ids, backend.sink_ids, s.sink_inputs, s.sink_length,
                                    s.sink_threshold, progress=s.progress)
        maps[name] = average_attention_maps(backend.model, model_ids, backend.sink_ids, s.map_inputs, s.map_length,
                                            progress=s.progress)
        infos[name] = {"description": backend.description, "source": backend.source, "kind": backend.kind,
                       "text_tokens": int(model_ids.numel()), "sink_tokens": len(backend.sink_ids)}
    recorded = {
        "text": text_name, "cache_size": s.cache_size, "start_sizes": list(s.start_sizes), "baselines": list(s.baselines),
        "dense_max_tokens": s.dense_max_tokens, "recompute_max_tokens": s.recompute_max_tokens, "chunk_size": s.chunk_size,
        "sink_inputs": s.sink_inputs, "sink_length": s.sink_length, "sink_threshold": s.sink_threshold,
        "map_inputs": s.map_inputs, "map_length": s.map_length,
    }
    result = CompareResult(columns, table, tokens, nlls, seconds, sinks, maps, infos, recorded)
    if output_dir is not None:
        write_outputs(result, output_dir)
    return result


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
    parser = ArgumentParser(
        prog="sinklm compare",
        description="Compare checkpoints under StreamingLLM caching: perplexity table (rows models, columns "
        "cache configs s+(W-s) and baselines), log-PPL curves, attention maps, sink metric, index.md.",
    )
    parser.add_argument("models", nargs="*", help="checkpoints as NAME=PATH or PATH (run folder, HF export/folder, hub name)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="another checkpoint (repeatable)")
    parser.add_argument("--output-dir", "-o", required=True, help="folder for table.md/csv, PNGs, sinks.json, index.md")
    by_step = parser.add_argument_group("by training step (instead of models: sinks_by_step.csv/json/png)")
    by_step.add_argument("--steps-of", metavar="RUN", help="every global_stepN of this run folder, probed as in training")
    by_step.add_argument("--steps", metavar="N,N", help="only these steps of --steps-of")
    by_step.add_argument("--revisions-of", metavar="HUB", help="hub revisions of one model, e.g. EleutherAI/pythia-70m")
    by_step.add_argument("--revisions", metavar="REV,REV", help="the revisions of --revisions-of, e.g. step1000,step143000")
    add_settings_args(parser, CompareSettings, skip=(*_API_ONLY, *(f.name for f in fields(TextSettings))))
    add_text_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.steps_of or args.revisions_of:
            return _by_step(args)
        if args.steps or args.revisions:
            raise CompareError("--steps needs --steps-of RUN, --revisions needs --revisions-of HUB")
        specs = _parse_model_specs(list(args.models) + list(args.model))
        if not specs:
            raise CompareError("give at least one checkpoint (NAME=PATH or PATH)")
        settings = settings_from_args(CompareSettings, args)
        settings.columns()  # every option checked before any model loads
        result = run_compare(specs, settings, args.output_dir)
    except (StreamError, ValueError, FileNotFoundError, OSError) as err:
        return fail(prog, err)
    print(result.to_markdown())
    print(f"wrote {result.files['index.md']}", file=sys.stderr)
    return 0


def _by_step(args: argparse.Namespace) -> int:
    """``--steps-of`` / ``--revisions-of``: the probe's curves against training step."""
    if args.models or args.model:
        raise CompareError("--steps-of / --revisions-of take no model arguments")
    if args.steps_of and args.revisions_of:
        raise CompareError("give --steps-of or --revisions-of, not both")
    settings = settings_from_args(CompareSettings, args)
    settings.columns()
    if args.steps_of:
        if args.revisions:
            raise CompareError("--revisions goes with --revisions-of, not --steps-of")
        curves = probe_run(args.steps_of, settings, parse_list(args.steps, "--steps", number=True))
    else:
        if not args.revisions:
            raise CompareError("--revisions-of needs --revisions, e.g. --revisions step1000,step143000")
        if args.steps:
            raise CompareError("--steps goes with --steps-of, not --revisions-of")
        curves = probe_revisions(args.revisions_of, parse_list(args.revisions, "--revisions"), settings)
    files = write_step_curves(curves, args.output_dir)
    print(summary_lines(curves))
    print(f"wrote {files['sinks_by_step.csv']} and {files['sinks_by_step.png'].name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
