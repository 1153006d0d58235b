"""Per-token decode latency: StreamingLLM cache vs sliding window with re-computation vs a dense cache.

For each cache size W (default 256, 512, 1024, 2048) the same model decodes one token at a time:

- ``step``:      the same cache as a fixed-shape decode step (:class:`inference.decode_step.DecodeStep`:
                 device-side bookkeeping; ``--decode graph`` replays one CUDA graph per token, the
                 default on CUDA; ``compile`` = torch.compile; ``eager`` elsewhere); what sessions run;
- ``stream``:    SinkCache(4, W - 4), already full and wrapping, fed token by token (the general path);
- ``recompute``: the paper's oracle baseline: a fresh forward over the last W tokens for every token;
- ``dense``:     an unbounded cache holding W tokens (the cost of attending to W tokens, no eviction).

Every step includes the vocabulary head for the new token. Methods run interleaved round by round so
a busy machine slows each alike; the median per-token time is reported. Then a flat-latency run
streams ``--flat-tokens`` tokens through a tiny model and compares the median per-token time of the
first 10% after the cache fills with the last 10%. Ratios print last, and as JSON with ``--json``.

    python benchmarks/bench_stream_decode.py                         # CPU, pythia-14m shape
    python benchmarks/bench_stream_decode.py --device cuda --shape pythia-160m --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.cache import SinkCache  # noqa: E402
from inference.decode_step import MODES, DecodeStep, StaticSinkCache  # noqa: E402
from pretrain.checkpoints import DTYPES  # noqa: E402
from pretrain.config import ModelConfig  # noqa: E402
from pretrain.model import GPTNeoX  # noqa: E402



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bytes(model, window: int) -> int:
    """What one decode step must read at least: every weight but the embedding table (one row of it),
    and the cached keys and values of ``window`` tokens in every layer."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))
    c, param = model.config, next(model.parameters())
    return weights + 2 * c.num_layers * window * c.hidden_size * param.element_size()


# the floor's rate is measured over a buffer larger than any last-level cache: a step sweeps every
# weight once per token, and on these shapes that sweep does not stay cached (pythia-14m: 37 MB
# per step beside 32 MB of L3 on the 2-core EPYC, so the head's 26 MB evicts the layers' weights)
STREAM_BYTES = 256 << 20
INTERLEAVED_ROUNDS, INTERLEAVED_TOKENS = 30, 100  # the flat run's drift-free check (see flat_latency)


@torch.no_grad()
def read_bandwidth(device: torch.device, nbytes: int = STREAM_BYTES, repeats: int = 20) -> float:
    """Bytes per second one reduction over a buffer of ``nbytes`` reads (memory's rate, not a cache's)."""
    buffer = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats + 3):
        sync(device)
        began = time.perf_counter()
        buffer.sum()
        sync(device)
        times.append(time.perf_counter() - began)
    return buffer.numel() * 4 / statistics.median(times[3:])


@torch.no_grad()
def time_stream(model, cache, ids, steps) -> float:
    """Seconds per token decoding ``steps`` tokens through ``cache``."""
    device = ids.device
    sync(device)
    began = time.perf_counter()
    for t in range(steps):
        model(ids[:, t : t + 1], cache=cache)
    sync(device)
    return (time.perf_counter() - began) / steps


@torch.no_grad()
def time_step(step: DecodeStep, ids, steps, clock=time.perf_counter) -> float:
    """Seconds per token through the fixed-shape decode step (by ``clock``: wall or thread CPU time)."""
    device = ids.device
    sync(device)
    began = clock()
    for t in range(steps):
        step(ids[:, t])
    sync(device)
    return (clock() - began) / steps


@torch.no_grad()
def time_recompute(model, ids, window, steps) -> float:
    """Seconds per token when every token re-runs the model over its last ``window`` tokens."""
    device = ids.device
    sync(device)
    began = time.perf_counter()
    for t in range(steps):
        hidden = model.hidden_states(ids[:, t : t + window])
        model.lm_head(hidden[:, -1])
    sync(device)
    return (time.perf_counter() - began) / steps


