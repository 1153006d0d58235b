"""The one console command: ``sinklm <subcommand> ...`` dispatches to each tool's ``main(argv)``.

Each tool is a module with ``main(argv=None) -> int``; it is imported only when its subcommand
runs, so ``sinklm --help`` stays fast and a missing optional dependency only affects its tool.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line description). Two-word commands ("data prepare") are keyed
# by their joined words.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data prepare": ("data.prepare", "tokenize a corpus into memory-mapped token shards"),
    "data verify": ("data.verify", "check prepared shards against their manifest's sha256 and vocabulary"),
    "train": ("sinklm.train", "pretrain a model with DeepSpeed (any attention variant, sink tokens)"),
    "convert": ("pretrain.convert", "convert DeepSpeed checkpoints <-> Hugging Face folders"),
    "stream-ppl": ("inference.stream_ppl", "streaming perplexity under a sink + window cache"),
    "generate": ("inference.generate", "generate text with the streaming cache"),
    "chat": ("inference.chat", "multi-turn chat with one streaming cache across turns"),
    "compare": ("inference.compare", "compare trained variants under streaming (the paper's Table 3)"),
    "zeroshot": ("inference.zeroshot", "zero-shot accuracy through lm-evaluation-harness (Table 4)"),
    "experiment": ("sinklm.experiment", "run the whole experiment end to end and write a report"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: sinklm <command> [options]   (sinklm <command> --help for each)", "", "commands:"]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from sinklm import __version__

        print(f"sinklm {__version__}")
        return 0
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in SUBCOMMANDS:
            module_name = SUBCOMMANDS[name][0]
            module = importlib.import_module(module_name)
            result = module.main(argv[words:])
            return int(result or 0)
    print(f"sinklm: error: unknown command {argv[0]!r}; expected one of: {', '.join(SUBCOMMANDS)} (see sinklm --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
