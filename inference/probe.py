"""The training probe's evaluation: streaming perplexity of a text under a sink + window cache.

``pretrain`` never imports ``inference``; ``sinklm train`` hands :func:`streaming_probe` to the
trainer (``pretrain.train.main(argv, probe=streaming_probe)``), which calls it every
``probe.every`` steps on the start of the validation split and logs what it returns.
Putting the model in eval mode (and back) is the caller's job.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import nn

from inference.perplexity import streaming_nll


class ProbeSettings(Protocol):
    """What the probe reads of ``pretrain.train_config.ProbeConfig`` (the trainer cuts the text to ``num_tokens``)."""

    start_size: int
    recent_size: int


@torch.no_grad()
def streaming_probe(model: nn.Module, text_ids: torch.Tensor, probe: ProbeSettings) -> dict[str, float]:
    """Mean streaming NLL of ``text_ids`` (1-D) through a ``start_size + recent_size`` cache (fast mode).

    Returns ``{"loss", "ppl", "start_size", "recent_size"}``, what the trainer logs as ``probe``.
    streaming_nll prepends the model's sink ids itself and scores every text token after the first;
    its warning for ``start_size != sink tokens`` is silenced (a deliberate probe setting).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nll = streaming_nll(model, text_ids, probe.start_size, probe.recent_size, mode="fast", progress=False)
    loss = float(nll.double().mean())
    ppl = float(torch.exp(torch.tensor(loss)))
    return {"loss": loss, "ppl": ppl, "start_size": probe.start_size, "recent_size": probe.recent_size}
