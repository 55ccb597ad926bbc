"""The rpc-gatts length protocol, sans-I/O (spec/transports.md §5).

No Bluetooth stack is imported here: these classes take the bytes of GATT writes and reads and
return bytes, frames or ATT error codes, so the device side (bumble, :mod:`transports.ble`) and the
client side (bleak) are thin wrappers, and the rules are tested on plain bytes.

Client → device: the client writes the 4-byte big-endian frame length to ``tx_ctl``, then the frame
to ``data`` in chunks (write requests of at most MTU - 3 bytes). :class:`FrameReceiver` is the
device's side of that.

Device → client: the device queues frames; the first one is *pending* and announced on ``rx_ctl``
(notification/indication) with its 4-byte length. Reading ``rx_ctl`` returns the pending length (0
if none) and rewinds; each read of ``data`` returns the next chunk of at most MTU - 2 bytes (one less
than the ATT maximum, so a client stack never switches to a long read). After the last chunk the
next queued frame becomes pending. :class:`FrameSender` is the device's side;
:class:`FrameReassembler` the client's.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from rpc.errors import TransportError

__all__ = [
    "ATT_READ_OVERHEAD",
    "ATT_WRITE_OVERHEAD",
    "DATA_UUID",
    "DEFAULT_MAX_FRAME_SIZE",
    "LENGTH_SIZE",
    "RX_CTL_UUID",
    "SERVICE_UUID",
    "TX_CTL_UUID",
    "AttError",
    "DataChunk",
    "FrameReassembler",
    "FrameReceiver",
    "FrameSender",
    "GattProtocolError",
    "RxState",
    "decode_length",
    "encode_length",
    "read_chunk_size",
    "write_chunk_size",
    "write_chunks",
]

# 128-bit UUIDs whose bytes spell ASCII ("_mOS_RPC_SVC_ID_", ...).
SERVICE_UUID = "5f6d4f53-5f52-5043-5f53-56435f49445f"
DATA_UUID = "5f6d4f53-5f52-5043-5f64-6174615f5f5f"
RX_CTL_UUID = "5f6d4f53-5f52-5043-5f72-785f63746c5f"
TX_CTL_UUID = "5f6d4f53-5f52-5043-5f74-785f63746c5f"

DEFAULT_MAX_FRAME_SIZE = 4096  # rpc.gatts.max_frame_size
LENGTH_SIZE = 4
ATT_WRITE_OVERHEAD = 3  # opcode + handle in a Write Request
ATT_READ_OVERHEAD = 2  # rpc-gatts answers one byte less than the ATT maximum (MTU - 1)
MIN_ATT_MTU = 23

_LENGTH = struct.Struct(">I")


class AttError(enum.IntEnum):
    """The ATT error codes the protocol answers with (Bluetooth Core Vol 3 Part F 3.4.1.1)."""

    INVALID_OFFSET = 0x07
    REQUEST_NOT_SUPPORTED = 0x06
    INSUFFICIENT_RESOURCES = 0x11
    UNLIKELY_ERROR = 0x0E


class GattProtocolError(TransportError):
    """A GATT operation violated the length protocol; ``att_error`` is the ATT code to answer with."""

    def __init__(self, att_error: AttError, message: str) -> None:
        super().__init__(f"{message} (ATT error 0x{int(att_error):02x} {att_error.name.lower()})")
        self.att_error = att_error


def encode_length(n: int) -> bytes:
    """The 4-byte big-endian length written to ``tx_ctl`` / announced on ``rx_ctl``."""
    if not 0 <= n <= 0xFFFFFFFF:
        raise ValueError(f"frame length {n} does not fit in 32 bits")
    return _LENGTH.pack(n)


def decode_length(value: bytes | bytearray | memoryview) -> int:
    """Parse a 4-byte big-endian length; anything but 4 bytes is a :class:`GattProtocolError`."""
    if len(value) != LENGTH_SIZE:
        raise GattProtocolError(AttError.REQUEST_NOT_SUPPORTED, f"a length is {LENGTH_SIZE} bytes, got {len(value)}")
    n: int = _LENGTH.unpack(bytes(value))[0]
    return n


def write_chunk_size(mtu: int) -> int:
    """The largest ``data`` write request payload for an ATT MTU (MTU - 3)."""
    _check_mtu(mtu)
    return mtu - ATT_WRITE_OVERHEAD


def read_chunk_size(mtu: int) -> int:
    """The device's ``data`` read chunk for an ATT MTU (MTU - 2)."""
    _check_mtu(mtu)
    return mtu - ATT_READ_OVERHEAD


