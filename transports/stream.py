"""The stream channels shared by the byte-stream transports (``tcp://``, serial ports): the framing
logic of both ends, with subclasses that only move bytes.

:class:`StreamClientChannel` is the mos side: frames written as ``\\n\"\"\"{json}\"\"\"\\n`` (or the
length-prefixed binary frames of a binary codec), read with mos's stream parser (both delimiters;
bytes outside frames are *junk*). :class:`StreamDeviceChannel` is the device side: the rpc-uart
algorithm (either delimiter, with or without CRC, the ``0x04`` handshake), answering in the style
the peer used. Subclasses implement ``write``/``drain`` (and start feeding ``data_received``).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from rpc.channel import Channel, FrameCodec, JsonCodec
from rpc.codec import AutoCodec, codec_by_name
from rpc.errors import ChannelClosed
from rpc.frame import DEFAULT_MAX_FRAME_SIZE, Frame, Style
from rpc.framing import (
    BadCrc,
    BinaryStreamDecoder,
    BinaryStreamEncoder,
    DeviceStreamDecoder,
    DeviceStreamEncoder,
    DualStreamDecoder,
    DualStreamEncoder,
    Empty,
    FlowControl,
    FrameBytes,
    Handshake,
    Junk,
    LineStreamDecoder,
    MosStreamDecoder,
    MosStreamEncoder,
    NonAscii,
    Oversize,
    StreamEvent,
    stream_safe,
)
from transports.registry import TransportURL

__all__ = ["READ_SIZE", "JunkHandler", "StreamClientChannel", "StreamDeviceChannel", "stream_codec"]

log = logging.getLogger("mgrpc.transport.tcp")  # the name these channels have always logged under
junk_log = logging.getLogger("mgrpc.junk")

JunkHandler = Callable[[bytes], None]
READ_SIZE = 65536
_background: set[asyncio.Task[None]] = set()


def stream_codec(url: TransportURL, opts: dict[str, Any], *, ascii_only: bool = False) -> FrameCodec:
    """The frame codec for a stream transport (``?codec=``): JSON text frames, or a binary codec
    (msgpack, between two mgrpc ends) in binary frames."""
    codec = opts.pop("codec", None)
    if codec is not None and not isinstance(codec, str):
        return codec
    name = codec or url.option("codec", "json") or "json"
    if name == "json":
        return JsonCodec(ascii_only=ascii_only)
    # Binary codecs travel in length-prefixed binary frames (rpc.framing.BinaryStreamEncoder).
    return codec_by_name(name)


def _log_junk(data: bytes) -> None:
    if data.strip():  # the newlines a device writes around its frames are not worth a line each
        junk_log.debug("junk: %r", data)


class StreamClientChannel(Channel):
    """The mos side of a byte stream: mos framing out, mos's parser in.

    ``on_junk`` receives bytes outside frames (device console output). A CRC error is fatal for
    the connection, as in mos: the channel closes and pending calls fail.
    """

    type = "stream"
    persistent = True
    broadcast = False

    def __init__(
        self,
        *,
        crc: bool,
        flow_control: bool = False,
        on_junk: JunkHandler | None = None,
        codec: FrameCodec | None = None,
        style: Style = "mos",
    ) -> None:
        super().__init__(codec=codec, style=style)
        self.on_junk: JunkHandler = on_junk or _log_junk
        self._enc: MosStreamEncoder | BinaryStreamEncoder = MosStreamEncoder(crc=crc)
        self._dec: MosStreamDecoder | BinaryStreamDecoder | LineStreamDecoder = MosStreamDecoder(
            flow_control=flow_control
        )
        self._line_check = True
        if self.binary:
            self._enc, self._dec = BinaryStreamEncoder(), BinaryStreamDecoder()
        self._handlers: dict[type, Callable[[Any], None]] = {
            FrameBytes: self._on_frame_bytes,
            Junk: self._on_junk,
            Handshake: self._on_handshake,
            BadCrc: self._on_bad_crc,
            FlowControl: self._on_flow_control,
            Oversize: self._on_oversize,
        }

    # -- receiving --------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Bytes arrived from the peer."""
        if self._line_check:
            # ?dialect=jsonrpc swaps the codec in after the channel is built: read lines from then on.
            self._line_check = False
            if getattr(self.codec, "line_framed", False):
                self._dec = LineStreamDecoder()
        self._dec.feed(data)
        self._dispatch()

    def eof_received(self) -> None:
        """The peer closed: a frame in progress counts as complete (mos), then the channel closes."""
        self._dec.feed_eof()
        self._dispatch()
        self.mark_closed()

    def _dispatch(self) -> None:
        for ev in self._dec.events():
            if self.closed:
                return
            self._handlers[type(ev)](ev)

    def _on_frame_bytes(self, ev: FrameBytes) -> None:
        self.deliver_bytes(ev.data)

    def _on_junk(self, ev: Junk) -> None:
        try:
            self.on_junk(ev.data)
        except Exception:  # a console callback must not break the link
            log.exception("junk handler failed")

    def _on_handshake(self, ev: Handshake) -> None:
        log.debug("%s: ignoring a handshake frame", self.type)

    def _on_bad_crc(self, ev: BadCrc) -> None:
        log.error("%s %s: %s; closing the connection (as mos does)", self.type, self.info(), ev.reason)
        self._spawn_close()

    def _on_flow_control(self, ev: FlowControl) -> None:
        pass  # only the serial transport honours XON/XOFF

    def _on_oversize(self, ev: Oversize) -> None:
        log.warning("%s %s: dropped a frame of %d bytes (too big)", self.type, self.info(), ev.size)

    def _spawn_close(self) -> None:
        self.mark_closed()
        try:
            task = asyncio.get_running_loop().create_task(self.close())
        except RuntimeError:
            return
        _background.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(_background.discard)

    # -- sending ----------------------------------------------------------------------------------
    def frame_bytes(self, frame: Frame) -> bytes:
        """The exact bytes written for ``frame``.

        With ``?dialect=jsonrpc`` (a codec marked ``line_framed``) a message is one line of JSON, as
        plain JSON-RPC 2.0 stream servers expect; replies are read with the same parser (its ``\n``
        delimiter).
        """
        if getattr(self.codec, "line_framed", False):
            return stream_safe(self.encode(frame).rstrip()) + b"\n"
        return self._enc.encode(self.encode(frame))


