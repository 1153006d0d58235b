"""Decoding raw text bytes the way every corpus reader here does (bundled books and local files alike)."""

from __future__ import annotations


def decode_text(raw: bytes) -> str:
    """Bytes -> text: UTF-8 (BOM dropped), else Windows-1252, else Latin-1; CRLF and lone CR -> LF.

    Windows-1252 comes before Latin-1 because Gutenberg-era "Latin-1" files often use its curly quotes
    in 0x80-0x9F, which Latin-1 would turn into invisible control characters.
    """
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    return text.replace("\r\n", "\n").replace("\r", "\n")