def _check_mtu(mtu: int) -> None:
    if mtu < MIN_ATT_MTU:
        raise ValueError(f"ATT MTU must be at least {MIN_ATT_MTU}, got {mtu}")


def write_chunks(frame: bytes, *, mtu: int) -> Iterator[bytes]:
    """Split ``frame`` into ``data`` write requests of at most MTU - 3 bytes each."""
    size = write_chunk_size(mtu)
    view = memoryview(frame)
    for start in range(0, len(frame), size):
        yield bytes(view[start : start + size])


# -- device side: receiving (tx_ctl + data writes) ---------------------------------------------------


class RxState(enum.Enum):
    """Where the device's receiver is: waiting for a length, or collecting announced bytes."""

    IDLE = "idle"
    RECEIVING = "receiving"


class _RxEvent(enum.Enum):
    LENGTH = "length"  # a valid non-zero length was written to tx_ctl
    CANCEL = "cancel"  # a zero length was written to tx_ctl
    PART = "part"  # data that does not complete the frame
    LAST = "last"  # data that completes the frame


# Legal moves. A data write while idle has nothing announced, so it is "more than announced"
# (INVALID_OFFSET) like in rpc-gatts, where the expected length is 0 then.
_RX_TRANSITIONS: dict[tuple[RxState, _RxEvent], RxState] = {
    (RxState.IDLE, _RxEvent.LENGTH): RxState.RECEIVING,
    (RxState.IDLE, _RxEvent.CANCEL): RxState.IDLE,
    (RxState.RECEIVING, _RxEvent.LENGTH): RxState.RECEIVING,  # discards the partial frame
    (RxState.RECEIVING, _RxEvent.CANCEL): RxState.IDLE,
    (RxState.RECEIVING, _RxEvent.PART): RxState.RECEIVING,
    (RxState.RECEIVING, _RxEvent.LAST): RxState.IDLE,
}


class FrameReceiver:
    """Device side of client → device transfers: one frame in flight.

    ``write_tx_ctl`` announces a length; ``write_data`` collects bytes and returns the frame once
    exactly the announced number arrived. A rejected write raises :class:`GattProtocolError` and
    changes nothing, so a client may retry it.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self.state = RxState.IDLE
        self.expected = 0
        self._buf = bytearray()

    def _move(self, event: _RxEvent) -> None:
        try:
            self.state = _RX_TRANSITIONS[(self.state, event)]
        except KeyError:
            raise GattProtocolError(
                AttError.UNLIKELY_ERROR, f"{event.value} is not allowed in state {self.state.value}"
            ) from None

    @property
    def received(self) -> int:
        """Bytes of the current frame collected so far."""
        return len(self._buf)

    def write_tx_ctl(self, value: bytes | bytearray | memoryview) -> None:
        """A write to ``tx_ctl``: the next frame's length (4 bytes big-endian; extra bytes ignored)."""
        if len(value) < LENGTH_SIZE:
            raise GattProtocolError(
                AttError.REQUEST_NOT_SUPPORTED, f"tx_ctl needs a {LENGTH_SIZE}-byte length, got {len(value)} bytes"
            )
        n = decode_length(bytes(value[:LENGTH_SIZE]))
        if n > self.max_frame_size:
            raise GattProtocolError(
                AttError.INSUFFICIENT_RESOURCES, f"frame of {n} bytes exceeds max_frame_size {self.max_frame_size}"
            )
        self._move(_RxEvent.LENGTH if n else _RxEvent.CANCEL)
        self.expected = n
        self._buf.clear()

    def write_data(self, value: bytes | bytearray | memoryview) -> bytes | None:
        """A write to ``data``; returns the whole frame when this write completes it."""
        if not value:
            return None  # an empty write adds nothing and completes nothing
        total = len(self._buf) + len(value)
        if total > self.expected:
            raise GattProtocolError(
                AttError.INVALID_OFFSET,
                f"data write of {len(value)} bytes goes past the announced length "
                f"({len(self._buf)} of {self.expected} received)",
            )
        self._move(_RxEvent.LAST if total == self.expected else _RxEvent.PART)
        self._buf += value
        if self.state is RxState.IDLE:
            frame = bytes(self._buf)
            self._buf.clear()
            self.expected = 0
            return frame
        return None


