"""Pythia-style training samples from token shards: fixed windows, sink tokens, rank sharding, exact resume.

The split's shards form one token stream (documents separated by EOS); a gpt-neox / Megatron indexed
dataset of whole documents is one stream too, its tokens as stored (:mod:`data.token_source`). With
``n`` text tokens per sample, window ``i`` covers ``stream[i*n : i*n + n + 1]`` -- consecutive windows overlap by one token,
as in gpt-neox, so every stream token is an input exactly once and a target exactly once. With ``k``
sink tokens a sample is::

    input_ids = [s_0 .. s_{k-1}] + stream[i*n : i*n + n]                    (length k + n)
    labels    = [-100] * (k - 1) + stream[i*n : i*n + n + 1]                 (length k + n)

so position ``t`` predicts ``input_ids[t + 1]``: sinks never appear as targets, the last sink predicts
the window's first text token, and the last text token predicts the token after the window.
``text_tokens`` fixes ``n`` independently of ``k``, so vanilla and sink-token runs can see exactly the
same text tokens in the same order.

Order: epoch ``e`` visits the ``W = (T - 1) // n`` windows in ``permutation(seed, e)`` order (or in
stream order with ``shuffle=False``). Global batch ``j`` of an epoch is the permutation slice
``[j * R * B, (j + 1) * R * B)`` (``R`` ranks, ``B`` micro-batch size); rank ``r`` takes its
``r``-th ``B`` samples of it. So ranks are disjoint, every rank has the same number of batches, and
the samples of a global batch do not depend on how it is split across ranks.

Tail drop (documented, counted in the tests): the last ``T - 1 - W*n`` tokens of the stream never
start a window (fewer than ``n + 1`` left), and each epoch the last ``W mod (R * B)`` windows of
that epoch's permutation are skipped so all ranks get whole batches -- a different set every epoch
when shuffling.

Epochs continue forever; ``state_dict()`` after ``m`` batches and ``load_state_dict()`` in a new
loader resume at batch ``m + 1`` exactly. Nothing is read until a batch is built (``np.memmap``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.shards import DataError
from data.token_source import open_token_source

IGNORE_INDEX = -100
STATE_VERSION = 1


def sink_batch(windows: np.ndarray, sinks: np.ndarray) -> dict[str, torch.Tensor]:
    """The module docstring's sample layout for ``windows`` (``(B, n + 1)`` int64 text tokens each) and
    ``k = len(sinks)`` sink ids: ``{"input_ids", "labels"}``, both ``(B, k + n)`` int64."""
    k, n = len(sinks), windows.shape[1] - 1
    inputs = np.empty((len(windows), k + n), dtype=np.int64)
    labels = np.empty((len(windows), k + n), dtype=np.int64)
    inputs[:, :k] = sinks
    inputs[:, k:] = windows[:, :n]
    if k:
        labels[:, : k - 1] = IGNORE_INDEX
        labels[:, k - 1 :] = windows
        # A sink id inside the text stream (only possible with foreign shards) must never be a target.
        labels[np.isin(labels, sinks)] = IGNORE_INDEX
    else:
        labels[:] = windows[:, 1:]
    return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


def check_rank_split(micro_batch_size: int, rank: int, world_size: int) -> None:
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")


def check_resume_identity(state: dict[str, Any], mine: dict[str, Any], data: str) -> None:
    """Refuse a loader state saved for other data or another data config (keys absent from it pass)."""
    for key, value in mine.items():
        if key in state and state[key] != value:
            raise DataError(
                f"cannot resume the loader: {key} was {state[key]!r} in the checkpoint but is {value!r} now "
                f"({data} or the data config changed)"
            )


class SampleLoader:
    """Micro-batches ``{"input_ids": (B, L), "labels": (B, L)}`` (int64), ``L = k + text_tokens``."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        sink_ids: Sequence[int] = (),
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1234,
        shuffle: bool = True,
        text_tokens: int | None = None,
        tokenizer_fingerprint: str | None = None,
        model_vocab_size: int | None = None,
        vocab_size: int | None = None,
    ):
        """``data_dir``: a prepared folder (``split`` of it) or a Megatron indexed dataset (all of it);
        ``vocab_size``: the text vocabulary of a Megatron dataset, which records none: its ids stay
        below it, sink ids start at it (default: ``model_vocab_size``, for a run without sinks)."""
        self.data_dir = Path(data_dir)
        source = open_token_source(self.data_dir, split, vocab_size if vocab_size is not None else model_vocab_size)
        self.manifest, self.tokenizer = source.manifest, source.tokenizer
        manifest_path = source.where
        self.split = split
        self.sink_ids = [int(s) for s in sink_ids]
        k = len(self.sink_ids)
        self.text_tokens = seq_len - k if text_tokens is None else int(text_tokens)
        check_rank_split(micro_batch_size, rank, world_size)
        if self.text_tokens < 1:
            raise DataError(f"seq_len={seq_len} with {k} sink token(s) leaves {self.text_tokens} text tokens per sample; need >= 1")
        if k + self.text_tokens > seq_len:
            raise DataError(
                f"a sample of {k} sink token(s) + text_tokens={self.text_tokens} = {k + self.text_tokens} tokens "
                f"exceeds seq_len={seq_len}"
            )
        info = self.tokenizer
        vocab_size = int(info["vocab_size"])
        named = self.manifest is not None  # a Megatron dataset names no tokenizer to compare
        if tokenizer_fingerprint is not None and named and tokenizer_fingerprint != info.get("fingerprint"):
            raise DataError(
                f"{manifest_path}: the data was tokenized with tokenizer {info.get('spec')!r} "
                f"(fingerprint {info.get('fingerprint')}), but this run uses fingerprint {tokenizer_fingerprint}; "
                "prepare the data again with the run's tokenizer"
            )
        if model_vocab_size is not None and vocab_size > model_vocab_size:
            raise DataError(
                f"{manifest_path}: tokenizer vocabulary has {vocab_size} tokens but the model has only "
                f"{model_vocab_size} embedding rows"
            )
        clashing = [s for s in self.sink_ids if s < vocab_size]
        if clashing:
            raise DataError(
                f"{manifest_path}: sink ids {clashing} fall inside the text vocabulary (0..{vocab_size - 1}); "
                f"sink ids must start at {vocab_size}"
            )
        if model_vocab_size is not None and any(s >= model_vocab_size for s in self.sink_ids):
            raise DataError(f"sink ids {self.sink_ids} exceed the model's {model_vocab_size} embedding rows")

        self.stream = source.stream
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.num_windows = max(0, (len(self.stream) - 1) // self.text_tokens)
        self.global_batch_size = world_size * micro_batch_size
        self.batches_per_epoch = self.num_windows // self.global_batch_size
        if self.batches_per_epoch == 0:
            what = f"split {split!r}" if self.manifest is not None else "the dataset"
            raise DataError(
                f"{manifest_path}: {what} has {len(self.stream)} tokens = {self.num_windows} windows of "
                f"{self.text_tokens}+1 tokens, fewer than one global batch of {self.global_batch_size} "
                f"({world_size} rank(s) x micro-batch {micro_batch_size})"
            )
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of this epoch already yielded (global batches = rank batches)
        self._order_epoch = -1
        self._order: np.ndarray | None = None
        self._sinks = np.asarray(self.sink_ids, dtype=np.int64)

    # ---------------------------------------------------------------------------------------
    # ordering
    # ---------------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices of ``epoch`` in visiting order (all ranks, before the tail drop)."""
        if epoch != self._order_epoch:
            # int32 when it fits: 4 bytes per window (a 300B-token corpus at 2048 = 146M windows = 0.6 GB).
            dtype = np.int32 if self.num_windows < 2**31 else np.int64
            self._order = np.arange(self.num_windows, dtype=dtype)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(self._order)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def window_indices(self, epoch: int, batch: int) -> np.ndarray:
        """This rank's window indices for batch ``batch`` of ``epoch``."""
        start = (batch * self.world_size + self.rank) * self.micro_batch_size
        return self.epoch_order(epoch)[start : start + self.micro_batch_size]

    # ---------------------------------------------------------------------------------------
    # samples
    # ---------------------------------------------------------------------------------------

    def window(self, index: int) -> np.ndarray:
        """Stream tokens ``[index*n, index*n + n + 1)`` as int64 (n + 1 tokens)."""
        start = int(index) * self.text_tokens
        return self.stream[start : start + self.text_tokens + 1]

    def build_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        windows = np.empty((len(indices), self.text_tokens + 1), dtype=np.int64)
        for row, index in enumerate(indices):
            windows[row] = self.window(index)
        return sink_batch(windows, self._sinks)

    # ---------------------------------------------------------------------------------------
    # iteration + state
    # ---------------------------------------------------------------------------------------

    def __iter__(self) -> SampleLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        batch = self.build_batch(self.window_indices(self.epoch, self.batch_in_epoch))
        self.batch_in_epoch += 1
        return batch

    def __len__(self) -> int:
        """Batches per epoch (per rank; the iterator itself never stops)."""
        return self.batches_per_epoch

    def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch's batches for this rank, without touching the resume state (validation passes)."""
        for batch in range(self.batches_per_epoch):
            yield self.build_batch(self.window_indices(epoch, batch))

    @property
    def tokens_per_batch(self) -> int:
        """Text tokens per micro-batch on this rank (sinks not counted)."""
        return self.micro_batch_size * self.text_tokens

    def _identity(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "num_windows": self.num_windows,
            "text_tokens": self.text_tokens,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "tokenizer_fingerprint": self.tokenizer.get("fingerprint"),
        }

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch comes from. Positions are stored as global samples into the epoch so a
        run may resume with another (world_size, micro_batch_size) of the same global batch size."""
        epoch, batch = self.epoch, self.batch_in_epoch
        if batch >= self.batches_per_epoch:  # an epoch just finished: the next batch opens the next one
            epoch, batch = epoch + 1, 0
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "samples_in_epoch": batch * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        check_resume_identity(state, self._identity(), f"data in {self.data_dir}")
        samples = int(state["samples_in_epoch"])
        if samples % self.global_batch_size:
            raise DataError(
                f"cannot resume the loader: {samples} samples into the epoch is not a whole number of global "
                f"batches of {self.global_batch_size} (was {state.get('global_batch_size')})"
            )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = samples // self.global_batch_size
