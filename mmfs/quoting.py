"""Paths as people see them: quoted the way git quotes paths.

Pure and light (no model, no trio): the verbs that print paths import it.
"""

from __future__ import annotations

C_ESCAPES = {0x07: "a", 0x08: "b", 0x09: "t", 0x0A: "n", 0x0B: "v", 0x0C: "f", 0x0D: "r", 0x22: '"', 0x5C: "\\"}


def quote_path(path: bytes) -> str:
    """A path as git shows it (with core.quotePath=false): as it is when it is
    printable UTF-8 without ``"`` or ``\\``; else in double quotes, with C
    escapes (``\\t``, ``\\n``, ``\\"``, ``\\\\``...) and ``\\ooo`` (octal) for each
    other byte that is not printable UTF-8."""
    text = path.decode(errors="surrogateescape")
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return '"' + "".join(quoted_char(char) for char in text) + '"'


def quoted_char(char: str) -> str:
    code = ord(char)
    if code in C_ESCAPES:
        return "\\" + C_ESCAPES[code]
    if char.isprintable():
        return char
    raw = bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else char.encode()  # an undecodable byte, or a character
    return "".join(f"\\{byte:03o}" for byte in raw)
