"""The processes and the DeepSpeed engine: ranks from the launcher, the process group, the
DeepSpeed JSON built from the run config, ``deepspeed.initialize``, and a clean shutdown.

Works the same under a plain ``python`` process (a world of one), torchrun, the deepspeed
launcher and srun; on CPU the process group uses gloo, on GPUs nccl.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.settings import deep_merge
from pretrain.config import CONFIG_DIR, ConfigError
from pretrain.train_config import RunConfig


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_dist_env() -> DistEnv:
    """Rank and world size from the launcher (torchrun / deepspeed / srun), or a single process."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


def init_distributed(env: DistEnv) -> None:
    """torch.distributed through DeepSpeed: nccl on GPUs, gloo on CPU. A plain ``python`` run gets
    the env:// variables of a world of one."""
    import deepspeed

    defaults = {"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank)}
    # a world of one needs no agreed port: take a free one so parallel single-process runs never clash
    port = os.environ.get("SINKLM_MASTER_PORT") or (str(_free_port()) if env.world_size == 1 else "29500")
    defaults.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_precision(requested: str, device: torch.device) -> str:
    """``train.precision`` for this device: ``auto`` -> bf16 / fp16 on GPUs, fp32 (only) on CPU."""
    if device.type != "cuda":
        if requested not in ("auto", "fp32"):
            raise ConfigError(f"train.precision={requested} needs a GPU; this run is on CPU (use fp32)")
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def shutdown() -> None:
    """Leave the process group cleanly: without it, gloo's worker threads are torn down during
    interpreter exit and a rank can abort ("terminate called without an active exception"),
    turning a finished run into a failed one for the launcher."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# the DeepSpeed JSON and engine
# --------------------------------------------------------------------------------------------


def deepspeed_json_path(name: str) -> Path:
    candidates = [Path(name), CONFIG_DIR / "deepspeed" / name, CONFIG_DIR / "deepspeed" / f"{name}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in (CONFIG_DIR / "deepspeed").glob("*.json"))
    raise ConfigError(f"deepspeed.config: no DeepSpeed config {name!r}; available: {', '.join(available)} or a path")


def deepspeed_config(run: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The JSON handed to ``deepspeed.initialize``: the file, the overrides, then our batch,
    clipping and precision settings (which win)."""
    path = deepspeed_json_path(run.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    ds = deep_merge(ds, run.deepspeed.overrides)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{path}: remove the {key!r} block: sinklm builds AdamW and the lr schedule itself "
                f"(set them in the `optimizer` section)"
            )
    zero = ds.setdefault("zero_optimization", {})
    if run.deepspeed.zero_stage is not None:
        zero["stage"] = run.deepspeed.zero_stage
    zero.setdefault("stage", 0)
    micro, gas = run.train.micro_batch_size, gradient_accumulation_steps(run, world_size)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = micro * gas * world_size
    ds["gradient_clipping"] = run.optimizer.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    if precision == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
        ds["fp16"].setdefault("initial_scale_power", 16)
    ds.setdefault("steps_per_print", 10**12)  # our own logger prints
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def gradient_accumulation_steps(run: RunConfig, world_size: int) -> int:
    if run.train.global_batch_size is None:
        return run.train.grad_accum_steps
    per_step = run.train.micro_batch_size * world_size
    if run.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={run.train.global_batch_size} is not a multiple of "
            f"micro_batch_size x world size = {run.train.micro_batch_size} x {world_size}"
        )
    return run.train.global_batch_size // per_step


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` on an existing process group: returns (engine, its optimizer)."""
    import deepspeed

    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    return engine, ds_optimizer