# -- device side: sending (rx_ctl + data reads) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataChunk:
    """One ``data`` read: the bytes to answer with, and the length to announce next (0: nothing)."""

    data: bytes
    announce: int = 0


class FrameSender:
    """Device side of device → client transfers: a queue whose head is the pending frame."""

    def __init__(self, *, max_queued: int | None = None) -> None:
        self.max_queued = max_queued
        self._queue: deque[bytes] = deque()
        self._offset = 0
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Bytes of every queued frame, the pending one included."""
        return self._bytes

    @property
    def pending_length(self) -> int:
        """Length of the pending frame, 0 when nothing is pending."""
        return len(self._queue[0]) if self._queue else 0

    @property
    def offset(self) -> int:
        """Bytes of the pending frame already read."""
        return self._offset

    def queue(self, frame: bytes) -> int:
        """Queue a frame; returns its length if it became pending (announce it), else 0."""
        if not frame:
            raise ValueError("cannot send an empty frame")
        if self.max_queued is not None and len(self._queue) >= self.max_queued:
            raise TransportError(f"GATT send queue is full ({self.max_queued} frames)")
        self._queue.append(bytes(frame))
        self._bytes += len(frame)
        return len(frame) if len(self._queue) == 1 else 0

    def read_rx_ctl(self) -> bytes:
        """A read of ``rx_ctl``: the pending frame's length (0 if none); rewinds the read offset."""
        self._offset = 0
        return encode_length(self.pending_length)

    def read_data(self, mtu: int) -> DataChunk:
        """A read of ``data``: the next chunk of at most MTU - 2 bytes (empty when nothing is pending).

        The ATT read offset is not used (rpc-gatts ignores it). Reading the last chunk sends the
        frame; the next one becomes pending and is returned in :attr:`DataChunk.announce`.
        """
        size = read_chunk_size(mtu)
        if not self._queue:
            return DataChunk(b"")
        frame = self._queue[0]
        chunk = frame[self._offset : self._offset + size]
        self._offset += len(chunk)
        if self._offset < len(frame):
            return DataChunk(chunk)
        self._bytes -= len(self._queue.popleft())
        self._offset = 0
        return DataChunk(chunk, self.pending_length)

    def clear(self) -> None:
        """Drop every queued frame (the connection went away)."""
        self._queue.clear()
        self._offset = 0
        self._bytes = 0


# -- client side: reading a frame -----------------------------------------------------------------------


class FrameReassembler:
    """Client side of device → client: collect ``data`` reads until the announced length."""

    def __init__(self, length: int, *, max_frame_size: int | None = None) -> None:
        if length < 0:
            raise ValueError("length must not be negative")
        if max_frame_size is not None and length > max_frame_size:
            raise GattProtocolError(
                AttError.INSUFFICIENT_RESOURCES, f"peer announced {length} bytes, more than {max_frame_size}"
            )
        self.length = length
        self._buf = bytearray()

    @property
    def done(self) -> bool:
        """True once the whole frame is collected."""
        return len(self._buf) == self.length

    @property
    def remaining(self) -> int:
        """Bytes still to read."""
        return self.length - len(self._buf)

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes | None:
        """Add one ``data`` read; returns the frame when complete.

        An empty read before the end means the peer dropped the frame; more bytes than announced
        means the two sides disagree. Both raise :class:`GattProtocolError`.
        """
        if self.done:
            raise GattProtocolError(AttError.INVALID_OFFSET, "frame already complete")
        if not chunk:
            raise GattProtocolError(
                AttError.UNLIKELY_ERROR, f"peer returned no data with {self.remaining} of {self.length} bytes left"
            )
        if len(chunk) > self.remaining:
            raise GattProtocolError(
                AttError.INVALID_OFFSET, f"peer returned {len(chunk)} bytes with only {self.remaining} left"
            )
        self._buf += chunk
        return bytes(self._buf) if self.done else None
