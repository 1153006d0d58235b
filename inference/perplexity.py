"""Streaming perplexity (``sinklm stream-ppl``): the paper's protocol, exactly, plus its baselines.

Every function takes the *text* token ids (N,) and returns per-token NLL (N - 1,) in float32 on the
CPU: entry t is the NLL of token t + 1 after the model has been fed tokens 0 .. t. A sink-token
model's stream starts with its k sink ids, fed before the text and never scored, so every variant
scores the same tokens.

- :func:`streaming_nll` ``mode="reference"``: one token at a time through a :class:`SinkCache`
  (feed one token, score the next, keep start + recent), as the paper's evaluation does.
- :func:`streaming_nll` ``mode="fast"``: the same numbers from chunks of ``chunk_size`` tokens; the
  cache's banded mask gives every token its sinks and its recent window at the cache's positions.
- :func:`dense_nll`: dense attention over the whole stream (optionally its first ``max_len`` tokens).
- window attention is ``streaming_nll(start_size=0, recent_size=W)``.
- :func:`recompute_nll`: sliding window with re-computation (the paper's oracle baseline): each
  token scored by running the model from scratch on the W tokens before it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from inference.cache import SinkCache
from inference.hf_cache import hf_streaming_nll
from inference.stream import (
    DTYPES,
    StreamError,
    add_cache_args,
    add_model_args,
    add_text_args,
    cache_sizes_from_args,
    check_start_size,
    fail,
    final_hidden,
    load_streaming_model,
    read_stream_tokens,
    stream_prefix,
)

MODES = ("fast", "reference")
BASELINES = ("dense", "window", "recompute")


def _with_prefix(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(stream (k + N,) on the model's device, k): the model's sink ids, then the text."""
    if ids.dim() != 1:
        raise StreamError(f"ids must be one stream of shape (N,), got shape {tuple(ids.shape)}")
    if ids.numel() < 2:
        raise StreamError(f"need at least 2 tokens to score one, got {ids.numel()}")
    device = next(model.parameters()).device
    prefix = torch.tensor(stream_prefix(model.config), dtype=torch.long)
    return torch.cat([prefix, ids.long().cpu()]).to(device), prefix.numel()


def _nll(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, piece: int = 64) -> torch.Tensor:
    """Per-token NLL (T,) float32 of ``targets`` (T,) from final hidden states (T, C).

    The vocabulary head runs ``piece`` tokens at a time so a (64, 50304) block of logits stays in
    cache, and the log-sum-exp is written out (max, exp in place, sum): together about 2x faster on
    a CPU than ``cross_entropy`` over one big block, with the same float32 numbers.
    """
    out = []
    for h, t in zip(hidden.split(piece), targets.split(piece)):
        logits = model.lm_head(h).float()  # (piece, V)
        top = logits.amax(dim=-1, keepdim=True)
        target = logits.gather(1, t[:, None])[:, 0]
        log_sum = (logits - top).exp_().sum(dim=-1).log_() + top[:, 0]
        out.append(log_sum - target)
    return torch.cat(out)


@torch.no_grad()
def streaming_nll(
    model: torch.nn.Module,
    ids: torch.Tensor,
    start_size: int,
    recent_size: int | None,
    mode: str = "fast",
    chunk_size: int = 1024,
    progress: bool = True,
) -> torch.Tensor:
    """Per-token NLL (N - 1,) of the text ``ids`` (N,) streamed through a ``start_size + recent_size`` cache.

    ``recent_size=None`` is an unbounded (dense) cache. ``mode="reference"`` feeds one token at a
    time; ``mode="fast"`` feeds ``chunk_size`` tokens at a time and gives the same numbers.
    """
    if mode not in MODES:
        raise StreamError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if recent_size is not None:  # an unbounded cache keeps every token: nothing to warn about
        check_start_size(model.config, start_size)
    cache = SinkCache(start_size, recent_size)
    stream, k = _with_prefix(model, ids)
    step = 1 if mode == "reference" else chunk_size
    if step < 1:
        raise StreamError(f"chunk_size must be >= 1, got {chunk_size}")
    total = stream.numel()
    out = torch.empty(ids.numel() - 1, dtype=torch.float32)
    label = f"{start_size}+{recent_size}" if recent_size is not None else "dense"
    bar = tqdm(total=total - 1, desc=f"stream-ppl {mode} {label}", unit="tok", disable=not progress, mininterval=1.0)
    # stream position p predicts p + 1; text target index i sits at p = k + i - 1, scored for i >= 1
    for start in range(0, total - 1, step):
        end = min(start + step, total - 1)  # the last token is never fed: nothing left to predict
        hidden = final_hidden(model, stream[None, start:end], cache)[0]  # (T, C)
        first = max(start, k)  # positions before k predict sinks (or x_0 from sinks only): not scored
        if first < end:
            out[first - k : end - k] = _nll(model, hidden[first - start :], stream[first + 1 : end + 1]).cpu()
        bar.update(end - start)
    bar.close()
    return out


@torch.no_grad()
def dense_nll(
    model: torch.nn.Module, ids: torch.Tensor, max_len: int | None = None, chunk_size: int = 1024, progress: bool = False
) -> torch.Tensor:
    """Dense attention over the first ``max_len`` text tokens (all when None): NLL (min(N, max_len) - 1,)."""
    if max_len is not None:
        if max_len < 2:
            raise StreamError(f"max_len must be >= 2, got {max_len}")
        ids = ids[:max_len]
    return streaming_nll(model, ids, 0, None, mode="fast", chunk_size=chunk_size, progress=progress)


