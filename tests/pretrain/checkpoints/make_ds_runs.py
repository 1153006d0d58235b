"""Write real DeepSpeed run folders for the convert tests (run under ``torchrun``, CPU, gloo).

Usage: ``torchrun --nproc_per_node 2 tests/pretrain/checkpoints/make_ds_runs.py OUT STAGE:VARIANT ...``
with VARIANT one of ``vanilla``, ``sink1``, ``sink2``, ``softmax1``, ``sink_logit``.

For each spec it builds a tiny :class:`GPTNeoX`, wraps it with ``deepspeed.initialize`` at that ZeRO
stage, takes two AdamW steps (so the saved weights are not the init), saves ``global_step2`` in the
run-folder layout of ``sinklm train`` (``config.yaml`` with the ``model`` section, ``latest``), and
stores the engine's own logits on a fixed batch as ``reference.pt``: the numbers an export must
reproduce. Used until/alongside real ``sinklm train`` runs; kept tiny (2 layers, 32 wide).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml

from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX, lm_loss

VARIANTS = {
    "vanilla": dict(attention="softmax", sink_tokens=0),
    "sink1": dict(attention="softmax", sink_tokens=1),
    "sink2": dict(attention="softmax", sink_tokens=2),
    "softmax1": dict(attention="softmax1", sink_tokens=0),
    "sink_logit": dict(attention="sink_logit", sink_tokens=0, sink_logit_init=0.5),
}


def model_config(variant: str) -> ModelConfig:
    return ModelConfig.from_preset("tiny", hidden_size=32, max_seq_len=64, **VARIANTS[variant])


def reference_batch(cfg: ModelConfig) -> torch.Tensor:
    """A fixed batch (2, 24) of text ids, led by the sink ids for sink-token models."""
    text = torch.randint(0, cfg.vocab_size, (2, 24 - cfg.sink_tokens), generator=torch.Generator().manual_seed(7))
    sinks = torch.tensor(cfg.sink_token_ids, dtype=torch.long).expand(2, -1)
    return torch.cat([sinks, text], dim=1)


def make_run(out: Path, stage: int, variant: str, rank: int) -> None:
    cfg = model_config(variant)
    run = out / f"zero{stage}-{variant}"
    torch.manual_seed(1234)
    model = GPTNeoX(cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.1}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    batch = reference_batch(cfg)
    for step in range(2):
        ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(100 * rank + step))
        loss = lm_loss(engine(ids[:, :-1]).logits, ids[:, 1:])
        engine.backward(loss)
        engine.step()
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        resolved = {"model": cfg.to_dict(), "data": {"tokenizer": None}, "deepspeed": ds_config}
        (run / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    dist.barrier()
    engine.save_checkpoint(str(run), tag="global_step2", client_state={"step": 2})
    engine.eval()
    with torch.no_grad():
        logits = engine(batch).logits  # ZeRO-3 gathers the partitioned weights inside forward
    if rank == 0:
        torch.save({"input_ids": batch, "logits": logits}, run / "reference.pt")
    dist.barrier()
    engine.destroy()


def main() -> None:
    out, specs = Path(sys.argv[1]), sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    for spec in specs:
        stage, variant = spec.split(":")
        make_run(out, int(stage), variant, rank)
    if rank == 0:
        (out / "done.json").write_text(json.dumps(specs))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
