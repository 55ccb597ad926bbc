"""``tcp://host:port``: the stream framing of the serial port without CRC and handshake (spec §7).

Client side (what ``mos --port tcp://host:port`` does): frames are written as ``\\n\"\"\"{json}\"\"\"\\n``
and read with mos's stream parser (both delimiters; bytes outside frames are *junk*).

Device side (no Mongoose OS library has one; ours is for tests and bridges): ``listen`` accepts
connections on ``host:port``, one channel per connection, read with the rpc-uart algorithm (so a
peer may use either delimiter, with or without CRC) and answered in the style the peer used.

Limits of the device side (listen URL options), so that abusive peers cannot starve the others:

``max_conns``       connections held at once (default 64); one more closes first a connection that has
                    not sent a whole frame yet, then the one quiet the longest (idle or half-sent
                    connections never lock out a client that has made a call)
``max_out_buffer``  bytes of replies queued for a peer that does not read them (default 1 MiB); past
                    that the connection is closed (replies are never dropped from a live stream)

Frames over ``rpc.max_frame_size`` (the node's ``max_frame_size``) are dropped by the decoder.

The framing logic is in :mod:`transports.stream` (shared with the serial transport); the channels
here only move bytes.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from rpc.channel import Channel, FrameCodec, JsonCodec
from rpc.codec import device_codec
from rpc.errors import ChannelClosed, TransportError, UsageError
from rpc.frame import DEFAULT_MAX_FRAME_SIZE, Frame
from rpc.node import Node
from transports.registry import TransportURL
from transports.stream import READ_SIZE, JunkHandler, StreamClientChannel, StreamDeviceChannel, stream_codec

__all__ = [
    "EXTRA",
    "OPTIONS",
    "SCHEMES",
    "TcpClientChannel",
    "TcpDeviceChannel",
    "TcpListener",
    "listen",
    "open_client",
]

SCHEMES = ("tcp",)
OPTIONS: frozenset[str] = frozenset({"connect_timeout", "max_conns", "max_out_buffer"})
DEFAULT_MAX_CONNS = 64
DEFAULT_MAX_OUT_BUFFER = 1 << 20
# Device side: bytes handled per turn of the event loop for one connection (a few hundred frames), so a
# flood on one connection delays the others by milliseconds, not by the whole backlog.
FAIR_READ_SIZE = 16384
EXTRA = ""

log = logging.getLogger("mgrpc.transport.tcp")


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

    _read_size = READ_SIZE

    async def _read_loop(self) -> None:
        try:
            while not self.closed:
                data = await self._reader.read(self._read_size)
                if not data:
                    break
                self.data_received(data)
                # A read returns at once while bytes are buffered: without a turn for the others here, a
                # peer that floods the connection would hold the event loop until its backlog is served.
                await asyncio.sleep(0)
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
    _read_size = FAIR_READ_SIZE

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        on_closed: Callable[[TcpDeviceChannel], None] | None = None,
        codec: FrameCodec | None = None,
        max_out_buffer: int = DEFAULT_MAX_OUT_BUFFER,
    ) -> None:
        # mos sends UTF-8 unescaped on TCP, so the UART's non-ASCII rule does not apply here.
        super().__init__(max_frame_size=max_frame_size, codec=codec or JsonCodec(), ascii_only=False)
        self._on_closed = on_closed
        self.max_out_buffer = max_out_buffer
        self.last_active = asyncio.get_running_loop().time()
        self.useful = False  # a whole frame has arrived (see max_conns)
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

    def data_received(self, data: bytes) -> None:
        """Bytes from the peer (also marks the connection active, see ``max_conns``)."""
        self.last_active = asyncio.get_running_loop().time()
        super().data_received(data)

    def deliver_bytes(self, data: bytes) -> Frame | None:
        """A whole frame arrived: the connection is in use (it is closed last, see ``max_conns``)."""
        self.useful = True
        return super().deliver_bytes(data)

    def write(self, data: bytes) -> None:
        """Queue bytes on the socket; a peer that lets ``max_out_buffer`` bytes pile up is cut off."""
        if self._writer.is_closing():
            return
        self._writer.write(data)
        unsent = self._writer.transport.get_write_buffer_size()
        if unsent > self.max_out_buffer:
            log.warning("tcp %s: the peer does not read its replies (%d bytes unsent); closing", self._peer, unsent)
            self.abort()

    def abort(self) -> None:
        """Drop the connection now, with whatever is still unsent."""
        self.mark_closed()
        self._writer.transport.abort()

    async def drain(self) -> None:
        """Wait for the socket buffer to drain."""
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            self.mark_closed()
            raise ChannelClosed(f"tcp {self._peer}: {e}") from e


def _positive_int(url: TransportURL, name: str, default: int) -> int:
    text = url.option(name, str(default)) or str(default)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"tcp:// option {name} must be a positive integer, not {text!r}")
    return value


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


async def open_client(url: TransportURL, **opts: Any) -> Channel:
    """Connect to ``host:port`` (option ``connect_timeout`` in seconds, default 10)."""
    host, port = url.host_port()
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
    host, port = url.host_port(default_host="127.0.0.1")
    codec = stream_codec(url, dict(opts))
    max_conns = _positive_int(url, "max_conns", DEFAULT_MAX_CONNS)
    max_out_buffer = _positive_int(url, "max_out_buffer", DEFAULT_MAX_OUT_BUFFER)
    listener: TcpListener | None = None

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert listener is not None
        while len(listener.channels) >= max_conns:
            quiet = min(listener.channels, key=lambda c: (c.useful, c.last_active))
            log.info("tcp: %d connections (max_conns); closing the quietest, %s", len(listener.channels), quiet.info())
            listener.channels.discard(quiet)
            quiet.abort()
        ch = TcpDeviceChannel(
            reader, writer, max_frame_size=node.max_frame_size, on_closed=listener.channels.discard,
            codec=None if codec.name == "json" else device_codec(codec), max_out_buffer=max_out_buffer,
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
