"""Streaming perplexity: the paper's protocol, exactly, plus its baselines (``sinklm stream-ppl``
is the command over these, in :mod:`inference.stream_ppl`).

Every function takes the *text* token ids (N,) and returns per-token NLL (N - 1,) in float32 on the
CPU: entry t is the NLL of token t + 1 after the model has been fed tokens 0 .. t. A sink-token
model's stream starts with its k sink ids, fed before the text and never scored, so every variant
scores the same tokens.

- :func:`streaming_nll` ``mode="reference"``: one token at a time through a :class:`SinkCache`
  (feed one token, score the next, keep start + recent), as the paper's evaluation does.
- :func:`streaming_nll` ``mode="fast"``: the same numbers from chunks of ``chunk_size`` tokens; the
  cache's banded mask gives every token its sinks and its recent window at the cache's positions.
- :func:`dense_nll`: dense attention over the whole stream (optionally its first ``max_len`` tokens).
- window attention is ``streaming_nll(start_size=0, recent_size=W)``.
- :func:`recompute_nll`: sliding window with re-computation (the paper's oracle baseline): each
  token scored by running the model from scratch on the W tokens before it. The windowing itself
  is :func:`sliding_window_nll`, shared with stock Hugging Face models (:mod:`inference.backends`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from inference.cache import SinkCache
from inference.stream import StreamError, check_start_size, stream_prefix

# (rows (B, T), first, targets (B, T - first)) -> NLL (B * (T - first),) of the targets, predicted
# from positions first .. T - 1 of each row by one fresh (cache-less) forward over the rows
PositionNLL = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]

MODES = ("fast", "reference")
CHUNK_SIZE = 1024  # tokens per forward in the fast mode (any size gives the same numbers)


def _with_prefix(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(stream (k + N,) on the model's device, k): the model's sink ids, then the text."""
    if ids.dim() != 1:
        raise StreamError(f"ids must be one stream of shape (N,), got shape {tuple(ids.shape)}")
    if ids.numel() < 2:
        raise StreamError(f"need at least 2 tokens to score one, got {ids.numel()}")
    device = next(model.parameters()).device
    prefix = torch.tensor(stream_prefix(model.config), dtype=torch.long)
    return torch.cat([prefix, ids.long().cpu()]).to(device), prefix.numel()


def _nll(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, piece: int = 64) -> torch.Tensor:
    """Per-token NLL (T,) float32 of ``targets`` (T,) from final hidden states (T, C).

    The vocabulary head runs ``piece`` tokens at a time so a (64, 50304) block of logits stays in
    cache, and the log-sum-exp is written out (max, exp in place, sum): together about 2x faster on
    a CPU than ``cross_entropy`` over one big block, with the same float32 numbers.
    """
    out = []
    for h, t in zip(hidden.split(piece), targets.split(piece)):
        logits = model.lm_head(h).float()  # (piece, V)
        top = logits.amax(dim=-1, keepdim=True)
        target = logits.gather(1, t[:, None])[:, 0]
        log_sum = (logits - top).exp_().sum(dim=-1).log_() + top[:, 0]
        out.append(log_sum - target)
    return torch.cat(out)


@torch.no_grad()
def streaming_nll(
    model: torch.nn.Module,
    ids: torch.Tensor,
    start_size: int,
    recent_size: int | None,
    mode: str = "fast",
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
) -> torch.Tensor:
    """Per-token NLL (N - 1,) of the text ``ids`` (N,) streamed through a ``start_size + recent_size`` cache.

    ``recent_size=None`` is an unbounded (dense) cache. ``mode="reference"`` feeds one token at a
    time; ``mode="fast"`` feeds ``chunk_size`` tokens at a time and gives the same numbers.
    """
    if mode not in MODES:
        raise StreamError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if recent_size is not None:  # an unbounded cache keeps every token: nothing to warn about
        check_start_size(model.config, start_size)
    cache = SinkCache(start_size, recent_size)
    stream, k = _with_prefix(model, ids)
    step = 1 if mode == "reference" else chunk_size
    if step < 1:
        raise StreamError(f"chunk_size must be >= 1, got {chunk_size}")
    total = stream.numel()
    out = torch.empty(ids.numel() - 1, dtype=torch.float32)
    label = f"{start_size}+{recent_size}" if recent_size is not None else "dense"
    bar = tqdm(total=total - 1, desc=f"stream-ppl {mode} {label}", unit="tok", disable=not progress, mininterval=1.0)
    # stream position p predicts p + 1; text target index i sits at p = k + i - 1, scored for i >= 1
    for start in range(0, total - 1, step):
        end = min(start + step, total - 1)  # the last token is never fed: nothing left to predict
        hidden = model.hidden_states(stream[None, start:end], cache=cache)[0]  # (T, C)
        first = max(start, k)  # positions before k predict sinks (or x_0 from sinks only): not scored
        if first < end:
            out[first - k : end - k] = _nll(model, hidden[first - start :], stream[first + 1 : end + 1]).cpu()
        bar.update(end - start)
    bar.close()
    return out


