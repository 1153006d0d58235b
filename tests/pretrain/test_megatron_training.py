"""``sinklm train`` with ``data.path`` (and ``data.validation_path``) naming a Megatron indexed dataset
of whole documents, ``data.format: shards``: the run trains on the windows a prepared folder with the
same tokens gives, states the tokenizer it assumes, and bad data fails before any model is built.

The datasets are written by megatron-core's own ``IndexedDatasetBuilder`` from the prepared Gutenberg
excerpt's documents (train and validation splits), as gpt-neox's ``preprocess_data.py --append-eod``
would write them; the expected per-step text comes from the prepared folder's own loader.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from megatron_testing import documents, megatron_core_dataset
from test_train_runs import records, run_to_end, train_args

from data.loader import SampleLoader
from pretrain.train import main
from pretrain.train_config import resolve_config

STEPS = 4


@pytest.fixture(scope="module")
def megatron(prepared_corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron-docs")
    return {split: megatron_core_dataset(root / split, documents(prepared_corpus, split)) for split in ("train", "validation")}


def args(megatron, run_dir: Path, *extra: str) -> list[str]:
    base = train_args(megatron["train"], run_dir, "sink1", f"--data.validation_path={megatron['validation']}")
    return [a for a in base if not a.startswith(("--train.max_steps", "--checkpoint.every"))] + [
        f"--train.max_steps={STEPS}", "--checkpoint.every=0", "--train.eval_every=2", "--logging.plot=false", *extra
    ]  # fmt: skip


@pytest.mark.slow
def test_trains_from_a_megatron_dataset(megatron, prepared_corpus, tmp_path):
    """Prevents a Megatron data.path training on anything but the shards' windows: one real run (one
    process, ZeRO-1) logs per step the CRC of exactly the text the prepared folder's loader yields for
    the same config, validates and probes on the Megatron validation dataset, and says what it assumed."""
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    run_to_end(args(megatron, run_dir), log, nproc=1)
    argv = args(megatron, run_dir)
    run = resolve_config([a for a in argv if not a.startswith("--")], [a[2:] for a in argv if a.startswith("--")])
    shards = SampleLoader(prepared_corpus, "train", run.seq_len, run.train.micro_batch_size, run.model.sink_token_ids,
                          seed=run.data.seed, shuffle=run.data.shuffle, text_tokens=run.text_tokens)  # fmt: skip
    k = run.model.sink_tokens
    want = [zlib.crc32(np.ascontiguousarray(next(shards)["input_ids"][:, k:].numpy()).tobytes()) for _ in range(STEPS)]
    train = records(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["text_crc"] for r in train] == [[c] for c in want]
    assert [r["step"] for r in records(run_dir, "val")] == [2, 4]
    assert [r["step"] for r in records(run_dir, "probe")] == [STEPS]  # the probe streams the Megatron validation data
    text = log.read_text()
    assert f"data: Megatron indexed dataset {megatron['train']}.idx (1 .bin part(s)" in text
    assert "ids taken as the bundled Pythia tokenizer's (GPT-NeoX-20B, model.vocab_size=50277)" in text
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["path"] == str(megatron["train"]) and saved["data"]["format"] == "shards"


def test_bad_megatron_data_fails_before_the_model(megatron, tmp_path, capsys):
    """Prevents a late failure on bad Megatron data: an id outside the vocabulary and a truncated .bin each
    exit 2 with one stderr line naming the file, before the run folder exists."""
    data = megatron["train"].with_suffix(".bin").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "d.idx").write_bytes(megatron["train"].with_suffix(".idx").read_bytes())
    run_dir = tmp_path / "never"
    cases = {
        "id": (data[:100] + np.array([50300], "<u2").tobytes() + data[102:], f"{bad / 'd.bin'}: token id 50300 (token 50 of the data"),
        "short": (data[:-10], f"data.path: {bad / 'd.bin'}: data shorter than {bad / 'd.idx'} says"),
    }
    for name, (raw, message) in cases.items():
        (bad / "d.bin").write_bytes(raw)
        assert main(args(megatron, run_dir, f"--data.path={bad / 'd'}")) == 2, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, lines)
    assert not run_dir.exists()
