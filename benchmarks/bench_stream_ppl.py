"""Streaming perplexity: fast (chunked, exact) mode vs the token-by-token reference protocol.

Streams ``--tokens`` tokens of the bundled stream-test book (Moby Dick) through a model of the
given shape (random weights unless ``--checkpoint``) with a ``start + recent`` cache, once in each
mode, and reports both times, the speed-up, and |delta ppl| / ppl (the requirement: <= 1e-4 in fp32).

    python benchmarks/bench_stream_ppl.py                       # pythia-14m shape, 20k tokens, 4+1020
    python benchmarks/bench_stream_ppl.py --device cuda --tokens 100000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.perplexity import perplexity, streaming_nll  # noqa: E402
from pretrain.checkpoints import DTYPES, load_model  # noqa: E402
from pretrain.config import ModelConfig  # noqa: E402
from pretrain.model import GPTNeoX  # noqa: E402


def stream_tokens(n: int) -> torch.Tensor:
    from data.corpora import stream_test_text
    from data.tokenizer import load_tokenizer

    text = stream_test_text()
    ids = load_tokenizer()(text[: 6 * n], add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"the stream-test book gave only {len(ids)} tokens, {n} asked")
    return torch.tensor(ids[:n], dtype=torch.long)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="pythia-14m")
    parser.add_argument("--checkpoint", default=None, help="a real checkpoint instead of random weights")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=1020)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.checkpoint:
        model = load_model(args.checkpoint, dtype=DTYPES[args.dtype]).model
        name = args.checkpoint
    else:
        torch.manual_seed(0)
        model = GPTNeoX(ModelConfig.from_preset(args.shape)).to(DTYPES[args.dtype])
        name = f"{args.shape} (random weights)"
    model = model.to(device).eval()
    ids = stream_tokens(args.tokens)
    s, r = args.start_size, args.recent_size
    print(f"{name}, {args.tokens:,} tokens of Moby Dick, cache {s}+{r}, {device} {args.dtype}", flush=True)

    streaming_nll(model, ids[:2 * args.chunk_size], s, r, "fast", args.chunk_size, progress=False)  # warm-up
    fast, fast_s = timed(lambda: streaming_nll(model, ids, s, r, "fast", args.chunk_size, progress=False), device)
    print(f"fast:      {fast_s:8.2f} s  ({args.tokens / fast_s:9.0f} tok/s)  ppl {perplexity(fast):.4f}", flush=True)
    reference, ref_s = timed(lambda: streaming_nll(model, ids, s, r, "reference", progress=True), device)
    print(f"reference: {ref_s:8.2f} s  ({args.tokens / ref_s:9.0f} tok/s)  ppl {perplexity(reference):.4f}", flush=True)

    ppl_fast, ppl_ref = perplexity(fast), perplexity(reference)
    result = {
        "model": name,
        "device": str(device),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "cache": f"{s}+{r}",
        "chunk_size": args.chunk_size,
        "fast_s": fast_s,
        "reference_s": ref_s,
        "speedup": ref_s / fast_s,
        "ppl_fast": ppl_fast,
        "ppl_reference": ppl_ref,
        "rel_delta_ppl": abs(ppl_fast - ppl_ref) / ppl_ref,
        "max_abs_delta_nll": (fast - reference).abs().max().item(),
    }
    print(f"\nspeed-up fast / reference = {result['speedup']:.1f}x   |delta ppl|/ppl = {result['rel_delta_ppl']:.2e}   "
          f"max |delta nll| = {result['max_abs_delta_nll']:.2e}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
