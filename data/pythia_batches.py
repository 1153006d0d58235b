"""Pythia's exact training batches from its pre-shuffled, pre-tokenized Pile (a Megatron indexed dataset).

In ``EleutherAI/pile-{standard,deduped}-pythia-preshuffled`` every sequence is one training sample of
2,049 tokens, stored in the order gpt-neox read them: training step ``s`` used samples
``[s * G, (s + 1) * G)`` with ``G = 1024`` for every Pythia size (146,432,000 samples = 143,000 steps).
gpt-neox trains on ``sample[:-1]`` predicting ``sample[1:]``.

:class:`PythiaBatchLoader` yields those samples with ``data.loader``'s layout (:func:`data.loader.sink_batch`),
so a run with ``k`` sink tokens sees exactly Pythia's text tokens in Pythia's order::

    input_ids = sinks + sample[:2048]                 labels = [-100] * (k - 1) + sample[0:2049]

(with ``k = 0`` exactly gpt-neox's ``sample[:2048]`` -> ``sample[1:2049]``).

Split across ranks as :class:`data.loader.SampleLoader` splits a global batch: micro-batch ``u``
(counted over the whole run) covers samples ``[u * R * B, (u + 1) * R * B)`` (``R`` ranks, micro-batch
``B``), rank ``r`` taking its ``r``-th ``B``; ``A = G / (R * B)`` consecutive micro-batches form step
``u // A`` (gradient accumulation). So step ``s`` trains on exactly Pythia's samples of step ``s``,
whatever ``R``, ``B`` and ``A``. The iterator stops after the last whole step of the data (Pythia's
data has no epochs to repeat). ``start_step`` or ``load_state_dict`` start anywhere without reading
what came before; sample sizes and token ids are checked as each micro-batch is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.indexed import IndexedDataset, open_indexed
from data.loader import check_rank_split, check_resume_identity, sink_batch
from data.shards import DataError

PYTHIA_SAMPLE_TOKENS = 2049
PYTHIA_GLOBAL_BATCH = 1024
STATE_VERSION = 1
STATE_KIND = "pythia-batches"


class PythiaBatchLoader:
    """Micro-batches ``{"input_ids": (B, k + n), "labels": (B, k + n)}`` (int64), ``n = sample_tokens - 1``."""

    def __init__(
        self,
        data: str | Path | IndexedDataset,
        micro_batch_size: int,
        sink_ids: Sequence[int] = (),
        rank: int = 0,
        world_size: int = 1,
        global_batch_size: int = PYTHIA_GLOBAL_BATCH,
        sample_tokens: int = PYTHIA_SAMPLE_TOKENS,
        start_step: int = 0,
        model_vocab_size: int | None = None,
    ):
        self.dataset = data if isinstance(data, IndexedDataset) else open_indexed(data)
        where = self.dataset.idx_path
        check_rank_split(micro_batch_size, rank, world_size)
        if sample_tokens < 2:
            raise DataError(f"sample_tokens must be >= 2 (inputs plus one target), got {sample_tokens}")
        per_micro = world_size * micro_batch_size
        if global_batch_size < 1 or global_batch_size % per_micro:
            raise DataError(
                f"global batch {global_batch_size} is not a whole number of micro-batches: {world_size} rank(s) x "
                f"micro-batch {micro_batch_size} = {per_micro} samples per micro-step"
            )
        self.sink_ids = [int(s) for s in sink_ids]
        if model_vocab_size is not None and any(not 0 <= s < model_vocab_size for s in self.sink_ids):
            raise DataError(f"sink ids {self.sink_ids} exceed the model's {model_vocab_size} embedding rows")
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.global_batch_size, self.sample_tokens = global_batch_size, sample_tokens
        self.text_tokens = sample_tokens - 1
        self.model_vocab_size = model_vocab_size
        self.accumulation_steps = global_batch_size // per_micro
        self.num_steps = len(self.dataset) // global_batch_size
        if self.num_steps == 0:
            raise DataError(
                f"{where}: {len(self.dataset)} samples, fewer than one global batch of {global_batch_size}"
            )
        self._check_sizes(np.arange(1))  # a dataset of documents rather than samples fails at once
        self._sinks = np.asarray(self.sink_ids, dtype=np.int64)
        self.micro_step = 0  # micro-batches of the run already yielded (same count on every rank)
        self.seek(start_step)

    # ---------------------------------------------------------------------------------------
    # positions
    # ---------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The training step the next micro-batch belongs to."""
        return self.micro_step // self.accumulation_steps

    def seek(self, step: int) -> None:
        """Make the next micro-batch the first of ``step`` (0 <= step <= num_steps)."""
        if not 0 <= step <= self.num_steps:
            raise DataError(f"step {step} is outside the data's {self.num_steps} steps ({self.dataset.idx_path})")
        self.micro_step = step * self.accumulation_steps

    def sample_indices(self, micro_step: int) -> np.ndarray:
        """This rank's sample indices for micro-batch ``micro_step`` of the run."""
        start = (micro_step * self.world_size + self.rank) * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)

    # ---------------------------------------------------------------------------------------
    # samples
    # ---------------------------------------------------------------------------------------

    def _check_sizes(self, indices: np.ndarray) -> None:
        sizes = np.asarray(self.dataset.sizes[indices])
        wrong = np.flatnonzero(sizes != self.sample_tokens)
        if len(wrong):
            i = int(indices[wrong[0]])
            raise DataError(
                f"{self.dataset.idx_path}: sequence {i} has {int(sizes[wrong[0]])} tokens, but every sample must "
                f"have {self.sample_tokens} tokens (text_tokens + 1): a pre-shuffled dataset of equal samples, as "
                "Pythia's, not one of whole documents"
            )

    def samples(self, indices: np.ndarray) -> np.ndarray:
        """The samples ``indices`` as a ``(len, sample_tokens)`` int64 array, sizes and ids checked."""
        self._check_sizes(indices)
        rows = np.stack([self.dataset[i] for i in indices]) if len(indices) else np.zeros((0, self.sample_tokens))
        bad = (rows < 0) if self.model_vocab_size is None else ((rows < 0) | (rows >= self.model_vocab_size))
        if self.sink_ids:
            bad |= np.isin(rows, self._sinks)
        if bad.any():
            r, c = (int(x) for x in np.argwhere(bad)[0])
            i = int(indices[r])
            token = int(rows[r, c])
            if token in self.sink_ids:
                why = f"one of the sink ids {self.sink_ids}: the text vocabulary overlaps the sink tokens"
            elif token < 0:
                why = "negative"
            else:
                why = f"outside the model's {self.model_vocab_size}-row vocabulary"
            raise DataError(
                f"{self.dataset.where(i)}: sample {i} holds token id {token} at position {c}, {why} "
                f"(index {self.dataset.idx_path})"
            )
        return rows.astype(np.int64, copy=False)

    def build_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return sink_batch(self.samples(indices), self._sinks)

    # ---------------------------------------------------------------------------------------
    # iteration + state
    # ---------------------------------------------------------------------------------------

    def __iter__(self) -> PythiaBatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.micro_step >= len(self):
            raise StopIteration
        batch = self.build_batch(self.sample_indices(self.micro_step))
        self.micro_step += 1
        return batch

    def __len__(self) -> int:
        """Micro-batches per rank over the whole run (``num_steps * accumulation_steps``)."""
        return self.num_steps * self.accumulation_steps

    @property
    def tokens_per_batch(self) -> int:
        """Text tokens per micro-batch on this rank (sinks not counted)."""
        return self.micro_batch_size * self.text_tokens

    def _identity(self) -> dict[str, Any]:
        return {
            "kind": STATE_KIND,
            "num_samples": len(self.dataset),
            "sample_tokens": self.sample_tokens,
            "global_batch_size": self.global_batch_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the next micro-batch comes from, as global samples consumed, so a run may resume with
        another (world_size, micro_batch_size) whose micro-steps divide the same position."""
        return {
            "version": STATE_VERSION,
            "samples": self.micro_step * self.world_size * self.micro_batch_size,
            "step": self.step,
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != STATE_KIND:
            raise DataError(
                f"loader state {state.get('kind')!r} version {state.get('version')!r}; this loader reads "
                f"{STATE_KIND!r} version {STATE_VERSION}"
            )
        check_resume_identity(state, self._identity(), f"data {self.dataset.idx_path}")
        samples, per_micro = int(state["samples"]), self.world_size * self.micro_batch_size
        if samples % per_micro:
            raise DataError(
                f"cannot resume the loader: {samples} samples consumed is not a whole number of micro-steps of "
                f"{per_micro} samples ({self.world_size} rank(s) x micro-batch {self.micro_batch_size})"
            )
        self.micro_step = samples // per_micro
