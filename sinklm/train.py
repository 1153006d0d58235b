"""``sinklm train``: pretraining (:mod:`pretrain.train`) with the streaming-perplexity probe plugged in.

Training cannot import the evaluation code (pretrain sits below inference), so the entry point that
sits above both hands the trainer its probe function. The launch scripts start this entry point
(``torchrun --no-python sinklm train``), never ``python -m pretrain.train``: under ``-m`` the working
directory comes first on ``sys.path``, and a user's own ``data.py`` there would shadow our package.
"""

from __future__ import annotations

from inference.probe import streaming_probe
from pretrain.train import main as train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, probe=streaming_probe)


if __name__ == "__main__":
    raise SystemExit(main())
