"""Frame codecs: JSON (the wire format of ``mos`` and devices) and msgpack (between two mgrpc ends).

A codec turns one :class:`rpc.frame.Frame` into one message and back. msgpack keeps the same members
as JSON (a map with the same keys, in the same order as the JSON encoding of the style) but carries
binary values natively: ``OTA.Write`` data can travel as raw bytes instead of base64, a third smaller.
It is never the default: a ``mos`` peer cannot read it. Select it with ``?codec=msgpack`` on a URL.
"""

from __future__ import annotations

from typing import Any

from rpc.channel import FrameCodec, JsonCodec
from rpc.errors import FrameError, FrameTooLarge, UsageError
from rpc.frame import ABSENT, DEFAULT_MAX_FRAME_SIZE, Frame, RawJSON, Style

__all__ = ["CODECS", "AutoCodec", "JsonCodec", "MsgpackCodec", "codec_by_name", "device_codec"]


def _value(v: Any) -> Any:
    if isinstance(v, RawJSON):
        import json

        return json.loads(v)
    return v


def frame_map(frame: Frame, style: Style) -> dict[str, Any]:
    """The frame's members as a dict, ordered as the JSON encoding of ``style`` orders them."""
    d: dict[str, Any] = {}
    if style == "device":
        if frame.id is not None and frame.id != "":
            d["id"] = frame.id
        d["src"] = frame.src or None
        for k in ("dst", "tag", "key", "method"):
            if getattr(frame, k):
                d[k] = getattr(frame, k)
    else:
        for k in ("src", "dst", "key", "tag"):
            if getattr(frame, k):
                d[k] = getattr(frame, k)
        if frame.id is not None and frame.id != "":
            d["id"] = frame.id
        if frame.method:
            d["method"] = frame.method
    if frame.params is not ABSENT:
        d["params"] = _value(frame.params)
    if frame.args is not ABSENT:
        d["args"] = _value(frame.args)
    if frame.error is not None:
        d["error"] = frame.error.to_json_obj()
    elif frame.result is not ABSENT or (style == "device" and not frame.method):
        d["result"] = None if frame.result is ABSENT else _value(frame.result)
    if frame.auth:
        d["auth"] = dict(frame.auth)
    if frame.nr:
        d["nr"] = True
    for k in ("v", "deadline", "timeout", "trace"):
        if getattr(frame, k):
            d[k] = getattr(frame, k)
    d.update(frame.extra)
    return d


class MsgpackCodec:
    """One frame per message as a msgpack map (bytes values allowed). Needs the ``msgpack`` extra."""

    name = "msgpack"

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        try:
            import msgpack
        except ImportError as e:
            raise UsageError("the msgpack codec needs msgpack; install it with: pip install 'mgrpc[msgpack]'") from e
        self._msgpack = msgpack
        self.max_frame_size = max_frame_size

    def encode(self, frame: Frame, style: Style) -> bytes:
        """Encode ``frame`` (member order of ``style``)."""
        try:
            data: bytes = self._msgpack.packb(frame_map(frame, style), use_bin_type=True)
        except (OverflowError, TypeError, ValueError) as e:  # e.g. an integer beyond 64 bits
            raise FrameError(f"cannot encode the frame as msgpack: {e}") from None
        return data

    def decode(self, data: bytes) -> Frame:
        """Decode one message; :class:`FrameError` on anything but a msgpack map with valid members."""
        if self.max_frame_size and len(data) > self.max_frame_size:
            raise FrameTooLarge(len(data), self.max_frame_size)
        try:
            obj = self._msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated types on bad input
            raise FrameError(f"invalid msgpack frame: {e}") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
            raise FrameError("a frame must be a map with string keys")
        return Frame.from_json(obj)  # ``raw`` is reserved for JSON text


CODECS: dict[str, type] = {"json": JsonCodec, "msgpack": MsgpackCodec}


def _is_json_text(data: bytes) -> bool:
    # A JSON frame is an object: its first non-blank byte is "{" (0x7B). A msgpack frame is a map,
    # whose first byte is 0x80-0x8F, 0xDE or 0xDF: never "{" nor a blank.
    return data.lstrip(b" \t\r\n")[:1] == b"{"


class AutoCodec:
    """A device's codec when it listens with a binary codec (``?codec=msgpack``): it still serves mos.

    Each message is decoded in the codec it is written in (JSON text starts with ``{``, a binary
    frame with a map byte), and frames go out in the codec of the last frame the peer sent -- the
    binary codec until the peer has said anything, JSON after a text handshake. One instance per
    peer (per channel): the choice is that peer's.
    """

    def __init__(self, binary: FrameCodec, *, json_codec: JsonCodec | None = None) -> None:
        self.binary_codec = binary
        self.json_codec = json_codec if json_codec is not None else JsonCodec()
        self.peer: FrameCodec = binary

    @property
    def name(self) -> str:
        """The name of the codec frames are sent in now (the peer's)."""
        return self.peer.name

    def encode(self, frame: Frame, style: Style) -> bytes:
        """Encode ``frame`` in the peer's codec."""
        return self.peer.encode(frame, style)

    def decode(self, data: bytes) -> Frame:
        """Decode one message in the codec it is written in; that becomes the peer's codec."""
        codec = self.json_codec if _is_json_text(data) else self.binary_codec
        frame = codec.decode(data)
        self.peer = codec
        return frame

    def peer_speaks_text(self) -> None:
        """The peer sent text framing (a handshake, an empty frame): answer it in JSON."""
        self.peer = self.json_codec


def device_codec(codec: FrameCodec) -> FrameCodec:
    """The codec for one peer of a device listening with ``codec``: JSON as is, a binary codec wrapped
    in an :class:`AutoCodec` (of a fresh instance), so JSON clients (mos) are served as well."""
    if codec.name == "json":
        return codec
    return AutoCodec(codec_by_name(codec.name))


def codec_by_name(name: str, **kw: Any) -> FrameCodec:
    """A codec instance for ``name`` (``json`` or ``msgpack``); :class:`UsageError` otherwise."""
    try:
        cls = CODECS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}") from None
    codec: FrameCodec = cls(**kw)
    return codec
