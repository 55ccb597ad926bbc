"""A serial device on a pty whose framing can be made wrong, to prove the serial checks catch it.

:class:`PtySerialDevice` runs the rpc-uart receive algorithm (:mod:`rpc.framing`) on the master side
of a pty pair and serves a :class:`rpc.node.Node`; clients open :attr:`PtySerialDevice.path`. The
serial faults of :data:`conformance.faults.FAULTS` (``serial_*``) change its framing. POSIX only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable

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

__all__ = ["PtySerialDevice"]

log = logging.getLogger("mgrpc.conformance.serialdev")

SERIAL_FAULTS = frozenset({"serial_crc_missing", "serial_bad_crc_accepted", "serial_no_handshake"})


class _UartChannel(Channel):
    type = "UART"
    persistent = True
    broadcast = True

    def __init__(self, dev: PtySerialDevice) -> None:
        super().__init__(style="device")
        self._dev = dev

    def info(self) -> str:
        return "UART0"

    async def send(self, frame: Frame) -> None:
        if self.closed:
            raise ChannelClosed("uart closed")
        self._dev.transmit(self.encode(frame))

    async def close(self) -> None:
        self.mark_closed()


class PtySerialDevice:
    """Serve ``node`` on a new pty; ``faults`` from ``serial_crc_missing``, ``serial_bad_crc_accepted``,
    ``serial_no_handshake``."""

    def __init__(self, node: Node, *, faults: Iterable[str] = ()) -> None:
        self.node = node
        self.faults = frozenset(faults)
        unknown = self.faults - SERIAL_FAULTS
        if unknown:
            raise ValueError(f"unknown serial fault(s) {sorted(unknown)}")
        self.modes = DeviceLinkModes()
        self.decoder = DeviceStreamDecoder(modes=self.modes, max_frame_size=node.max_frame_size)
        self.encoder = DeviceStreamEncoder(modes=self.modes)
        self.channel = _UartChannel(self)
        self._master = -1
        self._slave = -1
        self.path = ""

    async def start(self) -> PtySerialDevice:
        """Open the pty pair and start serving."""
        import tty

        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self.node.add_channel(self.channel, default=True)
        asyncio.get_running_loop().add_reader(self._master, self._readable)
        return self

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # no client has the slave open: nothing to read
            return
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
        self.node.remove_channel(self.channel)
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1
