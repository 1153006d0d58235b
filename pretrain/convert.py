"""``sinklm convert``: DeepSpeed run folders, Hugging Face folders and initial checkpoints, both ways.

A thin CLI over :func:`pretrain.checkpoints.convert`; its flags are the fields of
:class:`pretrain.checkpoints.ExportSettings`. ``--to hf`` writes a shareable Hugging Face folder
(vanilla and sink-token models as stock ``gpt_neox``; softmax1/sink_logit with bundled modelling code,
``trust_remote_code=True``); ``--to init`` writes an initial checkpoint for ``train.init_from``,
optionally adding sink tokens (``--add-sink-tokens``) or switching the attention kind
(``--attention``) -- continued pretraining of e.g. Pythia with a sink token.
"""

from __future__ import annotations

import argparse
import sys

from data.settings import ArgumentParser, add_settings_args, settings_from_args
from data.shards import DataError
from pretrain.checkpoints import CheckpointError, ExportSettings, convert
from pretrain.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="sinklm convert",
        description="Convert checkpoints: a DeepSpeed run folder, a Hugging Face GPT-NeoX folder or an "
        "initial checkpoint -> a Hugging Face folder (--to hf) or an initial checkpoint for train.init_from "
        "(--to init).",
    )
    parser.add_argument("source", help="DeepSpeed run folder, Hugging Face folder (or hub name) or initial checkpoint")
    parser.add_argument(
        "output", help="output folder: absent or empty, or with --overwrite an earlier export (never anything else)"
    )
    add_settings_args(parser, ExportSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args.source, args.output, settings_from_args(ExportSettings, args))
    except (CheckpointError, ConfigError, DataError) as err:  # DataError: tokenizer problems
        print(f"sinklm convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
