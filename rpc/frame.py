"""mgRPC frames: parse any frame, encode requests like ``mos`` and replies like a device.

Sans-I/O: bytes in, :class:`Frame` out, and back. See ``spec/frame.md``.

Two encodings exist on the wire and both are reproduced byte for byte:

* **mos style** (:meth:`Frame.encode` with ``style="mos"``): Go ``encoding/json`` of the mos
  frame struct, members in the struct's order ``v, src, dst, key, tag, id, method, params,
  deadline, timeout, result, error, trace, auth, nr, args``, empty members omitted, compact.
  Unknown members of a parsed frame follow at the end, so a bridge never drops a field.
* **device style** (``style="device"``): the fixed order of rpc-common
  ``id, src, dst, tag, key, method, params|args, result|error``; the id is written bare when its
  text is all digits; strings escaped as frozen's ``%Q`` does (``\\v`` included).

Decisions where the device's own behaviour is not valid JSON (spec/frame.md §9): a *string* id is
always echoed as a JSON string (a device would echo ``"007"`` as the invalid bare ``007``); a number
id that is negative or fractional is echoed as a string of its text, as a device does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from rpc.errors import FrameError, FrameTooLarge

__all__ = [
    "ABSENT",
    "DEFAULT_MAX_FRAME_SIZE",
    "ErrorInfo",
    "Frame",
    "RawJSON",
    "Style",
    "frozen_quote",
    "parse_frame",
]

DEFAULT_MAX_FRAME_SIZE = 4096

Style = Literal["mos", "device"]


class _Absent:
    """Marker for a member that is not in the frame (distinct from JSON ``null``)."""

    _inst: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


class RawJSON(str):
    """JSON text inserted verbatim when a frame is encoded (e.g. a device result with its spacing)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The ``error`` member: ``code`` (0 means success) and an optional ``message``."""

    code: int
    message: str | None = None

    @property
    def ok(self) -> bool:
        """True when the code is 0, i.e. a success reported through the error path."""
        return self.code == 0

    def to_json_obj(self) -> dict[str, Any]:
        """The member as a plain dict, message omitted when absent."""
        d: dict[str, Any] = {"code": self.code}
        if self.message is not None:
            d["message"] = self.message
        return d


_KNOWN = frozenset(
    (
        "v", "id", "src", "dst", "tag", "key", "method", "params", "args", "result", "error",
        "auth", "nr", "deadline", "timeout", "trace",
    )
)  # fmt: skip
_STR_MEMBERS = ("src", "dst", "tag", "key", "method")


@dataclass(frozen=True, slots=True)
class Frame:
    """One mgRPC frame. A frame with a non-empty ``method`` is a request, otherwise a response.

    ``params``, ``args`` and ``result`` are :data:`ABSENT` when missing (``None`` is JSON ``null``).
    ``extra`` holds members this library does not know, kept for bridges. ``raw`` is the exact
    text the frame was parsed from (not compared, not encoded unless asked for).
    """

    id: int | float | str | None = None
    src: str = ""
    dst: str = ""
    method: str = ""
    params: Any = ABSENT
    args: Any = ABSENT
    result: Any = ABSENT
    error: ErrorInfo | None = None
    tag: str = ""
    key: str = ""
    auth: Mapping[str, Any] | None = None
    nr: bool = False
    v: int | None = None
    deadline: int | None = None
    timeout: int | None = None
    trace: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    raw: bytes | None = field(default=None, compare=False, repr=False)

    # -- classification -------------------------------------------------------------------------
    @property
    def is_request(self) -> bool:
        """True if the frame carries a method."""
        return bool(self.method)

    @property
    def is_response(self) -> bool:
        """True if the frame carries no method."""
        return not self.method

    @property
    def wants_reply(self) -> bool:
        """A request is answered only when it has an id (spec/frame.md §1)."""
        return self.id is not None and self.id != ""

    @property
    def arguments(self) -> Any:
        """The request's arguments: ``params`` if present, else the legacy ``args`` (None if neither)."""
        if self.params is not ABSENT:
            return self.params
        if self.args is not ABSENT:
            return self.args
        return None

    @property
    def ok(self) -> bool:
        """For a response: no error, or an error with code 0."""
        return self.error is None or self.error.code == 0

    def replace(self, **changes: Any) -> Frame:
        """A copy with some members changed (``raw`` is dropped, since the text no longer matches)."""
        changes.setdefault("raw", None)
        return dataclasses.replace(self, **changes)

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def request(
        cls,
        method: str,
        params: Any = ABSENT,
        *,
        id: int | str | None = None,
        src: str = "",
        dst: str = "",
        compat_args: bool = False,
        **kw: Any,
    ) -> Frame:
        """Build a request; with ``compat_args`` the arguments go in ``args`` as ``--mgrpc-compat-args``."""
        if compat_args:
            return cls(id=id, src=src, dst=dst, method=method, args=params, **kw)
        return cls(id=id, src=src, dst=dst, method=method, params=params, **kw)

    def reply(self, result: Any = None, *, src: str = "") -> Frame:
        """The success response to this request: ``dst`` = our ``src``, ``tag`` copied."""
        return Frame(id=self.id, src=src or self.dst, dst=self.src, tag=self.tag, result=result)

    def reply_error(self, code: int, message: str | None = None, *, src: str = "") -> Frame:
        """The error response to this request."""
        return Frame(id=self.id, src=src or self.dst, dst=self.src, tag=self.tag, error=ErrorInfo(code, message))

    # -- parsing ----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview | str, *, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Frame:
        """Parse one frame; raise :class:`FrameError` (or :class:`FrameTooLarge`) on bad input."""
        return parse_frame(data, max_size=max_size)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, raw: bytes | None = None) -> Frame:
        """Build a frame from a decoded JSON object, checking member types."""
        return _from_obj(obj, raw)

    # -- encoding ---------------------------------------------------------------------------------
    def to_json(self, style: Style = "mos", *, html_escape: bool = False) -> str:
        """The frame as JSON text in the given style (no trailing newline).

        A response to a JSON-RPC 2.0 request (``extra`` holds ``"jsonrpc": "2.0"``) is always
        written in JSON-RPC 2.0 form, whatever the style.
        """
        if self.extra and not self.method and self.extra.get("jsonrpc") == "2.0":
            return _encode_jsonrpc(self)
        if style == "device":
            return _encode_device(self)
        return _encode_mos(self, html_escape)

    def encode(self, style: Style = "mos", *, html_escape: bool = False) -> bytes:
        """The frame as UTF-8 bytes in the given style (no trailing newline)."""
        return self.to_json(style, html_escape=html_escape).encode("utf-8")

    def to_obj(self) -> dict[str, Any]:
        """All present members as a plain dict (mos order, extras last)."""
        return json.loads(_encode_mos(self, False))


