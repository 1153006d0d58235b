"""Where sink tokens live in the vocabulary: the single source of truth for data and model.

Pythia's tokenizer has 50,277 tokens, padded to 50,304 rows in the embedding. ``k`` learnable sink
tokens take the first ``k`` spare rows: ids 50,277 ... 50,277 + k - 1. Both the data loader (which
prepends them) and the model config (which validates that they fit) call :func:`sink_token_ids`.
"""

from __future__ import annotations


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Round the tokenizer's vocabulary up to a multiple of ``multiple`` (GPT-NeoX's
    ``make_vocab_size_divisible_by``): 50,277 -> 50,304 for 128."""
    if vocab_size < 1 or multiple < 1:
        raise ValueError(f"vocab_size and multiple must be positive, got {vocab_size} and {multiple}")
    return -(-vocab_size // multiple) * multiple


def sink_token_ids(vocab_size: int, num_sink_tokens: int, padded_size: int | None = None) -> list[int]:
    """Token ids reserved for ``num_sink_tokens`` sink tokens after a ``vocab_size`` vocabulary.

    Raises ``ValueError`` when they do not fit in the padded embedding (``padded_size``, default
    the 128-multiple padding of ``vocab_size``).
    """
    if num_sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {num_sink_tokens}")
    padded = padded_vocab_size(vocab_size) if padded_size is None else padded_size
    if vocab_size + num_sink_tokens > padded:
        raise ValueError(
            f"sink_tokens={num_sink_tokens} does not fit in the padded vocabulary: ids "
            f"{vocab_size}..{vocab_size + num_sink_tokens - 1} exceed padded_vocab_size={padded} "
            f"(only {padded - vocab_size} spare rows)"
        )
    return list(range(vocab_size, vocab_size + num_sink_tokens))


def sink_token_strings(num_sink_tokens: int) -> list[str]:
    """Special-token strings: ``<|sink|>`` for one sink, ``<|sink_0|>``, ``<|sink_1|>``... for more."""
    if num_sink_tokens == 1:
        return ["<|sink|>"]
    return [f"<|sink_{i}|>" for i in range(num_sink_tokens)]
