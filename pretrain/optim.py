"""AdamW with Pythia's parameter groups and learning-rate schedule.

Weight decay applies to matrices (linear weights, embeddings) only; biases, LayerNorm
gains/biases and other 1-D parameters such as the per-head ``sink_logit`` are not decayed
(GPT-NeoX's ``no_weight_decay`` groups). The schedule is a linear warm-up followed by a cosine
decay to ``min_lr_ratio`` x peak, a pure function of the step so a resumed run needs only the
step count to continue it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from pretrain.train_config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and undecayed 1-D parameters (biases, norms, sink logits)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.Optimizer:
    """torch AdamW (DeepSpeed wraps it for ZeRO / mixed precision); fused kernels on CUDA."""
    assert cfg.lr is not None, "resolve optimizer.lr first"
    kwargs = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs
    )


@dataclass(frozen=True)
class WarmupCosine:
    """lr(step) for step = 0, 1, ...: linear warm-up to ``peak``, cosine down to ``peak * min_ratio``."""

    peak: float
    warmup_steps: int
    decay_steps: int
    min_ratio: float = 0.1

    @classmethod
    def from_config(cls, cfg: OptimizerConfig, max_steps: int) -> "WarmupCosine":
        assert cfg.lr is not None, "resolve optimizer.lr first"
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * max_steps)
        decay = cfg.decay_steps if cfg.decay_steps is not None else max_steps
        return cls(peak=cfg.lr, warmup_steps=max(0, warmup), decay_steps=max(decay, warmup + 1), min_ratio=cfg.min_lr_ratio)

    def __call__(self, step: int) -> float:
        """Learning rate for the optimizer step that takes the model from ``step`` to ``step + 1``."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps))
        floor = self.peak * self.min_ratio
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
