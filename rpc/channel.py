"""The channel seam: how the router sees a transport.

A channel carries whole frames. The router (:class:`rpc.node.Node`) gives each channel a *sink*
when the channel is added; the channel calls ``sink.frame_received(self, frame)`` for every frame it
decodes and ``sink.channel_closed(self)`` when it goes away. The router calls :meth:`Channel.send`.

The facts rpc-common keeps per channel are attributes: ``type`` (the string ACL entries match:
``UART``, ``HTTP``, ``WS_in``, ``WS_out``, ``MQTT``, ``GATTS``, ``loopback``, ...), ``persistent``,
``broadcast`` and :meth:`Channel.info` (the text ``RPC.Ping`` reports).
"""

from __future__ import annotations

import abc
import logging
from typing import Protocol

from rpc.errors import FrameError
from rpc.frame import DEFAULT_MAX_FRAME_SIZE, Frame, Style, parse_frame

__all__ = ["Channel", "ChannelSink", "FrameCodec", "JsonCodec", "looks_like_jsonrpc"]

log = logging.getLogger("mgrpc.channel")


class ChannelSink(Protocol):
    """What a channel reports to (the router)."""

    def frame_received(self, channel: Channel, frame: Frame) -> None:
        """A frame arrived on ``channel``."""

    def channel_closed(self, channel: Channel) -> None:
        """``channel`` is gone (peer went away or it was closed)."""


def looks_like_jsonrpc(data: bytes) -> bool:
    """For a message that is *not* a valid mgRPC frame: is it meant as JSON-RPC 2.0?

    A batch (a JSON array) or text naming a ``"jsonrpc"`` member is (docs/protocol/jsonrpc.md);
    anything else stays mgRPC junk, dropped as a device drops it.
    """
    return data[:64].lstrip()[:1] == b"[" or b'"jsonrpc"' in data


class FrameCodec(Protocol):
    """Turns frames into message bytes and back (JSON by default, msgpack between mgrpc ends)."""

    @property
    def name(self) -> str:
        """``json``, ``msgpack``: what frames are written in."""

    def encode(self, frame: Frame, style: Style) -> bytes:
        """Encode one frame as one message."""

    def decode(self, data: bytes) -> Frame:
        """Decode one message; raise :class:`rpc.errors.FrameError` on bad input."""


class JsonCodec:
    """The wire codec of ``mos`` and devices: one JSON object per message."""

    name = "json"

    def __init__(
        self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, html_escape: bool = False, ascii_only: bool = False
    ) -> None:
        self.max_frame_size = max_frame_size
        self.html_escape = html_escape
        self.ascii_only = ascii_only

    def encode(self, frame: Frame, style: Style) -> bytes:
        """Encode ``frame`` in ``style``; with ``ascii_only`` non-ASCII is ``\\uXXXX``-escaped (UART).

        A frame parsed from JSON and not changed since (a bridge forwarding it) is sent as the exact
        bytes it arrived as, so every member, order and escape survives the hop.
        """
        raw = frame.raw
        if raw is not None and (not self.ascii_only or raw.isascii()) and not self.html_escape:
            return raw
        text = frame.to_json(style, html_escape=self.html_escape)
        if self.ascii_only and not text.isascii():
            text = _escape_non_ascii(text)
        return text.encode("utf-8")

    def decode(self, data: bytes) -> Frame:
        """Parse one frame, enforcing the size limit."""
        return parse_frame(data, max_size=self.max_frame_size)


def _escape_non_ascii(text: str) -> str:
    # Non-ASCII can only occur inside JSON strings, so escaping every such character is safe.
    out = []
    for ch in text:
        o = ord(ch)
        if o < 0x80:
            out.append(ch)
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            o -= 0x10000
            out.append(f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}")
    return "".join(out)


class Channel(abc.ABC):
    """Base class of every transport's channel. Subclasses implement :meth:`send` and :meth:`close`.

    ``style`` is how frames are written on this channel: ``"device"`` on a device's listening side,
    ``"mos"`` on a client side.
    """

    type: str = "unknown"
    persistent: bool = True
    broadcast: bool = False

    def __init__(self, *, codec: FrameCodec | None = None, style: Style = "mos") -> None:
        self.codec: FrameCodec = codec if codec is not None else JsonCodec()
        self.style: Style = style
        self.address: str | None = None  # learned from the first frame's src (router)
        self.user: str | None = None  # set by transports that authenticate (HTTP digest, WS)
        self.closed = False
        self._sink: ChannelSink | None = None

    # -- wiring -------------------------------------------------------------------------------
    def attach(self, sink: ChannelSink) -> None:
        """Called by the router when the channel is added."""
        self._sink = sink

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start receiving (open the port, begin reading). Default: nothing to do."""

    def info(self) -> str:
        """Text for ``RPC.Ping``'s ``channel_info``."""
        return ""

    @property
    def binary(self) -> bool:
        """True when the codec is not JSON text (a link between two mgrpc ends)."""
        return self.codec.name != "json"

    # -- used by transports -----------------------------------------------------------------------
    def deliver(self, frame: Frame) -> None:
        """Hand a decoded frame to the router."""
        if self._sink is not None:
            self._sink.frame_received(self, frame)

    def deliver_bytes(self, data: bytes) -> Frame | None:
        """Decode one message and deliver it; bad input is logged and dropped. Returns the frame.

        A message that is not a frame but looks like JSON-RPC 2.0 (a batch array, or JSON-RPC text
        that does not parse) goes to the sink's ``jsonrpc_received``, which answers it.
        """
        try:
            frame = self.codec.decode(data)
        except FrameError as e:
            if not self.deliver_jsonrpc(data):
                log.warning("%s: dropping bad frame: %s", self.type, e)
            return None
        self.deliver(frame)
        return frame

    def deliver_jsonrpc(self, data: bytes) -> bool:
        """Hand an undecodable message to the sink as JSON-RPC if it looks like it; True if handed."""
        sink = self._sink
        handler = getattr(sink, "jsonrpc_received", None)
        if handler is None or self.codec.name != "json" or not looks_like_jsonrpc(data):
            return False
        handler(self, data)
        return True

    def encode(self, frame: Frame) -> bytes:
        """Encode ``frame`` for this channel (codec and style)."""
        return self.codec.encode(frame, self.style)

    def mark_closed(self) -> None:
        """Record that the channel is gone and tell the router (once)."""
        if self.closed:
            return
        self.closed = True
        if self._sink is not None:
            self._sink.channel_closed(self)

    # -- implemented by transports ----------------------------------------------------------------
    @abc.abstractmethod
    async def send(self, frame: Frame) -> None:
        """Send one frame. Raise :class:`rpc.errors.TransportError` if it cannot be sent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the channel; must call :meth:`mark_closed`."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.type} {self.info()!r}>"
