"""Multi-turn streaming chat (``sinklm chat``): one cache for the whole conversation, like the paper's demo.

Turns come from a JSONL file (MT-Bench question lines ``{"turns": ["...", "..."]}``, or one turn per
line as ``{"content"|"prompt"|"text": "..."}`` or a JSON string) or from stdin, one turn per line.
Every turn is fed into the same generation session (:mod:`inference.session`): the conversation
becomes one unbounded stream, the cache keeps the sinks and the recent window and evicts the rest,
and the reply is printed token by token as it is generated.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import torch

from data.settings import ArgumentParser
from data.shards import DataError
from data.sources import iter_jsonl
from inference.backends import load_backend
from inference.generate import TextStreamer, add_sampling_args
from inference.session import GenerationSession, Sampler
from inference.stream import StreamError, add_cache_args, add_model_args, cache_sizes_from_args, fail

DEFAULT_TEMPLATE = "USER: {prompt}\n\nASSISTANT: "
TURN_FIELDS = ("content", "prompt", "text", "question")


def read_turns(path: str | Path) -> list[str]:
    """User turns from a JSONL file, in order (see the module docstring for accepted lines)."""
    path = Path(path)
    if not path.is_file():
        raise StreamError(f"turns file not found: {path}")
    turns: list[str] = []
    try:
        for where, record in iter_jsonl(path):
            turns.extend(_turns_of(record, where))
    except DataError as err:
        raise StreamError(str(err)) from None
    if not turns:
        raise StreamError(f"{path}: no turns found")
    return turns


def _turns_of(record, where: str) -> list[str]:
    if isinstance(record, str):
        return [record]
    if isinstance(record, dict):
        if isinstance(record.get("turns"), list) and all(isinstance(t, str) for t in record["turns"]):
            return list(record["turns"])
        for field in TURN_FIELDS:
            if isinstance(record.get(field), str):
                return [record[field]]
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise StreamError(f"{where}: expected a 'turns' list or one of {', '.join(TURN_FIELDS)} (fields: {keys})")
    raise StreamError(f"{where}: expected a JSON object or string, found {type(record).__name__}")


def stdin_turns(stream: TextIO) -> Iterator[str]:
    """Each non-empty line of ``stream`` is a turn (interactive: prompts on stderr)."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("USER: ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def chat(
    session: GenerationSession,
    tokenizer,
    turns: Iterable[str],
    sampler: Sampler,
    max_new_tokens: int,
    template: str = DEFAULT_TEMPLATE,
    out: TextIO | None = None,
    echo: bool = True,
    stop_at_eos: bool = True,
) -> list[str]:
    """Run the conversation through one session; print each reply as it comes; return the replies."""
    out = sys.stdout if out is None else out
    eos = tokenizer.eos_token_id if stop_at_eos else None
    replies: list[str] = []
    for index, turn in enumerate(turns):
        text = template.format(prompt=turn)
        if index:
            text = "\n\n" + text  # the previous reply ended without a separator
        if echo:
            print(text, end="", file=out, flush=True)
        prompt_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        streamer = TextStreamer(tokenizer)
        pieces: list[str] = []
        for token in session.generate(prompt_ids, max_new_tokens, sampler, eos):
            if eos is not None and int(token[0]) == eos:
                break
            piece = streamer.push(int(token[0]))
            pieces.append(piece)
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)
        replies.append("".join(pieces))
    return replies


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sinklm chat",
        description="Multi-turn chat with one StreamingLLM cache across all turns (turns from a JSONL file or stdin).",
    )
    add_model_args(parser)
    add_cache_args(parser)
    parser.add_argument("--turns", default=None, help="JSONL file of turns (MT-Bench format works); default: stdin lines")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="how a turn is written into the stream; {prompt} = the turn")
    add_sampling_args(parser, max_new_tokens=256)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        start, recent = cache_sizes_from_args(args)
        sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
        if "{prompt}" not in args.template:
            raise StreamError(f"--template must contain {{prompt}}, got {args.template!r}")
        if args.max_new_tokens < 1:
            raise StreamError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        turns = read_turns(args.turns) if args.turns else None
        backend = load_backend(args.checkpoint, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer, tag=args.tag,
                               device_map=args.device_map)
        tokenizer = backend.tokenizer
        session = backend.new_session(start, recent)
    except (StreamError, ValueError, FileNotFoundError, OSError) as err:
        return fail(prog, err)
    if turns is None:
        turns = stdin_turns(sys.stdin)
        echo = not sys.stdin.isatty()  # a person typing already sees their turn
    else:
        echo = True
    chat(session, tokenizer, turns, sampler, args.max_new_tokens, args.template, echo=echo, stop_at_eos=not args.ignore_eos)
    print(f"[stream length {session.tokens_seen}, cache {session.tokens_kept}/{start}+{recent}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
