"""``sinklm stream-ppl``: perplexity of a checkpoint on a long token stream under a sink + window cache.

The stream goes through the checkpoint's back-end (:func:`inference.backends.load_backend`): our
models and Hugging Face GPT-NeoX / Llama-family / MPT / Falcon models in the exact chunked fast mode
(or token by token with ``--mode reference``; HF models through :class:`inference.hf_cache.HFSinkCache`). Baselines: dense
attention, window attention (0 + cache size) and sliding window with re-computation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data.outputs import check_output_file
from data.settings import ArgumentParser
from inference.backends import load_backend
from pretrain.checkpoints.integrity import folder_problem
from inference.perplexity import CHUNK_SIZE, MODES, perplexity
from inference.stream import (
    StreamError,
    add_cache_args,
    add_model_args,
    add_text_args,
    cache_sizes_from_args,
    check_text_args,
    fail,
    sink_warnings_ignored,
)

BASELINES = ("dense", "window", "recompute")
MODE_LABELS = {"hf-per-token": "per-token (HF SinkCache)", "hf-chunked": "chunked (HF, exact)"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sinklm stream-ppl",
        description="Perplexity of a checkpoint on a long token stream under a StreamingLLM sink + window cache "
        "(the paper's token-by-token protocol, or the exact chunked fast mode), with baselines.",
    )
    add_model_args(parser)
    add_cache_args(parser)
    add_text_args(parser)
    parser.add_argument("--mode", choices=MODES, default="fast", help="fast (chunked, exact) or reference (token by token)")
    parser.add_argument(
        "--chunk-size", type=int, default=CHUNK_SIZE,
        help="tokens per chunk in fast mode (any size gives the same numbers; larger suits a GPU)",
    )
    parser.add_argument(
        "--baselines",
        default="",
        help=f"comma list of {', '.join(BASELINES)}: dense attention, window attention (0 + cache size), "
        "sliding window with re-computation (window = cache size)",
    )
    parser.add_argument("--dense-max-len", type=int, default=4096, help="dense baseline: first N text tokens only")
    parser.add_argument("--recompute-max-tokens", type=int, default=4096, help="recompute baseline: first N text tokens only")
    parser.add_argument("--recompute-batch", type=int, default=8, help="windows per forward pass in the recompute baseline")
    parser.add_argument("--output-dir", default=None, help="write <method>.nll.npy (float32 per-token NLL) and summary.json here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _parse_baselines(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    for name in names:
        if name not in BASELINES:
            raise StreamError(f"unknown baseline {name!r} in --baselines; expected any of {', '.join(BASELINES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        start, recent = cache_sizes_from_args(args)
        baselines = _parse_baselines(args.baselines)
        if args.chunk_size < 1:
            raise StreamError(f"--chunk-size must be >= 1, got {args.chunk_size}")
        for flag in ("dense_max_len", "recompute_max_tokens", "recompute_batch"):
            if getattr(args, flag) < 1:
                raise StreamError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.output_dir:
            check_output_file(args.output_dir, "--output-dir folder")  # before any work, not after it
        check_text_args(args)
        if Path(args.checkpoint).is_dir():  # every route (ours or transformers') gets the one-line truncation error
            problem = folder_problem(Path(args.checkpoint))
            if problem:
                raise StreamError(problem)
        backend = load_backend(args.checkpoint, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer, tag=args.tag,
                               device_map=args.device_map)
        ids, text_name = backend.tokenize_stream(args)
    except (StreamError, ValueError, FileNotFoundError, OSError) as err:
        return fail(prog, err)

    progress = not args.no_progress
    cache_size = start + recent
    mode = backend.stream_mode(args.mode)
    variant = backend.description
    print(
        f"{args.checkpoint}: {variant}, {text_name}: {ids.numel():,} tokens, cache {start}+{recent}, "
        f"{MODE_LABELS.get(mode, mode)} mode",
        file=sys.stderr,
    )

    def stream_nll(s: int, r: int, mode: str) -> torch.Tensor:
        return backend.streaming_nll(ids, s, r, mode, args.chunk_size, progress)

    def window_nll() -> torch.Tensor:
        with sink_warnings_ignored():  # evicting a sink-token model's sinks is this baseline's point
            return stream_nll(0, cache_size, "fast")

    dense_len = min(ids.numel(), args.dense_max_len)
    recompute_len = min(ids.numel(), args.recompute_max_tokens)
    runs: list[tuple[str, dict, Callable[[], torch.Tensor]]] = [
        (f"stream_{start}+{recent}", {"start_size": start, "recent_size": recent, "mode": mode},
         lambda: stream_nll(start, recent, args.mode)),
    ]
    if "dense" in baselines:
        runs.append((f"dense_{dense_len}", {"max_len": dense_len},
                     lambda: backend.dense_nll(ids, dense_len, args.chunk_size, progress)))
    if "window" in baselines:
        runs.append((f"window_0+{cache_size}", {"start_size": 0, "recent_size": cache_size}, window_nll))
    if "recompute" in baselines:
        runs.append((f"recompute_{cache_size}", {"window": cache_size, "max_tokens": recompute_len},
                     lambda: backend.recompute_nll(ids[:recompute_len], cache_size, args.recompute_batch, progress)))

    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, details, run in runs:
        began = time.perf_counter()
        nll = run()
        seconds = time.perf_counter() - began
        row = {"method": name, **details, "tokens_scored": nll.numel(), "mean_nll": nll.double().mean().item(),
               "ppl": perplexity(nll), "seconds": round(seconds, 3)}
        if out_dir is not None:
            np.save(out_dir / f"{name}.nll.npy", nll.numpy())
            row["nll_file"] = str(out_dir / f"{name}.nll.npy")
        results.append(row)

    width = max(len(r["method"]) for r in results)
    print(f"{'method'.ljust(width)}  {'tokens':>10}  {'ppl':>12}  {'seconds':>9}")
    for r in results:
        print(f"{r['method'].ljust(width)}  {r['tokens_scored']:>10,}  {r['ppl']:>12.4f}  {r['seconds']:>9.2f}")
    if out_dir is not None:
        summary = {"checkpoint": args.checkpoint, "variant": variant, "text": text_name,
                   "text_tokens": ids.numel(), "dtype": args.dtype, "results": results}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out_dir / 'summary.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
