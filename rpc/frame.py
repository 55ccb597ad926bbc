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
    "value_text",
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
    JSON text the frame was parsed from (not compared; a JSON channel sends it as is, so a bridge
    forwards frames byte for byte; :meth:`replace` drops it).
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
        try:
            if self.extra and not self.method and self.extra.get("jsonrpc") == "2.0":
                return _encode_jsonrpc(self)
            if style == "device":
                return _encode_device(self)
            return _encode_mos(self, html_escape)
        except FrameError:
            raise
        except (TypeError, ValueError) as e:  # e.g. bytes from a msgpack peer: JSON has no form for them
            raise FrameError(f"cannot encode the frame as JSON: {e}") from None

    def encode(self, style: Style = "mos", *, html_escape: bool = False) -> bytes:
        """The frame as UTF-8 bytes in the given style (no trailing newline)."""
        return self.to_json(style, html_escape=html_escape).encode("utf-8")


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
        obj = _DECODE(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        obj = _retry_vt(raw, e)
    if not isinstance(obj, dict):
        raise FrameError(f"a frame must be a JSON object, not {type(obj).__name__}")
    if _SURROGATE_RE.search(raw) and _has_lone_surrogate(obj):
        # JSON lets "\ud800" stand alone; such a string has no UTF-8 form, so no reply or forwarded
        # copy of the frame could ever be written. Refuse it here, as bad input.
        raise FrameError("invalid JSON: a lone UTF-16 surrogate escape")
    return _from_obj(obj, raw)


_SURROGATE_RE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


_DECODE = json.JSONDecoder().decode
_VT_BYTES_RE = re.compile(rb"(?<!\\)((?:\\\\)*)\\v")


def _retry_vt(raw: bytes, first: Exception) -> Any:
    """Devices write a vertical tab as the non-standard ``\\v`` (frozen ``%Q``); accept it."""
    if b"\\v" in raw:
        try:
            return _DECODE(_VT_BYTES_RE.sub(rb"\1\\u000b", raw).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    raise FrameError(f"invalid JSON: {first}") from None


def _from_obj(obj: Mapping[str, Any], raw: bytes | None) -> Frame:
    if obj.keys() <= _KNOWN:
        kw: dict[str, Any] = dict(obj)
        extra: dict[str, Any] | None = None
    else:
        kw = {k: v for k, v in obj.items() if k in _KNOWN}
        extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    fid = kw.get("id")
    if fid is not None and (fid.__class__ is bool or not isinstance(fid, int | float | str)):
        raise FrameError("id must be a number or a string")
    for name in _STR_MEMBERS:
        if name in kw:
            val = kw[name]
            if val is None:
                del kw[name]
            elif val.__class__ is not str:
                raise FrameError(f"{name} must be a string")
    if "error" in kw:
        err = kw["error"]
        if err is None:
            del kw["error"]
        else:
            kw["error"] = _error_info(err)
    if "auth" in kw and kw["auth"] is not None and not isinstance(kw["auth"], dict):
        raise FrameError("auth must be an object")
    for name in ("v", "deadline", "timeout"):
        if name in kw:
            val = kw[name]
            if val is not None and (val.__class__ is bool or not isinstance(val, int)):
                del kw[name]  # the device parses these with %d and ignores them
    if "nr" in kw:
        kw["nr"] = bool(kw["nr"])
    if extra:
        kw["extra"] = extra
    return Frame(raw=raw, **kw)


def _error_info(err: Any) -> ErrorInfo:
    if not isinstance(err, dict):
        raise FrameError("error must be an object")
    code = err.get("code", 0)
    if code.__class__ is bool or not isinstance(code, int):
        if isinstance(code, float) and code.is_integer():
            code = int(code)
        else:
            raise FrameError("error.code must be an integer")
    msg = err.get("message")
    if msg is not None and not isinstance(msg, str):
        msg = json.dumps(msg, separators=(",", ":"))
    return ErrorInfo(code, msg)


# ---------------------------------------------------------------------------------------------
# encoding

_VT_RE = re.compile(r"(?<!\\)((?:\\\\)*)\\u000b")
_HTML = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_HTML_RE = re.compile("[<>&\u2028\u2029]")
_GO_RE = re.compile("[\u2028\u2029]")
_COMPACT = (",", ":")


_ENC_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=_COMPACT).encode
_ENC_SPACED = json.JSONEncoder(ensure_ascii=False).encode


def _dumps(value: Any, separators: tuple[str, str] | None = None) -> str:
    if isinstance(value, RawJSON):
        return str(value)
    return _ENC_COMPACT(value) if separators is _COMPACT else _ENC_SPACED(value)


def frozen_quote(s: str) -> str:
    """Quote a string as frozen's ``%Q`` does: ``\\b \\t \\n \\v \\f \\r`` short, other controls ``\\u00XX``."""
    out = _ENC_SPACED(s)
    if "\\u000b" in out:
        out = _VT_RE.sub(r"\1\\v", out)
    return out


def value_text(value: Any, style: Style = "device") -> str:
    """A member value as JSON text the way ``style`` writes it: a device's ``", "``/``": "`` spacing
    (frozen ``%Q`` strings), or mos's compact form. :class:`RawJSON` is used verbatim."""
    return _device_value(value) if style == "device" else _dumps(value, _COMPACT)


def _device_value(value: Any) -> str:
    text = _dumps(value)
    if "\\u000b" in text:
        text = _VT_RE.sub(r"\1\\v", text)
    return text


def _device_id(fid: int | float | str) -> str:
    if isinstance(fid, str):
        return frozen_quote(fid)
    if fid.__class__ is int and fid >= 0:
        return str(fid)
    return frozen_quote(json.dumps(fid))


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
    if f.raw is not None:  # a reply built by the JSON-RPC dispatcher (one object or a batch array)
        return f.raw.decode("utf-8")
    body = '{"jsonrpc":"2.0","id":' + json.dumps(f.id, ensure_ascii=False)
    if f.error is not None and f.error.code != 0:
        return body + ',"error":' + _dumps(f.error.to_json_obj(), _COMPACT) + "}"
    return body + ',"result":' + ("null" if f.result is ABSENT else _dumps(f.result, _COMPACT)) + "}"


def _encode_mos(f: Frame, html_escape: bool) -> str:
    parts: list[str] = []
    add = parts.append
    if f.v:
        add('"v":%d' % f.v)
    if f.src:
        add('"src":' + _ENC_COMPACT(f.src))
    if f.dst:
        add('"dst":' + _ENC_COMPACT(f.dst))
    if f.key:
        add('"key":' + _ENC_COMPACT(f.key))
    if f.tag:
        add('"tag":' + _ENC_COMPACT(f.tag))
    if f.id is not None and f.id != "" and f.id != 0:
        add('"id":' + (str(f.id) if f.id.__class__ is int else _ENC_COMPACT(f.id)))
    if f.method:
        add('"method":' + _ENC_COMPACT(f.method))
    if f.params is not ABSENT:
        add('"params":' + _dumps(f.params, _COMPACT))
    if f.deadline:
        add('"deadline":%d' % f.deadline)
    if f.timeout:
        add('"timeout":%d' % f.timeout)
    if f.result is not ABSENT:
        add('"result":' + _dumps(f.result, _COMPACT))
    if f.error is not None:
        e = f.error
        if e.message:
            add('"error":{"code":%d,"message":%s}' % (e.code, _ENC_COMPACT(e.message)))
        else:  # Go's `message,omitempty`: an empty message is not written
            add('"error":{"code":%d}' % e.code)
    if f.trace:
        add('"trace":' + _dumps(f.trace, _COMPACT))
    if f.auth:
        add('"auth":' + _dumps(f.auth, _COMPACT))
    if f.nr:
        add('"nr":true')
    if f.args is not ABSENT:
        add('"args":' + _dumps(f.args, _COMPACT))
    for k, val in f.extra.items():
        add(_ENC_COMPACT(k) + ":" + _dumps(val, _COMPACT))
    text = "{" + ",".join(parts) + "}"
    if html_escape:
        if _HTML_RE.search(text):
            text = _HTML_RE.sub(lambda m: _HTML[m.group(0)], text)
    elif _GO_RE.search(text):
        text = _GO_RE.sub(lambda m: _HTML[m.group(0)], text)
    return text
