"""``data.format: pythia`` through a real ``sinklm train``: the trainer consumes Pythia's batches in
Pythia's order (step s = samples [s G, (s+1) G) of a pre-shuffled Megatron dataset) from
``data.start_step`` on, with the learning-rate schedule at that step; a stop and resume equals an
uninterrupted run; bad data configs fail in a second with one line.

The fixture is a Megatron dataset written here from the documented ``.idx`` layout (not by
``data.indexed``): the prepared Gutenberg excerpt's training tokens cut into 65-token samples (64
text tokens + the last target, Pythia's 2049 scaled down), shuffled once with a fixed seed (as
Pythia's data is pre-shuffled) and split into three Pythia-named ``.bin`` parts. Validation reads the
prepared folder's validation split through ``data.validation_path``.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_train_runs import records, run_to_end  # launched as the installed `sinklm train`, as there

from data.shards import TokenStream
from pretrain.config import CONFIG_DIR
from pretrain.optim import WarmupCosine
from pretrain.train_config import resolve_config

SAMPLE = 65  # tokens per sample (Pythia: 2049)
G, RANKS, MICRO = 8, 2, 2  # global batch (Pythia: 1024), ranks, micro-batch -> 2 accumulation steps
START, STEPS = 2, 8
EXPERIMENTS = CONFIG_DIR / "experiments"


def write_megatron(folder: Path, samples: np.ndarray, parts: int = 3) -> Path:
    """``document.idx`` (magic, version 1, dtype code 8 = uint16, counts, int32 sizes, int64 byte
    pointers, int64 document index) + ``document-0000i-of-0000{parts-1}.bin`` byte ranges."""
    folder.mkdir(parents=True)
    n, length = samples.shape
    header = struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, n, n + 1)
    sizes = np.full(n, length, "<i4").tobytes()
    pointers = (np.arange(n, dtype="<i8") * length * 2).tobytes()
    (folder / "document.idx").write_bytes(header + sizes + pointers + np.arange(n + 1, dtype="<i8").tobytes())
    data = samples.astype("<u2").tobytes()
    cuts = np.linspace(0, len(data), parts + 1).astype(int)
    cuts[1] += 1  # a part boundary inside a token
    for i in range(parts):
        (folder / f"document-{i:05d}-of-{parts - 1:05d}.bin").write_bytes(data[cuts[i] : cuts[i + 1]])
    return folder


@pytest.fixture(scope="module")
def pythia_data(prepared_corpus, tmp_path_factory) -> Path:
    stream = TokenStream(prepared_corpus, "train")
    count = len(stream) // SAMPLE
    samples = stream[: count * SAMPLE].reshape(count, SAMPLE)
    np.random.default_rng(7).shuffle(samples)
    return write_megatron(tmp_path_factory.mktemp("pythia") / "preshuffled", samples)


def direct_samples(folder: Path) -> np.ndarray:
    """Every sample, read by concatenating the parts' raw bytes (independent of data.indexed)."""
    raw = b"".join(p.read_bytes() for p in sorted(folder.glob("document-*.bin")))
    return np.frombuffer(raw, "<u2").reshape(-1, SAMPLE).astype(np.int64)


def pythia_args(data: Path, validation: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        str(EXPERIMENTS / "quickstart-sink1.yaml"),
        "--data.format=pythia",
        f"--data.path={data}",
        f"--data.validation_path={validation}",
        f"--data.start_step={START}",
        f"--data.seq_len={SAMPLE}",  # 1 sink + 64 text tokens
        f"--data.text_tokens={SAMPLE - 1}",
        f"--train.run_dir={run_dir}",
        f"--train.max_steps={STEPS}",
        f"--train.global_batch_size={G}",
        f"--train.micro_batch_size={MICRO}",
        "--train.eval_every=4",
        "--train.eval_batches=2",
        "--optimizer.warmup_steps=3",  # an explicit schedule (as Pythia's 1430 / 143000), so max_steps may change
        f"--optimizer.decay_steps={STEPS}",
        "--checkpoint.every=0",
        "--deepspeed.config=zero1",
        "--logging.log_every=2",
        "--logging.plot=false",
        *extra,
    ]


