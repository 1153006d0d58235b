"""SampleLoader: Pythia windows, sink layout, rank sharding with exact token accounting, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.loader import IGNORE_INDEX, SampleLoader
from data.shards import DataError, TokenStream
from data.sinks import sink_token_ids

VOCAB = 50277


def _stream(data_dir, split="train") -> np.ndarray:
    stream = TokenStream(data_dir, split)
    return stream[0 : len(stream)]


def _collect_epoch(data_dir, world_size, micro_batch_size, seq_len, sink_ids=(), epoch=0):
    """All samples of one epoch over all ranks: list of (rank, input_ids row, labels row)."""
    samples = []
    for rank in range(world_size):
        loader = SampleLoader(
            data_dir, "train", seq_len, micro_batch_size, sink_ids=sink_ids, rank=rank, world_size=world_size
        )
        for batch in loader.iter_epoch(epoch):
            assert batch["input_ids"].shape == (micro_batch_size, seq_len)
            assert batch["input_ids"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
            for inp, lab in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
                samples.append((rank, inp, lab))
    return samples, loader


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_token_accounting_across_ranks(prepared_corpus, world_size):
    """Prevents duplicated or lost data under data parallelism: over one epoch every text token of the
    split is an input exactly once across all ranks, except the documented tail drop, and no window is
    served to two ranks. Each sample's place in the stream is found by searching the stream, not by
    asking the loader."""
    k, seq_len, micro = 1, 48, 5
    sinks = sink_token_ids(VOCAB, k)
    n = seq_len - k
    stream = _stream(prepared_corpus)
    total = len(stream)
    # Every position where an n-token text run starts, keyed by its bytes (repeats in the text give lists).
    where: dict[bytes, list[int]] = {}
    for p in range(0, total - n):
        where.setdefault(stream[p : p + n].tobytes(), []).append(p)

    samples, loader = _collect_epoch(prepared_corpus, world_size, micro, seq_len, sinks)
    covered = np.zeros(total, dtype=np.int64)
    owner: dict[int, int] = {}
    for rank, inp, lab in samples:
        text = inp[k:]
        offsets = [p for p in where[text.tobytes()] if p % n == 0 and p not in owner]
        assert offsets, "sample text is not a Pythia window of the stream"
        p = offsets[0]
        owner[p] = rank
        covered[p : p + n] += 1
        # labels: the last sink predicts the first text token, then the next token each step.
        assert np.array_equal(lab[k - 1 :], stream[p : p + n + 1])
    assert covered.max() == 1  # nothing seen twice, on any rank
    windows = (total - 1) // n
    used = loader.batches_per_epoch * world_size * micro
    assert len(samples) == used == len(owner)
    dropped_windows = windows - used
    assert 0 <= dropped_windows < world_size * micro  # tail drop: less than one global batch
    tail_tokens = total - windows * n  # never start a window (n + 1 tokens needed)
    assert 1 <= tail_tokens <= n
    assert int((covered == 0).sum()) == dropped_windows * n + tail_tokens
    # ranks get equal shares
    counts = np.bincount(list(owner.values()), minlength=world_size)
    assert (counts == counts[0]).all()


@pytest.mark.parametrize("k", [0, 1, 4])
def test_sink_layout(prepared_corpus, k):
    """Prevents a mis-prepended or mis-labelled sink: every sample starts with exactly the configured
    sink ids, no label is a sink id (k-1 ignored positions), and k = 0 gives plain next-token samples."""
    sinks = sink_token_ids(VOCAB, k)
    loader = SampleLoader(prepared_corpus, "train", seq_len=32, micro_batch_size=3, sink_ids=sinks)
    for _ in range(5):
        batch = next(loader)
        inp, lab = batch["input_ids"], batch["labels"]
        assert inp.shape == lab.shape == (3, 32)
        if k:
            assert (inp[:, :k] == torch.tensor(sinks)).all()
            assert (inp[:, k:] < VOCAB).all()  # no sink id in the text part
            assert (lab[:, : k - 1] == IGNORE_INDEX).all()
            assert (lab[:, k - 1 :] >= 0).all()
            assert not torch.isin(lab, torch.tensor(sinks)).any()
        else:
            assert (inp < VOCAB).all() and (lab >= 0).all()
        # shifted: labels[t] == input_ids[t + 1] wherever both are text
        assert torch.equal(lab[:, k:-1], inp[:, k + 1 :])


def test_same_text_tokens_for_every_variant(prepared_corpus):
    """Prevents unfair comparisons: with a fixed text_tokens, vanilla and sink-token loaders see the same
    text tokens in the same order (only the sink prefix differs)."""
    plain = SampleLoader(prepared_corpus, "train", seq_len=64, micro_batch_size=2, text_tokens=60)
    sinks = sink_token_ids(VOCAB, 4)
    sunk = SampleLoader(prepared_corpus, "train", seq_len=64, micro_batch_size=2, sink_ids=sinks, text_tokens=60)
    for _ in range(4):
        a, b = next(plain), next(sunk)
        assert a["input_ids"].shape == (2, 60) and b["input_ids"].shape == (2, 64)
        assert torch.equal(a["input_ids"], b["input_ids"][:, 4:])
        assert torch.equal(a["labels"], b["labels"][:, 4:])
    with pytest.raises(DataError, match=r"4 sink token\(s\) \+ text_tokens=61 = 65 tokens exceeds seq_len=64"):
        SampleLoader(prepared_corpus, "train", seq_len=64, micro_batch_size=2, sink_ids=sinks, text_tokens=61)


def test_resume_gives_the_same_remaining_batches(prepared_corpus):
    """Prevents a resumed run from repeating or skipping data: state after N batches, loaded into a new
    loader, yields exactly the batches an uninterrupted loader yields next, across an epoch boundary."""
    kwargs = dict(seq_len=256, micro_batch_size=8, sink_ids=sink_token_ids(VOCAB, 1), rank=1, world_size=2, seed=7)
    reference = SampleLoader(prepared_corpus, "train", **kwargs)
    per_epoch = len(reference)
    stop = per_epoch - 2
    expected = [next(reference) for _ in range(stop + 6)][stop:]
    first = SampleLoader(prepared_corpus, "train", **kwargs)
    for _ in range(stop):
        next(first)
    state = first.state_dict()
    resumed = SampleLoader(prepared_corpus, "train", **kwargs)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(6)]
    for a, b in zip(expected, got):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert resumed.epoch == 1
    # A changed seed or split cannot be resumed silently.
    other = SampleLoader(prepared_corpus, "train", **{**kwargs, "seed": 8})
    with pytest.raises(DataError, match="seed was 7 in the checkpoint but is 8 now"):
        other.load_state_dict(state)


def test_resume_with_another_rank_layout_of_the_same_global_batch(prepared_corpus):
    """Prevents data loss when a run restarts on a different number of GPUs with the same global batch:
    2 ranks x 4 and 1 rank x 8 serve the same samples per global step, before and after a resume."""
    common = dict(seq_len=32, seed=3)
    single = SampleLoader(prepared_corpus, "train", micro_batch_size=8, **common)
    pair = [SampleLoader(prepared_corpus, "train", micro_batch_size=4, rank=r, world_size=2, **common) for r in range(2)]
    for _ in range(3):
        whole = next(single)["input_ids"]
        halves = torch.cat([next(p)["input_ids"] for p in pair])
        assert torch.equal(whole, halves)
    moved = SampleLoader(prepared_corpus, "train", micro_batch_size=8, **common)
    moved.load_state_dict(pair[0].state_dict())
    assert torch.equal(next(moved)["input_ids"], torch.cat([next(p)["input_ids"] for p in pair]))


def test_epochs_reshuffle_and_continue(prepared_corpus):
    """Prevents a loader that stops after one epoch or repeats the same order: epochs go on forever,
    each one a different permutation of the same windows; shuffle=False is stream order."""
    loader = SampleLoader(prepared_corpus, "validation", seq_len=128, micro_batch_size=4, seed=1)
    e0, e1 = loader.epoch_order(0).copy(), loader.epoch_order(1).copy()
    assert sorted(e0) == sorted(e1) == list(range(loader.num_windows))
    assert not np.array_equal(e0, e1)
    for _ in range(2 * len(loader) + 1):
        next(loader)
    assert loader.epoch == 2
    ordered = SampleLoader(prepared_corpus, "validation", seq_len=128, micro_batch_size=4, shuffle=False)
    stream = _stream(prepared_corpus, "validation")
    first = next(ordered)["input_ids"].numpy()
    assert np.array_equal(first.reshape(-1), stream[: 4 * 128])


def test_clear_errors(prepared_corpus):
    """Prevents training on data the model cannot read: tokenizer mismatch, a model vocabulary smaller
    than the data's, sink ids inside the text vocabulary and a too-small split are named clearly."""
    with pytest.raises(DataError, match=r"manifest.json: the data was tokenized with tokenizer .*fingerprint 0000"):
        SampleLoader(prepared_corpus, "train", 32, 2, tokenizer_fingerprint="0000")
    with pytest.raises(DataError, match="vocabulary has 50277 tokens but the model has only 50000 embedding rows"):
        SampleLoader(prepared_corpus, "train", 32, 2, model_vocab_size=50000)
    with pytest.raises(DataError, match=r"sink ids \[100\] fall inside the text vocabulary"):
        SampleLoader(prepared_corpus, "train", 32, 2, sink_ids=[100])
    with pytest.raises(DataError, match="fewer than one global batch"):
        SampleLoader(prepared_corpus, "validation", 256, 64, world_size=2)
    with pytest.raises(DataError, match="no split 'test'"):
        SampleLoader(prepared_corpus, "test", 32, 2)
