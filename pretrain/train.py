"""``sinklm train``: pretrain a GPT-NeoX variant with DeepSpeed (one process, torchrun, or deepspeed).

    sinklm train configs/experiments/quickstart-vanilla.yaml --train.max_steps=20
    torchrun --nproc_per_node 2 -m pretrain.train configs/experiments/quickstart-sink1.yaml
    deepspeed --num_gpus 8 --module pretrain.train configs/experiments/paper-160m-sink1.yaml

Flow: resolve + validate the config, the data and any checkpoint to resume (all before touching
DeepSpeed, so bad input fails in a second) -> build the model (optionally from ``train.init_from``)
-> ``deepspeed.initialize`` -> resume -> train, validating and checkpointing on schedule.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from data.shards import DataError, read_manifest
from pretrain.checkpoint import (
    ResumePoint,
    check_same_shape,
    code_version,
    find_resume_point,
    load_checkpoint,
    read_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.config import ConfigError
from pretrain.metrics import MetricsLogger, StepStats, guess_peak_tflops, truncate_metrics
from pretrain.model import GPTNeoX, lm_loss
from pretrain.optim import WarmupCosine, build_optimizer, set_lr
from pretrain.train_config import RunConfig, deepspeed_config, gradient_accumulation_steps, resolve_config

CONFIG_FILE = "config.yaml"
DEEPSPEED_FILE = "deepspeed.json"

# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


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
    if device.type != "cuda":
        if requested not in ("auto", "fp32"):
            raise ConfigError(f"train.precision={requested} needs a GPU; this run is on CPU (use fp32)")
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


# --------------------------------------------------------------------------------------------
# checks before anything runs
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything decided before DeepSpeed starts."""

    run: RunConfig
    env: DistEnv
    precision: str
    grad_accum: int
    manifest: dict[str, Any]
    resume: ResumePoint | None
    has_validation: bool


def _resume_point(run: RunConfig) -> ResumePoint | None:
    mode, run_dir = run.train.resume, Path(run.train.run_dir)
    if mode == "never":
        if read_latest(run_dir):
            raise ConfigError(
                f"train.resume=never but {run_dir} already holds checkpoints (latest: {read_latest(run_dir)}); "
                "choose another train.run_dir or resume"
            )
        return None
    if mode == "auto":
        return find_resume_point(run_dir) if run_dir.is_dir() else None
    point = find_resume_point(mode)
    if point is None:
        raise ConfigError(f"train.resume: {mode} holds no complete checkpoint (no `latest` file)")
    return point


def _check_resume_compatible(run: RunConfig, point: ResumePoint, manifest: dict[str, Any], world_size: int) -> None:
    where = str(point.load_dir / point.tag)
    saved = point.state.get("config", {})
    check_same_shape(saved.get("model", {}), run.model, where)
    saved_tok = point.state.get("tokenizer", {}).get("fingerprint")
    if saved_tok and saved_tok != manifest["tokenizer"].get("fingerprint"):
        raise ConfigError(
            f"{where} was trained on data tokenized with fingerprint {saved_tok}, but {run.data.path} uses "
            f"{manifest['tokenizer'].get('fingerprint')}"
        )
    saved_text = point.state.get("text_tokens")
    if saved_text is not None and saved_text != run.text_tokens:
        raise ConfigError(f"{where} was trained with {saved_text} text tokens per sample; this config has {run.text_tokens}")
    saved_data = saved.get("data", {})
    for key in ("seed", "shuffle", "train_split"):
        if key in saved_data and saved_data[key] != getattr(run.data, key):
            raise ConfigError(f"{where} was trained with data.{key}={saved_data[key]!r}; this config has {getattr(run.data, key)!r}")
    saved_world = point.state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise ConfigError(
            f"{where} was written by {saved_world} process(es); this run has {world_size}. Resume with the "
            f"same number of processes (ZeRO shards and each rank's data position depend on it)"
        )