@torch.no_grad()
def decode_comparison(model, sizes, steps, rounds, device, start_size, mode="eager", batch=1) -> list[dict]:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    rate = read_bandwidth(device)  # memory's rate does not depend on the cache size: measured once
    for window in sizes:
        total = 2 * window + 2 * steps * rounds + 16
        ids = torch.randint(0, vocab, (batch, total), generator=gen).to(device)
        stream = SinkCache(start_size, window - start_size)
        model.hidden_states(ids[:, : window + 8], cache=stream)  # full and already evicting
        step = DecodeStep(model, StaticSinkCache.from_sink_cache(model, stream), mode)
        dense = SinkCache(0, None)
        model.hidden_states(ids[:, :window], cache=dense)
        times: dict[str, list[float]] = {"step": [], "stream": [], "recompute": [], "dense": []}
        offset = window + 8
        time_step(step, ids[:, offset:], 3)  # warm-up (allocator, kernels, capture or compile)
        time_stream(model, stream, ids[:, offset:], 3)
        offset += 3
        for _ in range(rounds):
            times["step"].append(time_step(step, ids[:, offset:], steps))
            times["stream"].append(time_stream(model, stream, ids[:, offset:], steps))
            times["recompute"].append(time_recompute(model, ids[:, offset - window + 1 :], window, steps))
            times["dense"].append(time_stream(model, dense, ids[:, offset:], steps))
            offset += steps
        row = {"cache": window, **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()}}
        row["recompute_over_step"] = row["recompute_ms"] / row["step_ms"]
        row["recompute_over_stream"] = row["recompute_ms"] / row["stream_ms"]
        row["stream_over_step"] = row["stream_ms"] / row["step_ms"]
        row["dense_over_stream"] = row["dense_ms"] / row["stream_ms"]
        nbytes = step_bytes(model, window)
        row["floor_ms"] = 1000 * nbytes / rate  # bandwidth-bound: no step can be faster
        row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
        row["recompute_over_floor"] = row["recompute_ms"] / row["floor_ms"]  # the largest ratio possible
        rows.append(row)
        print(
            f"cache {window:5d}: step ({mode}) {row['step_ms']:8.3f} ms/tok  stream {row['stream_ms']:8.3f}  "
            f"recompute {row['recompute_ms']:8.3f}  dense {row['dense_ms']:8.3f}",
            flush=True,
        )
    return rows


