"""The tokenizer: Pythia's GPT-NeoX-20B BPE (bundled) or any Hugging Face fast tokenizer, plus sink tokens.

Sink tokens are added as special tokens at exactly the ids :func:`data.sinks.sink_token_ids` reserves
after the base vocabulary (50,277 ... for GPT-NeoX), so the tokenizer, the loader and the model agree.
End of document is the tokenizer's EOS, ``<|endoftext|>`` (id 0 for GPT-NeoX).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data.shards import DataError
from data.sinks import padded_vocab_size as _padded_vocab_size
from data.sinks import sink_token_ids, sink_token_strings

BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "corpora" / "tokenizer" / "gpt-neox-20b.json.gz"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
_SINK_PATTERN = re.compile(r"^<\|sink(_\d+)?\|>$")


def _read_tokenizer_file(path: Path) -> Tokenizer:
    """A ``tokenizers`` JSON file, optionally gzip-compressed."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return Tokenizer.from_str(f.read())
    return Tokenizer.from_file(str(path))


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    vocab = backend.get_vocab(with_added_tokens=True)
    special = {}
    if EOS_TOKEN in vocab:
        special.update(eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    if PAD_TOKEN in vocab:
        special["pad_token"] = PAD_TOKEN
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)


BUNDLED_SPEC = "bundled:gpt-neox-20b"
"""How manifests and checkpoints name the bundled tokenizer; accepted back as a spec."""


def _load_base(spec: str | Path | None) -> PreTrainedTokenizerFast:
    if spec is None or str(spec) == BUNDLED_SPEC:
        return _wrap(_read_tokenizer_file(BUNDLED_TOKENIZER))
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return _wrap(_read_tokenizer_file(path))
        except Exception as err:  # tokenizers raises plain Exception subclasses on bad JSON
            raise DataError(f"{path}: not a tokenizers JSON file ({err})") from None
    if path.is_dir():
        if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            return _wrap(_read_tokenizer_file(path / "tokenizer.json"))
        if (path / "tokenizer.json").is_file() and _has_remote_code(path):
            # AutoTokenizer would read config.json, find its auto_map (a softmax1/sink_logit export) and ask
            # on the terminal whether to run that code -- for a tokenizer that needs none.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif str(spec).startswith(("/", ".", "~")) or str(spec).endswith((".json", ".json.gz")):
        raise DataError(f"tokenizer not found: {path}")
    else:
        # A hub name: needs network (or the local HF cache). Tests never take this path.
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(spec))
        except OSError as err:
            raise DataError(f"tokenizer {spec!r}: not a local file/folder and could not load it from the hub ({err})") from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer {spec!r}: got a slow {type(tokenizer).__name__}; a fast (Rust) tokenizer is required")
    return tokenizer


