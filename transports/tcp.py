"""``tcp://host:port``: the stream framing of the serial port without CRC and handshake (spec §7).

Client side (what ``mos --port tcp://host:port`` does): frames are written as ``\\n\"\"\"{json}\"\"\"\\n``
and read with mos's stream parser (both delimiters; bytes outside frames are *junk*).

Device side (no Mongoose OS library has one; ours is for tests and bridges): ``listen`` accepts
connections on ``host:port``, one channel per connection, read with the rpc-uart algorithm (so a
peer may use either delimiter, with or without CRC) and answered in the style the peer used.

The channel classes here are shared with the serial transport: :class:`StreamClientChannel`
(mos side) and :class:`StreamDeviceChannel` (device side) hold the framing logic, subclasses only
move bytes.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from typing import Any

from rpc.channel import Channel, FrameCodec, JsonCodec
from rpc.codec import codec_by_name
from rpc.errors import ChannelClosed, TransportError, UsageError
from rpc.frame import DEFAULT_MAX_FRAME_SIZE, Frame, Style
from rpc.framing import (
    BadCrc,
    BinaryStreamDecoder,
    BinaryStreamEncoder,
    DeviceStreamDecoder,
    DeviceStreamEncoder,
    Empty,
    FlowControl,
    FrameBytes,
    Handshake,
    Junk,
    MosStreamDecoder,
    MosStreamEncoder,
    NonAscii,
    Oversize,
    StreamEvent,
)
from rpc.node import Node
from transports.registry import TransportURL

__all__ = [
    "EXTRA",
    "OPTIONS",
    "SCHEMES",
    "JunkHandler",
    "StreamClientChannel",
    "StreamDeviceChannel",
    "TcpClientChannel",
    "TcpDeviceChannel",
    "TcpListener",
    "listen",
    "open_client",
    "stream_codec",
]

SCHEMES = ("tcp",)
OPTIONS: frozenset[str] = frozenset({"connect_timeout"})
EXTRA = ""

log = logging.getLogger("mgrpc.transport.tcp")
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
    junk_log.debug("junk: %r", data)


# ---------------------------------------------------------------------------------------------
# shared channel logic


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
        self._dec: MosStreamDecoder | BinaryStreamDecoder = MosStreamDecoder(flow_control=flow_control)
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
        """The exact bytes written for ``frame``."""
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
        self._dec: DeviceStreamDecoder | BinaryStreamDecoder
        self._enc: DeviceStreamEncoder | BinaryStreamEncoder
        if self.binary:
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


# ---------------------------------------------------------------------------------------------
# TCP


class _TcpIO(Channel):
    """Reading and closing, shared by both ends of a TCP connection (mixed in before the framing class)."""

    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter
    _task: asyncio.Task[None] | None
    data_received: Callable[[bytes], None]  # from the framing class

    async def start(self) -> None:
        """Start reading."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while not self.closed:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                self.data_received(data)
        except (ConnectionError, OSError) as e:
            log.info("tcp %s: read failed: %s", self.info(), e)
        finally:
            self._read_ended()
            self._writer.close()

    def _read_ended(self) -> None:
        """The peer closed the connection (or reading failed)."""
        self.mark_closed()

    async def close(self) -> None:
        """Close the connection."""
        self.mark_closed()
        self._writer.close()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class TcpClientChannel(_TcpIO, StreamClientChannel):
    """``mos --port tcp://host:port``: stream framing without CRC or handshake."""

    type = "TCP"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        address: str,
        on_junk: JunkHandler | None = None,
        codec: FrameCodec | None = None,
    ) -> None:
        super().__init__(crc=False, flow_control=False, on_junk=on_junk, codec=codec)
        self._reader = reader
        self._writer = writer
        self._address = address
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def info(self) -> str:
        """``host:port`` of the peer."""
        return self._address

    def _read_ended(self) -> None:
        if not self.closed:
            self.eof_received()  # a frame in progress counts as complete, as in mos

    async def send(self, frame: Frame) -> None:
        """Write one frame."""
        if self.closed:
            raise ChannelClosed(f"tcp connection to {self._address} is closed")
        data = self.frame_bytes(frame)
        async with self._lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                self.mark_closed()
                raise ChannelClosed(f"tcp {self._address}: {e}") from e