def expected_crcs(samples: np.ndarray, step: int) -> list[int]:
    """Pythia's step ``step`` as the trainer's CRCs: rank r's micro-batch m of the step is the
    r-th block of MICRO samples in the m-th block of RANKS * MICRO of [step G, (step + 1) G)."""
    accumulation = G // (RANKS * MICRO)
    crcs = []
    for rank in range(RANKS):
        crc = 0
        for micro in range(accumulation):
            first = step * G + (micro * RANKS + rank) * MICRO
            crc = zlib.crc32(np.ascontiguousarray(samples[first : first + MICRO, : SAMPLE - 1]).tobytes(), crc)
        crcs.append(crc)
    return crcs


@pytest.fixture(scope="module")
def uninterrupted(pythia_data, prepared_corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pythia-runs") / "uninterrupted"
    run_to_end(pythia_args(pythia_data, prepared_corpus, run_dir), run_dir.with_suffix(".log"))
    return run_dir


@pytest.mark.slow
def test_trains_on_pythias_batches_from_start_step(uninterrupted, pythia_data):
    """Prevents training on anything but Pythia's order: every step's text on every rank equals a
    direct read of Pythia's samples for that step, starting at data.start_step (logged steps
    START+1..STEPS), with the lr schedule at the absolute step and validation from validation_path."""
    samples = direct_samples(pythia_data)
    train = records(uninterrupted)
    assert [r["step"] for r in train] == list(range(START + 1, STEPS + 1))
    for r in train:
        assert r["text_crc"] == expected_crcs(samples, r["step"] - 1), f"step {r['step']}"
    schedule = WarmupCosine(peak=2e-3, warmup_steps=3, decay_steps=STEPS, min_ratio=0.1)
    assert [r["lr"] for r in train] == pytest.approx([schedule(r["step"] - 1) for r in train], rel=1e-12)
    peak, floor = 2e-3, 2e-4  # Pythia's rule: linear warm-up, then cosine from the peak to 10% at decay_steps
    assert train[0]["lr"] == pytest.approx(peak * 3 / 3)  # step index 2 is the last warm-up step
    assert train[-1]["lr"] == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    assert [r["step"] for r in records(uninterrupted, "val")] == [4, 8]
    assert all(r["tokens_seen"] == (r["step"] - START) * G * SAMPLE for r in train)


@pytest.mark.slow
def test_resume_equals_uninterrupted(uninterrupted, pythia_data, prepared_corpus, tmp_path):
    """Prevents a resumed Pythia-order run from re-reading or skipping batches: stop at step 5 (a
    checkpoint), run the same command to step 8; steps 6..8 must equal the uninterrupted run's."""
    run_dir = tmp_path / "stopped"
    run_to_end(pythia_args(pythia_data, prepared_corpus, run_dir, "--train.max_steps=5"), tmp_path / "first.log")
    run_to_end(pythia_args(pythia_data, prepared_corpus, run_dir), tmp_path / "second.log")
    assert f"resumed from {run_dir / 'global_step5'} at step 5" in (tmp_path / "second.log").read_text()
    got, want = records(run_dir), records(uninterrupted)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a["text_crc"] == b["text_crc"], f"step {a['step']}"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6), f"step {a['step']}"
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)


