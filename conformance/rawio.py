"""Byte-level access to a device's stream transports (serial tty, TCP) for the framing checks.

The framing checks must see exactly what the device writes, so they bypass the transports: a
:class:`RawStream` writes bytes as given and keeps everything read in :attr:`RawStream.buffer`.
Serial ports are opened raw with ``termios`` (POSIX; ptys and real ttys alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from conformance.model import CheckSkipped

__all__ = ["RawStream", "open_raw_serial", "open_raw_tcp"]

_BAUDS = {
    9600: "B9600", 19200: "B19200", 38400: "B38400", 57600: "B57600", 115200: "B115200",
    230400: "B230400", 460800: "B460800", 921600: "B921600",
}  # fmt: skip


class RawStream:
    """Bytes out as given, bytes in appended to :attr:`buffer`; :meth:`wait_for` polls it."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self.on_write: Callable[[bytes], None] | None = None  # told every write (failure reports)
        self._changed = asyncio.Event()

    def _fed(self, data: bytes) -> None:
        if data:
            self.buffer += data
        else:
            self.closed = True
        self._changed.set()

    async def write(self, data: bytes) -> None:
        """Write all of ``data``."""
        raise NotImplementedError

    async def wait_for(self, pred: Callable[[bytes], bool], *, timeout_s: float) -> bool:
        """Wait until ``pred(buffer)`` holds (True) or ``timeout_s`` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if pred(bytes(self.buffer)):
                return True
            left = deadline - loop.time()
            if left <= 0 or self.closed:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def take(self) -> bytes:
        """Everything read so far, clearing the buffer."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def close(self) -> None:
        """Close the stream."""
        self.closed = True


class _TtyStream(RawStream):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
        self._fed(data)

    async def write(self, data: bytes) -> None:
        if self.on_write is not None:
            self.on_write(data)
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            view = view[n:]

    async def close(self) -> None:
        if not self.closed or self.fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.fd)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        self.closed = True


async def open_raw_serial(path: str, *, baud: int = 115200) -> RawStream:
    """Open a tty raw (8N1, ``baud``), DTR/RTS left low as mos does; POSIX only."""
    try:
        import termios
        import tty
    except ImportError:
        raise CheckSkipped("raw serial checks need a POSIX system") from None
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        speed = getattr(termios, _BAUDS.get(baud, "B115200"))
        attrs[4] = attrs[5] = speed
        attrs[2] |= termios.CLOCAL | termios.CREAD
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        with contextlib.suppress(OSError):
            termios.tcflush(fd, termios.TCIFLUSH)
    except BaseException:
        os.close(fd)
        raise
    return _TtyStream(fd)


class _TcpStream(RawStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        try:
            while True:
                data = await self.reader.read(4096)
                self._fed(data)
                if not data:
                    return
        except OSError:
            self._fed(b"")

    async def write(self, data: bytes) -> None:
        if self.on_write is not None:
            self.on_write(data)
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()
        self.closed = True


async def open_raw_tcp(host: str, port: int) -> RawStream:
    """Open a TCP connection."""
    reader, writer = await asyncio.open_connection(host, port)
    return _TcpStream(reader, writer)