class TcpDeviceChannel(_TcpIO, StreamDeviceChannel):
    """One accepted TCP connection on the device side (type ``TCP_in``, info ``ip:port``)."""

    type = "TCP_in"
    persistent = False
    broadcast = True

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        on_closed: Callable[[TcpDeviceChannel], None] | None = None,
        codec: FrameCodec | None = None,
    ) -> None:
        # mos sends UTF-8 unescaped on TCP, so the UART's non-ASCII rule does not apply here.
        super().__init__(max_frame_size=max_frame_size, codec=codec or JsonCodec(), ascii_only=False)
        self._on_closed = on_closed
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._task: asyncio.Task[None] | None = None

    def info(self) -> str:
        """The peer's ``ip:port``."""
        return self._peer

    def mark_closed(self) -> None:
        """Also tell the listener, which forgets the connection."""
        was_closed = self.closed
        super().mark_closed()
        if not was_closed and self._on_closed is not None:
            self._on_closed(self)

    def write(self, data: bytes) -> None:
        """Queue bytes on the socket."""
        if not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        """Wait for the socket buffer to drain."""
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            self.mark_closed()
            raise ChannelClosed(f"tcp {self._peer}: {e}") from e


class TcpListener:
    """A device node served on ``tcp://host:port``; ``url`` has the real port."""

    def __init__(self, server: asyncio.Server, node: Node, url: str) -> None:
        self.server = server
        self.node = node
        self.url = url
        self.channels: set[TcpDeviceChannel] = set()

    async def close(self) -> None:
        """Stop accepting and close every connection."""
        self.server.close()
        for ch in list(self.channels):
            await ch.close()
        self.channels.clear()
        await self.server.wait_closed()


def _host_port(url: TransportURL, *, default_host: str | None = None) -> tuple[str, int]:
    host = url.host or default_host
    if not host or url.port is None:
        raise UsageError(f"{url.scheme}:// needs host:port, e.g. {url.scheme}://127.0.0.1:8910 (got {url.raw!r})")
    return host, url.port


async def open_client(url: TransportURL, **opts: Any) -> Channel:
    """Connect to ``host:port`` (option ``connect_timeout`` in seconds, default 10)."""
    host, port = _host_port(url)
    codec = stream_codec(url, opts)
    try:
        timeout_s = float(opts.pop("connect_timeout_s", url.option("connect_timeout", "10")))
    except (TypeError, ValueError):
        raise UsageError("tcp:// option connect_timeout must be a number of seconds") from None
    on_junk = opts.pop("on_junk", None)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except TimeoutError:
        raise TransportError(f"tcp://{host}:{port}: connection timed out after {timeout_s:g} s") from None
    except OSError as e:
        raise TransportError(f"tcp://{host}:{port}: {e.strerror or e}") from e
    return TcpClientChannel(reader, writer, address=f"{host}:{port}", on_junk=on_junk, codec=codec)


async def listen(url: TransportURL, node: Node, **opts: Any) -> TcpListener:
    """Serve ``node`` on ``host:port`` (port 0 picks a free one; see ``.url``)."""
    host, port = _host_port(url, default_host="127.0.0.1")
    codec = stream_codec(url, dict(opts))
    listener: TcpListener | None = None

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert listener is not None
        ch = TcpDeviceChannel(
            reader, writer, max_frame_size=node.max_frame_size, on_closed=listener.channels.discard,
            codec=None if codec.name == "json" else codec_by_name(codec.name),
        )  # fmt: skip
        listener.channels.add(ch)
        node.add_channel(ch)
        await ch.start()

    try:
        server = await asyncio.start_server(on_connect, host, port)
    except OSError as e:
        raise TransportError(f"tcp://{host}:{port}: cannot listen: {e.strerror or e}") from e
    sock = server.sockets[0].getsockname()
    listener = TcpListener(server, node, f"tcp://{sock[0]}:{sock[1]}")
    return listener