# ---------------------------------------------------------------------------------------------
# parsing


def parse_frame(data: bytes | bytearray | memoryview | str, *, max_size: int = DEFAULT_MAX_FRAME_SIZE) -> Frame:
    """Parse bytes (or text) holding one JSON frame. Only :class:`FrameError` is ever raised."""
    if isinstance(data, str):
        raw = data.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(data)
    if max_size and len(raw) > max_size:
        raise FrameTooLarge(len(raw), max_size)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        obj = _retry_vt(raw, e)
    if not isinstance(obj, dict):
        raise FrameError(f"a frame must be a JSON object, not {type(obj).__name__}")
    return _from_obj(obj, raw)


_VT_BYTES_RE = re.compile(rb"(?<!\\)((?:\\\\)*)\\v")


def _retry_vt(raw: bytes, first: Exception) -> Any:
    """Devices write a vertical tab as the non-standard ``\\v`` (frozen ``%Q``); accept it."""
    if b"\\v" in raw:
        try:
            return json.loads(_VT_BYTES_RE.sub(rb"\1\\u000b", raw))
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    raise FrameError(f"invalid JSON: {first}") from None


def _from_obj(obj: Mapping[str, Any], raw: bytes | None) -> Frame:
    kw: dict[str, Any] = {}
    extra: dict[str, Any] | None = None
    for k, val in obj.items():
        if k in _KNOWN:
            kw[k] = val
        else:
            if extra is None:
                extra = {}
            extra[k] = val
    fid = kw.get("id")
    if fid is not None and (isinstance(fid, bool) or not isinstance(fid, int | float | str)):
        raise FrameError("id must be a number or a string")
    for name in _STR_MEMBERS:
        val = kw.get(name)
        if val is None:
            kw.pop(name, None)
        elif not isinstance(val, str):
            raise FrameError(f"{name} must be a string")
    err = kw.get("error")
    if err is not None:
        if not isinstance(err, dict):
            raise FrameError("error must be an object")
        code = err.get("code", 0)
        if isinstance(code, bool) or not isinstance(code, int):
            if isinstance(code, float) and code.is_integer():
                code = int(code)
            else:
                raise FrameError("error.code must be an integer")
        msg = err.get("message")
        if msg is not None and not isinstance(msg, str):
            msg = json.dumps(msg, separators=(",", ":"))
        kw["error"] = ErrorInfo(code, msg)
    elif "error" in kw:
        del kw["error"]
    auth = kw.get("auth")
    if auth is not None and not isinstance(auth, dict):
        raise FrameError("auth must be an object")
    v = kw.get("v")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        kw.pop("v")  # the device parses it with %d and ignores it
    for name in ("deadline", "timeout"):
        val = kw.get(name)
        if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
            kw.pop(name)
    nr = kw.get("nr")
    if nr is not None:
        kw["nr"] = bool(nr)
    if extra:
        kw["extra"] = extra
    return Frame(raw=raw, **kw)


