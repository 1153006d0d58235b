"""Bundled Gutenberg corpus: a fixed, disjoint split by book and robust decoding."""

from __future__ import annotations

import gzip

from data.corpora import GUTENBERG_DIR, SPLITS, book_names, bundled_books, read_book, stream_test_text
from data.text import decode_text


def test_split_is_by_book_disjoint_and_complete():
    """Prevents test text leaking into training: every bundled book is in exactly one split, and the
    stream-test split holds Moby Dick plus another long book."""
    assigned = [name for names in SPLITS.values() for name in names]
    assert sorted(assigned) == book_names() and len(book_names()) == 18
    assert len(set(assigned)) == len(assigned)
    assert "melville-moby_dick" in SPLITS["stream-test"] and len(SPLITS["stream-test"]) >= 2
    assert 1 <= len(SPLITS["validation"]) <= 2
    lengths = {name: len(read_book(name)) for name in SPLITS["stream-test"]}
    assert min(lengths.values()) > 800_000  # long books, like PG19's test set


def test_stream_test_text_is_moby_dick():
    """Prevents evaluating streaming perplexity on the wrong (possibly trained-on) text."""
    text = stream_test_text()
    assert text.startswith("[Moby Dick by Herman Melville 1851]")
    assert "Call me Ishmael." in text
    assert [name for name, _ in bundled_books("stream-test")][0] == "melville-moby_dick"


def test_latin1_and_crlf_books_decode_cleanly():
    """Prevents mojibake and stray carriage returns in training text: Latin-1 books decode to the right
    accented characters, CRLF books come out with LF only."""
    raw = gzip.open(GUTENBERG_DIR / "chesterton-ball.txt.gz").read()
    try:
        raw.decode("utf-8")
        raise AssertionError("chesterton-ball is expected to be Latin-1 in the source")
    except UnicodeDecodeError:
        pass
    ball = read_book("chesterton-ball")
    assert "\ufffd" not in ball and "\r" not in ball
    assert any(ch in ball for ch in "éèàç")  # Latin-1 accents decoded as such
    moby_raw = gzip.open(GUTENBERG_DIR / "melville-moby_dick.txt.gz").read()
    assert b"\r\n" in moby_raw
    moby = read_book("melville-moby_dick")
    assert "\r" not in moby and moby.count("\n") == moby_raw.count(b"\n")
    assert decode_text(b"caf\xe9\r\nna\xefve\rend") == "café\nnaïve\nend"
    assert decode_text("\ufeffcafé".encode("utf-8")) == "café"
    assert decode_text(b"\x93quoted\x94") == "\u201cquoted\u201d"  # Windows-1252 curly quotes
