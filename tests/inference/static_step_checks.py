"""The steady-state check every fixed-shape decode step must pass (inference/static_step.py's subclasses).

After ``warm`` tokens a step reads no device value on the host and keeps the address of every buffer it
touches and of the logits it returns. ``HostSyncs`` counts the host reads.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncs(TorchDispatchMode):
    """Counts the ops that copy a device value to the host (``.item()``, ``bool(t)``, ``int(t)``)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def assert_steady_state(step, ids: torch.Tensor, warm: int) -> None:
    """Feed ids[:, :warm], then ids[:, warm:] under the host-sync counter: no sync, no buffer moved."""
    for t in range(warm):
        step(ids[:, t])
    before = [b.data_ptr() for b in step.cache.buffers()] + [step.logits.data_ptr()]
    with HostSyncs() as mode:
        outs = [step(ids[:, t]) for t in range(warm, ids.shape[1])]
    assert mode.syncs == 0
    assert [b.data_ptr() for b in step.cache.buffers()] + [step.logits.data_ptr()] == before
    assert all(o.data_ptr() == before[-1] for o in outs)
    assert int(step.cache.position) == ids.shape[1]
