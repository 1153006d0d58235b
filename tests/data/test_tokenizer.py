"""Tokenizer: the bundled GPT-NeoX-20B vocabulary, sink tokens at the reserved ids, fingerprints."""

from __future__ import annotations

import pytest

from data.shards import DataError
from data.sinks import sink_token_ids, sink_token_strings
from data.tokenizer import base_vocab_size, load_tokenizer, tokenizer_fingerprint


@pytest.fixture(scope="module")
def neox():
    return load_tokenizer()


def test_bundled_tokenizer_is_pythias(neox):
    """Prevents a wrong or altered vocabulary: 50,277 tokens, EOS <|endoftext|> = 0, known Pythia ids."""
    assert len(neox) == 50277 and base_vocab_size(neox) == 50277
    assert neox.eos_token == "<|endoftext|>" and neox.eos_token_id == 0
    assert neox.pad_token_id == 1
    # Reference ids from EleutherAI's 20B_tokenizer.json (Pythia): "Hello world" -> [12092, 1533].
    assert neox.encode("Hello world", add_special_tokens=False) == [12092, 1533]
    text = "Call me Ishmael.\n\n  Ünïcödé — «quotes»"
    assert neox.decode(neox.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("k", [1, 4])
def test_sink_tokens_at_reserved_ids(k):
    """Prevents data and model disagreeing on sink ids: the tokenizer's sink tokens sit exactly at
    sink_token_ids(50277, k), are special (never split, skipped on decode) and can be prepended."""
    tok = load_tokenizer(num_sink_tokens=k, prepend_sinks=True)
    ids = sink_token_ids(50277, k)
    assert tok.convert_tokens_to_ids(sink_token_strings(k)) == ids
    assert len(tok) == 50277 + k and base_vocab_size(tok) == 50277
    encoded = tok("Call me Ishmael.").input_ids
    assert encoded[:k] == ids and encoded[k:] == load_tokenizer().encode("Call me Ishmael.")
    assert tok.decode(encoded, skip_special_tokens=True) == "Call me Ishmael."


def test_fingerprint_ignores_sinks_but_not_vocabulary(neox, tmp_path):
    """Prevents false tokenizer-mismatch errors (sink tokens added later) and missed real mismatches."""
    with_sinks = load_tokenizer(num_sink_tokens=2, prepend_sinks=True)
    assert tokenizer_fingerprint(with_sinks) == tokenizer_fingerprint(neox)
    # An exported folder with sinks reloads with the same sinks and fingerprint.
    with_sinks.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok", num_sink_tokens=2)
    assert again.convert_tokens_to_ids(sink_token_strings(2)) == sink_token_ids(50277, 2)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(neox)
    with pytest.raises(DataError, match=r"already has sink tokens \['<\|sink_0\|>', '<\|sink_1\|>'\]"):
        load_tokenizer(tmp_path / "tok", num_sink_tokens=1)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    other = Tokenizer(WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}, unk_token="<|endoftext|>"))
    other.pre_tokenizer = Whitespace()
    other.save(str(tmp_path / "other.json"))
    small = load_tokenizer(tmp_path / "other.json", num_sink_tokens=1)
    assert tokenizer_fingerprint(small) != tokenizer_fingerprint(neox)
    assert small.convert_tokens_to_ids("<|sink|>") == 3 and small.eos_token_id == 0


def test_vocabulary_larger_than_the_model_is_an_error():
    """Prevents out-of-range embedding lookups: a tokenizer (with its sinks) larger than the model's
    padded vocabulary fails with both sizes in the message."""
    with pytest.raises(DataError, match="50277 tokens but the model's padded vocabulary has only 50000 rows"):
        load_tokenizer(num_sink_tokens=1, padded_vocab_size=50000)
    with pytest.raises(DataError, match="sink_tokens=28 does not fit"):
        load_tokenizer(num_sink_tokens=28)
    assert len(load_tokenizer(num_sink_tokens=27, padded_vocab_size=50304)) == 50304

