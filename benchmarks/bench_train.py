"""Training throughput: sinklm's GPTNeoX vs Hugging Face GPTNeoXForCausalLM, and variant overheads.

Every configuration does the same work per step: forward on (batch, seq) tokens, next-token
cross-entropy over the padded vocabulary, backward, AdamW step (betas 0.9/0.95, wd 0.1), in the
same process, interleaved round by round so a busy machine slows every contender alike. Reports
the median tokens/s per configuration, the ratio ours / HF, and softmax1 / sink_logit vs vanilla.
Our model's loss is the chunked one training uses (``model(ids, labels=...)``, no full logits);
``--full-logits`` adds ``sinklm softmax full-logits`` (the old path: ``lm_loss`` of the logits)
for the ratio between the two, and with ``--deepspeed`` both run inside the DeepSpeed engine too.

    # the quickstart's shape (tiny, 8 x 256, fp32, ZeRO-0), old loss vs new, back to back:
    python benchmarks/bench_train.py --shape tiny --seq 256 --batch 8 --variants softmax --no-hf \
        --full-logits --deepspeed --deepspeed-stages 0 --steps 10

    python benchmarks/bench_train.py                                  # CPU: tiny and pythia-14m
    python benchmarks/bench_train.py --device cuda --shape pythia-160m --dtype bf16 --seq 2048 --batch 8
    python benchmarks/bench_train.py --deepspeed                      # + our model inside a DeepSpeed engine (CPU)

The GPU mode needs no DeepSpeed: bf16 autocast over fp32 weights with fused AdamW, which is the
arithmetic DeepSpeed's bf16 mode runs. MFU = tokens/s x training FLOPs per token
(:meth:`ModelConfig.flops_per_token`) / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.config import ModelConfig  # noqa: E402
from pretrain.metrics import guess_peak_tflops  # noqa: E402
from pretrain.model import GPTNeoX, lm_loss  # noqa: E402
from pretrain.optim import param_groups  # noqa: E402


@dataclass
class Contender:
    name: str
    shape: str
    step: callable  # runs one training step
    tokens_per_step: int
    flops_per_token: float
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per step (all threads)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / statistics.median(self.times)


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, **fused)


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def loss_of(forward, inputs: torch.Tensor, labels: torch.Tensor, full_logits: bool) -> torch.Tensor:
    """Training's loss (chunked through the head), or the old full-logits one."""
    if full_logits:
        return lm_loss(forward(inputs).logits, labels)
    return forward(inputs, labels=labels).loss


