"""Training save/resume: DeepSpeed checkpoints that survive a kill at any moment.

Run folder layout::

    run_dir/
      config.yaml              resolved config of the (latest) run
      latest                   name of the newest COMPLETE checkpoint, e.g. "global_step200"
      global_step200/          DeepSpeed engine files (model, optimizer; any ZeRO stage)
        sinklm_state.json      step, tokens seen, resolved config, tokenizer, code version
      metrics.jsonl, loss.png

Saving is two-phase: every rank writes its engine shards into ``global_step{N}/``, all ranks
meet at a barrier, and only then rank 0 replaces ``latest`` atomically (write a temporary file,
``os.replace``). A kill at any moment therefore leaves ``latest`` naming a checkpoint whose files
are all on disk; a half-written ``global_step{N}`` is simply ignored and overwritten later.
Pruning to the newest K keeps whatever ``latest`` names and deletes only older, complete ones.

Each checkpoint's client state (inside the DeepSpeed files) also holds, per rank, the data
loader position and the RNG states, so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from data.version import __version__
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.checkpoints.integrity import folder_problem
from pretrain.config import ConfigError, ModelConfig

LATEST_FILE = "latest"
STATE_FILE = "sinklm_state.json"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")
# Test hook: "N" or "N:SECONDS" makes rank 0 stop after the engine files of global_step{N} are
# written but before its state file and `latest` (default 600 s), so a test can SIGKILL it there.
HOLD_ENV = "SINKLM_TEST_HOLD_BEFORE_LATEST"

# Fields of ModelConfig that a checkpoint's weights depend on (its name and init do not matter).
SHAPE_FIELDS = (
    "vocab_size",
    "vocab_multiple",
    "num_layers",
    "hidden_size",
    "num_heads",
    "intermediate_size",
    "rotary_pct",
    "rotary_base",
    "use_parallel_residual",
    "attention",
    "sink_tokens",
)


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int | None:
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def read_latest(run_dir: str | Path) -> str | None:
    """The tag ``latest`` names, or None when there is no complete checkpoint."""
    path = Path(run_dir) / LATEST_FILE
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


@dataclass
class ResumePoint:
    load_dir: Path  # the folder holding global_step{N}/
    tag: str
    state: dict[str, Any]  # the checkpoint's sinklm_state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])


def find_resume_point(path: str | Path) -> ResumePoint | None:
    """A run folder (follows ``latest``) or one ``global_step{N}`` folder -> what to load.
    Returns None for a folder without any complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"train.resume: no such folder: {path}")
    if step_of(path.name) is not None and (path / STATE_FILE).is_file():
        load_dir, tag = path.parent, path.name
    else:
        tag = read_latest(path)
        if tag is None:
            return None
        load_dir = path
    folder = load_dir / tag
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise ConfigError(f"{folder}: not a complete sinklm checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{state_file}: unreadable ({err}){other_tags_hint(load_dir, tag, '--resume')}") from None
    problem = folder_problem(folder)
    if problem:
        raise ConfigError(problem + other_tags_hint(load_dir, tag, "--resume"))
    return ResumePoint(load_dir=load_dir, tag=tag, state=state)


def other_tags_hint(run_dir: Path, bad_tag: str, option: str) -> str:
    """'; other checkpoints: ...' naming the complete, undamaged tags of ``run_dir`` besides ``bad_tag``,
    and how to pick one with ``option`` (``--tag`` or ``--resume``)."""
    usable = [
        p.name for _, p in reversed(list_checkpoints(run_dir))
        if p.name != bad_tag and (p / STATE_FILE).is_file() and folder_problem(p) is None
    ]
    if not usable:
        return f"; {run_dir} holds no other complete checkpoint"
    pick = f"--tag {usable[0]}" if option == "--tag" else f"--resume {Path(run_dir) / usable[0]}"
    return f"; other checkpoints in {run_dir}: {', '.join(usable)} (pick one with {pick})"


def check_same_shape(saved_model: dict[str, Any], model: ModelConfig, where: str) -> None:
    """Refuse to load weights of another architecture, naming the fields that differ."""
    current = model.to_dict()
    differ = [
        f"{key}: checkpoint {saved_model.get(key)!r} vs config {current[key]!r}"
        for key in SHAPE_FIELDS
        if saved_model.get(key) != current[key]
    ]
    if differ:
        raise ConfigError(f"{where} was trained with a different model shape: " + "; ".join(differ))


def code_version() -> str:
    """Package version plus the git commit (with ``+dirty``) when run from a checkout."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}" if commit else __version__


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a list of one without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _hold_for_tests(step: int) -> None:
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    want, _, seconds = spec.partition(":")
    if int(want) != step:
        return
    print(f"[sinklm test hook] {tag_for(step)} written, holding before `latest`", file=sys.stderr, flush=True)
    time.sleep(float(seconds or 600))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(engine, run_dir: str | Path, step: int, meta: dict[str, Any], rank_state: dict[str, Any], keep_last: int) -> Path:
    """Two-phase save of ``global_step{step}`` (every rank calls this).

    ``meta`` (JSON-able: step, tokens seen, config, tokenizer, version) goes into the client state
    and ``sinklm_state.json``; ``rank_state`` (loader position, RNG) is gathered from all ranks
    into the client state so each rank finds its own on resume.
    """
    run_dir = Path(run_dir)
    tag = tag_for(step)
    rank_states = gather_objects(rank_state)
    client_state = {**meta, "rank_states": rank_states}
    engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state, save_latest=False)
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        _hold_for_tests(step)
        _write_atomic(run_dir / tag / STATE_FILE, json.dumps(meta, indent=1, default=str))
        _write_atomic(run_dir / LATEST_FILE, tag)
        prune_checkpoints(run_dir, keep_last)
    _barrier()
    return run_dir / tag


def load_checkpoint(engine, point: ResumePoint) -> dict[str, Any]:
    """Load model + optimizer into ``engine``; returns this rank's client state (with ``rank_state``)."""
    load_path, client_state = engine.load_checkpoint(
        str(point.load_dir), tag=point.tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None or client_state is None:
        raise ConfigError(f"{point.load_dir / point.tag}: DeepSpeed could not load this checkpoint")
    rank_states = client_state.get("rank_states") or []
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(rank_states) != world:
        raise ConfigError(
            f"{point.load_dir / point.tag} was written by {len(rank_states)} rank(s); this run has {world}. "
            f"Resume with the same number of processes (the data order and ZeRO shards depend on it)"
        )
    return {**client_state, "rank_state": rank_states[_rank()]}


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    run_dir = Path(run_dir)
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        step = step_of(child.name)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep_last`` (never the one ``latest``
    names, never anything newer than it, which may be a save in progress)."""
    if keep_last <= 0:
        return []
    latest = read_latest(run_dir)
    latest_step = step_of(latest) if latest else None
    if latest_step is None:
        return []
    older = [(s, p) for s, p in list_checkpoints(run_dir) if s <= latest_step]
    complete = [p for s, p in older if (p / STATE_FILE).is_file()]
    # an older folder without its state file is the debris of a save that was killed
    stale = [p for s, p in older if s < latest_step and not (p / STATE_FILE).is_file()]
    doomed = complete[:-keep_last] + stale
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
