"""The training probe's evaluation function: streaming_nll's mean, logged fields, no warnings."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from inference.perplexity import streaming_nll
from inference.probe import streaming_probe
from pretrain.config import ModelConfig
from pretrain.model import GPTNeoX
from pretrain.train_config import ProbeConfig


def _tiny(sink_tokens: int = 0) -> GPTNeoX:
    config = ModelConfig.from_preset("tiny", sink_tokens=sink_tokens, num_layers=2, init_method="normal", init_std=0.3)
    torch.manual_seed(0)
    return GPTNeoX(config).eval()


@pytest.mark.parametrize("sink_tokens,start_size", [(0, 4), (1, 1), (1, 4)])
def test_probe_is_the_mean_streaming_nll(sink_tokens, start_size):
    """The probe must report streaming_nll's mean (fast mode) for the probe's cache settings, with
    exp(loss) as ppl and the settings it ran with, as the trainer logged before the move."""
    model = _tiny(sink_tokens)
    ids = torch.randint(0, 50277, (300,), generator=torch.Generator().manual_seed(1))
    probe = ProbeConfig(every=10, start_size=start_size, recent_size=60, num_tokens=300)
    got = streaming_probe(model, ids, probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = float(streaming_nll(model, ids, start_size, 60, mode="fast", progress=False).double().mean())
    ppl = float(torch.exp(torch.tensor(want)))
    assert got == {"loss": want, "ppl": ppl, "start_size": start_size, "recent_size": 60}
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-6)


def test_probe_is_silent_and_keeps_the_callers_mode():
    """A start_size that differs from the model's sink count is a deliberate probe setting: no warning;
    the caller owns train/eval mode (the probe does not switch it)."""
    model = _tiny(sink_tokens=1).train()
    ids = torch.randint(0, 50277, (120,), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = streaming_probe(model, ids, ProbeConfig(start_size=4, recent_size=28))
    assert math.isfinite(out["loss"]) and model.training and torch.is_grad_enabled()
