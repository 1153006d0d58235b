"""What every fixed-shape decode step shares: where a stream position lives in the sink + ring buffers,
and running one whole step eagerly, through ``torch.compile`` or replayed from a captured CUDA graph.

Two steps build on it: :class:`inference.decode_step.DecodeStep` (our GPT-NeoX over its
StaticSinkCache) and :class:`inference.hf_decode_step.HFDecodeStep` (a stock transformers model over
its HFStaticCache). Each keeps ``s`` sink slots followed by a ring; the slot of stream position t
(:func:`ring_slot`) is computed on the device, so a step never reads a device value on the host.
"""

from __future__ import annotations

import torch

MODES = ("eager", "compile", "graph")


def ring_slot(position: torch.Tensor, start: int, ring: int) -> torch.Tensor:
    """The buffer slot of stream position(s) ``position`` (a device tensor): positions below ``start``
    are sinks at slot t; later ones share a ring of ``ring`` slots after them (slot s + (t - s) % ring)."""
    if not start:
        return position.remainder(ring)
    return torch.where(position < start, position, start + (position - start).remainder(ring))


class StaticStep:
    """One whole decode step over fixed buffers: ``step(ids)`` with ids (B,) or (B, 1) returns the
    next-token logits (B, V) in a buffer that the next call overwrites.

    A subclass sets ``cache`` (whose ``buffers()`` are every tensor the step updates in place),
    ``input_ids`` (B, 1) and ``logits`` (B, V), then calls :meth:`_init_mode`; its ``_step()`` reads
    ``input_ids``, writes ``logits`` and advances the cache, all in place. ``mode``: ``eager``;
    ``compile`` (``torch.compile`` of the step; ``mode="reduce-overhead"`` on CUDA); ``graph`` (CUDA only:
    the step captured once as a CUDA graph and replayed per token: no launches from Python, no
    allocation, no host synchronisation).
    """

    @staticmethod
    def check_mode(mode: str, device: torch.device) -> None:
        if mode not in MODES:
            raise ValueError(f"decode mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"decode mode 'graph' needs a CUDA device, the cache is on {device}")

    def _init_mode(self, mode: str, device: torch.device, dtype: torch.dtype) -> None:
        self.check_mode(mode, device)
        self.mode = mode
        # oneDNN's kernels for one-row elementwise ops cost more than ATen's own (GELU over 512
        # values: ~13 us vs ~1 us), and for float32 a CPU step uses no oneDNN product: off while
        # an eager float32 step runs on the CPU (about 10% of a pythia-14m step)
        self._without_onednn = device.type == "cpu" and dtype == torch.float32 and mode == "eager"
        self._graph = None
        self._run = self._step
        if mode == "compile":
            self._run = torch.compile(self._step, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)

    def _step(self) -> None:
        raise NotImplementedError

    @torch.inference_mode()  # not just no_grad: no autograd bookkeeping per op (~8% of a small CPU step)
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(ids.view(-1, 1))
        if self.mode == "graph":
            if self._graph is None:
                self._capture()
            self._graph.replay()
        elif self._without_onednn and torch.backends.mkldnn.enabled:
            torch.backends.mkldnn.enabled = False
            try:
                self._run()
            finally:
                torch.backends.mkldnn.enabled = True
        else:
            self._run()
        return self.logits

    @torch.inference_mode()
    def _capture(self) -> None:
        """Warm up on a side stream (on a copy of the state, restored after), then capture one step."""
        saved = [t.clone() for t in self.cache.buffers()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        for buffer, copy in zip(self.cache.buffers(), saved):
            buffer.copy_(copy)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._step()
