"""What the training probe costs: probe seconds against training-step seconds, in one real run.

Trains the CPU quickstart shape (``configs/experiments/quickstart-<variant>.yaml``: tiny GPT-NeoX,
8 samples of 256 tokens per step, ZeRO-0 fp32) through the real trainer (``sinklm train``'s
``pretrain.train.main`` with ``inference.probe.streaming_probe``) for ``--steps`` steps with a probe
every ``--every`` steps, then reads the run's ``metrics.jsonl``: the mean step time (first step
excluded: warm-up) and the mean probe time give the overhead at any interval,

    overhead(N) = probe seconds / (N * step seconds),

reported for ``probe.every: null`` (``DEFAULT_PROBE_EVERY``) with the smallest interval that stays
under 2%. The text is an excerpt of the bundled books (prepared into a temporary folder).

    python benchmarks/bench_probe.py                     # sink1 variant, 2 threads
    python benchmarks/bench_probe.py --variant softmax1 --threads 1
    python benchmarks/bench_probe.py --config configs/experiments/paper-160m-sink1.yaml --data DIR   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prepared_excerpt(out: Path) -> Path:
    """Real text, small: 8 training books' first 100k characters and 120k of a validation book."""
    from data.corpora import SPLITS, read_book
    from data.prepare import prepare

    train = [read_book(name)[:100_000] for name in SPLITS["train"][:8]]
    validation = [read_book(SPLITS["validation"][0])[:120_000]]
    prepare(out, {"train": train, "validation": validation}, workers=1, progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sink1", help="quickstart variant (vanilla, softmax1, sink-logit, sink1, sink2)")
    parser.add_argument("--config", default=None, help="another training config instead of the quickstart variant")
    parser.add_argument("--data", default=None, help="a prepared data folder (default: a bundled-books excerpt)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="probe interval during the measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (stated in the result)")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="more --section.key=value training overrides")
    args = parser.parse_args(argv)

    import torch

    from inference.probe import streaming_probe
    from pretrain.metrics import read_metrics
    from pretrain.train import main as train_main
    from pretrain.train_config import DEFAULT_PROBE_EVERY

    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    config = args.config or str(REPO / "configs" / "experiments" / f"quickstart-{args.variant}.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else prepared_excerpt(Path(tmp) / "data")
        run = Path(tmp) / "run"
        rc = train_main([config, f"--data.path={data}", f"--train.run_dir={run}", f"--train.max_steps={args.steps}",
                         f"--probe.every={args.every}", "--train.eval_every=0", "--checkpoint.every=0",
                         "--checkpoint.save_at_end=false", "--logging.progress_bar=false", "--logging.plot=false",
                         f"--logging.log_every={args.steps}", *args.overrides], probe=streaming_probe)
        if rc:
            return rc
        records = read_metrics(run)
    steps = [r["step_time"] for r in records if r["kind"] == "train"][1:]
    probes = [r["seconds"] for r in records if r["kind"] == "probe"]
    step_s, probe_s = sum(steps) / len(steps), sum(probes) / len(probes)

    def overhead(every: int) -> float:
        return probe_s / (every * step_s)

    result = {
        "config": config, "threads": args.threads, "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "steps_timed": len(steps), "probes_timed": len(probes),
        "step_seconds": round(step_s, 4), "probe_seconds": round(probe_s, 4), "probe_in_steps": round(probe_s / step_s, 2),
        "default_every": DEFAULT_PROBE_EVERY, "overhead_at_default": round(overhead(DEFAULT_PROBE_EVERY), 5),
        "smallest_every_under_2pct": math.ceil(probe_s / (0.02 * step_s)),
    }
    print(json.dumps(result, indent=2))
    print(f"probe {probe_s:.3f} s = {probe_s / step_s:.2f} training steps ({step_s:.3f} s each, {args.threads} threads): "
          f"+{100 * overhead(DEFAULT_PROBE_EVERY):.2f}% at the default interval of {DEFAULT_PROBE_EVERY} steps; "
          f"under 2% from every {result['smallest_every_under_2pct']} steps")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
