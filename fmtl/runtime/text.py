"""Untrusted text (file names, class names) made safe to write: to UTF-8 files, terminals and spreadsheets.

- ``shown_name``: a file name whose bytes are not UTF-8 (Python keeps them as lone surrogates,
  ``os.fsdecode``) gets those bytes as backslash escapes, ``b'b\\xff.png'`` -> ``b\\xff.png``, so
  it can be written as UTF-8 anywhere. Used by every output format.
- ``terminal_text``: also control characters (newlines, ESC sequences that recolour or retitle
  a terminal) and bidirectional overrides (which make a name read backwards) as escapes.
- ``csv_cell``: a cell a spreadsheet would run as a formula (first character ``= + - @``, tab
  or carriage return) gets a leading ``'`` so it is shown as text (OWASP's CSV injection rule).
"""

from __future__ import annotations

import unicodedata

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Unicode's explicit direction controls: LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI, and the marks.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def shown_name(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes) and any other lone surrogate as backslash escapes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from undecodable bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def terminal_text(text: str) -> str:
    """``shown_name(text)`` with control characters and direction overrides as escapes (``\\n``, ``\\x1b``)."""
    text = shown_name(text)
    if text.isprintable() and not _BIDI.intersection(text):
        return text
    return "".join(_escape(char) for char in text)


def _escape(char: str) -> str:
    if char in _BIDI or unicodedata.category(char) in ("Cc", "Zl", "Zp"):
        return char.encode("unicode_escape").decode("ascii")
    return char


def csv_cell(text: str) -> str:
    """``shown_name(text)``, prefixed with ``'`` when a spreadsheet would read it as a formula."""
    text = shown_name(text)
    return "'" + text if text.startswith(FORMULA_STARTS) else text
