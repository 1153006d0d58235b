"""``sinklm train``: pretrain a GPT-NeoX variant with DeepSpeed (one process, torchrun, or deepspeed).

    sinklm train configs/experiments/quickstart-vanilla.yaml --train.max_steps=20
    torchrun --nproc_per_node 2 --no-python sinklm train configs/experiments/quickstart-sink1.yaml
    deepspeed --num_gpus 8 --no_python --no_local_rank sinklm train configs/experiments/paper-160m-sink1.yaml

Launch the installed ``sinklm`` entry point (as ``launch/*.sh`` do) rather than ``-m pretrain.train``:
``python -m`` puts the working directory first on ``sys.path``, where a user's own ``data.py``
would shadow our ``data`` package. ``sinklm train`` also hands the trainer its probe function
(:data:`pretrain.plan.ProbeFn`); this module alone has none, so it refuses ``probe.every > 0``.

Flow: resolve + validate the config, the data and any checkpoint to resume (:mod:`pretrain.plan`,
all before touching DeepSpeed, so bad input fails in a second) -> build the model (optionally from ``train.init_from``)
-> ``deepspeed.initialize`` -> resume -> train, validating and checkpointing on schedule.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from data.loader import SampleLoader
from data.settings import ArgumentParser, split_cli_overrides
from data.shards import DataError
from data.verify import split_identity
from pretrain.checkpoints import load_init_for_training
from pretrain.checkpoints.init_format import start_step_from_init
from pretrain.checkpoints.training import (
    ResumePoint,
    code_version,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.config import ConfigError
from pretrain.distributed import deepspeed_config, init_distributed, initialize_engine, shutdown
from pretrain.metrics import MetricsLogger, StepStats, guess_peak_tflops, truncate_metrics
from pretrain.model import GPTNeoX
from pretrain.optim import WarmupCosine, build_optimizer, set_lr
from pretrain.plan import Plan, ProbeFn, check_probe, plan_run, pythia_loader
from pretrain.train_config import resolve_config

__all__ = ["Plan", "ProbeFn", "Trainer", "build_parser", "main", "plan_run"]

CONFIG_FILE = "config.yaml"
DEEPSPEED_FILE = "deepspeed.json"


class Trainer:
    """Owns the engine, the loaders and the loop: ``setup()`` -> ``fit()``."""

    def __init__(self, plan: Plan, probe: ProbeFn | None = None):
        check_probe(plan.run, probe)
        self.plan = plan
        self.probe_fn = probe
        self.run = plan.run
        self.probe_every = plan.run.probe.interval(probe is not None and plan.has_validation)
        self.env = plan.env
        self.run_dir = Path(self.run.train.run_dir)
        self.step = 0
        self.tokens_seen = 0
        self.stop_requested = False
        self.stop_signal = ""  # "SIGTERM" or "SIGINT" (Ctrl-C) once one asked the run to save and stop
        self.log: MetricsLogger | None = None

    # ---- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        run, env = self.run, self.env
        init_distributed(env)
        cfg = run.model
        torch.manual_seed(run.train.seed)  # identical initial weights on every rank
        model = GPTNeoX(cfg)
        if run.train.init_from:
            model.load_state_dict(load_init_for_training(run.train.init_from, cfg), strict=True)
        optimizer = build_optimizer(model, run.optimizer, env.device.type)
        self.schedule = WarmupCosine.from_config(run.optimizer, run.train.max_steps)
        self.ds_config = deepspeed_config(run, env.world_size, self.plan.precision)
        self.engine, self.optimizer = initialize_engine(model, optimizer, self.ds_config)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        if run.train.compile_on(env.device.type):
            self.engine.compile()  # compiles the module in place: checkpoint keys stay the same

        def loader(folder: str, split: str, **order) -> SampleLoader:
            # train and validation cut samples identically; only the order differs
            return SampleLoader(
                folder,
                split,
                seq_len=run.seq_len,
                micro_batch_size=run.train.micro_batch_size,
                sink_ids=cfg.sink_token_ids,
                rank=env.rank,
                world_size=env.world_size,
                text_tokens=run.text_tokens,
                model_vocab_size=cfg.padded_vocab_size,
                vocab_size=cfg.vocab_size,  # the text vocabulary of a Megatron dataset, which names none
                **order,
            )

        if run.data.format == "pythia":  # Pythia's batches from data.start_step; the step counter starts there
            self.loader, self.step = pythia_loader(run, env.rank, env.world_size), run.data.start_step or 0
        else:
            self.loader = loader(run.data.path, run.data.train_split, seed=run.data.seed, shuffle=run.data.shuffle)
        has_val = self.plan.has_validation
        self.val_loader = loader(run.validation_dir, run.data.validation_split, shuffle=False) if has_val else None
        if self.plan.resume is not None:
            self._resume(self.plan.resume)
        if env.is_main:
            self._start_run_folder()
        signal.signal(signal.SIGTERM, self._on_stop_signal)  # schedulers preempt with SIGTERM: save, then exit
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job keeps ignoring Ctrl-C
            signal.signal(signal.SIGINT, self._on_stop_signal)  # Ctrl-C: the same; a second one aborts at once

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
        if "indexed" in self.plan.manifest:  # a Megatron dataset of documents names no tokenizer: say what is assumed
            info = self.plan.manifest["indexed"]
            self.log.message(
                f"data: Megatron indexed dataset {info['index']} ({info['parts']} .bin part(s), {info['tokens']:,} tokens, "
                f"{info['documents']:,} documents) read as one token stream; ids taken as the bundled Pythia "
                f"tokenizer's (GPT-NeoX-20B, model.vocab_size={cfg.vocab_size}), all checked < {cfg.vocab_size}"
            )

    def _on_stop_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_requested and signum == signal.SIGINT:
            print(f"sinklm train: second {name}: aborting without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if signum == signal.SIGINT and self.env.is_main:
            print(f"sinklm train: {name}: saving after this step, then exiting (again to abort)", file=sys.stderr, flush=True)
        self.stop_requested, self.stop_signal = True, name

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
                loss = self.engine(input_ids, labels=labels).loss  # chunked: no (B, L, V) logits
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
            if self.probe_every and self.step % self.probe_every == 0 and not done:
                self.probe()
            if (run.checkpoint.every and self.step % run.checkpoint.every == 0) or stop:
                self.save()
                last_saved = self.step
            if stop:
                if self.log:
                    self.log.message(f"{self.stop_signal or 'a stop signal on another rank'}: saved step {self.step}; exiting (rerun the same command to resume)")
                break
        else:
            self.validate()
            if self.probe_every:
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
                self.log.message(f"no {self.run.data.validation_split!r} split in {self.run.validation_dir or 'data.validation_path (unset)'}: validation skipped")
            return None
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # summed NLL, target count
        batches = min(self.run.train.eval_batches, len(self.val_loader))
        for index, batch in enumerate(self.val_loader.iter_epoch(0)):
            if index >= batches:
                break
            input_ids = batch["input_ids"].to(self.env.device)
            labels = batch["labels"].to(self.env.device)
            count = (labels != -100).sum()
            total[0] += self.engine(input_ids, labels=labels).loss.double() * count
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
        """The probe function (given by the caller) on the start of the validation split, on rank 0;
        under ZeRO-3 every rank runs it (its forward passes gather the parameters collectively).
        Rank 0 logs the values with the tokens seen and the probe's seconds."""
        if self.zero_stage != 3 and not self.env.is_main:
            return
        probe = self.run.probe
        began = time.perf_counter()
        text = torch.from_numpy(self.run.validation_text(probe.num_tokens))
        self.engine.eval()
        values = self.probe_fn(self.engine.module, text, probe)
        self.engine.train()
        if self.log:
            seconds = round(time.perf_counter() - began, 3)
            self.log.log_eval("probe", self.step, {**values, "tokens_seen": self.tokens_seen, "seconds": seconds})

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
            "train_data": split_identity(self.plan.manifest, run.data.train_split) if "splits" in self.plan.manifest else None,
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
    parser = ArgumentParser(
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


def main(argv: list[str] | None = None, probe: ProbeFn | None = None) -> int:
    """``sinklm train``; ``probe`` evaluates the model every ``probe.every`` steps (see ProbeFn)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_cli_overrides(argv)
        args = build_parser().parse_args(rest)
        if args.resume is not None and args.fresh:
            raise ConfigError("--resume and --fresh contradict each other")
        if args.resume is not None:
            overrides.append(f"train.resume={args.resume}" if args.resume else "train.resume=")
        if args.fresh:
            overrides.append("train.resume=never")
        run = resolve_config(args.configs, overrides)
        if run.data.format == "pythia":  # continuing converted Pythia weights: their recorded stepN is the start step
            run.data.start_step, note = start_step_from_init(run.train.init_from, run.data.start_step)
            if note:
                try:
                    run.validate()  # the derived step against train.max_steps
                except ConfigError as err:
                    raise ConfigError(f"{err} ({note})") from None
                if os.environ.get("RANK", "0") == "0":
                    print(f"sinklm train: {note}", file=sys.stderr, flush=True)
        if run.train.resume == "":
            run.train.resume = run.train.run_dir  # bare --resume: this run folder, which must have a checkpoint
        if args.print_config:
            print(yaml.safe_dump(run.to_dict(), sort_keys=False), end="")
            return 0
        plan = plan_run(run, probe)
    except (ConfigError, DataError) as err:
        print(f"sinklm train: error: {err}", file=sys.stderr)
        return 2
    trainer = Trainer(plan, probe)
    try:
        trainer.setup()
    except (ConfigError, DataError) as err:
        print(f"sinklm train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing to save yet
        print("sinklm train: interrupted (SIGINT) during start-up, before any step: nothing to save", file=sys.stderr)
        return 130
    code = trainer.fit()
    shutdown()
    return 130 if trainer.stop_signal == "SIGINT" else code


if __name__ == "__main__":
    raise SystemExit(main())
