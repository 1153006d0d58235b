"""Hugging Face streaming perplexity: the exact chunked path vs the per-token HFSinkCache route.

Builds a stock transformers model with random weights (default: a 135M-parameter Llama shape, the
SmolLM-135M layout), streams ``--tokens`` tokens of the bundled stream-test book through a
``start + recent`` cache once per route, and reports both speeds, the ratio (one run), and
|delta ppl| / ppl (the requirement: <= 1e-4 in fp32).

    python benchmarks/bench_hf_stream.py                          # llama 135M, 4,096 tokens, 4+1020
    python benchmarks/bench_hf_stream.py --family mpt --tokens 2048
    python benchmarks/bench_hf_stream.py --device cuda --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stream_ppl import stream_tokens, timed  # noqa: E402  (the same book excerpt and timer)

from inference.hf_cache import hf_streaming_nll  # noqa: E402
from inference.hf_chunked import hf_chunked_nll  # noqa: E402
from inference.perplexity import perplexity  # noqa: E402
from pretrain.checkpoints import DTYPES, parse_dtype  # noqa: E402

VOCAB = 49152  # SmolLM's vocabulary; the stream's ids are folded into it


def build(family: str):
    """A ~135M-parameter model of the family with random weights (SmolLM-135M's widths)."""
    from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, rope_theta=10000.0)
        return LlamaForCausalLM(config)
    if family == "mpt":
        return MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=576, n_layers=24, n_heads=8, max_seq_len=8192))
    return FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=576, num_hidden_layers=24, num_attention_heads=9,
                                          num_kv_heads=3, new_decoder_architecture=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("llama", "mpt", "falcon"), default="llama")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--start-size", type=int, default=4)
    parser.add_argument("--recent-size", type=int, default=1020)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args.family).to(device=device, dtype=parse_dtype(args.dtype)).eval()
    ids = stream_tokens(args.tokens) % VOCAB  # GPT-NeoX ids folded into the model's vocabulary
    s, r = args.start_size, args.recent_size
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