@torch.no_grad()
def recompute_nll(
    model: torch.nn.Module, ids: torch.Tensor, window: int, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """Sliding window with re-computation: NLL (N - 1,), each token predicted by a fresh forward pass
    over the ``window`` tokens before it (at positions 0 .. window - 1).

    For a sink-token model the window is its k sink ids + the latest ``window - k`` text tokens, so
    the model always sees the start it was trained with.
    """
    stream, k = _with_prefix(model, ids)
    text = window - k
    if text < 1:
        raise StreamError(f"window {window} leaves no room for text after the model's {k} sink token(s)")
    n = ids.numel()
    out = torch.empty(n - 1, dtype=torch.float32)
    # Targets i = 1 .. text: the context is the whole prefix so far; one causal pass scores them all.
    head = min(text, n - 1)
    hidden = final_hidden(model, stream[None, : k + head])[0, k:]  # positions k .. k + head - 1
    out[:head] = _nll(model, hidden, stream[k + 1 : k + head + 1]).cpu()
    # Targets i > text: context = sinks + ids[i - text : i], exactly ``window`` tokens, batched.
    targets = torch.arange(text + 1, max(n, text + 1))  # empty when the text fits one window
    prefix = stream[:k]
    bar = tqdm(total=targets.numel(), desc=f"stream-ppl recompute {window}", unit="tok", disable=not progress, mininterval=1.0)
    for chunk in targets.split(batch_size) if targets.numel() else ():
        rows = torch.stack([stream[k + i - text : k + i] for i in chunk.tolist()])  # (b, text)
        if k:
            rows = torch.cat([prefix.expand(rows.shape[0], k), rows], dim=1)
        last = final_hidden(model, rows)[:, -1]  # (b, C)
        out[chunk - 1] = _nll(model, last, stream[k + chunk.to(stream.device)]).cpu()
        bar.update(chunk.numel())
    bar.close()
    return out


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL), accumulated in float64."""
    return math.exp(nll.double().mean().item())


# -- CLI --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinklm stream-ppl",
        description="Perplexity of a checkpoint on a long token stream under a StreamingLLM sink + window cache "
        "(the paper's token-by-token protocol, or the exact chunked fast mode), with baselines.",
    )
    add_model_args(parser)
    add_cache_args(parser)
    add_text_args(parser)
    parser.add_argument("--mode", choices=MODES, default="fast", help="fast (chunked, exact) or reference (token by token)")
    parser.add_argument(
        "--chunk-size", type=int, default=1024,
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
        from inference.compare import load_entry, uses_hf_route  # lazy: compare imports this module

        if uses_hf_route(args.checkpoint):
            # a Llama-family HF model: streamed token by token through inference.hf_cache.SinkCache
            entry = load_entry("model", args.checkpoint, DTYPES[args.dtype], args.device, args.tokenizer)
            ids, text_name = entry.tokenize(args)
            variant = entry.description
        else:
            entry = None
            model, config, tokenizer = load_streaming_model(args)
            ids, text_name = read_stream_tokens(args, tokenizer)
            variant = f"{config.variant} ({config.attention}, {config.sink_tokens} sink tokens)"
    except (StreamError, ValueError, FileNotFoundError, OSError) as err:
        return fail(prog, err)

    progress = not args.no_progress
    cache_size = start + recent
    print(
        f"{args.checkpoint}: {variant}, {text_name}: {ids.numel():,} tokens, cache {start}+{recent}, "
        f"{'per-token (HF SinkCache)' if entry is not None else args.mode} mode",
        file=sys.stderr,
    )

    def stream_nll(s: int, r: int, mode: str) -> torch.Tensor:
        if entry is not None:
            return hf_streaming_nll(entry.model, ids, s, r, progress=progress)
        return streaming_nll(model, ids, s, r, mode, args.chunk_size, progress)

    def window_nll() -> torch.Tensor:
        with warnings.catch_warnings():  # evicting a sink-token model's sinks is this baseline's point
            warnings.filterwarnings("ignore", message=r".*sink token\(s\).*")
            return stream_nll(0, cache_size, "fast")

    dense_len = min(ids.numel(), args.dense_max_len)
    recompute_len = min(ids.numel(), args.recompute_max_tokens)
    runs: list[tuple[str, dict, Callable[[], torch.Tensor]]] = [
        (f"stream_{start}+{recent}", {"start_size": start, "recent_size": recent, "mode": args.mode if entry is None else "hf-per-token"},
         lambda: stream_nll(start, recent, args.mode)),
    ]
    if "dense" in baselines:
        runs.append((f"dense_{dense_len}", {"max_len": dense_len},
                     lambda: entry.dense(ids, dense_len, args.chunk_size, progress) if entry is not None
                     else dense_nll(model, ids, dense_len, args.chunk_size, progress)))
    if "window" in baselines:
        runs.append((f"window_0+{cache_size}", {"start_size": 0, "recent_size": cache_size}, window_nll))
    if "recompute" in baselines:
        runs.append((f"recompute_{cache_size}", {"window": cache_size, "max_tokens": recompute_len},
                     lambda: entry.recompute(ids[:recompute_len], cache_size, args.recompute_batch, progress) if entry is not None
                     else recompute_nll(model, ids[:recompute_len], cache_size, args.recompute_batch, progress)))

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
