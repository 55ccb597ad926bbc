"""Frames as bytes, written and read here (standard library only, nothing shared with ``rpc/``).

The device style of the protocol reference (docs/protocol/frames.md §1.2): envelope members in the order
``id, src, dst, tag, payload`` with no whitespace between them; a numeric id whose text is all digits is
written bare, any other id as a JSON string; result bodies keep the handler's own spacing. Strings are
escaped the way the device's printf does (``\\v`` included, non-ASCII left as UTF-8 bytes).
"""

from __future__ import annotations

import json
import zlib
from typing import Any

__all__ = ["compact", "crc_hex", "id_text", "parse", "q", "reply", "spaced"]

_ESC = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v", 0x0C: "\\f", 0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}


def q(text: str) -> str:
    """``text`` as a quoted JSON string, escaped like the device's ``%Q``."""
    out = ['"']
    for ch in text:
        o = ord(ch)
        if o in _ESC:
            out.append(_ESC[o])
        elif o < 0x20:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def compact(value: Any) -> str:
    """JSON text with no spaces (how the device prints arrays and config)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def spaced(value: Any) -> str:
    """JSON text with ``": "`` and ``", "`` (how handlers printed with a format string look)."""
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)


def id_text(fid: Any) -> str:
    """The id as the device writes it: bare when its text is all digits, else a JSON string."""
    if isinstance(fid, str):
        return json.dumps(fid, ensure_ascii=False)
    text = repr(fid) if isinstance(fid, float) else str(fid)
    return text if text.isdigit() else q(text)


def reply(
    fid: Any,
    src: str,
    dst: str = "",
    tag: str = "",
    *,
    result: str | None = None,
    error: tuple[int, str] | None = None,
    id_writer: Any = id_text,
    order: tuple[str, ...] = ("id", "src", "dst", "tag"),
    sep: str = ",",
) -> str:
    """One device-style response frame; ``result`` is JSON text, ``error`` is (code, message)."""
    parts = {
        "id": f'"id":{id_writer(fid)}',
        "src": f'"src":{q(src)}',
        "dst": f'"dst":{q(dst)}' if dst else "",
        "tag": f'"tag":{q(tag)}' if tag else "",
    }
    members = [parts[k] for k in order if parts.get(k)]
    if error is not None:
        code, msg = error
        members.append(f'"error":{{"code":{code}' + (f',"message":{q(msg)}}}' if msg else "}"))
    if result is not None:
        members.append(f'"result":{result}')
    return "{" + sep.join(members) + "}"


def parse(data: bytes | str) -> dict[str, Any] | None:
    """A received frame as a dict (None when it is not a JSON object)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def crc_hex(data: bytes) -> str:
    """CRC-32 (IEEE) of ``data`` as 8 lowercase hex digits."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
