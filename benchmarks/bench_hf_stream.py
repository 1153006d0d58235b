"""Hugging Face streaming perplexity: the exact chunked path vs the per-token HFSinkCache route.

Builds a stock transformers model with random weights (default: a 135M-parameter Llama shape, the
SmolLM-135M layout), streams ``--tokens`` tokens of the bundled stream-test book through a
``start + recent`` cache once per route, and reports both speeds, the ratio (one run), and
|delta ppl| / ppl (the requirement: <= 1e-4 in fp32).

    python benchmarks/bench_hf_stream.py                          # llama 135M, 4,096 tokens, 4+1020
    python benchmarks/bench_hf_stream.py --family mpt --tokens 2048
    python benchmarks/bench_hf_stream.py --device cuda --tokens 16384

``--decode`` instead times generation's per-token route on the same model: after one prompt that
fills the cache, ``--decode-tokens`` tokens one forward each through HFSinkCache (eager) and through
the fixed-shape :class:`inference.hf_decode_step.HFDecodeStep` (eager, compiled; on CUDA also a
replayed CUDA graph), all from the same state over the same ids (past the point where eviction
starts), with per-token wall and CPU (process) milliseconds, the ratios and the largest logit
difference to HFSinkCache:

    python benchmarks/bench_hf_stream.py --decode --threads 2       # llama 135M, 4+1020, CPU
    python benchmarks/bench_hf_stream.py --decode --device cuda --dtype bf16
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stream_ppl import stream_tokens, timed  # noqa: E402  (the same book excerpt and timer)

from data.settings import ArgumentParser  # noqa: E402

from inference.hf_cache import HFSinkCache, cache_kwarg, hf_streaming_nll, stream_prefill  # noqa: E402
from inference.hf_decode_step import HFDecodeStep, HFStaticCache  # noqa: E402
from inference.hf_chunked import hf_chunked_nll  # noqa: E402
from inference.perplexity import perplexity  # noqa: E402
from pretrain.checkpoints import DTYPES, parse_dtype  # noqa: E402

VOCAB = 49152  # SmolLM's vocabulary; the stream's ids are folded into it


def build(family: str, shape: str = "135m", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A model of the family with random weights, built directly on ``device`` in ``dtype``: ``135m``
    (SmolLM-135M's widths) or, for the llama family, ``llama2-7b`` (Llama-2-7B's: the paper's row)."""
    from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

    torch.manual_seed(0)
    if family == "llama" and shape == "llama2-7b":
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        make = LlamaForCausalLM
    elif family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, rope_theta=10000.0)
        make = LlamaForCausalLM
    elif family == "mpt":
        config, make = MptConfig(vocab_size=VOCAB, d_model=576, n_layers=24, n_heads=8, max_seq_len=8192), MptForCausalLM
    else:
        config = FalconConfig(vocab_size=VOCAB, hidden_size=576, num_hidden_layers=24, num_attention_heads=9,
                              num_kv_heads=3, new_decoder_architecture=True)
        make = FalconForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 7B model initialised in fp32 on the host would take minutes and 28 GB
    try:
        with torch.device(device):
            return make(config)
    finally:
        torch.set_default_dtype(default)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_routes(feeds: dict, ids: torch.Tensor, warmup: int, device: torch.device) -> dict:
    """Feed ids[:, i] one at a time to every route (``feed`` returns the logits). The first ``warmup`` ids
    route by route (compile / capture happen there); then the routes take turns on each id, so a busy
    machine's load falls on all of them alike. Median wall and CPU (process) ms per token, and the logits."""
    rows = {name: {"walls": [], "cpus": [], "logits": []} for name in feeds}
    for name, feed in feeds.items():
        began = time.perf_counter()
        for i in range(warmup):
            rows[name]["logits"].append(feed(ids[:, i]).float().clone())
        _sync(device)
        rows[name]["warmup_s"] = round(time.perf_counter() - began, 2)
    for i in range(warmup, ids.shape[1]):
        for name, feed in feeds.items():
            wall, cpu = time.perf_counter(), time.process_time()
            rows[name]["logits"].append(feed(ids[:, i]).float().clone())
            _sync(device)
            rows[name]["walls"].append(time.perf_counter() - wall)
            rows[name]["cpus"].append(time.process_time() - cpu)
    for row in rows.values():
        row["ms_per_token"] = round(1e3 * statistics.median(row.pop("walls")), 3)
        row["cpu_ms_per_token"] = round(1e3 * statistics.median(row.pop("cpus")), 3)
        row["logits"] = torch.stack(row["logits"], 1)
    return rows


