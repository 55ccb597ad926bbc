"""Looking at frames as the bytes they were: member order and the exact text of a member's value."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["member_order", "member_text", "show"]

_DEC = json.JSONDecoder()


def _members(raw: bytes | str) -> list[tuple[str, int, int]]:
    """Top-level members of a JSON object: (name, value start, value end) in text offsets."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    i = text.index("{") + 1
    out: list[tuple[str, int, int]] = []
    n = len(text)

    def ws(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = ws(i)
    if i < n and text[i] == "}":
        return out
    while i < n:
        name, i = _DEC.raw_decode(text, ws(i))
        i = ws(i)
        if text[i] != ":":
            raise ValueError("':' expected")
        start = ws(i + 1)
        _, end = _DEC.raw_decode(text, start)
        out.append((str(name), start, end))
        i = ws(end)
        if i < n and text[i] == ",":
            i += 1
            continue
        break
    return out


def member_order(raw: bytes | str) -> list[str]:
    """Names of the top-level members in the order they appear in the text."""
    return [m[0] for m in _members(raw)]


def member_text(raw: bytes | str, name: str) -> str | None:
    """The exact text of a top-level member's value (e.g. ``123`` or ``"123"`` for ``id``)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    for m, start, end in _members(text):
        if m == name:
            return text[start:end]
    return None


def show(value: Any, *, limit: int = 300) -> str:
    """Short printable text for a report's seen/expected column."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False) if _jsonable(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