class StreamDeviceChannel(Channel):
    """The device side of a byte stream: the rpc-uart algorithm (spec/transports.md §1.2).

    Subclasses implement :meth:`write` (queue bytes, never block) and :meth:`drain`.
    """

    type = "stream"
    persistent = True
    broadcast = True

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        codec: FrameCodec | None = None,
        ascii_only: bool = True,
    ) -> None:
        super().__init__(codec=codec, style="device")
        self._dec: DeviceStreamDecoder | BinaryStreamDecoder | DualStreamDecoder
        self._enc: DeviceStreamEncoder | BinaryStreamEncoder | DualStreamEncoder
        if isinstance(self.codec, AutoCodec):
            # A binary codec on the device side: text frames (mos) are served on the same link.
            text = DeviceStreamDecoder(max_frame_size=max_frame_size, ascii_only=ascii_only)
            self._dec = DualStreamDecoder(text, BinaryStreamDecoder(max_frame_size=max_frame_size))
            self._enc = DualStreamEncoder(DeviceStreamEncoder(modes=text.modes), BinaryStreamEncoder())
        elif self.binary:
            self._dec, self._enc = BinaryStreamDecoder(max_frame_size=max_frame_size), BinaryStreamEncoder()
        else:
            self._dec = DeviceStreamDecoder(max_frame_size=max_frame_size, ascii_only=ascii_only)
            self._enc = DeviceStreamEncoder(modes=self._dec.modes)

    @property
    def modes(self) -> Any:
        """The learned :class:`rpc.framing.DeviceLinkModes`."""
        return self._dec.modes

    def data_received(self, data: bytes) -> None:
        """Bytes arrived: decode, answer empty/handshake frames, deliver frames, then transmit."""
        self._dec.feed(data)
        for ev in self._dec.events():
            self._on_event(ev)
        out = self._enc.data_to_send()
        if out and not self.closed:
            self.write(out)

    def _on_event(self, ev: StreamEvent) -> None:
        _DEVICE_ACTIONS[type(ev)](self, ev)

    def _deliver_event(self, ev: FrameBytes) -> None:
        self.deliver_bytes(ev.data)

    def _answer_event(self, ev: Empty | Handshake) -> None:
        if isinstance(self.codec, AutoCodec):
            self.codec.peer_speaks_text()  # a text peer (mos): what we send must be text too
        self._enc.handle(ev)

    def send_nowait(self, frame: Frame) -> bool:
        """Queue ``frame`` for transmission (in order); raise :class:`ChannelClosed` if closed."""
        if self.closed:
            raise ChannelClosed(f"{self.type} channel is closed")
        self._enc.queue_frame(self.encode(frame))
        self.write(self._enc.data_to_send())
        return True

    async def send(self, frame: Frame) -> None:
        """Send ``frame`` and wait until it is written."""
        self.send_nowait(frame)
        await self.drain()

    def write_console(self, text: str | bytes) -> None:
        """Write device log output (what a device's debug console prints on a shared UART).

        Frames are queued whole, so log text lands between frames, never inside one; mos shows it
        as console *junk*.
        """
        if self.closed:
            return
        self.write(text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text))

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Queue bytes for the peer."""

    async def drain(self) -> None:
        """Wait until queued bytes are written."""


def _log_event(level: int, text: str) -> Callable[[StreamDeviceChannel, Any], None]:
    def act(ch: StreamDeviceChannel, ev: Any) -> None:
        log.log(level, text, ch.type, ev)

    return act


# What the device does with each decoder event (rpc-uart's reactions, as data).
_DEVICE_ACTIONS: dict[type, Callable[[StreamDeviceChannel, Any], None]] = {
    FrameBytes: StreamDeviceChannel._deliver_event,
    Empty: StreamDeviceChannel._answer_event,
    Handshake: StreamDeviceChannel._answer_event,
    BadCrc: _log_event(logging.WARNING, "%s: Corrupted frame (%s)"),
    Oversize: _log_event(logging.WARNING, "%s: Incoming frame is too big (%s)"),
    NonAscii: _log_event(logging.WARNING, "%s: non-ASCII input, receive buffer dropped (%s)"),
    Junk: _log_event(logging.DEBUG, "%s: dropped bytes before a frame (%s)"),
    FlowControl: _log_event(logging.DEBUG, "%s: ignored %s"),
}
