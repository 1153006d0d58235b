"""Streaming generation (``sinklm generate``): unbounded text from a bounded sink + window cache.

The checkpoint's back-end (:func:`inference.backends.load_backend`) opens one generation session
(:mod:`inference.session`) for the whole stream: the prompt is fed exactly as if token by token,
new tokens are sampled one at a time, and the cache evicts the middle as the stream grows, so
memory and per-token time stay flat however long it runs. ``sinklm chat`` keeps one session across
turns. :class:`TextStreamer` turns the ids into text as they come.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from data.settings import ArgumentParser
from inference.backends import load_backend
from inference.session import Sampler
from inference.stream import StreamError, add_cache_args, add_model_args, cache_sizes_from_args, fail


class TextStreamer:
    """Turns ids into text as they come, holding back incomplete UTF-8 / merge-dependent pieces."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already printed, kept as decoding context
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            if self.prefix > 64:  # bounded memory for unbounded streams
                del self.ids[: self.prefix]
                self.read -= self.prefix
                self.prefix = 0
            return now[len(before) :]
        return ""


# -- CLI --------------------------------------------------------------------------------------------


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sinklm generate",
        description="Generate text from a checkpoint with the StreamingLLM cache, for any number of tokens.",
    )
    add_model_args(parser)
    add_cache_args(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help="prompt text")
    source.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    add_sampling_args(parser, max_new_tokens=256)
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        start, recent = cache_sizes_from_args(args)
        sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
        if args.max_new_tokens < 1:
            raise StreamError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.prompt_file is not None:
            try:
                with open(args.prompt_file, encoding="utf-8") as f:
                    prompt = f.read()
            except FileNotFoundError:
                raise StreamError(f"prompt file not found: {args.prompt_file}") from None
        else:
            prompt = args.prompt if args.prompt is not None else ""
        backend = load_backend(args.checkpoint, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer, tag=args.tag,
                               device_map=args.device_map)
        tokenizer = backend.tokenizer
        prompt_ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if prompt_ids.numel() == 0 and not backend.sink_ids:
            prompt_ids = torch.tensor([tokenizer.eos_token_id], dtype=torch.long)  # start a document
        session = backend.new_session(start, recent)
    except (StreamError, ValueError, FileNotFoundError, OSError) as err:
        return fail(prog, err)

    if args.echo:
        print(prompt, end="", flush=True)
    streamer = TextStreamer(tokenizer)
    eos = None if args.ignore_eos else tokenizer.eos_token_id
    began = time.perf_counter()
    produced = 0
    for token in session.generate(prompt_ids, args.max_new_tokens, sampler, eos):
        produced += 1
        if eos is not None and int(token[0]) == eos:
            break
        print(streamer.push(int(token[0])), end="", flush=True)
    seconds = time.perf_counter() - began
    print()
    print(
        f"[{produced} tokens in {seconds:.2f}s ({produced / max(seconds, 1e-9):.1f} tok/s); stream length "
        f"{session.tokens_seen}, cache {session.tokens_kept}/{start}+{recent}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