def test_bad_configs_fail_early(pythia_data, prepared_corpus, tmp_path, capsys):
    """Prevents a late or vague failure: each inconsistent Pythia-order config stops before any
    model is built with exit status 2 and one stderr line naming the key, expected and found."""
    from pretrain.train import main

    run_dir = tmp_path / "never"
    base = pythia_args(pythia_data, prepared_corpus, run_dir)
    cases = {
        "--data.text_tokens=30": "data.text_tokens: 30 text tokens per sample need samples of 31 tokens, but",
        "--train.global_batch_size=7": "train.global_batch_size=7 is not a multiple of micro_batch_size x world size = 2 x 1",
        "--train.max_steps=400": "train.max_steps=400 exceeds the",
        "--data.start_step=8": "data.start_step: must be in [0, train.max_steps=8)",
        f"--data.path={prepared_corpus}": "data.path (data.format=pythia): ",
        "--data.validation_split=test": f"data.validation_path: {prepared_corpus} has no split 'test' (has train, validation",
        f"--data.validation_path={tmp_path / 'nothing'}": f"data.validation_path: {tmp_path / 'nothing'} does not exist",
    }
    for override, message in cases.items():
        assert main([*base, override]) == 2, override
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (override, lines)
    shards = [a for a in base if not a.startswith(("--data.format", "--data.start_step"))]
    assert main([*shards, f"--data.path={pythia_data}", "--data.start_step=1"]) == 2  # a Megatron stream, no steps
    assert "data.start_step: only applies to data.format=pythia" in capsys.readouterr().err
    assert not run_dir.exists()


def test_shipped_pythia_configs(tmp_path, prepared_corpus):
    """Prevents the shipped recipes drifting from Pythia: global batch 1024 of 2049-token samples
    (1 sink + 2048 text), the schedule at Pythia's position (warm-up 1% of 143,000 steps, cosine to
    10%), and the continued run's plan accepting a dataset in Pythia's exact layout."""
    scratch = resolve_config([EXPERIMENTS / "pythia-160m-scratch-sink1.yaml"])
    cont = resolve_config([EXPERIMENTS / "pythia-160m-continue-sink1.yaml"])
    for run in (scratch, cont):
        assert (run.data.format, run.train.global_batch_size, run.seq_len, run.text_tokens) == ("pythia", 1024, 2049, 2048)
        assert (run.model.name, run.model.sink_tokens, run.optimizer.lr) == ("pythia-160m", 1, 6e-4)
        assert (run.optimizer.warmup_steps, run.optimizer.decay_steps, run.optimizer.min_lr_ratio) == (1430, 143000, 0.1)
    assert scratch.data.start_step in (None, 0) and scratch.train.init_from is None
    n = cont.data.start_step
    assert n and cont.train.init_from and cont.train.max_steps > n
    lr = WarmupCosine.from_config(cont.optimizer, cont.train.max_steps)(n)
    pythia = 6e-5 + (6e-4 - 6e-5) * 0.5 * (1 + math.cos(math.pi * (n - 1430) / (143000 - 1430)))
    assert lr == pytest.approx(pythia, rel=1e-12)

    from pretrain.plan import plan_run, pythia_loader

    # two of Pythia's steps of real tokens (tiled), 2049 per sample, plan + loader at step 1
    tokens = TokenStream(prepared_corpus, "train")[:]
    samples = np.resize(tokens, (2 * 1024, 2049))
    data = write_megatron(tmp_path / "pile", samples, parts=2)
    overrides = [f"data.path={data}", f"data.validation_path={prepared_corpus}", "data.start_step=1",
                 "train.max_steps=2", "train.init_from=null", f"train.run_dir={tmp_path / 'run'}", "train.precision=fp32"]
    run = resolve_config([EXPERIMENTS / "pythia-160m-continue-sink1.yaml"], overrides)
    plan = plan_run(run)
    assert plan.grad_accum * run.train.micro_batch_size == 1024 and plan.has_validation
    batch = next(pythia_loader(run, 0, 1))
    assert batch["input_ids"].shape == (run.train.micro_batch_size, 2049)
    assert (batch["input_ids"][:, 0] == 50277).all()
    assert (batch["input_ids"][:, 1:].numpy() == samples[1024 : 1024 + run.train.micro_batch_size, :2048]).all()
