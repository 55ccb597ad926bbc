"""JSON text utilities that work on the text itself, so numbers and escapes stay verbatim.

``mos call`` prints a result with Go's ``json.MarshalIndent(raw, "", "  ")``: the raw JSON is
compacted with HTML escaping (``<`` ``>`` ``&`` become ``\\u003c`` ``\\u003e`` ``\\u0026``, U+2028/9
escaped) and re-indented; numbers and other string escapes are kept exactly as the device sent them.
:func:`go_indent` does the same on text. :func:`member_text` finds a top-level member's value text
in a frame, so the CLI can print the device's ``result`` without re-encoding it.
"""

from __future__ import annotations

__all__ = ["compact", "go_indent", "member_text"]

_WS = " \t\r\n"
_HTML = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _string_end(text: str, i: int) -> int:
    """Index just past the string starting at ``text[i] == '"'``."""
    i += 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    raise ValueError("unterminated string")


def _escape_string(s: str) -> str:
    if any(c in s for c in _HTML):
        return "".join(_HTML.get(c, c) for c in s)
    return s


def compact(text: str) -> str:
    """``text`` without insignificant whitespace, as Go compacts a ``json.RawMessage`` (strings and
    numbers are kept verbatim, e.g. ``1.50``, ``1e3``, ``\\u00e9``)."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = _string_end(text, i)
            out.append(text[i:j])
            i = j
            continue
        if c not in _WS:
            out.append(c)
        i += 1
    return "".join(out)


def go_indent(text: str, indent: str = "  ") -> str:
    """Re-indent JSON ``text`` as Go's ``MarshalIndent`` does (empty containers stay ``{}``/``[]``)."""
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    need_newline = False  # an opening bracket was written; newline+indent pending before next value
    while i < n:
        c = text[i]
        if c in _WS:
            i += 1
            continue
        if c == '"':
            j = _string_end(text, i)
            if need_newline:
                out.append("\n" + indent * depth)
                need_newline = False
            out.append(_escape_string(text[i:j]))
            i = j
            continue
        if c in "{[":
            if need_newline:
                out.append("\n" + indent * depth)
            out.append(c)
            depth += 1
            need_newline = True
            i += 1
            continue
        if c in "}]":
            depth -= 1
            if need_newline:  # empty container
                need_newline = False
            else:
                out.append("\n" + indent * depth)
            out.append(c)
            i += 1
            continue
        if c == ",":
            out.append(",\n" + indent * depth)
            i += 1
            continue
        if c == ":":
            out.append(": ")
            i += 1
            continue
        # literal: number, true, false, null
        j = i
        while j < n and text[j] not in _WS and text[j] not in ',:{}[]"':
            j += 1
        if need_newline:
            out.append("\n" + indent * depth)
            need_newline = False
        out.append(text[i:j])
        i = j
    return "".join(out)


def _value_end(text: str, i: int) -> int:
    """Index just past the JSON value starting at ``i`` (whitespace already skipped)."""
    c = text[i]
    if c == '"':
        return _string_end(text, i)
    if c in "{[":
        depth = 0
        n = len(text)
        while i < n:
            c = text[i]
            if c == '"':
                i = _string_end(text, i)
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError("unterminated container")
    j = i
    while j < len(text) and text[j] not in _WS and text[j] not in ",}]":
        j += 1
    return j


def member_text(text: str, name: str) -> str | None:
    """The raw text of top-level member ``name`` of the JSON object ``text``, or None if absent."""
    i = text.index("{") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in _WS + ",":
            i += 1
        if i >= n or text[i] == "}":
            return None
        j = _string_end(text, i)
        key = text[i + 1 : j - 1]
        i = j
        while text[i] in _WS:
            i += 1
        i += 1  # ':'
        while text[i] in _WS:
            i += 1
        end = _value_end(text, i)
        if key == name:
            return text[i:end]
        i = end
    return None
