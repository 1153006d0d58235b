"""Continuing a released Pythia checkpoint at its own step: ``sinklm convert owner/name@stepN --to init``
records the source (hub name, revision, commit) in the initial checkpoint; ``sinklm train`` with
``data.format: pythia`` and ``train.init_from`` on it derives ``data.start_step = N`` (stated in the log
and the resolved config), refuses an explicit start step that disagrees, and starts the step counter
and the learning-rate schedule at step N.

The hub is a hand-made Hugging Face cache read offline (``hub_cache_testing``): tiny GPT-NeoX weights
under revisions ``step2`` and ``main``. Pythia's data is a Megatron dataset of equal samples written
here from the documented layout (``test_pythia_data.write_megatron``) from the prepared corpus's tokens.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hub_cache_testing import build_hub_cache, use_hub_cache
from test_pythia_data import write_megatron
from test_train_runs import records, run_to_end

from data.shards import TokenStream
from pretrain.checkpoints import ExportSettings, convert
from pretrain.checkpoints.init_format import pythia_step_of, read_init_source
from pretrain.config import CONFIG_DIR
from pretrain.optim import WarmupCosine
from pretrain.train import main

HUB = "test-owner/pythia-tiny"
COMMITS = {"step2": "c" * 40, "main": "d" * 40}
N, STEPS, SAMPLE, G = 2, 4, 33, 2  # start step (the revision), last step, tokens per sample, global batch


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Initial checkpoints: HUB@step2 + 1 sink token; that one converted again (local); HUB at main."""
    root = tmp_path_factory.mktemp("pythia-continue")
    cache = build_hub_cache(root / "hf_cache", HUB, COMMITS)
    with pytest.MonkeyPatch.context() as mp:
        use_hub_cache(mp, cache)
        out = {"step2": root / "init-step2-sink1", "main": root / "init-main"}
        convert(f"{HUB}@step2", out["step2"], ExportSettings(to="init", add_sink_tokens=1))
        convert(HUB, out["main"], ExportSettings(to="init", add_sink_tokens=1))
    out["again"] = root / "init-again"
    convert(out["step2"], out["again"], ExportSettings(to="init"))
    return out


@pytest.fixture(scope="module")
def pythia_data(prepared_corpus, tmp_path_factory) -> Path:
    tokens = TokenStream(prepared_corpus, "train")[: STEPS * G * SAMPLE]
    return write_megatron(tmp_path_factory.mktemp("pile") / "preshuffled", tokens.reshape(STEPS * G, SAMPLE), parts=2)


def args(init: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        str(CONFIG_DIR / "experiments" / "quickstart-sink1.yaml"),
        "--model.hidden_size=32", "--model.max_seq_len=64",  # the hub fixture's shape (+ the converted sink)
        "--data.format=pythia", f"--data.path={data}", "--data.validation_path=null",
        f"--data.seq_len={SAMPLE}", f"--data.text_tokens={SAMPLE - 1}",
        f"--train.init_from={init}", f"--train.run_dir={run_dir}", f"--train.max_steps={STEPS}",
        f"--train.global_batch_size={G}", f"--train.micro_batch_size={G}",
        "--optimizer.warmup_steps=1", f"--optimizer.decay_steps={STEPS}",
        "--checkpoint.every=0", "--logging.log_every=1", "--logging.plot=false", "--probe.every=0",
        *extra,
    ]  # fmt: skip


def test_convert_records_the_source(converted):
    """Prevents an initial checkpoint forgetting which revision it is: the hub name, revision and
    commit (snapshot) are in its metadata; main is recorded as main (no step); a second local
    conversion records its input's path and keeps the step through ``from``."""
    step2 = read_init_source(converted["step2"])
    assert step2 == {"hub_name": HUB, "revision": "step2", "commit": COMMITS["step2"]}
    assert pythia_step_of(step2) == N
    main_record = read_init_source(converted["main"])
    assert main_record["revision"] == "main" and pythia_step_of(main_record) is None
    again = read_init_source(converted["again"])
    assert again["path"] == str(converted["step2"].resolve()) and again["format"] == "init"
    assert again["from"] == step2 and pythia_step_of(again) == N


def resolved(capsys, argv: list[str]) -> tuple[dict, str]:
    assert main([*argv, "--print-config"]) == 0
    out = capsys.readouterr()
    return yaml.safe_load(out.out), out.err


def test_start_step_derived_agreeing_or_refused(converted, pythia_data, tmp_path, capsys):
    """Prevents continuing Pythia at the wrong step: unset, data.start_step becomes the recorded N
    (resolved config and a stderr line say so, also through a second conversion); set to N it passes;
    set otherwise, or past train.max_steps, it is one line (exit 2) naming both keys and values;
    without a recorded step, or with data.format shards, nothing is derived."""
    run_dir = tmp_path / "never"
    for init in (converted["step2"], converted["again"]):
        config, err = resolved(capsys, args(init, pythia_data, run_dir))
        assert config["data"]["start_step"] == N
        assert f"data.start_step={N}: from train.init_from={init} records its weights as " in err
        assert f"{HUB}@step2" in err
    config, err = resolved(capsys, args(converted["step2"], pythia_data, run_dir, f"--data.start_step={N}"))
    assert config["data"]["start_step"] == N and "agrees with" in err
    config, _ = resolved(capsys, args(converted["main"], pythia_data, run_dir))
    assert config["data"]["start_step"] is None
    assert main(args(converted["step2"], pythia_data, run_dir, "--data.start_step=3")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "data.start_step=3 disagrees with train.init_from=" in lines[0], lines
    assert f"{HUB}@step2 (step {N})" in lines[0]
    assert main(args(converted["step2"], pythia_data, run_dir, f"--train.max_steps={N}")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"data.start_step: must be in [0, train.max_steps={N})" in lines[0], lines
    assert f"(data.start_step={N}: from train.init_from=" in lines[0]
    assert not run_dir.exists()


@pytest.mark.slow
def test_training_starts_at_the_recorded_step(converted, pythia_data, tmp_path):
    """Prevents the step counter or the learning-rate schedule restarting at 0 when continuing a
    converted stepN: one real run (one process) from the step2 checkpoint logs steps N+1..STEPS, each
    on Pythia's samples of that step, at the schedule's lr of the absolute step (lr(N) first)."""
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    run_to_end(args(converted["step2"], pythia_data, run_dir), log, nproc=1)
    train = records(run_dir)
    assert [r["step"] for r in train] == list(range(N + 1, STEPS + 1))
    schedule = WarmupCosine(peak=2e-3, warmup_steps=1, decay_steps=STEPS, min_ratio=0.1)  # quickstart's peak lr
    assert [r["lr"] for r in train] == pytest.approx([schedule(s) for s in range(N, STEPS)], rel=1e-12)
    assert train[0]["lr"] < schedule(0)  # past the peak: step 2 of a 4-step cosine, not a restart
    raw = b"".join(p.read_bytes() for p in sorted(pythia_data.glob("document-*.bin")))
    samples = np.frombuffer(raw, "<u2").reshape(-1, SAMPLE).astype(np.int64)
    for r in train:
        rows = np.ascontiguousarray(samples[(r["step"] - 1) * G : r["step"] * G, : SAMPLE - 1])
        assert r["text_crc"] == [zlib.crc32(rows.tobytes())], r["step"]
    assert f"data.start_step={N}: from train.init_from=" in log.read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["start_step"] == N
