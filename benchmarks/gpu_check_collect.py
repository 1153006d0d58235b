"""Gather ``gpu_check.sh``'s pieces into one JSON: the machine, exactness, decode, training benchmark,
and per variant of the short ``sinklm train`` runs the median tokens/s, MFU and step time vs vanilla
(steps before ``--skip-steps`` are left out: they hold the compile and warm-up)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def train_summary(run_dir: Path, skip: int) -> dict | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("kind") == "train" and r["step"] > skip]
    if not steps:
        return None
    mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
    return {
        "steps_counted": len(steps),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "step_time_s": statistics.median(r["step_time"] for r in steps),
        "mfu": statistics.median(mfus) if mfus else None,
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="gpu_check.sh's work folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--skip-steps", type=int, default=10)
    args = parser.parse_args(argv)
    if not args.work.is_dir():
        print(f"gpu_check_collect: work folder {args.work} does not exist", file=sys.stderr)
        return 2
    train = {}
    for run in sorted(args.work.glob("run-*")):
        summary = train_summary(run, args.skip_steps)
        if summary:
            train[run.name[len("run-"):]] = summary
    vanilla = train.get("vanilla")
    for summary in train.values():
        summary["step_time_vs_vanilla"] = summary["step_time_s"] / vanilla["step_time_s"] if vanilla else None
    result = {
        "machine": read_json(args.work / "machine.json"),
        "exactness": read_json(args.work / "exactness.json"),
        "decode": {p.stem[len("decode-"):]: read_json(p) for p in sorted(args.work.glob("decode-*.json"))},
        "hf_stream": read_json(args.work / "hf-stream.json"),
        "hf_decode": {p.stem[len("hf-decode-"):]: read_json(p) for p in sorted(args.work.glob("hf-decode-*.json"))},
        "bench_train": read_json(args.work / "bench-train.json"),
        "sinklm_train": train,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, summary in train.items():
        mfu = f"{100 * summary['mfu']:.1f}%" if summary["mfu"] is not None else "n/a"
        ratio = summary["step_time_vs_vanilla"]
        print(f"sinklm train {name:<11} {summary['tokens_per_s']:>12,.0f} tokens/s  MFU {mfu:>6}  "
              f"step time vs vanilla {ratio:.3f}" if ratio else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
