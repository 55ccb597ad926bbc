"""Stream devices (serial pty, TCP) that record every byte a client sends and can frame wrongly.

:class:`StreamDevice` is the rpc-uart algorithm (:mod:`rpc.framing`) between bytes and a
:class:`rpc.node.Node`, keeping the raw input in :attr:`StreamDevice.rx` (the client checks read
it). :class:`PtySerialDevice` serves it on the master side of a pty pair (clients open
:attr:`PtySerialDevice.path`; POSIX only); :class:`TcpStreamDevice` on a TCP port, one
:class:`StreamDevice` per connection. The serial faults of :data:`conformance.faults.FAULTS`
(``serial_*``) change the framing, to prove the serial checks catch them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable

from rpc.channel import Channel
from rpc.errors import ChannelClosed
from rpc.frame import Frame
from rpc.framing import (
    BadCrc,
    DeviceLinkModes,
    DeviceStreamDecoder,
    DeviceStreamEncoder,
    FrameBytes,
    Handshake,
)
from rpc.node import Node

__all__ = ["PtySerialDevice", "StreamDevice", "TcpStreamDevice"]

log = logging.getLogger("mgrpc.conformance.serialdev")

SERIAL_FAULTS = frozenset({"serial_crc_missing", "serial_bad_crc_accepted", "serial_no_handshake"})


class _StreamChannel(Channel):
    persistent = True
    broadcast = True

    def __init__(self, dev: StreamDevice, type_: str, info: str) -> None:
        super().__init__(style="device")
        self.type = type_
        self._info = info
        self._dev = dev

    def info(self) -> str:
        return self._info

    async def send(self, frame: Frame) -> None:
        if self.closed:
            raise ChannelClosed(f"{self.type} closed")
        self._dev.transmit(self.encode(frame))

    async def close(self) -> None:
        self.mark_closed()


class StreamDevice:
    """The device side of one stream: ``feed(bytes)`` in, ``write(bytes)`` out, frames to ``node``."""

    def __init__(
        self,
        node: Node,
        write: Callable[[bytes], None],
        *,
        faults: Iterable[str] = (),
        type_: str = "UART",
        info: str = "UART0",
    ) -> None:
        self.node = node
        self.faults = frozenset(faults)
        unknown = self.faults - SERIAL_FAULTS
        if unknown:
            raise ValueError(f"unknown serial fault(s) {sorted(unknown)}")
        self.write = write
        self.rx = bytearray()
        self.modes = DeviceLinkModes()
        self.decoder = DeviceStreamDecoder(modes=self.modes, max_frame_size=node.max_frame_size)
        self.encoder = DeviceStreamEncoder(modes=self.modes)
        self.channel = _StreamChannel(self, type_, info)

    def feed(self, data: bytes) -> None:
        """Bytes from the client."""
        self.rx += data
        self.decoder.feed(data)
        for ev in self.decoder.events():
            if isinstance(ev, FrameBytes):
                self.channel.deliver_bytes(ev.data)
            elif isinstance(ev, BadCrc):
                if "serial_bad_crc_accepted" in self.faults:
                    self.channel.deliver_bytes(ev.data)
            elif isinstance(ev, Handshake):
                if "serial_no_handshake" not in self.faults:
                    self.encoder.handle(ev)
            else:
                self.encoder.handle(ev)
        self._flush()

    def transmit(self, json_bytes: bytes) -> None:
        """Queue one frame for the wire, framed per the learned modes (and the faults)."""
        if "serial_crc_missing" in self.faults:
            self.modes.crc = False
        self.encoder.queue_frame(json_bytes)
        self._flush()

    def _flush(self) -> None:
        data = self.encoder.data_to_send()
        if data:
            self.write(data)


class PtySerialDevice:
    """Serve ``node`` on a new pty; ``faults`` from ``serial_crc_missing``, ``serial_bad_crc_accepted``,
    ``serial_no_handshake``."""

    def __init__(self, node: Node, *, faults: Iterable[str] = ()) -> None:
        self.node = node
        self.dev = StreamDevice(node, self._write, faults=faults)
        self._master = -1
        self._slave = -1
        self.path = ""

    @property
    def rx(self) -> bytearray:
        """Every byte received so far."""
        return self.dev.rx

    async def start(self) -> PtySerialDevice:
        """Open the pty pair and start serving."""
        import tty

        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self.node.add_channel(self.dev.channel, default=True)
        asyncio.get_running_loop().add_reader(self._master, self._readable)
        return self

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # no client has the slave open: nothing to read
            return
        self.dev.feed(data)

    def _write(self, data: bytes) -> None:
        while data:
            try:
                n = os.write(self._master, data)
            except BlockingIOError:
                log.warning("pty full, %d bytes dropped", len(data))
                return
            data = data[n:]

    async def close(self) -> None:
        """Stop serving and close the pty."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._master)
        self.node.remove_channel(self.dev.channel)
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1


class TcpStreamDevice:
    """Serve ``node`` on ``tcp://host:port`` (port 0 = any free one): one :class:`StreamDevice` per connection."""

    def __init__(self, node: Node, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.devices: list[StreamDevice] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        """``tcp://host:port``."""
        return f"tcp://{self.host}:{self.port}"

    async def start(self) -> TcpStreamDevice:
        """Start listening."""
        self._server = await asyncio.start_server(self._conn, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        dev = StreamDevice(self.node, writer.write, type_="TCP", info=f"{peer[0]}:{peer[1]}" if peer else "")
        self.devices.append(dev)
        self._writers.append(writer)
        self.node.add_channel(dev.channel)
        try:
            while data := await reader.read(4096):
                dev.feed(data)
        except OSError:
            pass
        finally:
            dev.channel.mark_closed()
            with contextlib.suppress(Exception):
                writer.close()

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
