"""Throughput of ``sinklm data prepare`` against the ``tokenizers`` library's own batch encoding.

Both run in this process on the same text (the bundled Gutenberg books by default) and the same
machine, so the ratio is meaningful even on a busy box:

- ``tokenizers`` baselines: ``Tokenizer.encode_batch`` (Rust, rayon threads on all cores) on the whole
  documents, again on the documents cut into the same line pieces prepare uses (more parallel), and
  plain ``encode`` piece by piece on one thread.
- ``prepare``: the full pipeline (piece cutting, worker processes, EOS, uint16 shards, sha256, manifest).

Prints a table, one JSON line, and last the ratio prepare / best of the tokenizers baselines
(> 1: prepare is faster).

    python benchmarks/bench_prepare.py                  # all 18 books, 3.2M tokens
    python benchmarks/bench_prepare.py --workers 4 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="prepare worker processes")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs for each side")
    parser.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of each book")
    args = parser.parse_args(argv)

    from tokenizers import Tokenizer

    from data.corpora import SPLITS, read_book
    from data.prepare import prepare
    from data.tokenizing import split_document, text_tokenizer
    from data.tokenizer import load_tokenizer

    names = [name for split in SPLITS.values() for name in split]
    texts = [read_book(name)[: args.max_chars] for name in names]
    chars = sum(len(t) for t in texts)
    tok = load_tokenizer()
    text_tokenizer = text_tokenizer(tok.backend_tokenizer.to_str())
    backend = Tokenizer.from_str(text_tokenizer.json)
    pieces = [piece for text in texts for piece in split_document(text)]

    def best_of(fn):
        best, out = float("inf"), None
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    doc_s, encodings = best_of(lambda: backend.encode_batch(texts, add_special_tokens=False))
    text_tokens = sum(len(e.ids) for e in encodings)
    piece_s, piece_enc = best_of(lambda: backend.encode_batch(pieces, add_special_tokens=False))
    assert sum(len(e.ids) for e in piece_enc) == text_tokens, "piece cuts changed the token count"
    # One thread, no rayon: on a small or busy machine this can beat encode_batch, so it joins the baseline.
    serial_s, serial_enc = best_of(lambda: [backend.encode(p, add_special_tokens=False) for p in pieces])
    assert sum(len(e.ids) for e in serial_enc) == text_tokens

    with tempfile.TemporaryDirectory() as tmp:
        def run_prepare():
            return prepare(tmp, {"train": texts}, tokenizer=tok, workers=args.workers, overwrite=True, progress=False)

        prep_s, result = best_of(run_prepare)
    prepared_tokens = result.tokens  # text tokens + one EOS per document
    assert prepared_tokens == text_tokens + len(texts), (prepared_tokens, text_tokens)

    rates = {
        "tokenizers_encode_batch_documents": text_tokens / doc_s,
        "tokenizers_encode_batch_pieces": text_tokens / piece_s,
        "tokenizers_encode_serial": text_tokens / serial_s,
        "prepare": prepared_tokens / prep_s,
    }
    baseline = max(v for k, v in rates.items() if k.startswith("tokenizers"))
    ratio = rates["prepare"] / baseline
    print(f"text: {len(texts)} books, {chars:,} characters, {text_tokens:,} tokens; {os.cpu_count()} CPU(s)")
    for name, rate in rates.items():
        print(f"  {name:<36} {rate:>12,.0f} tokens/s")
    print(json.dumps({
        "books": len(texts), "characters": chars, "tokens": text_tokens, "cpus": os.cpu_count(),
        "workers": args.workers, "repeat": args.repeat,
        **{f"{k}_tokens_per_s": round(v) for k, v in rates.items()}, "ratio": round(ratio, 3),
    }))
    print(f"ratio prepare / best tokenizers baseline: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
