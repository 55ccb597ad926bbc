"""``udp://host:port``: one JSON frame per datagram (spec/transports.md §7).

Client side as ``mos`` does it: the frame is Go ``json.Marshal`` output (HTML characters escaped,
no newline), and at most 10000 bytes of a datagram are read.

Device side (ours; no Mongoose OS library has one): ``listen`` binds ``host:port`` and keeps one
channel per peer address (type ``UDP``, info ``ip:port``); the least recently heard peer's channel
is dropped when more than ``max_peers`` (URL option, default 64) are known; a dropped peer that
writes again gets a new channel, so it is still answered. Datagrams over the node's
``max_frame_size`` are dropped, and replies are sent without waiting (a peer that reads nothing
costs the device nothing: the kernel drops what does not fit).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, cast

from rpc.channel import Channel, FrameCodec, JsonCodec
from rpc.errors import ChannelClosed, TransportError, UsageError
from rpc.frame import Frame
from rpc.node import Node
from transports.registry import TransportURL

__all__ = [
    "EXTRA",
    "MAX_DATAGRAM",
    "OPTIONS",
    "SCHEMES",
    "UdpClientChannel",
    "UdpDeviceChannel",
    "UdpListener",
    "listen",
    "open_client",
]

SCHEMES = ("udp",)
OPTIONS: frozenset[str] = frozenset({"max_peers"})
EXTRA = ""

MAX_DATAGRAM = 10000  # mos reads datagrams into a 10000-byte buffer

log = logging.getLogger("mgrpc.transport.udp")


def _codec(url: TransportURL, opts: dict[str, Any], default: FrameCodec) -> FrameCodec:
    codec = opts.pop("codec", None)
    if codec is not None and not isinstance(codec, str):
        return codec
    name = codec or url.option("codec", "json")
    if name != "json":
        raise UsageError(f"udp:// codec {name!r} is not available by name; pass a codec object")
    return default


def _addr_text(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.on_datagram: Any = None
        self.on_lost: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: on Python 3.11 the selector loop's datagram transport does not derive
        # from asyncio.DatagramTransport, and an exception here is logged by asyncio as a traceback.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.on_datagram is not None:
            self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable: nobody listens (yet); calls time out as with mos.
        log.info("udp: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()


class UdpClientChannel(Channel):
    """``mos --port udp://host:port``."""

    type = "UDP"
    persistent = True
    broadcast = False

    def __init__(self, transport: asyncio.DatagramTransport, address: str, *, codec: FrameCodec) -> None:
        super().__init__(codec=codec, style="mos")
        self._transport = transport
        self._address = address

    def info(self) -> str:
        """The peer's ``host:port``."""
        return self._address

    def datagram_received(self, data: bytes, addr: Any = None) -> None:
        """One frame arrived (only the first 10000 bytes are read, as mos does)."""
        self.deliver_bytes(data[:MAX_DATAGRAM])

    def send_nowait(self, frame: Frame) -> bool:
        """Send one datagram."""
        if self.closed:
            raise ChannelClosed(f"udp {self._address} is closed")
        self._transport.sendto(self.encode(frame))
        return True

    async def send(self, frame: Frame) -> None:
        """Send one datagram."""
        self.send_nowait(frame)

    async def close(self) -> None:
        """Close the socket."""
        self.mark_closed()
        self._transport.close()


class UdpDeviceChannel(Channel):
    """The device side's channel for one peer address."""

    type = "UDP"
    persistent = False
    broadcast = False

    def __init__(self, listener: UdpListener, addr: Any, *, codec: FrameCodec) -> None:
        super().__init__(codec=codec, style="device")
        self._listener = listener
        self.peer = addr

    def info(self) -> str:
        """The peer's ``ip:port``."""
        return _addr_text(self.peer)

    def send_nowait(self, frame: Frame) -> bool:
        """Send one datagram to the peer."""
        if self.closed or self._listener.transport is None:
            raise ChannelClosed(f"udp peer {self.info()} is gone")
        data = self.encode(frame)
        if len(data) > MAX_DATAGRAM:
            log.warning("udp: a %d-byte frame to %s exceeds what mos reads (%d)", len(data), self.info(), MAX_DATAGRAM)
        self._listener.transport.sendto(data, self.peer)
        return True

    async def send(self, frame: Frame) -> None:
        """Send one datagram to the peer."""
        self.send_nowait(frame)

    async def close(self) -> None:
        """Forget the peer."""
        self._listener.forget(self)
        self.mark_closed()


class UdpListener:
    """A device node served on ``udp://host:port``; ``url`` has the real port."""

    def __init__(self, node: Node, *, max_peers: int = 64, codec: FrameCodec | None = None) -> None:
        self.node = node
        self.max_peers = max_peers
        self.codec: FrameCodec = codec if codec is not None else JsonCodec()
        self.transport: asyncio.DatagramTransport | None = None
        self.url = ""
        self.peers: OrderedDict[Any, UdpDeviceChannel] = OrderedDict()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Route a datagram to its peer's channel, creating it on first contact."""
        ch = self.peers.get(addr)
        if ch is None or ch.closed:
            ch = UdpDeviceChannel(self, addr, codec=self.codec)
            self.peers[addr] = ch
            self.node.add_channel(ch)
            while len(self.peers) > self.max_peers:
                _, old = self.peers.popitem(last=False)
                old.mark_closed()
        else:
            self.peers.move_to_end(addr)
        ch.deliver_bytes(data)

    def forget(self, ch: UdpDeviceChannel) -> None:
        """Drop a peer's channel."""
        if self.peers.get(ch.peer) is ch:
            del self.peers[ch.peer]

    async def close(self) -> None:
        """Close the socket and every peer channel."""
        for ch in list(self.peers.values()):
            ch.mark_closed()
        self.peers.clear()
        if self.transport is not None:
            self.transport.close()


async def open_client(url: TransportURL, **opts: Any) -> Channel:
    """Open a UDP socket connected to ``host:port``."""
    host, port = url.host_port()
    codec = _codec(url, opts, JsonCodec(html_escape=True))  # Go json.Marshal escapes <, >, &
    loop = asyncio.get_running_loop()
    proto = _Protocol()
    try:
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, remote_addr=(host, port))
    except OSError as e:
        raise TransportError(f"udp://{host}:{port}: {e.strerror or e}") from e
    ch = UdpClientChannel(transport, f"{host}:{port}", codec=codec)
    proto.on_datagram = ch.datagram_received
    proto.on_lost = ch.mark_closed
    return ch


async def listen(url: TransportURL, node: Node, **opts: Any) -> UdpListener:
    """Serve ``node`` on ``udp://host:port`` (port 0 picks a free one; see ``.url``)."""
    host, port = url.host_port(default_host="127.0.0.1")
    codec = _codec(url, opts, JsonCodec())  # as the client side: a codec name other than json is an error
    text = opts.pop("max_peers", url.option("max_peers", "64"))
    try:
        max_peers = int(text)
    except (TypeError, ValueError):
        max_peers = 0
    if max_peers <= 0:  # 0 answered nobody; a negative bound raised on every datagram
        raise UsageError(f"udp:// option max_peers must be a positive integer, not {text!r}")
    listener = UdpListener(node, max_peers=max_peers, codec=codec)
    proto = _Protocol()
    proto.on_datagram = listener.datagram_received
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(host, port))
    except OSError as e:
        raise TransportError(f"udp://{host}:{port}: cannot listen: {e.strerror or e}") from e
    listener.transport = transport
    sock = transport.get_extra_info("sockname")
    listener.url = f"udp://{sock[0]}:{sock[1]}"
    return listener
