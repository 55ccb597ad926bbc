"""``serial://`` (or a bare ``/dev/ttyUSB0`` / ``COM7``): the UART transport (spec/transports.md §1).

Client side, as ``mos`` opens a port (§1.3-§1.5): 115200 8N1 raw, DTR and RTS set false (so ESP
boards stay out of reset), pending input flushed; the ``\"\"\"\\x04\"\"\"\\n\\n`` handshake before
frames; frames with CRC; XON/XOFF from the device honoured; bytes outside frames handed to
``on_junk`` (``mgrpc console``); non-ASCII text ``\\uXXXX``-escaped, because the device drops its
receive buffer on any byte >= 0x80.

URL options (``serial:///dev/ttyUSB0?baud=921600&pacing=1``):

========================  =======================================================================
``baud``                  line speed (default 115200; ``baud_rate`` is accepted too)
``handshake``             ``once`` per connection (default), ``every`` frame (what mos does when it
                          paces writes), or ``off`` (like rpc-uart's ``mgrpc_uart.py``)
``pacing``                ``1``: write in 16-byte chunks with 5 ms pauses, as mos does by default
                          at 115200 (off by default: modern USB-UART bridges do not need it)
``handshake_wait``        ``reply`` (default): go on as soon as the device answers a handshake;
                          ``interval``: always wait the whole 200 ms handshake interval, as mos does
                          (its serial codec sleeps the interval, then looks for the answer)
``hw_flow_control``       ``1``: RTS/CTS
``set_control_lines``     ``0`` leaves DTR/RTS alone (default ``1``: both false)
``inverted_control_lines`` ``1``: DTR/RTS true instead of false
``uart_no``               device side: the number in the channel info ``UART<n>`` (default 0)
``max_out_buffer``        device side: bytes queued for a host that does not read the port (default
                          1 MiB); past it, what the device sends is dropped, whole frames at a
                          time, as a UART nobody listens to loses it (memory stays bounded)
========================  =======================================================================

Device side (``listen``): opens the tty (a USB-UART adapter, or one end of a pty pair such as a
:class:`transports.linkemu.LinkEmulator` path) and runs the rpc-uart algorithm; channel type
``UART``, info ``UART0``, persistent and broadcast-enabled.

I/O: on POSIX the port's file descriptor is watched by the event loop (works for ptys and real
ttys); elsewhere (Windows) a reader thread and a writer thread hand data to and from the loop.
pyserial is imported only when a port is opened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rpc.channel import Channel, FrameCodec, JsonCodec
from rpc.codec import device_codec
from rpc.errors import ChannelClosed, TransportError, UsageError
from rpc.frame import DEFAULT_MAX_FRAME_SIZE, Frame
from rpc.framing import HANDSHAKE, HANDSHAKE_ACK, FlowControl, Handshake
from rpc.node import Node
from transports.registry import TransportURL
from transports.stream import JunkHandler, StreamClientChannel, StreamDeviceChannel, stream_codec

__all__ = [
    "EXTRA",
    "OPTIONS",
    "SCHEMES",
    "SerialClientChannel",
    "SerialDeviceChannel",
    "SerialListener",
    "SerialOptions",
    "listen",
    "open_client",
    "open_port",
]

SCHEMES = ("serial",)
OPTIONS: frozenset[str] = frozenset(
    {"baud", "baud_rate", "handshake", "handshake_wait", "pacing", "hw_flow_control", "set_control_lines",
     "inverted_control_lines", "uart_no", "max_out_buffer"}
)  # fmt: skip
EXTRA = "serial"

log = logging.getLogger("mgrpc.transport.serial")

HANDSHAKE_MODES = ("once", "every", "off")
HANDSHAKE_WAITS = ("reply", "interval")
_READ_SIZE = 4096


@dataclass(frozen=True, slots=True)
class SerialOptions:
    """Port and protocol settings (see the module docstring for the URL spelling)."""

    baud: int = 115200
    hw_flow_control: bool = False
    set_control_lines: bool = True
    inverted_control_lines: bool = False
    handshake: str = "once"
    handshake_wait: str = "reply"
    pacing: bool = False
    pacing_chunk_size: int = 16
    pacing_delay_s: float = 0.005
    handshake_interval_s: float = 0.2
    handshake_timeout_s: float = 15.0
    uart_no: int = 0
    max_out_buffer: int = 1 << 20  # device side: bytes queued for a host that does not read
    io: str = "auto"  # "fd" (event loop watches the fd), "thread", or "auto"


_FLAGS = ("hw_flow_control", "set_control_lines", "inverted_control_lines", "pacing")


def _options(url: TransportURL, opts: dict[str, Any]) -> SerialOptions:
    """Merge URL query options and keyword options (keywords win); bad values are UsageErrors."""
    kw: dict[str, Any] = {}
    try:
        baud = opts.pop("baud", None) or url.option("baud") or url.option("baud_rate")
        if baud is not None:
            kw["baud"] = int(baud)
        if url.option("uart_no") is not None:
            kw["uart_no"] = int(url.option("uart_no") or 0)
        if url.option("max_out_buffer") is not None:
            kw["max_out_buffer"] = int(url.option("max_out_buffer") or 0)
    except ValueError:
        raise UsageError(f"serial: baud, uart_no and max_out_buffer must be integers ({url.raw!r})") from None
    for name in _FLAGS:
        if name in url.query:
            kw[name] = url.flag(name)
    for name in ("handshake", "handshake_wait"):
        value = url.option(name)
        if value is not None:
            kw[name] = value
    for name in SerialOptions.__dataclass_fields__:
        if name in opts:
            kw[name] = opts.pop(name)
    if opts:
        log.debug("serial: ignoring options %s", ", ".join(sorted(opts)))
    o = SerialOptions(**kw)
    if o.handshake not in HANDSHAKE_MODES:
        raise UsageError(f"serial: handshake must be one of {', '.join(HANDSHAKE_MODES)}, not {o.handshake!r}")
    if o.handshake_wait not in HANDSHAKE_WAITS:
        raise UsageError(
            f"serial: handshake_wait must be one of {', '.join(HANDSHAKE_WAITS)}, not {o.handshake_wait!r}"
        )
    if o.baud <= 0:
        raise UsageError("serial: baud must be positive")
    if o.max_out_buffer <= 0:
        raise UsageError("serial: max_out_buffer must be a positive number of bytes")
    return o


def _port_path(url: TransportURL) -> str:
    path = url.path or url.host
    if not path:
        raise UsageError(f"serial: no device path in {url.raw!r} (e.g. /dev/ttyUSB0, COM7)")
    return path


def _import_pyserial() -> Any:
    try:
        import serial
    except ImportError as e:
        raise TransportError("the serial transport needs pyserial; install it with: pip install 'mgrpc[serial]'") from e
    return serial


def open_port(path: str, options: SerialOptions, *, control_lines: bool = True) -> Any:
    """Open ``path`` raw (8N1, no software flow control in the driver) and flush its input.

    With ``control_lines`` the DTR/RTS settings of ``options`` are applied before the port opens,
    so the lines never pulse (an ESP32's reset is wired to them).
    """
    serial = _import_pyserial()
    ser = serial.Serial()
    ser.port = path
    ser.baudrate = options.baud
    ser.bytesize = serial.EIGHTBITS
    ser.parity = serial.PARITY_NONE
    ser.stopbits = serial.STOPBITS_ONE
    ser.xonxoff = False  # XON/XOFF are handled in the RPC layer, as mos does
    ser.rtscts = options.hw_flow_control
    ser.timeout = 0.2  # mos's inter-character timeout; only the thread reader blocks on it
    if control_lines and (options.set_control_lines or options.inverted_control_lines):
        level = options.inverted_control_lines
        ser.dtr = level
        ser.rts = level
    try:
        ser.open()
        ser.reset_input_buffer()
    except (serial.SerialException, OSError, ValueError) as e:
        raise TransportError(f"cannot open serial port {path}: {e}") from e
    return ser


# ---------------------------------------------------------------------------------------------
# byte movers


class _PortIO(Protocol):
    @property
    def unsent(self) -> int: ...
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


class _IOBase:
    """What both byte movers share: waiting for written bytes, and reporting a lost port once."""

    _drained: asyncio.Event
    _closed: bool
    _on_lost: Callable[[str], None]

    def close(self) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        await self._drained.wait()
        if self._closed:
            raise ChannelClosed("serial port is closed")

    def _lost(self, why: str) -> None:
        if not self._closed:
            self.close()
            self._on_lost(why)


class _FdIO(_IOBase):
    """The event loop watches the port's file descriptor (POSIX: ttys and ptys)."""

    def __init__(self, ser: Any, on_data: Callable[[bytes], None], on_lost: Callable[[str], None]) -> None:
        self._ser = ser
        self._fd: int = ser.fileno()
        os.set_blocking(self._fd, False)
        self._on_data = on_data
        self._on_lost = on_lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tx = bytearray()
        self._drained = asyncio.Event()
        self._drained.set()
        self._writing = False
        self._closed = False

    @property
    def unsent(self) -> int:
        """Bytes written but not on the port yet."""
        return len(self._tx)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(f"read failed: {e}")
            return
        if not data:  # readable but empty: the other end hung up / the adapter is gone
            self._lost("port closed")
            return
        self._on_data(data)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ChannelClosed("serial port is closed")
        self._tx += data
        self._drained.clear()
        self._flush()

    def _flush(self) -> None:
        while self._tx:
            try:
                n = os.write(self._fd, self._tx)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._lost(f"write failed: {e}")
                return
            del self._tx[:n]
        if self._tx:
            if not self._writing and self._loop is not None:
                self._loop.add_writer(self._fd, self._flush)
                self._writing = True
            elif self._loop is None:  # not started yet: retry from the loop soon
                asyncio.get_running_loop().call_later(0.001, self._flush)
            return
        if self._writing and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._drained.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
        self._drained.set()
        try:
            self._ser.close()
        except Exception:
            log.debug("closing the port failed", exc_info=True)


class _ThreadIO(_IOBase):
    """A reader thread and a writer thread (ports without a pollable descriptor, e.g. Windows)."""

    def __init__(self, ser: Any, on_data: Callable[[bytes], None], on_lost: Callable[[str], None]) -> None:
        self._ser = ser
        self._on_data = on_data
        self._on_lost = on_lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued = 0
        self._written = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        self._threads: list[threading.Thread] = []

    @property
    def unsent(self) -> int:
        """Bytes written but not on the port yet."""
        return self._queued - self._written

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for target, name in ((self._read_loop, "reader"), (self._write_loop, "writer")):
            t = threading.Thread(target=target, name=f"mgrpc-serial-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _call(self, func: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(func, *args)
            except RuntimeError:
                pass

    def _read_loop(self) -> None:
        while not self._closed:
            try:
                data = self._ser.read(max(1, self._ser.in_waiting))
            except Exception as e:
                if not self._closed:
                    self._call(self._lost, f"read failed: {e}")
                return
            if data:
                self._call(self._on_data, bytes(data))

    def _write_loop(self) -> None:
        while True:
            data = self._q.get()
            if data is None or self._closed:
                return
            try:
                self._ser.write(data)
            except Exception as e:
                self._call(self._lost, f"write failed: {e}")
                return
            self._call(self._wrote, len(data))

    def _wrote(self, n: int) -> None:
        self._written += n
        if self._written >= self._queued:
            self._drained.set()

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ChannelClosed("serial port is closed")
        self._queued += len(data)
        self._drained.clear()
        self._q.put(bytes(data))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        self._drained.set()
        try:
            self._ser.cancel_read()
        except Exception:
            pass
        try:
            self._ser.close()
        except Exception:
            log.debug("closing the port failed", exc_info=True)


def _make_io(
    ser: Any, options: SerialOptions, on_data: Callable[[bytes], None], on_lost: Callable[[str], None]
) -> _PortIO:
    mode = options.io
    if mode == "auto":
        mode = "fd" if os.name == "posix" and hasattr(ser, "fileno") else "thread"
    if mode == "fd":
        return _FdIO(ser, on_data, on_lost)
    if mode == "thread":
        return _ThreadIO(ser, on_data, on_lost)
    raise UsageError(f"serial: io must be auto, fd or thread, not {mode!r}")


# ---------------------------------------------------------------------------------------------
# channels


class SerialClientChannel(StreamClientChannel):
    """The host side of a serial port, speaking as ``mos`` does (handshake, CRC, XON/XOFF)."""

    type = "serial"

    def __init__(
        self,
        ser: Any,
        path: str,
        options: SerialOptions,
        *,
        on_junk: JunkHandler | None = None,
        codec: FrameCodec | None = None,
    ) -> None:
        super().__init__(crc=True, flow_control=True, on_junk=on_junk, codec=codec)
        self.path = path
        self.options = options
        self._io = _make_io(ser, options, self.data_received, self._lost)
        self._handshaken = asyncio.Event()
        self._xon = asyncio.Event()
        self._xon.set()  # sending is allowed until the device says XOFF
        self._write_lock = asyncio.Lock()
        self._started = False
        self.handshakes_sent = 0

    def info(self) -> str:
        """The port path."""
        return self.path

    async def start(self) -> None:
        """Start reading the port."""
        if not self._started:
            self._started = True
            self._io.start(asyncio.get_running_loop())

    @property
    def handshake_complete(self) -> bool:
        """True once the device answered the handshake (until the next frame with ``every``)."""
        return self._handshaken.is_set()

    # -- receiving: the serial-specific events --------------------------------------------------
    def _on_handshake(self, ev: Handshake) -> None:
        if not self._handshaken.is_set():
            # The ack goes out before any frame: writes are queued in order.
            self._io.write(HANDSHAKE_ACK)
            self._handshaken.set()
            log.debug("%s: handshake complete", self.path)

    def _on_flow_control(self, ev: FlowControl) -> None:
        if ev.xoff:
            self._xon.clear()
        else:
            self._xon.set()

    def _lost(self, why: str) -> None:
        log.info("serial %s: %s", self.path, why)
        self._dec.feed_eof()
        self._dispatch()
        self.mark_closed()

    # -- sending ----------------------------------------------------------------------------------
    async def send(self, frame: Frame) -> None:
        """Handshake if needed, then write the frame (paced if configured, honouring XOFF)."""
        if self.closed:
            raise ChannelClosed(f"serial port {self.path} is closed")
        data = self.frame_bytes(frame)
        async with self._write_lock:
            if await self._ensure_handshake():
                self._xon.set()  # as mos: writes start unblocked right after a successful sync
            await self._write(data)

    async def _ensure_handshake(self) -> bool:
        """Handshake unless done; True if one took place now."""
        mode = self.options.handshake
        if mode == "off" or self.binary:  # binary frames (msgpack) need no rpc-uart handshake
            return False
        if mode == "every":
            self._handshaken.clear()
        if self._handshaken.is_set():
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.handshake_timeout_s
        tries = 0
        while not self._handshaken.is_set():
            if self.closed:
                raise ChannelClosed(f"serial port {self.path} is closed")
            self._xon.set()  # XOFF is ignored until we know the device listens
            await self._write(HANDSHAKE)
            self.handshakes_sent += 1
            tries += 1
            if tries % 25 == 0:
                log.info("No response to handshake. Is %s the right port? Is rpc-uart enabled?", self.path)
            try:
                if self.options.handshake_wait == "interval":
                    await asyncio.sleep(self.options.handshake_interval_s)  # mos sleeps, then looks
                    if not self._handshaken.is_set():
                        raise TimeoutError
                else:
                    await asyncio.wait_for(self._handshaken.wait(), self.options.handshake_interval_s)
            except TimeoutError:
                if loop.time() >= deadline:
                    raise TransportError(
                        f"No response to handshake on {self.path} within {self.options.handshake_timeout_s:g} s. "
                        "Is it the right port? Is rpc-uart enabled?"
                    ) from None
        return True

    async def _write(self, data: bytes) -> None:
        o = self.options
        if not o.pacing:
            await self._xon.wait()
            self._io.write(data)
            await self._io.drain()
            return
        for i in range(0, len(data), o.pacing_chunk_size):
            await self._xon.wait()
            self._io.write(data[i : i + o.pacing_chunk_size])
            await self._io.drain()
            await asyncio.sleep(o.pacing_delay_s)

    async def close(self) -> None:
        """Close the port."""
        self.mark_closed()
        self._io.close()


class SerialDeviceChannel(StreamDeviceChannel):
    """The device side of a UART: rpc-uart's framing; type ``UART``, info ``UART<n>``."""

    type = "UART"
    persistent = True
    broadcast = True

    def __init__(
        self, ser: Any, path: str, options: SerialOptions, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        codec: FrameCodec | None = None,
    ) -> None:  # fmt: skip
        # A device writes UTF-8 as is (frozen's %Q escapes no non-ASCII); only its input must be ASCII.
        super().__init__(max_frame_size=max_frame_size, codec=codec or JsonCodec())
        self.path = path
        self.options = options
        self._io = _make_io(ser, options, self.data_received, self._lost)
        self._started = False
        self.dropped_bytes = 0  # sent while the host read nothing (see max_out_buffer)
        self._dropping = False

    def info(self) -> str:
        """``UART<n>`` as rpc-uart reports it."""
        return f"UART{self.options.uart_no}"

    async def start(self) -> None:
        """Start reading the port."""
        if not self._started:
            self._started = True
            self._io.start(asyncio.get_running_loop())

    def write(self, data: bytes) -> None:
        """Queue bytes on the port; dropped while ``max_out_buffer`` bytes wait (the host reads nothing).

        Each call carries whole frames (or a handshake answer, or console text), so a drop never
        leaves half a frame on the line.
        """
        if self._io.unsent > self.options.max_out_buffer:
            if not self._dropping:
                log.warning("serial %s: the host reads nothing (%d bytes unsent); dropping output",
                            self.path, self._io.unsent)  # fmt: skip
            self._dropping = True
            self.dropped_bytes += len(data)
            return
        self._dropping = False
        self._io.write(data)

    async def drain(self) -> None:
        """Wait until queued bytes are written."""
        await self._io.drain()

    def _lost(self, why: str) -> None:
        log.info("serial %s: %s", self.path, why)
        self.mark_closed()

    async def close(self) -> None:
        """Close the port."""
        self.mark_closed()
        self._io.close()


class SerialListener:
    """A node served on a serial port (one channel, for the port's lifetime)."""

    def __init__(self, channel: SerialDeviceChannel, url: str) -> None:
        self.channel = channel
        self.url = url

    async def close(self) -> None:
        """Close the port."""
        await self.channel.close()


# ---------------------------------------------------------------------------------------------
# entry points


async def open_client(url: TransportURL, **opts: Any) -> Channel:
    """Open the port as mos does and return the (not yet reading) client channel.

    Keyword options: ``on_junk`` (callable receiving console bytes), any :class:`SerialOptions`
    field, ``codec`` (JSON only).
    """
    path = _port_path(url)
    codec = stream_codec(url, opts, ascii_only=True)
    on_junk = opts.pop("on_junk", None)
    options = _options(url, opts)
    ser = open_port(path, options)
    return SerialClientChannel(ser, path, options, on_junk=on_junk, codec=codec)


async def listen(url: TransportURL, node: Node, **opts: Any) -> SerialListener:
    """Serve ``node`` on a serial port (device side)."""
    path = _port_path(url)
    codec = stream_codec(url, opts, ascii_only=True)
    options = _options(url, opts)
    ser = open_port(path, options, control_lines=False)
    # A binary codec still serves mos on the same port (rpc.codec.AutoCodec).
    device = None if codec.name == "json" else device_codec(codec)
    ch = SerialDeviceChannel(ser, path, options, max_frame_size=node.max_frame_size, codec=device)
    node.add_channel(ch)
    await ch.start()
    return SerialListener(ch, f"serial://{path}")
