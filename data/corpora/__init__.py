"""The bundled default corpus: 18 public-domain Gutenberg books (the NLTK selection), split by book.

The split is fixed so every run, test and report sees the same held-out text. Like PG19, the
stream-test books are whole long books that no training sample ever came from; ``validation`` is
for the training loss curve. Source and licence: ``data/corpora/README.md``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from data.text import decode_text

CORPORA_DIR = Path(__file__).resolve().parent
GUTENBERG_DIR = CORPORA_DIR / "gutenberg"

# Fixed split by book (file stem). stream-test: the two long held-out books for streaming perplexity
# (Moby Dick first: it is the default long-stream text). validation: two shorter books.
SPLITS: dict[str, tuple[str, ...]] = {
    "stream-test": ("melville-moby_dick", "edgeworth-parents"),
    "validation": ("chesterton-thursday", "shakespeare-macbeth"),
    "train": (
        "austen-emma",
        "austen-persuasion",
        "austen-sense",
        "bible-kjv",
        "blake-poems",
        "bryant-stories",
        "burgess-busterbrown",
        "carroll-alice",
        "chesterton-ball",
        "chesterton-brown",
        "milton-paradise",
        "shakespeare-caesar",
        "shakespeare-hamlet",
        "whitman-leaves",
    ),
}
SPLIT_NAMES = tuple(SPLITS)
STREAM_TEST_BOOK = "melville-moby_dick"


def book_names() -> list[str]:
    """All bundled book names (file stems), sorted."""
    return sorted(p.name[: -len(".txt.gz")] for p in GUTENBERG_DIR.glob("*.txt.gz"))


def read_book(name: str) -> str:
    """One bundled book, decoded (UTF-8 or Latin-1) with LF line endings."""
    path = GUTENBERG_DIR / f"{name}.txt.gz"
    if not path.is_file():
        raise KeyError(f"no bundled book {name!r}; available: {', '.join(book_names())}")
    with gzip.open(path, "rb") as f:
        return decode_text(f.read())


def bundled_books(split: str) -> list[tuple[str, str]]:
    """``(name, text)`` for each book of ``split`` in {train, validation, stream-test}, in a fixed order."""
    if split not in SPLITS:
        raise KeyError(f"unknown bundled split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    return [(name, read_book(name)) for name in SPLITS[split]]


def stream_test_text() -> str:
    """The default long-stream evaluation text: Moby Dick (about 300k GPT-NeoX tokens), never trained on."""
    return read_book(STREAM_TEST_BOOK)