@torch.no_grad()
def dense_nll(
    model: torch.nn.Module, ids: torch.Tensor, max_len: int | None = None, chunk_size: int = CHUNK_SIZE, progress: bool = False
) -> torch.Tensor:
    """Dense attention over the first ``max_len`` text tokens (all when None): NLL (min(N, max_len) - 1,)."""
    if max_len is not None:
        if max_len < 2:
            raise StreamError(f"max_len must be >= 2, got {max_len}")
        ids = ids[:max_len]
    return streaming_nll(model, ids, 0, None, mode="fast", chunk_size=chunk_size, progress=progress)


@torch.no_grad()
def recompute_nll(
    model: torch.nn.Module, ids: torch.Tensor, window: int, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """Sliding window with re-computation: NLL (N - 1,), each token predicted by a fresh forward pass
    over the ``window`` tokens before it (at positions 0 .. window - 1).

    For a sink-token model the window is its k sink ids + the latest ``window - k`` text tokens, so
    the model always sees the start it was trained with.
    """
    stream, k = _with_prefix(model, ids)
    return sliding_window_nll(stream, k, window, trunk_position_nll(model), batch_size, progress)


def trunk_position_nll(model: torch.nn.Module) -> PositionNLL:
    """:data:`PositionNLL` of our GPT-NeoX: the trunk over the rows, the vocabulary head only where scored."""

    def score(rows: torch.Tensor, first: int, targets: torch.Tensor) -> torch.Tensor:
        hidden = model.hidden_states(rows)[:, first:]
        return _nll(model, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))

    return score


@torch.no_grad()
def sliding_window_nll(
    stream: torch.Tensor, k: int, window: int, position_nll: PositionNLL, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """The re-computation baseline over ``stream`` (k + N,): k fixed prefix ids (a sink-token model's
    sinks; none for other models), then the text. NLL (N - 1,) of text tokens 1 .. N - 1.

    Text token i is predicted from the prefix + the latest ``window - k`` text tokens before it (all
    of them while fewer), by a fresh forward: the first ``window - k`` targets from one causal pass,
    the rest in batches of ``batch_size`` windows of exactly ``window`` tokens.
    """
    text = window - k
    if text < 1:
        if not k:
            raise StreamError(f"window must be >= 1, got {window}")
        raise StreamError(f"window {window} leaves no room for text after the model's {k} sink token(s)")
    n = stream.numel() - k
    out = torch.empty(n - 1, dtype=torch.float32)
    # Targets i = 1 .. text: the context is the whole prefix so far; one causal pass scores them all.
    head = min(text, n - 1)
    out[:head] = position_nll(stream[None, : k + head], k, stream[None, k + 1 : k + head + 1]).cpu()
    # Targets i > text: context = prefix + ids[i - text : i], exactly ``window`` tokens, batched.
    targets = torch.arange(text + 1, max(n, text + 1))  # empty when the text fits one window
    prefix = stream[:k]
    bar = tqdm(total=targets.numel(), desc=f"recompute {window}", unit="tok", disable=not progress, mininterval=1.0)
    for chunk in targets.split(batch_size) if targets.numel() else ():
        rows = torch.stack([stream[k + i - text : k + i] for i in chunk.tolist()])  # (b, text)
        if k:
            rows = torch.cat([prefix.expand(rows.shape[0], k), rows], dim=1)
        out[chunk - 1] = position_nll(rows, window - 1, stream[k + chunk.to(stream.device)][:, None]).cpu()
        bar.update(chunk.numel())
    bar.close()
    return out


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL), accumulated in float64."""
    return math.exp(nll.double().mean().item())