def decode_routes(model, ids: torch.Tensor, s: int, r: int, tokens: int, warmup: int, device: torch.device,
                  baselines: bool = False) -> dict:
    """Per-token decode through HFSinkCache and through the static step (eager, compile, graph on CUDA),
    each from the same full, evicting cache over the same ``warmup + tokens`` ids."""
    prompt, rest = ids[None, : s + r + 1].to(device), ids[None, s + r + 1 :][:, : warmup + tokens].to(device)
    prefilled = HFSinkCache(model, s, r)
    stream_prefill(model, prompt, prefilled)  # one forward: the cache is full, the next token evicts
    key, cache = cache_kwarg(model), copy.deepcopy(prefilled)
    feeds = {"hf_sink_cache": lambda t: model(input_ids=t[:, None], **{key: cache}).logits[:, -1]}
    for mode in ("eager", "compile") + (("graph",) if device.type == "cuda" else ()):
        feeds[f"static_{mode}"] = HFDecodeStep(model, HFStaticCache.from_hf_sink_cache(model, prefilled), mode)
    if baselines:
        # the alternatives (not the same protocol, so no logit comparison): a sliding window of s + r tokens
        # re-run for every token, and a dense cache (DynamicCache) that keeps everything, as long as ours
        window = prompt[:, -(s + r):].clone()

        def recompute(t):
            window.copy_(torch.cat([window[:, 1:], t[:, None]], dim=1))
            return model(input_ids=window, use_cache=False, logits_to_keep=1).logits[:, -1]

        dense = model(input_ids=prompt, use_cache=True).past_key_values
        feeds["recompute"] = recompute
        feeds["dense"] = lambda t: model(input_ids=t[:, None], past_key_values=dense, use_cache=True).logits[:, -1]
    rows = time_routes(feeds, rest, warmup, device)
    want = rows["hf_sink_cache"]["logits"]
    base, base_cpu = rows["hf_sink_cache"]["ms_per_token"], rows["hf_sink_cache"]["cpu_ms_per_token"]
    for name, row in rows.items():
        logits = row.pop("logits")
        row["max_abs_delta_logits"] = None if name in ("recompute", "dense") else (logits - want).abs().max().item()
        row["speedup_vs_hf_sink_cache"] = round(base / row["ms_per_token"], 2)
        row["cpu_speedup_vs_hf_sink_cache"] = round(base_cpu / max(row["cpu_ms_per_token"], 1e-9), 2)
    if baselines:
        fastest = min((n for n in rows if n.startswith("static_") or n == "hf_sink_cache"), key=lambda n: rows[n]["ms_per_token"])
        rows["ratios"] = {"fastest_streaming_route": fastest,
                          "recompute_over_streaming": round(rows["recompute"]["ms_per_token"] / rows[fastest]["ms_per_token"], 2),
                          "streaming_over_dense": round(rows[fastest]["ms_per_token"] / rows["dense"]["ms_per_token"], 3)}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])  # one-line errors
    parser.add_argument("--family", choices=("llama", "mpt", "falcon"), default="llama")
    parser.add_argument("--shape", choices=("135m", "llama2-7b"), default="135m",
                        help="model widths (llama2-7b: the paper's Llama-2-7B row, llama family only; bf16 on a GPU)")
    parser.add_argument("--baselines", action="store_true",
                        help="with --decode: also time recompute (sliding window re-run per token) and a dense cache")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=1020)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--decode", action="store_true", help="time per-token decode routes instead (see above)")
    parser.add_argument("--decode-tokens", type=int, default=48, help="timed tokens per decode route")
    parser.add_argument("--warmup", type=int, default=4, help="untimed tokens per decode route (compile / capture)")
    args = parser.parse_args(argv)
    if args.decode and (args.decode_tokens < 1 or args.warmup < 1):
        parser.error(f"--decode-tokens and --warmup must be >= 1, got {args.decode_tokens}, {args.warmup}")
    needed = args.start_size + args.recent_size + 1 + args.warmup + args.decode_tokens
    if args.decode and args.tokens < needed:
        parser.error(f"--decode needs --tokens >= {needed} (a prompt that fills the cache, then the decoded ids), got {args.tokens}")
    if args.shape != "135m" and args.family != "llama":
        parser.error(f"--shape {args.shape} is a llama shape; got --family {args.family}")
    if args.decode and args.family != "llama":
        parser.error(f"--decode times the static step, which streams the llama family; got --family {args.family}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args.family, args.shape, device, parse_dtype(args.dtype)).eval()
    ids = stream_tokens(args.tokens) % model.config.vocab_size  # GPT-NeoX ids folded into the model's vocabulary
    s, r = args.start_size, args.recent_size
    if args.decode:
        result = {
            "family": args.family, "shape": args.shape, "parameters": sum(p.numel() for p in model.parameters()),
            "cache": f"{s}+{r}",
            "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
            "load_average_before": os.getloadavg()[0], "timed_tokens": args.decode_tokens, "warmup_tokens": args.warmup,
            "routes": decode_routes(model, ids, s, r, args.decode_tokens, args.warmup, device, args.baselines),
            "load_average_after": os.getloadavg()[0],
        }
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    chunked, t_chunked = timed(lambda: hf_chunked_nll(model, ids, s, r, args.chunk_size), device)
    per_token, t_per_token = timed(lambda: hf_streaming_nll(model, ids, s, r, progress=False), device)
    ppl_c, ppl_p = perplexity(chunked), perplexity(per_token)
    n = ids.numel() - 1
    result = {
        "family": args.family, "parameters": sum(p.numel() for p in model.parameters()), "tokens": ids.numel(),
        "cache": f"{s}+{r}", "chunk_size": args.chunk_size, "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "per_token_s": round(t_per_token, 2), "chunked_s": round(t_chunked, 2),
        "per_token_tok_s": round(n / t_per_token, 1), "chunked_tok_s": round(n / t_chunked, 1),
        "ratio": round(t_per_token / t_chunked, 2),
        "ppl_per_token": ppl_p, "ppl_chunked": ppl_c, "rel_delta_ppl": abs(ppl_c - ppl_p) / ppl_p,
        "max_abs_delta_nll": (chunked - per_token).abs().max().item(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