@torch.no_grad()
def flat_latency(model, tokens, start_size, recent_size, device, mode="eager", clock: str = "wall") -> dict:
    """Per-token times of the decode step over a long stream: first 10% after the cache fills vs the last 10%,
    and the stream's step at its end alternated with a fresh one (see below).

    ``clock="cpu"`` times each token by the calling thread's CPU time (``time.thread_time``; with one
    torch thread all the work runs there), which does not count time spent descheduled, so a run on a
    shared machine still shows whether the step itself grows slower as the stream goes on."""
    now = time.thread_time if clock == "cpu" else time.perf_counter
    cache = StaticSinkCache(model, 1, start_size, recent_size)
    step = DecodeStep(model, cache, mode)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    per_token = []
    for t in range(tokens):
        sync(device)
        began = now()
        step(ids[:, t])
        sync(device)
        per_token.append(now() - began)
    filled = start_size + recent_size + 1
    steady = per_token[filled:]
    tenth = max(1, len(steady) // 10)
    first, last = statistics.median(steady[:tenth]), statistics.median(steady[-tenth:])
    # the first and last tenths run minutes apart, and a shared machine drifts in between (the same
    # code gave 0.38 by wall clock and 1.29 by CPU time on one day): so also the stream's step, now
    # far in, alternated round by round with a fresh one just past the fill point, on the same ids
    early = DecodeStep(model, StaticSinkCache(model, 1, start_size, recent_size), mode)
    for t in range(filled):
        early(ids[:, t])
    positions = [int(early.cache.position), int(step.cache.position)]  # where the two start
    rounds: dict[str, list[float]] = {"early": [], "late": []}
    for r in range(INTERLEAVED_ROUNDS):
        round_ids = ids[:, (torch.arange(INTERLEAVED_TOKENS, device=device) + r * INTERLEAVED_TOKENS) % tokens]
        for name, timed in (("early", early), ("late", step)):
            rounds[name].append(time_step(timed, round_ids, INTERLEAVED_TOKENS, now))
    return {
        "tokens": tokens,
        "clock": clock,
        "cache": f"{start_size}+{recent_size}",
        "first10_ms": 1000 * first,
        "last10_ms": 1000 * last,
        "last_over_first": last / first,
        "interleaved_positions": positions,
        "interleaved_late_over_early": statistics.median(rounds["late"]) / statistics.median(rounds["early"]),
        "cache_bytes": sum(b.numel() * b.element_size() for b in cache.buffers()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="pythia-14m", help="model preset for the decode comparison")
    parser.add_argument("--sizes", default="256,512,1024,2048", help="cache sizes W")
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32, help="tokens timed per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flat-shape", default="tiny")
    parser.add_argument("--flat-tokens", type=int, default=100_000, help="0 skips the flat-latency run")
    parser.add_argument("--flat-cache", type=int, default=256)
    parser.add_argument("--flat-clock", choices=("wall", "cpu"), default="wall",
                        help="time each flat-run token by wall clock or by this thread's CPU time (use with --threads 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--decode", choices=MODES, default=None, help="the step's mode (default: graph on CUDA, eager on CPU)")
    parser.add_argument("--batch", type=int, default=1, help="streams decoded in lockstep")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mode = args.decode or ("graph" if device.type == "cuda" else "eager")
    dtype = DTYPES[args.dtype]
    sizes = [int(s) for s in args.sizes.split(",")]

    torch.manual_seed(0)
    model = GPTNeoX(ModelConfig.from_preset(args.shape, max_seq_len=max(max(sizes), 2048))).to(device, dtype).eval()
    print(f"decode latency, {args.shape} ({model.num_params() / 1e6:.1f}M params), {device} {args.dtype}, "
          f"median of {args.rounds} rounds x {args.steps} tokens, batch {args.batch}, step mode {mode}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    rows = decode_comparison(model, sizes, args.steps, args.rounds, device, args.start_size, mode, args.batch)

    flat = None
    if args.flat_tokens:
        small = GPTNeoX(ModelConfig.from_preset(args.flat_shape)).to(device, dtype).eval()
        print(f"flat latency: {args.flat_tokens:,} tokens through {args.flat_shape}, cache "
              f"{args.start_size}+{args.flat_cache - args.start_size} ...", flush=True)
        flat = flat_latency(small, args.flat_tokens, args.start_size, args.flat_cache - args.start_size, device, mode,
                            args.flat_clock)

    print("\nratios (per-token latency; > 1 means the streaming cache is faster)")
    for row in rows:
        print(f"  cache {row['cache']:5d}: recompute / step = {row['recompute_over_step']:6.1f}x   recompute / stream = "
              f"{row['recompute_over_stream']:6.1f}x   stream / step = {row['stream_over_step']:5.2f}x   "
              f"dense / stream = {row['dense_over_stream']:5.2f}x   step / bandwidth floor ({row['floor_ms']:.3f} ms) = "
              f"{row['step_over_floor']:5.2f}x (recompute / floor = {row['recompute_over_floor']:.1f}x)")
    if flat is not None:
        print(f"  flat: last 10% / first 10% per-token time = {flat['last_over_first']:.3f} "
              f"({flat['first10_ms']:.3f} -> {flat['last10_ms']:.3f} ms {flat['clock']} over {flat['tokens']:,} tokens; "
              f"cache {flat['cache_bytes']:,} bytes); alternated, position {flat['interleaved_positions'][1]:,} / "
              f"{flat['interleaved_positions'][0]:,} = {flat['interleaved_late_over_early']:.3f}")
    result = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
              "batch": args.batch, "step_mode": mode, "decode": rows, "flat": flat}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
