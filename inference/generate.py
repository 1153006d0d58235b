"""Streaming generation (``sinklm generate``): unbounded text from a bounded sink + window cache.

:class:`StreamingSession` owns one :class:`~inference.cache.SinkCache` for a whole stream: prompts
are fed in chunks (exactly as if token by token), new tokens are sampled one at a time, and the
cache evicts the middle as the stream grows, so memory and per-token time stay flat however long it
runs. ``sinklm chat`` keeps one session across turns.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from inference.cache import SinkCache
from inference.stream import (
    StreamError,
    add_cache_args,
    add_model_args,
    cache_sizes_from_args,
    check_start_size,
    fail,
    final_hidden,
    load_streaming_model,
    stream_prefix,
)


@dataclass
class Sampler:
    """Next-token choice: greedy when ``temperature == 0``, else temperature / top-k / top-p sampling."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise StreamError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise StreamError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise StreamError(f"top_p must be in (0, 1], got {self.top_p}")
        self._generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> token ids (B,)."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # drop a token once the tokens before it already cover top_p (the first always stays)
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= self.top_p
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device)
            self._generator.manual_seed(0 if self.seed is None else self.seed)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator)[:, 0]


class StreamingSession:
    """One stream through a model with a sink + window cache: feed prompts, generate replies.

    A sink-token model's k sink ids go in first (they take the start slots). Only text ids
    (below ``config.vocab_size``) are ever generated: sink ids and vocabulary padding are masked.
    """

    def __init__(self, model: torch.nn.Module, start_size: int, recent_size: int | None, batch_size: int = 1, chunk_size: int = 512):
        check_start_size(model.config, start_size)
        self.model = model
        self.cache = SinkCache(start_size, recent_size)
        self.chunk_size = chunk_size
        self.device = next(model.parameters()).device
        prefix = torch.tensor(stream_prefix(model.config), dtype=torch.long, device=self.device)
        # ids waiting to be fed: the sinks at first, later the last generated token
        self.pending = prefix.expand(batch_size, -1).clone()
        self.vocab_limit = model.config.vocab_size

    @property
    def tokens_seen(self) -> int:
        return self.cache.seen

    @torch.no_grad()
    def _feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ids (B, T >= 1); return the next-token logits (B, V) with non-text ids masked."""
        hidden = None
        for start in range(0, ids.shape[1], self.chunk_size):
            hidden = final_hidden(self.model, ids[:, start : start + self.chunk_size], self.cache)
        logits = self.model.lm_head(hidden[:, -1]).float()
        logits[:, self.vocab_limit :] = float("-inf")
        return logits

    @torch.no_grad()
    def generate(
        self, prompt_ids: torch.Tensor, max_new_tokens: int, sampler: Sampler, eos_id: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Feed ``prompt_ids`` (B, T) (may be empty when something is pending), then yield up to
        ``max_new_tokens`` new ids (B,) one at a time; stops early once every row has produced ``eos_id``."""
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        ids = torch.cat([self.pending, prompt_ids.to(self.device).long()], dim=1)
        if ids.shape[1] == 0:
            raise StreamError("nothing to condition on: empty prompt at the start of the stream")
        if max_new_tokens < 1:
            self.pending = ids  # fed with the next call
            return
        logits = self._feed(ids)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = sampler(logits)
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                finished |= token == eos_id
            self.pending = token[:, None]  # the newest token is fed on the next step (or next turn)
            yield token
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits = self._feed(self.pending)
            self.pending = self.pending[:, :0]


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
    parser = argparse.ArgumentParser(
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
        model, config, tokenizer = load_streaming_model(args)
        prompt_ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if prompt_ids.numel() == 0 and not config.sink_tokens:
            prompt_ids = torch.tensor([tokenizer.eos_token_id], dtype=torch.long)  # start a document
        session = StreamingSession(model, start, recent)
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
        f"{session.tokens_seen}, cache {len(session.cache)}/{start}+{recent}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