def plan_run(run: RunConfig) -> Plan:
    """Validate data, tokenizer, vocabulary and resume folder; raise ConfigError / DataError."""
    env = read_dist_env()
    data_dir = Path(run.data.path)
    if not data_dir.exists():
        raise ConfigError(
            f"data.path: {data_dir} does not exist; prepare it first, e.g. `sinklm data prepare --out {data_dir}`"
        )
    manifest = read_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab != run.model.vocab_size:
        raise ConfigError(
            f"vocabulary mismatch: {data_dir}/manifest.json was tokenized with a {vocab}-token vocabulary "
            f"({manifest['tokenizer'].get('spec')}) but model.vocab_size is {run.model.vocab_size}"
        )
    splits = manifest["splits"]
    if run.data.train_split not in splits:
        raise ConfigError(f"data.train_split: {data_dir} has no split {run.data.train_split!r} (has {', '.join(splits)})")
    has_validation = run.data.validation_split in splits
    if run.probe.every and not has_validation:
        raise ConfigError(f"probe.every: the probe streams the validation split, but {data_dir} has no {run.data.validation_split!r}")
    if run.probe.every:
        try:
            import inference.perplexity  # noqa: F401  (only the probe needs it)
        except ImportError as err:
            raise ConfigError(f"probe.every={run.probe.every} needs inference.perplexity ({err})") from None
    if run.train.init_from:
        init = Path(run.train.init_from)
        from pretrain.init_checkpoint import is_init_checkpoint

        if not is_init_checkpoint(init):
            raise ConfigError(f"train.init_from: {init} is not an initial checkpoint (needs model.yaml + model.safetensors)")
    precision = resolve_precision(run.train.precision, env.device)
    grad_accum = gradient_accumulation_steps(run, env.world_size)
    point = _resume_point(run)
    if point is not None:
        _check_resume_compatible(run, point, manifest, env.world_size)
    return Plan(run, env, precision, grad_accum, manifest, point, has_validation)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class Trainer:
    """Owns the engine, the loaders and the loop: ``setup()`` -> ``fit()``."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.run = plan.run
        self.env = plan.env
        self.run_dir = Path(self.run.train.run_dir)
        self.step = 0
        self.tokens_seen = 0
        self.stop_requested = False
        self.log: MetricsLogger | None = None

    # ---- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        import deepspeed

        from data.loader import SampleLoader

        run, env = self.run, self.env
        init_distributed(env)
        cfg = run.model
        torch.manual_seed(run.train.seed)  # identical initial weights on every rank
        model = GPTNeoX(cfg)
        if run.train.init_from:
            from pretrain.init_checkpoint import load_init_checkpoint

            init_cfg, state = load_init_checkpoint(run.train.init_from)
            check_same_shape(init_cfg.to_dict(), cfg, f"train.init_from {run.train.init_from}")
            model.load_state_dict(state, strict=True)
        optimizer = build_optimizer(model, run.optimizer, env.device.type)
        self.schedule = WarmupCosine.from_config(run.optimizer, run.train.max_steps)
        self.ds_config = deepspeed_config(run, env.world_size, self.plan.precision)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        if run.train.compile:
            self.engine.compile()  # compiles the module in place: checkpoint keys stay the same
        def loader(split: str, **order) -> SampleLoader:
            # train and validation cut samples identically; only the order differs
            return SampleLoader(
                run.data.path,
                split,
                seq_len=run.seq_len,
                micro_batch_size=run.train.micro_batch_size,
                sink_ids=cfg.sink_token_ids,
                rank=env.rank,
                world_size=env.world_size,
                text_tokens=run.text_tokens,
                model_vocab_size=cfg.padded_vocab_size,
                **order,
            )

        self.loader = loader(run.data.train_split, seed=run.data.seed, shuffle=run.data.shuffle)
        self.val_loader = loader(run.data.validation_split, shuffle=False) if self.plan.has_validation else None
        if self.plan.resume is not None:
            self._resume(self.plan.resume)
        if env.is_main:
            self._start_run_folder()
        signal.signal(signal.SIGTERM, self._on_sigterm)  # schedulers preempt with SIGTERM: save, then exit

    def _resume(self, point: ResumePoint) -> None:
        client = load_checkpoint(self.engine, point)
        self.step = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        self.loader.load_state_dict(client["rank_state"]["loader"])
        set_rng_state(client["rank_state"]["rng"])
        if self.env.is_main:
            print(f"resumed from {point.load_dir / point.tag} at step {self.step} ({self.tokens_seen:,} tokens seen)", flush=True)

    def _start_run_folder(self) -> None:
        run = self.run
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resolved = run.to_dict()
        text = yaml.safe_dump(resolved, sort_keys=False)
        print(f"# resolved config ({self.run_dir / CONFIG_FILE})\n{text}", flush=True)
        (self.run_dir / CONFIG_FILE).write_text(text)
        (self.run_dir / DEEPSPEED_FILE).write_text(yaml.safe_dump(self.ds_config, sort_keys=False))
        truncate_metrics(self.run_dir, self.step)  # drop records a killed run wrote past its checkpoint
        cfg = run.model
        peak = run.logging.peak_tflops
        if peak is None and self.env.device.type == "cuda":
            peak = guess_peak_tflops(torch.cuda.get_device_name(self.env.device), self.plan.precision)
        peak_flops = peak * 1e12 * self.env.world_size if peak else None
        self.log = MetricsLogger(
            self.run_dir,
            run.logging,
            run.wandb,
            resolved,
            max_steps=run.train.max_steps,
            start_step=self.step,
            flops_per_token=cfg.flops_per_token(run.sample_len),
            peak_flops=peak_flops,
            title=f"{self.run_dir.name} ({cfg.name}, {cfg.variant})",
        )
        params = cfg.num_params()  # from the config: ZeRO-3 ranks hold only shards
        self.log.message(
            f"model {cfg.name} {cfg.variant}: {params / 1e6:.2f}M parameters | {self.env.world_size} rank(s) on "
            f"{self.env.device.type} | ZeRO-{self.zero_stage} {self.plan.precision} | micro-batch "
            f"{run.train.micro_batch_size} x {self.plan.grad_accum} accumulation x {self.env.world_size} = "
            f"{self.ds_config['train_batch_size']} samples of {run.sample_len} tokens "
            f"({cfg.sink_tokens} sink + {run.text_tokens} text) per step"
        )

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    # ---- loop --------------------------------------------------------------------------------

    def fit(self) -> int:
        run = self.run
        max_steps = run.train.max_steps
        if self.step >= max_steps:
            if self.log:
                self.log.message(f"nothing to do: the checkpoint is at step {self.step} >= train.max_steps={max_steps}")
            return 0
        self.engine.train()
        k = run.model.sink_tokens
        tokens_per_micro = run.train.micro_batch_size * run.sample_len
        last_saved = self.step
        while self.step < max_steps:
            t0 = time.perf_counter()
            lr = self.schedule(self.step)
            set_lr(self.engine.optimizer, lr)
            loss_sum = torch.zeros((), device=self.env.device)
            text_crc = 0
            grad_norm = None
            for micro in range(self.plan.grad_accum):
                batch = next(self.loader)
                text_crc = zlib.crc32(batch["input_ids"][:, k:].numpy().tobytes(), text_crc)
                input_ids = batch["input_ids"].to(self.env.device, non_blocking=True)
                labels = batch["labels"].to(self.env.device, non_blocking=True)
                logits = self.engine(input_ids).logits  # (B, L, V)
                loss = lm_loss(logits, labels)
                self.engine.backward(loss)
                loss_sum += loss.detach()
                if micro == self.plan.grad_accum - 1 and self._needs_own_grad_norm():
                    grad_norm = self._grad_norm()
                self.engine.step()
            if grad_norm is None:
                norm = self.engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else None
            self.step += 1
            self.tokens_seen += tokens_per_micro * self.plan.grad_accum * self.env.world_size
            losses, crcs, stop = self._gather_step(loss_sum.item() / self.plan.grad_accum, text_crc)
            if self.log:
                self.log.log_step(
                    StepStats(
                        step=self.step,
                        loss=sum(losses) / len(losses),
                        lr=lr,
                        grad_norm=grad_norm,
                        tokens_seen=self.tokens_seen,
                        step_time=time.perf_counter() - t0,
                        tokens_per_step=tokens_per_micro * self.plan.grad_accum * self.env.world_size,
                        text_crc=crcs,
                        rank_losses=losses,
                    )
                )
            done = self.step >= max_steps
            if run.train.eval_every and self.step % run.train.eval_every == 0 and not done:
                self.validate()
            if run.probe.every and self.step % run.probe.every == 0 and not done:
                self.probe()
            if (run.checkpoint.every and self.step % run.checkpoint.every == 0) or stop:
                self.save()
                last_saved = self.step
            if stop:
                if self.log:
                    self.log.message(f"SIGTERM: saved step {self.step}; exiting (rerun the same command to resume)")
                break
        else:
            self.validate()
            if run.probe.every:
                self.probe()
            if run.checkpoint.save_at_end and last_saved != self.step:
                self.save()
        if self.log:
            self.log.plot()
            self.log.message(f"done: step {self.step}, {self.tokens_seen:,} tokens in {self.log.elapsed():.1f} s")
            self.log.close()
        return 0

    def _needs_own_grad_norm(self) -> bool:
        # DeepSpeed reports the norm from its ZeRO / mixed-precision optimizers, not for plain fp32 stage 0
        return self.zero_stage == 0 and self.plan.precision == "fp32"

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0

    def _gather_step(self, loss: float, text_crc: int) -> tuple[list[float], list[int], bool]:
        """One small all-gather per step: every rank's loss, its batch CRC (proof of disjoint data)
        and whether any rank got SIGTERM (so all stop at the same step)."""
        import torch.distributed as dist

        mine = torch.tensor([loss, float(text_crc), float(self.stop_requested)], dtype=torch.float64, device=self.env.device)
        if self.env.world_size == 1:
            rows = [mine]
        else:
            rows = [torch.empty_like(mine) for _ in range(self.env.world_size)]
            dist.all_gather(rows, mine)
        values = torch.stack(rows).cpu().tolist()
        return [v[0] for v in values], [int(v[1]) for v in values], any(v[2] > 0 for v in values)

    # ---- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean next-token loss over the first ``eval_batches`` micro-batches of every rank's share
        of the validation split (the same samples every time)."""
        if self.val_loader is None:
            if self.log:
                self.log.message(f"no {self.run.data.validation_split!r} split in {self.run.data.path}: validation skipped")
            return None
        import torch.distributed as dist

        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # summed NLL, target count
        batches = min(self.run.train.eval_batches, len(self.val_loader))
        for index, batch in enumerate(self.val_loader.iter_epoch(0)):
            if index >= batches:
                break
            input_ids = batch["input_ids"].to(self.env.device)
            labels = batch["labels"].to(self.env.device)
            logits = self.engine(input_ids).logits
            count = (labels != -100).sum()
            total[0] += lm_loss(logits, labels).double() * count
            total[1] += count
        if self.env.world_size > 1:
            dist.all_reduce(total)
        self.engine.train()
        loss = float(total[0] / total[1])
        if self.log:
            self.log.log_eval("val", self.step, {"loss": loss, "ppl": float(torch.exp(torch.tensor(loss))), "tokens": int(total[1])})
        return loss

    @torch.no_grad()
    def probe(self) -> None:
        """Streaming perplexity of the start of the validation split under a sink + window cache.
        Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 logs."""
        from data.shards import TokenStream
        from inference.perplexity import streaming_nll

        probe = self.run.probe
        # streaming_nll prepends the model's sink ids itself and scores every text token after the first
        text = torch.from_numpy(TokenStream(self.run.data.path, self.run.data.validation_split)[: probe.num_tokens])
        self.engine.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # start_size != sink_tokens is a deliberate probe setting
            nll = streaming_nll(self.engine.module, text, probe.start_size, probe.recent_size, mode="fast", progress=False)
        self.engine.train()
        loss = float(nll.double().mean())
        if self.log:
            self.log.log_eval(
                "probe",
                self.step,
                {"loss": loss, "ppl": float(torch.exp(torch.tensor(loss))), "start_size": probe.start_size, "recent_size": probe.recent_size},
            )

    # ---- checkpoints -------------------------------------------------------------------------

    def save(self) -> None:
        run = self.run
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "text_tokens": run.text_tokens,
            "world_size": self.env.world_size,
            "variant": run.model.variant,
            "sink_token_ids": run.model.sink_token_ids,
            "tokenizer": dict(self.plan.manifest["tokenizer"]),
            "code_version": code_version(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": run.to_dict(),
        }
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state()}
        t0 = time.perf_counter()
        path = save_checkpoint(self.engine, self.run_dir, self.step, meta, rank_state, run.checkpoint.keep_last)
        if self.log:
            self.log.message(f"saved {path} in {time.perf_counter() - t0:.1f} s")
            self.log.plot()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinklm train",
        description="Pretrain a GPT-NeoX model (vanilla, softmax1, sink_logit or sink tokens) with DeepSpeed. "
        "Config files are merged in order; --section.key=value overrides any field "
        "(e.g. --train.max_steps=20 --optimizer.lr=3e-4 --model.attention=softmax1).",
        epilog="Sections: model data train optimizer checkpoint logging wandb deepspeed probe "
        "(see pretrain/train_config.py). Runs resume automatically from <train.run_dir>/latest.",
    )
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML files, e.g. configs/experiments/quickstart-vanilla.yaml")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="PATH",
        help="resume from PATH (a run folder or its global_stepN); without PATH: from train.run_dir, "
        "failing if it has no checkpoint",
    )
    parser.add_argument("--fresh", action="store_true", help="never resume (error if train.run_dir has checkpoints)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--section.key=value`` / ``--section.key value`` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name:
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv):
                overrides.append(f"{name}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"override {arg} has no value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        if args.resume is not None and args.fresh:
            raise ConfigError("--resume and --fresh contradict each other")
        if args.resume is not None:
            overrides.append(f"train.resume={args.resume}" if args.resume else "train.resume=")
        if args.fresh:
            overrides.append("train.resume=never")
        run = resolve_config(args.configs, overrides)
        if run.train.resume == "":
            run.train.resume = run.train.run_dir  # bare --resume: this run folder, which must have a checkpoint
        if args.print_config:
            print(yaml.safe_dump(run.to_dict(), sort_keys=False), end="")
            return 0
        plan = plan_run(run)
    except (ConfigError, DataError) as err:
        print(f"sinklm train: error: {err}", file=sys.stderr)
        return 2
    trainer = Trainer(plan)
    try:
        trainer.setup()
    except (ConfigError, DataError) as err:
        print(f"sinklm train: error: {err}", file=sys.stderr)
        return 2
    code = trainer.fit()
    _shutdown_distributed()
    return code


def _shutdown_distributed() -> None:
    """Leave the process group cleanly: without it, gloo's worker threads are torn down during
    interpreter exit and a rank can abort ("terminate called without an active exception"),
    turning a finished run into a failed one for the launcher."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