# ---------------------------------------------------------------------------------------------
# encoding

_GO_ORDER = (
    "v", "src", "dst", "key", "tag", "id", "method", "params", "deadline", "timeout", "result",
    "error", "trace", "auth", "nr", "args",
)  # fmt: skip
_VT_RE = re.compile(r"(?<!\\)((?:\\\\)*)\\u000b")
_HTML = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_HTML_RE = re.compile("[<>&\u2028\u2029]")
_GO_RE = re.compile("[\u2028\u2029]")
_COMPACT = (",", ":")


def _dumps(value: Any, separators: tuple[str, str] | None = None) -> str:
    if isinstance(value, RawJSON):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=separators)


def frozen_quote(s: str) -> str:
    """Quote a string as frozen's ``%Q`` does: ``\\b \\t \\n \\v \\f \\r`` short, other controls ``\\u00XX``."""
    out = json.dumps(s, ensure_ascii=False)
    if "\\u000b" in out:
        out = _VT_RE.sub(r"\1\\v", out)
    return out


def _device_value(value: Any) -> str:
    text = _dumps(value)
    if "\\u000b" in text:
        text = _VT_RE.sub(r"\1\\v", text)
    return text


def _device_id(fid: int | float | str) -> str:
    if isinstance(fid, str):
        return frozen_quote(fid)
    text = json.dumps(fid)
    return text if text.isdigit() else frozen_quote(text)


def _encode_device(f: Frame) -> str:
    parts: list[str] = []
    if f.id is not None and f.id != "":
        parts.append('"id":' + _device_id(f.id))
    parts.append('"src":' + (frozen_quote(f.src) if f.src else "null"))
    if f.dst:
        parts.append('"dst":' + frozen_quote(f.dst))
    if f.tag:
        parts.append('"tag":' + frozen_quote(f.tag))
    if f.key:
        parts.append('"key":' + frozen_quote(f.key))
    if f.method:
        parts.append('"method":' + frozen_quote(f.method))
        if f.params is not ABSENT:
            parts.append('"params":' + _device_value(f.params))
        elif f.args is not ABSENT:
            parts.append('"args":' + _device_value(f.args))
        if f.auth is not None:
            parts.append('"auth":' + _dumps(f.auth, _COMPACT))
    elif f.error is not None:
        e = f.error
        if e.message is None:
            parts.append('"error":{"code":%d}' % e.code)
        else:
            parts.append('"error":{"code":%d,"message":%s}' % (e.code, frozen_quote(e.message)))
    else:
        parts.append('"result":' + ("null" if f.result is ABSENT else _device_value(f.result)))
    return "{" + ",".join(parts) + "}"


def _encode_jsonrpc(f: Frame) -> str:
    body = '{"jsonrpc":"2.0","id":' + json.dumps(f.id, ensure_ascii=False)
    if f.error is not None and f.error.code != 0:
        return body + ',"error":' + _dumps(f.error.to_json_obj(), _COMPACT) + "}"
    return body + ',"result":' + ("null" if f.result is ABSENT else _dumps(f.result, _COMPACT)) + "}"


def _go_member(name: str, f: Frame) -> Any:
    """The value of a member for mos-style encoding, or ABSENT when omitempty drops it."""
    val = getattr(f, name)
    if name in ("params", "args", "result"):
        return val
    if name == "error":
        return ABSENT if val is None else val.to_json_obj()
    if name == "nr":
        return True if val else ABSENT
    if name == "id":
        return ABSENT if val is None or val == "" or val == 0 else val
    if val is None or val == "" or val == 0:
        return ABSENT
    return val


def _encode_mos(f: Frame, html_escape: bool) -> str:
    parts: list[str] = []
    for name in _GO_ORDER:
        val = _go_member(name, f)
        if val is ABSENT:
            continue
        parts.append(f'"{name}":' + _dumps(val, _COMPACT))
    for k, val in f.extra.items():
        parts.append(json.dumps(k, ensure_ascii=False) + ":" + _dumps(val, _COMPACT))
    text = "{" + ",".join(parts) + "}"
    if html_escape:
        if _HTML_RE.search(text):
            text = _HTML_RE.sub(lambda m: _HTML[m.group(0)], text)
    elif _GO_RE.search(text):
        text = _GO_RE.sub(lambda m: _HTML[m.group(0)], text)
    return text
