"""File names and messages as safe, single terminal lines.

A file name may hold anything but '/' and NUL: line breaks that would forge a second `error:` line, escape
sequences that drive the terminal, bidirectional overrides that reorder what is shown, bytes that are not
UTF-8. Every line the toolkit prints about a file shows the name through ``show``, and every message is
passed through ``one_line`` before it is printed, so one problem is always one line and the terminal only
ever receives printable text.
"""

from __future__ import annotations

import os
import unicodedata

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str | None:
    """The escape of one character, or None when it prints as itself."""
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:                       # a byte that is not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if ch in _SHORT:
        return _SHORT[ch]
    if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
    return None


def show(name) -> str:
    """A file name or path (str, bytes or PathLike) for a message: as it is when every character prints as
    itself, else in single quotes with control and format characters, line breaks and non-UTF-8 bytes
    escaped (backslashes and quotes escaped too, so the quoted form reads back unambiguously)."""
    text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    if all(_escape(c) is None for c in text) and text == text.strip():
        return text
    out = []
    for c in text:
        e = _escape(c)
        out.append(e if e is not None else "\\\\" if c == "\\" else "\\'" if c == "'" else c)
    return "'" + "".join(out) + "'"


def one_line(text) -> str:
    """A message as one printable line: control and format characters (line breaks included) and
    non-UTF-8 bytes escaped; ordinary text, backslashes included, unchanged."""
    text = str(text)
    return "".join(e if (e := _escape(c)) is not None else c for c in text)