def ours(cfg: ModelConfig, batch: torch.Tensor, device: torch.device, dtype: str, compile_model: bool, full_logits: bool = False):
    model = GPTNeoX(cfg).to(device).train()
    forward = torch.compile(model) if compile_model else model
    opt = make_optimizer(model, device)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with autocast(device, dtype):
            loss = loss_of(forward, inputs, labels, full_logits)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def huggingface(cfg: ModelConfig, batch: torch.Tensor, device: torch.device, dtype: str, compile_model: bool):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pretrain.hf_keymap import to_hf_config

    hf_cfg = GPTNeoXConfig(**to_hf_config(cfg))
    hf_cfg._attn_implementation = "sdpa"
    model = GPTNeoXForCausalLM(hf_cfg).to(device).train()
    forward = torch.compile(model) if compile_model else model
    opt = make_optimizer(model, device)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with autocast(device, dtype):
            logits = forward(input_ids=inputs, use_cache=False).logits
            loss = lm_loss(logits, labels)  # the same loss code for both
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_deepspeed(cfg: ModelConfig, batch: torch.Tensor, stage: int, full_logits: bool = False):
    """Our model inside a DeepSpeed engine (world of one, fp32 on CPU): the `sinklm train` path."""
    import os

    import deepspeed

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29593").items():
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    model = GPTNeoX(cfg)
    opt = make_optimizer(model, torch.device("cpu"))
    config = {
        "train_micro_batch_size_per_gpu": batch.shape[0],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**12,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        loss = loss_of(engine, inputs, labels, full_logits)
        engine.backward(loss)
        engine.step()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", nargs="+", default=None, help="model presets (default: tiny pythia-14m on CPU, pythia-160m on GPU)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default: 128 on CPU, 2048 on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: 4 on CPU, 8 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender per round (default: 3 CPU, 10 GPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--variants", nargs="+", default=["softmax", "softmax1", "sink_logit"], help="our attention kinds")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face contender")
    parser.add_argument("--deepspeed", action="store_true", help="also time our model inside a DeepSpeed engine (CPU)")
    parser.add_argument("--deepspeed-stages", type=int, nargs="+", default=[1], help="ZeRO stages for --deepspeed (default: 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--full-logits", action="store_true", help="also time our vanilla model with the old full-logits loss")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_train: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    shapes = args.shape or (["pythia-160m"] if gpu else ["tiny", "pythia-14m"])
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    seq = args.seq or (2048 if gpu else 128)
    batch_size = args.batch or (8 if gpu else 4)
    steps = args.steps or (10 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak_tflops = guess_peak_tflops(torch.cuda.get_device_name(device), dtype) if gpu else None

    contenders: list[Contender] = []
    for shape in shapes:
        base = ModelConfig.from_preset(shape, max_seq_len=max(seq, ModelConfig.from_preset(shape).max_seq_len))
        torch.manual_seed(0)
        batch = torch.randint(0, base.vocab_size, (batch_size, seq + 1), device=device)
        tokens = batch_size * seq
        for kind in args.variants:
            cfg = ModelConfig.from_dict({**base.to_dict(), "attention": kind})
            contenders.append(Contender(f"sinklm {kind}", shape, ours(cfg, batch, device, dtype, args.compile), tokens, cfg.flops_per_token(seq)))
        if args.full_logits:
            step = ours(base, batch, device, dtype, args.compile, full_logits=True)
            contenders.append(Contender("sinklm softmax full-logits", shape, step, tokens, base.flops_per_token(seq)))
        if not args.no_hf:
            contenders.append(Contender("HF GPTNeoX", shape, huggingface(base, batch, device, dtype, args.compile), tokens, base.flops_per_token(seq)))
        if args.deepspeed and not gpu:
            for stage in args.deepspeed_stages:
                step = ours_deepspeed(base, batch.cpu(), stage=stage)
                contenders.append(Contender(f"sinklm softmax +DS ZeRO-{stage}", shape, step, tokens, base.flops_per_token(seq)))
                if args.full_logits:
                    step = ours_deepspeed(base, batch.cpu(), stage=stage, full_logits=True)
                    contenders.append(Contender(f"sinklm softmax full-logits +DS ZeRO-{stage}", shape, step, tokens, base.flops_per_token(seq)))

    print(
        f"# {device.type} {torch.cuda.get_device_name(device) if gpu else ''} torch {torch.__version__} threads "
        f"{torch.get_num_threads()} | batch {batch_size} x seq {seq} | {dtype} | {args.rounds} rounds x {steps} steps",
        flush=True,
    )
    for contender in contenders:
        for _ in range(args.warmup):
            contender.step()
        sync(device)
    for _ in range(args.rounds):
        for contender in contenders:
            for _ in range(steps):
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                contender.step()
                sync(device)
                contender.times.append(time.perf_counter() - t0)
                contender.cpu_times.append(time.process_time() - c0)

    results = []
    print(f"{'shape':<12} {'model':<40} {'tokens/s':>10} {'ms/step':>9} {'cpu ms':>9} {'vs HF':>7} {'vs vanilla':>10}" + ("   MFU" if peak_tflops else ""))
    for shape in shapes:
        group = {c.name: c for c in contenders if c.shape == shape}
        hf = group.get("HF GPTNeoX")
        vanilla = group.get("sinklm softmax")
        for c in group.values():
            tps = c.tokens_per_second
            row = {
                "shape": shape,
                "model": c.name,
                "tokens_per_s": round(tps, 1),
                "ms_per_step": round(1000 * statistics.median(c.times), 2),
                # CPU seconds the process spent per step: on a shared machine, steadier than wall time
                "cpu_ms_per_step": round(1000 * statistics.median(c.cpu_times), 2),
                "vs_hf": round(tps / hf.tokens_per_second, 3) if hf else None,
                "vs_vanilla": round(vanilla.tokens_per_second / tps, 3) if vanilla and c.name.startswith("sinklm") else None,
                "mfu": round(tps * c.flops_per_token / (peak_tflops * 1e12), 4) if peak_tflops else None,
            }
            results.append(row)
            vs_hf = f"{row['vs_hf']:.2f}x" if row["vs_hf"] else ""
            overhead = f"{row['vs_vanilla']:.3f}" if row["vs_vanilla"] else ""
            mfu = f" {100 * row['mfu']:5.1f}%" if row["mfu"] is not None else ""
            print(f"{shape:<12} {c.name:<40} {tps:>10,.0f} {row['ms_per_step']:>9.1f} {row['cpu_ms_per_step']:>9.1f} {vs_hf:>7} {overhead:>10}{mfu}")
    print("(vs HF: our tokens/s / HF's, >1 = faster; vs vanilla: time per step / vanilla's, >1 = overhead)")
    if args.json:
        args.json.write_text(json.dumps({"device": device.type, "threads": torch.get_num_threads(), "dtype": dtype, "seq": seq, "batch": batch_size, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