def _has_remote_code(folder: Path) -> bool:
    """Whether ``folder/config.json`` points transformers at bundled modelling code (``auto_map``)."""
    try:
        return "auto_map" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _existing_sinks(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {tok: idx for tok, idx in tokenizer.get_vocab().items() if _SINK_PATTERN.match(tok)}


def base_vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """Tokens of the text vocabulary, i.e. without sink tokens (50,277 for GPT-NeoX)."""
    sinks = _existing_sinks(tokenizer)
    return min(sinks.values()) if sinks else len(tokenizer)


def load_tokenizer(
    spec: str | Path | None = None,
    num_sink_tokens: int = 0,
    padded_vocab_size: int | None = None,
    prepend_sinks: bool = False,
) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer and give it ``num_sink_tokens`` sink special tokens.

    ``spec``: None or ``"bundled:gpt-neox-20b"`` (the bundled GPT-NeoX-20B tokenizer), a ``tokenizer.json`` (optionally ``.gz``),
    a local tokenizer folder (e.g. one of our HF exports), or a hub name. ``padded_vocab_size``: the
    model's embedding rows; a tokenizer needing more ids is an error. ``prepend_sinks``: install a
    post-processor that puts the sink tokens in front of every encoding (for HF exports; training data
    never uses it, the loader prepends sinks itself).
    """
    tokenizer = _load_base(spec)
    existing = _existing_sinks(tokenizer)
    base = base_vocab_size(tokenizer)
    name = spec or BUNDLED_TOKENIZER.name
    if padded_vocab_size is not None and base > padded_vocab_size:
        raise DataError(
            f"tokenizer {name} has {base} tokens but the model's padded vocabulary has only {padded_vocab_size} rows"
        )
    wanted = sink_token_strings(num_sink_tokens) if num_sink_tokens else []
    try:
        ids = sink_token_ids(base, num_sink_tokens, padded_size=padded_vocab_size or _padded_vocab_size(base))
    except ValueError as err:
        raise DataError(f"tokenizer {name}: {err}") from None
    if existing:
        # A folder we exported already carries its sinks: they must be exactly the requested ones.
        have = sorted(existing, key=existing.get)
        if have != wanted or [existing[t] for t in have] != ids:
            raise DataError(
                f"tokenizer {spec}: already has sink tokens {have} at ids {sorted(existing.values())}, "
                f"but {num_sink_tokens} sink token(s) {wanted} at ids {ids} were requested"
            )
    elif wanted:
        tokenizer.add_special_tokens({"additional_special_tokens": wanted}, replace_extra_special_tokens=False)
        got = tokenizer.convert_tokens_to_ids(wanted)
        if got != ids:
            raise DataError(f"tokenizer {spec}: sink tokens landed at ids {got}, expected {ids}")
    total = len(tokenizer)
    if padded_vocab_size is not None and total > padded_vocab_size:
        raise DataError(
            f"tokenizer {name} has {total} tokens but the model's padded vocabulary "
            f"has only {padded_vocab_size} rows"
        )
    if prepend_sinks and wanted:
        single = " ".join(wanted) + " $A"
        pair = " ".join(wanted) + " $A $B"
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=single, pair=pair, special_tokens=list(zip(wanted, ids))
        )
    return tokenizer


def tokenizer_state(tokenizer: PreTrainedTokenizerFast | Tokenizer) -> dict:
    """The backend tokenizer's full JSON state (parse once, reuse: it is megabytes)."""
    backend = tokenizer.backend_tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast) else tokenizer
    return json.loads(backend.to_str())


def is_sink_token(content: str) -> bool:
    return _SINK_PATTERN.match(content) is not None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast | Tokenizer | dict) -> str:
    """A short hash of what maps text to ids: model, normalizer, pre-tokenizer and the non-sink added
    tokens. Sink tokens and post-processors are left out, so a tokenizer with sinks added still matches
    the data prepared without them. Accepts a tokenizer or its :func:`tokenizer_state`."""
    if isinstance(tokenizer, dict):
        return _fingerprint_of_state(tokenizer)
    backend = tokenizer.backend_tokenizer if isinstance(tokenizer, PreTrainedTokenizerFast) else tokenizer
    return _fingerprint_of_json(backend.to_str())


@functools.lru_cache(maxsize=8)
def _fingerprint_of_json(tokenizer_json: str) -> str:
    # Cached: parsing and canonicalising a 1.5 MB vocabulary takes ~0.5 s, callers ask repeatedly.
    return _fingerprint_of_state(json.loads(tokenizer_json))


def _fingerprint_of_state(state: dict) -> str:
    added = [
        {"id": t["id"], "content": t["content"], "special": t["special"]}
        for t in state.get("added_tokens", [])
        if not is_sink_token(t["content"])
    ]
    keep = {
        "model": state.get("model"),
        "normalizer": state.get("normalizer"),
        "pre_tokenizer": state.get("pre_tokenizer"),
        "added_tokens": sorted(added, key=lambda t: t["id"]),
    }
    blob = json.dumps(keep, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
