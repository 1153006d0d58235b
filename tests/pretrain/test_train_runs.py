"""Real DeepSpeed training runs on CPU (gloo): 2 processes under torchrun, ZeRO-2 and ZeRO-3,
exact resume after SIGKILL, a kill in the middle of a checkpoint save, identical text across
variants, and errors before any step.

All runs share one tiny setup (2 layers x 64, 62 text tokens per sample, micro-batch 2, 8 steps,
a checkpoint every 4) on the session's prepared Gutenberg excerpt. The uninterrupted ZeRO-2 run
is the reference every other run is compared with; it is made once per module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.config import CONFIG_DIR

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 8, 4
# the installed console entry point, as launch/*.sh run it (it gives the trainer its probe function)
SINKLM = shutil.which("sinklm", path=str(Path(sys.executable).parent)) or shutil.which("sinklm") or "sinklm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(data_dir: Path, run_dir: Path, variant: str = "vanilla", *extra: str) -> list[str]:
    return [
        str(CONFIG_DIR / "experiments" / f"quickstart-{variant}.yaml"),
        f"--data.path={data_dir}",
        f"--train.run_dir={run_dir}",
        f"--train.max_steps={STEPS}",
        "--train.micro_batch_size=2",
        "--data.seq_len=64",
        "--data.text_tokens=62",  # the same text for vanilla (62) and sink1 (1 + 62) samples
        "--train.eval_every=4",
        "--train.eval_batches=2",
        f"--checkpoint.every={SAVE_EVERY}",
        "--checkpoint.keep_last=1",
        "--logging.log_every=4",
        *extra,
    ]


def launch(args: list[str], log: Path, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``sinklm train`` under torchrun (or as one plain process) in its own process group."""
    if nproc > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
        cmd = [*torchrun, "--no-python", SINKLM, "train", *args]
    else:
        cmd = [SINKLM, "train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(args: list[str], log: Path, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 240) -> None:
    proc = launch(args, log, nproc, env)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    assert rc == 0, f"training failed (rc {rc}):\n{log.read_text()[-4000:]}"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank: no handler, no cleanup, like a node dying.

    torchrun starts each rank in a session of its own, so killing the launcher's process group
    would orphan the ranks, which then keep writing into the run folder the resumed run uses.
    The whole process tree is collected first and killed at once."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)
    assert not [c for c in tree if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "a rank survived the kill"


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == kind]


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before the kill point:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"kill point not reached in {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def zero2_run(prepared_corpus, tmp_path_factory):
    """The reference: vanilla, ZeRO-2, 2 ranks, 8 uninterrupted steps."""
    run_dir = tmp_path_factory.mktemp("train") / "zero2"
    run_to_end(train_args(prepared_corpus, run_dir, "vanilla", "--deepspeed.config=zero2"), run_dir.with_suffix(".log"))
    return run_dir


@pytest.fixture(scope="module")
def zero3_sink_run(prepared_corpus, tmp_path_factory):
    """The 1-sink-token variant, ZeRO-3, 2 ranks, same data settings as the reference."""
    run_dir = tmp_path_factory.mktemp("train") / "zero3-sink1"
    run_to_end(train_args(prepared_corpus, run_dir, "sink1", "--deepspeed.config=zero3"), run_dir.with_suffix(".log"))
    return run_dir


def check_run(run_dir: Path, stage: int) -> None:
    train = records(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in train]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.2, f"loss did not fall: {losses}"
    val = records(run_dir, "val")
    assert [r["step"] for r in val] == [4, 8] and val[1]["loss"] < val[0]["loss"]
    for r in train:
        assert len(r["text_crc"]) == 2 and r["text_crc"][0] != r["text_crc"][1], "both ranks trained on the same samples"
        assert r["rank_loss"][0] != r["rank_loss"][1]
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
        assert r["tokens_seen"] == r["step"] * 2 * 2 * train_sample_len(run_dir)
    # keep_last=1: only the final checkpoint survives, and `latest` names it
    assert (run_dir / "latest").read_text().strip() == f"global_step{STEPS}"
    folders = sorted(p.name for p in run_dir.glob("global_step*"))
    assert folders == [f"global_step{STEPS}"]
    files = {p.name for p in (run_dir / f"global_step{STEPS}").iterdir()}
    if stage == 3:
        assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files
    else:
        assert "mp_rank_00_model_states.pt" in files
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "sinklm_state.json"} <= files
    state = json.loads((run_dir / f"global_step{STEPS}" / "sinklm_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["tokenizer"]["fingerprint"]
    assert state["code_version"].startswith("0.")
    config = __import__("yaml").safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["hidden_size"] == 64 and "preset" not in config["model"]
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def train_sample_len(run_dir: Path) -> int:
    config = __import__("yaml").safe_load((run_dir / "config.yaml").read_text())
    return config["model"]["sink_tokens"] + config["data"]["text_tokens"]


def test_zero2_two_ranks_train(zero2_run):
    """ZeRO-2 over 2 gloo ranks: loss falls, validation improves, checkpoints pruned to the last,
    and the two ranks train on different samples every step (no duplicated data shard)."""
    check_run(zero2_run, stage=2)


def test_zero3_two_ranks_train(zero3_sink_run):
    """The same under ZeRO-3 (parameters partitioned), with a sink-token model."""
    check_run(zero3_sink_run, stage=3)


def test_variants_see_identical_text(zero2_run, zero3_sink_run):
    """Vanilla and sink-token runs of one experiment must train on the same text tokens in the
    same order, rank by rank (the comparison in the paper is otherwise confounded)."""
    vanilla = [r["text_crc"] for r in records(zero2_run)]
    sink = [r["text_crc"] for r in records(zero3_sink_run)]
    assert vanilla == sink
    assert len({tuple(c) for c in vanilla}) == STEPS  # and the batches do change from step to step


def test_resume_after_sigkill_is_exact(prepared_corpus, zero2_run, tmp_path):
    """Train, SIGKILL every process after the step-4 checkpoint, resume: the losses of steps 5..8
    must equal the uninterrupted run's (same data order, optimizer moments, schedule, RNG)."""
    run_dir = tmp_path / "killed"
    log = tmp_path / "killed.log"
    args = train_args(prepared_corpus, run_dir, "vanilla", "--deepspeed.config=zero2")
    # safety net: should the kill come late, the run parks before committing step 8
    proc = launch(args, log, env={"SINKLM_TEST_HOLD_BEFORE_LATEST": f"{STEPS}"})
    wait_for(lambda: (run_dir / "latest").is_file() and any(r["step"] > SAVE_EVERY for r in _safe_records(run_dir)), proc, log)
    kill_group(proc)
    assert (run_dir / "latest").read_text().strip() == f"global_step{SAVE_EVERY}"

    run_to_end(args, tmp_path / "resumed.log")
    assert f"resumed from {run_dir / f'global_step{SAVE_EVERY}'} at step {SAVE_EVERY}" in (tmp_path / "resumed.log").read_text()
    resumed, reference = records(run_dir), records(zero2_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no duplicated steps from the killed run
    for got, want in zip(resumed, reference):
        assert got["text_crc"] == want["text_crc"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-6), f"step {got['step']}"
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert records(run_dir, "val")[-1]["loss"] == pytest.approx(records(zero2_run, "val")[-1]["loss"], rel=1e-6)


def _safe_records(run_dir: Path) -> list[dict]:
    try:
        return records(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_kill_during_checkpoint_save(prepared_corpus, zero2_run, tmp_path):
    """SIGKILL after the engine wrote global_step8 but before the save was committed: `latest`
    still names global_step4, the half-saved folder is ignored (even with a truncated shard), and
    the resumed run reproduces the reference."""
    run_dir = tmp_path / "killed-saving"
    log = tmp_path / "saving.log"
    args = train_args(prepared_corpus, run_dir, "vanilla", "--deepspeed.config=zero2")
    proc = launch(args, log, env={"SINKLM_TEST_HOLD_BEFORE_LATEST": f"{STEPS}"})
    wait_for(lambda: "holding before `latest`" in log.read_text(), proc, log)
    kill_group(proc)

    assert (run_dir / "latest").read_text().strip() == f"global_step{SAVE_EVERY}"
    partial = run_dir / f"global_step{STEPS}"
    assert partial.is_dir() and not (partial / "sinklm_state.json").exists()
    shard = partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # as if the kill had come mid-write
    assert (run_dir / f"global_step{SAVE_EVERY}" / "sinklm_state.json").is_file()

    run_to_end(args, tmp_path / "resumed.log")
    assert (run_dir / "latest").read_text().strip() == f"global_step{STEPS}"
    assert (partial / "sinklm_state.json").is_file()
    got = [r["loss"] for r in records(run_dir)]
    want = [r["loss"] for r in records(zero2_run)]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_sink_logit_single_process_zero0(prepared_corpus, tmp_path):
    """A plain `sinklm train` (no launcher: world of one) with ZeRO-0 trains the sink_logit
    variant; its per-head logits b_h learn (they receive gradient through the kernel); the
    streaming-perplexity probe (the function `sinklm train` hands the trainer) runs on schedule."""
    import torch

    run_dir = tmp_path / "sink-logit"
    probe = ["--probe.every=2", "--probe.num_tokens=96", "--probe.start_size=4", "--probe.recent_size=28"]
    args = train_args(prepared_corpus, run_dir, "sink-logit", "--deepspeed.config=zero0", "--train.max_steps=4", "--checkpoint.every=0", *probe)
    run_to_end(args, tmp_path / "sink-logit.log", nproc=1)
    probes = records(run_dir, "probe")
    assert [r["step"] for r in probes] == [2, 4]
    assert all(math.isfinite(r["loss"]) and 5 < r["loss"] < 15 for r in probes)
    train = records(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(len(r["text_crc"]) == 1 for r in train)
    assert all(r["grad_norm"] > 0 for r in train)
    states = torch.load(run_dir / "global_step4" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    sink_logit = states["module"]["blocks.0.attn.sink_logit"]
    assert sink_logit.shape == (4,) and sink_logit.abs().max() > 0  # initialised at 0, moved by training


def test_resume_refuses_other_model_shape(zero2_run, prepared_corpus, tmp_path, capsys):
    """Resuming a run folder with a different model shape must stop before any step with the
    fields that differ, not crash inside DeepSpeed's state-dict loading."""
    from pretrain.train import main

    args = train_args(prepared_corpus, tmp_path / "other", "vanilla", f"--train.resume={zero2_run}", "--model.hidden_size=128")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different model shape" in err and "hidden_size: checkpoint 64 vs config 128" in err
    assert not (tmp_path / "other").exists()
    # the same folder with the same shape but another sample length is refused too
    args = train_args(prepared_corpus, tmp_path / "other", "vanilla", f"--train.resume={zero2_run}", "--data.text_tokens=30")
    assert main(args) == 2
    assert "text tokens per sample" in capsys.readouterr().err
    # and a 2-process checkpoint is not resumed by 1 process (ZeRO shards, per-rank data positions)
    args = train_args(prepared_corpus, tmp_path / "other", "vanilla", f"--train.resume={zero2_run}")
    assert main(args) == 2
    assert "written by 2 process(es); this run has 1" in capsys.readouterr().err


def test_init_from_starts_from_those_weights(prepared_corpus, tmp_path):
    """`train.init_from` loads an initial checkpoint before DeepSpeed starts: a run from the weights
    that seed 999 draws trains exactly like a run initialised with seed 999; an initial checkpoint
    of another shape is refused before any step, naming the fields."""
    import torch

    from pretrain.checkpoints.init_format import save_init_checkpoint
    from pretrain.model import GPTNeoX
    from pretrain.train_config import resolve_config

    short = ["--deepspeed.config=zero0", "--train.max_steps=2", "--checkpoint.every=0", "--logging.plot=false"]
    args = train_args(prepared_corpus, tmp_path / "unused", "vanilla", *short)
    model_cfg = resolve_config(args[:1], [a[2:] for a in args[1:]]).model
    torch.manual_seed(999)
    save_init_checkpoint(tmp_path / "init", model_cfg, GPTNeoX(model_cfg).state_dict())
    run_to_end([*args, f"--train.run_dir={tmp_path / 'from-init'}", f"--train.init_from={tmp_path / 'init'}"], tmp_path / "a.log", nproc=1)
    run_to_end([*args, f"--train.run_dir={tmp_path / 'seed-999'}", "--train.seed=999"], tmp_path / "b.log", nproc=1)
    got, want = records(tmp_path / "from-init"), records(tmp_path / "seed-999")
    assert [r["step"] for r in got] == [1, 2]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6, abs=1e-6)

    wide = model_cfg.__class__.from_dict({**model_cfg.to_dict(), "hidden_size": 128})
    save_init_checkpoint(tmp_path / "wide", wide, GPTNeoX(wide).state_dict())
    log = tmp_path / "wide.log"
    proc = launch([*args, f"--train.run_dir={tmp_path / 'from-wide'}", f"--train.init_from={tmp_path / 'wide'}"], log, nproc=1)
    assert proc.wait(timeout=240) == 2
    assert "train.init_from" in log.read_text() and "hidden_size: checkpoint 128 vs config 64" in log.read_text()
