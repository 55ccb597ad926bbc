"""Serial and TCP stream framing of mgRPC, both roles, sans-I/O (spec/transports.md §1 and §7).

Four pieces, none of which does I/O:

* :class:`MosStreamEncoder` — the bytes ``mos`` writes: ``\\n\"\"\"{json}<crc>\"\"\"\\n`` (no CRC on
  TCP), the handshake ``\"\"\"\\x04\"\"\"\\n\\n`` and its acknowledgement ``\"\"\"``.
* :class:`MosStreamDecoder` — mos's receive parser: a frame starts only at a delimiter followed by
  ``{`` or ``0x04``; everything else is console output, delivered as :class:`Junk`.
* :class:`DeviceStreamDecoder` / :class:`DeviceStreamEncoder` — the rpc-uart algorithm: ``\"\"\"`` or
  ``\\n`` delimiters, empty frames answered with a ``\\n`` that waits for the next transmission, the
  ``0x04`` handshake, CRC metadata, and the per-channel *compat* (``\"\"\"``) and *crc* modes, learned
  from the input and sticky (:class:`DeviceLinkModes`).

Usage follows h11: ``dec.feed(chunk)`` then ``for ev in dec.events(): ...``.

Chunking: both decoders behave as if bytes arrived one at a time (a legal timing for a real UART),
so the *sequence* of events never depends on how the input was split — except that :class:`Junk`
and :class:`NonAscii` data may be reported in more, smaller pieces (their concatenation is the
same). A real device parses whole reads, which differs only on input no correct peer sends (a raw
``\\n`` inside a ``\"\"\"``-delimited frame, or a non-ASCII byte in the same read as a whole frame).
"""

from __future__ import annotations

import enum
import json
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rpc.errors import FrameError
from rpc.frame import DEFAULT_MAX_FRAME_SIZE

__all__ = [
    "BINARY_MARKER",
    "EOF_CHAR",
    "HANDSHAKE",
    "HANDSHAKE_ACK",
    "HANDSHAKE_REPLY",
    "XOFF",
    "XON",
    "BadCrc",
    "BinaryStreamDecoder",
    "BinaryStreamEncoder",
    "DeviceLinkModes",
    "DeviceStreamDecoder",
    "DeviceStreamEncoder",
    "DualStreamDecoder",
    "DualStreamEncoder",
    "Empty",
    "FlowControl",
    "FrameBytes",
    "Handshake",
    "Junk",
    "LineStreamDecoder",
    "MosStreamDecoder",
    "MosStreamEncoder",
    "NonAscii",
    "Oversize",
    "StreamEvent",
    "crc32_hex",
    "stream_safe",
]

QUOTES = b'"""'  # the old delimiter (before 2018-06-14), still sent by mos
NEWLINE = b"\n"  # the new delimiter
EOF_CHAR = 0x04
XON = 0x11
XOFF = 0x13
HANDSHAKE = b'"""\x04"""\n\n'  # mos -> device, repeated every 200 ms until answered
HANDSHAKE_REPLY = b'"""\x04"""'  # device -> mos (queued by the device for the 0x04 frame)
HANDSHAKE_ACK = b'"""'  # mos -> device, once, when the reply arrives

DEFAULT_MOS_MAX_FRAME_SIZE = 1 << 20  # mos has no limit; we bound memory at 1 MiB per frame


def stream_safe(json_bytes: bytes) -> bytes:
    """JSON made safe for newline framing: a raw ``\\n`` (which would end the frame early) can only
    be insignificant whitespace in valid JSON, so it becomes a space (the CRC covers the result).
    Invalid JSON holding one is refused with :class:`FrameError`.
    """
    if b"\n" not in json_bytes:
        return json_bytes
    try:
        json.loads(json_bytes)  # strict: a raw newline inside a string is invalid
    except ValueError:
        raise FrameError("a frame with a raw newline that is not valid JSON cannot be framed") from None
    return json_bytes.replace(b"\n", b" ")


def crc32_hex(data: bytes) -> str:
    """CRC-32 (IEEE, = ``zlib.crc32``) of ``data`` as 8 lowercase hex digits, as both ends print it."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


# ---------------------------------------------------------------------------------------------
# events


@dataclass(frozen=True, slots=True)
class FrameBytes:
    """One frame's JSON bytes. ``crc_ok`` is True if a CRC came with it and matched, None if none did."""

    data: bytes
    crc_ok: bool | None = None


@dataclass(frozen=True, slots=True)
class Junk:
    """Bytes that are not part of a frame (device console output, stray bytes)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Handshake:
    """A frame consisting of the single byte ``0x04``."""


@dataclass(frozen=True, slots=True)
class Empty:
    """A frame of whitespace only (device side; the device answers it with a ``\\n``)."""


@dataclass(frozen=True, slots=True)
class BadCrc:
    """A frame whose metadata did not verify: dropped by a device, fatal for mos.

    ``data`` is the frame (JSON part when it could be split off), ``reason`` says what was wrong.
    """

    data: bytes
    reason: str = "CRC mismatch"


@dataclass(frozen=True, slots=True)
class FlowControl:
    """An XOFF (``xoff=True``, stop writing) or XON (``xoff=False``, resume) byte from the device."""

    xoff: bool


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame longer than the limit was discarded; ``size`` bytes were dropped."""

    size: int = 0


@dataclass(frozen=True, slots=True)
class NonAscii:
    """Device side: a byte >= 0x80 arrived, so the receive buffer (``data``, ending with it) was dropped."""

    data: bytes


StreamEvent = FrameBytes | Junk | Handshake | Empty | BadCrc | FlowControl | Oversize | NonAscii

_HIGH_RE = re.compile(rb"[\x80-\xff]+")
_FLOW_RE = re.compile(rb"[\x11\x13]")
_GO_HEX_RE = re.compile(rb"[+-]?[0-9a-fA-F]+")
_C_HEX_RE = re.compile(rb"[ \t\n\v\f\r]*(?:0[xX])?([0-9a-fA-F]*)")


def _earliest_delimiter(buf: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """Position and length of the first ``\"\"\"`` or ``\\n`` at or after ``start``; (-1, 0) if none."""
    q = buf.find(QUOTES, start)
    n = buf.find(NEWLINE, start)
    if q < 0:
        return (n, 1) if n >= 0 else (-1, 0)
    if n < 0 or q < n:
        return q, 3
    return n, 1


def _quote_tail(buf: bytes | bytearray) -> int:
    """How many trailing bytes could be the start of a ``\"\"\"`` completed by later input (0..2)."""
    if buf.endswith(b'""'):
        return 2
    if buf.endswith(b'"'):
        return 1
    return 0


class _Decoder:
    """Event queue shared by the decoders."""

    def __init__(self) -> None:
        self._events: deque[StreamEvent] = deque()

    def events(self) -> Iterator[StreamEvent]:
        """Yield (and remove) the events produced so far."""
        while self._events:
            yield self._events.popleft()

    def __iter__(self) -> Iterator[StreamEvent]:
        return self.events()

    def _emit(self, ev: StreamEvent) -> None:
        self._events.append(ev)


# ---------------------------------------------------------------------------------------------
# mos side


class MosStreamEncoder:
    """What mos writes on a stream: ``\\n\"\"\"{json}[crc]\"\"\"\\n``; ``crc=False`` for TCP."""

    def __init__(self, *, crc: bool = True) -> None:
        self.crc = crc

    def encode(self, json_bytes: bytes) -> bytes:
        """Frame one JSON message (see :func:`stream_safe` for raw newlines)."""
        json_bytes = stream_safe(json_bytes.rstrip())  # mos trims the Go encoder's trailing newline
        parts = [b"\n", QUOTES, json_bytes]
        if self.crc:
            parts.append(crc32_hex(json_bytes).encode("ascii"))
        parts += [QUOTES, b"\n"]
        return b"".join(parts)

    @staticmethod
    def handshake() -> bytes:
        """The handshake mos repeats until the device answers: ``\"\"\"\\x04\"\"\"\\n\\n``."""
        return HANDSHAKE

    @staticmethod
    def ack() -> bytes:
        """What mos writes once when the handshake reply arrives: ``\"\"\"``."""
        return HANDSHAKE_ACK


class LineStreamDecoder(_Decoder):
    """One message per line (newline-delimited JSON), what plain JSON-RPC 2.0 stream peers speak.

    Used on the client side with ``?dialect=jsonrpc``. Blank lines are skipped; a line longer than
    ``max_size`` (0: no bound) is dropped as :class:`Oversize`; at EOF a last unterminated line counts.
    """

    def __init__(self, *, max_size: int = 0) -> None:
        super().__init__()
        self.max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; every complete line becomes a :class:`FrameBytes` event."""
        buf = self._buf
        buf += data
        while (pos := buf.find(b"\n")) >= 0:
            self._line(bytes(buf[:pos]))
            del buf[: pos + 1]
        if self.max_size and len(buf) > self.max_size:
            self._emit(Oversize(len(buf)))
            buf.clear()

    def feed_eof(self) -> None:
        """The stream ended: a last line without its newline is still a message."""
        if self._buf:
            self._line(bytes(self._buf))
            self._buf.clear()

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        if self.max_size and len(line) > self.max_size:
            self._emit(Oversize(len(line)))
            return
        self._emit(FrameBytes(line, None))


class _MosState(enum.Enum):
    HUNT = "hunt"  # between frames: looking for a delimiter followed by '{' or 0x04
    FRAME = "frame"  # inside a frame: looking for the closing delimiter
    SKIP = "skip"  # inside an oversize frame: dropping bytes until the closing delimiter


class MosStreamDecoder(_Decoder):
    """mos's receive parser (``frameFromRxBuf``), spec/transports.md §1.6.

    Events: :class:`FrameBytes` (CRC verified when present), :class:`Handshake`, :class:`Junk`,
    :class:`BadCrc` (malformed metadata or CRC mismatch; mos closes the connection),
    :class:`FlowControl` (XON/XOFF removed from the stream; only with ``flow_control=True``, the
    serial default) and :class:`Oversize` (our memory bound; mos itself has none).

    mos indexes the byte after the delimiter relative to the buffer start, which misreads a frame
    that follows junk in the same read; we check the byte right after the delimiter, as intended.
    """

    def __init__(self, *, flow_control: bool = True, max_frame_size: int = DEFAULT_MOS_MAX_FRAME_SIZE) -> None:
        super().__init__()
        self.flow_control = flow_control
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._state = _MosState.HUNT
        self._skipped = 0
        self._steps: dict[_MosState, Callable[[], bool]] = {
            _MosState.HUNT: self._step_hunt,
            _MosState.FRAME: self._step_frame,
            _MosState.SKIP: self._step_skip,
        }

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; events become available from :meth:`events`."""
        data = bytes(data)
        if not data:
            return
        if not self.flow_control:
            self._parse(data)
            return
        start = 0
        for m in _FLOW_RE.finditer(data):
            self._parse(data[start : m.start()])
            self._emit(FlowControl(xoff=data[m.start()] == XOFF))
            start = m.end()
        self._parse(data[start:])

    def feed_eof(self) -> None:
        """The peer closed the stream: a frame in progress is taken as complete (as mos does)."""
        if self._state is _MosState.FRAME:
            body = bytes(self._buf)
            self._buf.clear()
            self._state = _MosState.HUNT
            if body:
                self._frame(body)
        elif self._state is _MosState.SKIP:
            self._emit(Oversize(self._skipped + len(self._buf)))
            self._buf.clear()
            self._state = _MosState.HUNT
        elif self._buf:
            self._emit(Junk(bytes(self._buf)))
            self._buf.clear()

    def _parse(self, data: bytes) -> None:
        if data:
            self._buf += data
        while self._steps[self._state]():
            pass

    def _step_hunt(self) -> bool:
        buf = self._buf
        pos, n = _earliest_delimiter(buf)
        if pos < 0:
            # No delimiter: all of it is junk, except a tail that may become a """ delimiter.
            cut = len(buf) - _quote_tail(buf)
            if cut > 0:
                self._emit(Junk(bytes(buf[:cut])))
                del buf[:cut]
            return False
        if pos + n >= len(buf):
            # A frame may start here: wait for the byte after the delimiter.
            if pos > 0:
                self._emit(Junk(bytes(buf[:pos])))
                del buf[:pos]
            return False
        if buf[pos + n] in (0x7B, EOF_CHAR):  # '{' or 0x04
            if pos > 0:
                self._emit(Junk(bytes(buf[:pos])))
            del buf[: pos + n]
            self._state = _MosState.FRAME
            return True
        self._emit(Junk(bytes(buf[: pos + n])))
        del buf[: pos + n]
        return True

    def _step_frame(self) -> bool:
        buf = self._buf
        pos, n = _earliest_delimiter(buf)
        if pos < 0:
            keep = _quote_tail(buf)
            if len(buf) - keep > self.max_frame_size:
                self._skipped = len(buf) - keep
                del buf[: len(buf) - keep]
                self._state = _MosState.SKIP
                return True
            return False
        body = bytes(buf[:pos])
        del buf[: pos + n]
        self._state = _MosState.HUNT
        if len(body) > self.max_frame_size:
            self._emit(Oversize(len(body)))
        else:
            self._frame(body)
        return True

    def _step_skip(self) -> bool:
        buf = self._buf
        pos, n = _earliest_delimiter(buf)
        if pos < 0:
            keep = _quote_tail(buf)
            self._skipped += len(buf) - keep
            del buf[: len(buf) - keep]
            return False
        self._emit(Oversize(self._skipped + pos))
        self._skipped = 0
        del buf[: pos + n]
        self._state = _MosState.HUNT
        return True

    def _frame(self, body: bytes) -> None:
        if body == b"\x04":
            self._emit(Handshake())
            return
        data = body.rstrip()
        if len(data) <= 1:
            payload, meta = data, b""
        else:
            # Metadata = bytes after the last '}' (mos never looks at index 0).
            j = data.rfind(b"}", 1)
            split = 1 if j < 0 else j + 1
            payload, meta = data[:split], data[split:]
        if not meta:
            self._emit(FrameBytes(payload, None))
            return
        field = meta.split(b",", 1)[0]
        if not _GO_HEX_RE.fullmatch(field) or not -(1 << 63) <= int(field, 16) < (1 << 63):
            self._emit(BadCrc(data, f"malformed frame metadata: {meta!r}"))
            return
        expected = int(field, 16) & 0xFFFFFFFF
        actual = zlib.crc32(payload) & 0xFFFFFFFF
        if expected != actual:
            self._emit(BadCrc(payload, f"CRC mismatch: expected 0x{expected:08x}, got 0x{actual:08x}"))
            return
        self._emit(FrameBytes(payload, True))


# ---------------------------------------------------------------------------------------------
# device side


@dataclass(slots=True)
class DeviceLinkModes:
    """What a device has learned about its peer; both flags only ever turn on (until reboot)."""

    compat: bool = False  # a """ was seen: frames are written with """ around them
    crc: bool = False  # a frame with a valid CRC was seen: frames are written with a CRC


_NO_LIMIT = 1 << 62

def _is_batch(body: bytes) -> bool:
    """A JSON-RPC 2.0 batch on a line: a JSON array (console text such as ``[boot] {...}`` is not)."""
    text = body.strip()
    if text[:1] != b"[" or text[-1:] != b"]":
        return False
    try:
        return isinstance(json.loads(text), list)
    except (ValueError, RecursionError):
        return False


class DeviceStreamDecoder(_Decoder):
    """The rpc-uart receive algorithm (spec/transports.md §1.2).

    Events: :class:`FrameBytes` (the JSON part; ``crc_ok`` True when a CRC verified), :class:`Empty`
    (answer with a queued ``\\n``), :class:`Handshake` (answer ``\"\"\"\\x04\"\"\"``), :class:`BadCrc`
    (frame dropped, "Corrupted frame"), :class:`Oversize` ("Incoming frame is too big"),
    :class:`NonAscii` (buffer dropped) and :class:`Junk` (bytes before the first ``{`` of a frame,
    which the device drops silently).

    Metadata parsing *[inferred]*: the leading hex number is read like C ``strtoul(.., 16)``
    (leading blanks and ``0x`` allowed, no digits = 0, values above 32 bits saturate).

    ``ascii_only=False`` lifts the non-ASCII rule (a UART rule) for transports that carry UTF-8,
    such as our device side of ``tcp://``, since mos never escapes non-ASCII text.
    """

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        modes: DeviceLinkModes | None = None,
        ascii_only: bool = True,
    ) -> None:
        super().__init__()
        self.max_frame_size = max_frame_size
        self.ascii_only = ascii_only
        self.modes = modes if modes is not None else DeviceLinkModes()
        self._buf = bytearray()

    @property
    def limit(self) -> int:
        """The most bytes the unparsed remainder may hold (``max_frame_size + 6``; a ``max_frame_size``
        of 0, a bridge's, is no limit)."""
        return self.max_frame_size + 6 if self.max_frame_size else _NO_LIMIT

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; events become available from :meth:`events`."""
        data = bytes(data)
        if not self.ascii_only:
            self._scan(data)
            return
        start = 0
        for m in _HIGH_RE.finditer(data):
            self._scan(data[start : m.start()])
            # Non-ASCII is not allowed on the wire: the device drops everything it has buffered.
            self._emit(NonAscii(bytes(self._buf) + m.group()))
            self._buf.clear()
            start = m.end()
        self._scan(data[start:])

    def _scan(self, data: bytes) -> None:
        if not data:
            return
        buf = self._buf
        buf += data
        limit = self.limit
        while True:
            pos, n = _earliest_delimiter(buf)
            end = pos + n if pos >= 0 else -1
            # Byte by byte, the buffer would reach limit+1 bytes before this delimiter completed.
            if (end < 0 and len(buf) > limit) or end > limit + 1:
                self._emit(Oversize(limit + 1))
                del buf[: limit + 1]
                continue
            if end < 0:
                return
            if n == 3:
                self.modes.compat = True
            body = bytes(buf[:pos])
            del buf[:end]
            self._frame(body)

    def _frame(self, body: bytes) -> None:
        if not body.strip():
            self._emit(Empty())
            return
        if body == b"\x04":
            self._emit(Handshake())
            return
        if _is_batch(body):
            # Not rpc-uart: a JSON-RPC 2.0 batch (docs/protocol/jsonrpc.md §5) is one message, whole.
            self._emit(FrameBytes(body.strip(), None))
            return
        k = body.find(b"{")
        if k < 0:
            self._emit(Junk(body))
            return
        if k > 0:
            self._emit(Junk(body[:k]))
        data = body[k:]
        j = data.rfind(b"}")
        if j < 0:
            # No closing brace: not JSON, and no CRC either (its absent payload must not "verify"
            # and switch CRC mode on). Handed on whole so a JSON-RPC peer gets its parse error.
            self._emit(FrameBytes(data, None))
            return
        payload, meta = data[: j + 1], data[j + 1 :]
        crc_ok: bool | None = None
        if len(meta) >= 8:
            m = _C_HEX_RE.match(meta)
            digits = m.group(1) if m else b""
            expected = min(int(digits, 16), 0xFFFFFFFF) if digits else 0
            actual = zlib.crc32(payload) & 0xFFFFFFFF
            if expected != actual:
                self._emit(BadCrc(payload, f"Corrupted frame: CRC 0x{expected:08x} != 0x{actual:08x}"))
                return
            self.modes.crc = True
            crc_ok = True
        self._emit(FrameBytes(payload, crc_ok))


class DeviceStreamEncoder:
    """What rpc-uart writes: ``\\n [\"\"\"] {json} [crc] [\"\"\"] \\n`` per the learned modes.

    Output is kept in a transmit buffer: the ``\\n`` answering an empty frame waits there until a
    real transmission (a frame or the handshake reply) starts; :meth:`data_to_send` returns what
    should go on the wire now.
    """

    def __init__(self, *, modes: DeviceLinkModes | None = None) -> None:
        self.modes = modes if modes is not None else DeviceLinkModes()
        self._tx = bytearray()
        self._transmit = False

    def queue_newline(self) -> None:
        """Answer an empty frame: a ``\\n`` that is sent with the next transmission."""
        self._tx += b"\n"

    def queue_handshake_reply(self) -> None:
        """Answer the ``0x04`` frame with ``\"\"\"\\x04\"\"\"`` and start transmitting."""
        self._tx += HANDSHAKE_REPLY
        self._transmit = True

    def queue_frame(self, json_bytes: bytes) -> None:
        """Queue one frame (JSON; see :func:`stream_safe`) and start transmitting."""
        json_bytes = stream_safe(json_bytes)
        compat = self.modes.compat
        self._tx += b"\n"
        if compat:
            self._tx += QUOTES
        self._tx += json_bytes
        if self.modes.crc:
            self._tx += crc32_hex(json_bytes).encode("ascii")
        if compat:
            self._tx += QUOTES
        self._tx += b"\n"
        self._transmit = True

    def handle(self, ev: StreamEvent) -> None:
        """Apply the device's automatic answer to a decoder event (:class:`Empty`, :class:`Handshake`)."""
        if isinstance(ev, Empty):
            self.queue_newline()
        elif isinstance(ev, Handshake):
            self.queue_handshake_reply()

    def data_to_send(self) -> bytes:
        """The bytes to write now (empty while only ``\\n`` answers are waiting)."""
        if not self._transmit:
            return b""
        out = bytes(self._tx)
        self._tx.clear()
        self._transmit = False
        return out

    @property
    def pending(self) -> int:
        """Bytes queued but not yet handed out."""
        return len(self._tx)


# ---------------------------------------------------------------------------------------------
# binary frames (msgpack between two mgrpc ends)

BINARY_MARKER = 0xC1  # never a valid msgpack byte, and >= 0x80 so no text parser takes it for a frame
_BIN_HEADER = 5  # marker + uint32 big-endian payload length
_BIN_TRAILER = 4  # uint32 big-endian CRC-32 of the payload


class BinaryStreamEncoder:
    """Frames for binary codecs on a byte stream: ``C1 <len:u32 BE> <payload> <crc32:u32 BE>``.

    Only used with ``?codec=msgpack`` between two mgrpc ends: the text framing of mos and rpc-uart
    cannot carry arbitrary bytes. It offers both the client API (:meth:`encode`) and the device
    API (:meth:`queue_frame` / :meth:`data_to_send` / :meth:`handle`) of the text encoders.
    """

    def __init__(self) -> None:
        self._out = bytearray()

    @staticmethod
    def encode(payload: bytes) -> bytes:
        """The bytes on the wire for one frame."""
        n = len(payload)
        crc = zlib.crc32(payload)
        return bytes((BINARY_MARKER,)) + n.to_bytes(4, "big") + payload + crc.to_bytes(4, "big")

    def queue_frame(self, payload: bytes) -> None:
        """Queue one frame for :meth:`data_to_send`."""
        self._out += self.encode(payload)

    def handle(self, ev: StreamEvent) -> None:
        """Binary links have no empty frames or handshakes to answer."""

    def data_to_send(self) -> bytes:
        """Everything queued, and forget it."""
        out, self._out = bytes(self._out), bytearray()
        return out


class BinaryStreamDecoder(_Decoder):
    """Decoder for :class:`BinaryStreamEncoder` frames; bytes between frames are :class:`Junk`.

    A bad CRC or an oversize length drops only the marker byte and hunts for the next marker, so one
    corrupted frame never takes the next ones with it.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MOS_MAX_FRAME_SIZE) -> None:
        super().__init__()
        self.max_frame_size = max_frame_size
        self.modes = DeviceLinkModes()
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes and produce the events they complete."""
        self._buf += data
        buf = self._buf
        while True:
            start = buf.find(BINARY_MARKER)
            if start < 0:
                if buf:
                    self._emit(Junk(bytes(buf)))
                    buf.clear()
                return
            if start:
                self._emit(Junk(bytes(buf[:start])))
                del buf[:start]
            if len(buf) < _BIN_HEADER:
                return
            n = int.from_bytes(buf[1:_BIN_HEADER], "big")
            if self.max_frame_size and n > self.max_frame_size:
                self._emit(Oversize(n))
                del buf[:1]
                continue
            end = _BIN_HEADER + n + _BIN_TRAILER
            if len(buf) < end:
                return
            payload = bytes(buf[_BIN_HEADER : _BIN_HEADER + n])
            if zlib.crc32(payload) != int.from_bytes(buf[end - _BIN_TRAILER : end], "big"):
                self._emit(BadCrc(payload, "binary frame CRC mismatch"))
                del buf[:1]
                continue
            self._emit(FrameBytes(payload, True))
            del buf[:end]

    def feed_eof(self) -> None:
        """The stream ended: an incomplete frame is junk."""
        if self._buf:
            self._emit(Junk(bytes(self._buf)))
            self._buf.clear()


# ---------------------------------------------------------------------------------------------
# both on one link (a device listening with a binary codec still serves mos)


class DualStreamDecoder(_Decoder):
    """Device side of a link that may carry text frames (rpc-uart) and binary frames alike.

    A :data:`BINARY_MARKER` byte (0xC1, which neither ASCII nor UTF-8 text ever contains) starts a
    binary frame, read whole by length; every other byte goes to the text decoder. Events are
    those of the two decoders, in stream order.
    """

    def __init__(self, text: DeviceStreamDecoder, binary: BinaryStreamDecoder) -> None:
        super().__init__()
        self.text = text
        self.binary = binary
        self.modes = text.modes
        self._frame = bytearray()  # the binary frame being read (starts with the marker)
        self._need = 0  # its total length once the header is in (0: not known yet)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; events become available from :meth:`events`."""
        data = bytes(data)
        pos = 0
        while pos < len(data):
            if not self._frame:
                k = data.find(BINARY_MARKER, pos)
                end = len(data) if k < 0 else k
                if end > pos:
                    self._pass(self.text, data[pos:end])
                if k < 0:
                    return
                pos = k
            pos = self._take_binary(data, pos)

    def _take_binary(self, data: bytes, pos: int) -> int:
        frame = self._frame
        if not self._need:
            k = min(len(data), pos + _BIN_HEADER - len(frame))
            frame += data[pos:k]
            pos = k
            if len(frame) < _BIN_HEADER:
                return pos
            n = int.from_bytes(frame[1:_BIN_HEADER], "big")
            if self.binary.max_frame_size and n > self.binary.max_frame_size:
                # Not a frame we can take: report it and read on as text after the marker.
                self._emit(Oversize(n))
                rest = bytes(frame[1:])
                frame.clear()
                self._pass(self.text, rest)
                return pos
            self._need = _BIN_HEADER + n + _BIN_TRAILER
        k = min(len(data), pos + self._need - len(frame))
        frame += data[pos:k]
        if len(frame) == self._need:
            self._pass(self.binary, bytes(frame))
            frame.clear()
            self._need = 0
        return k

    def _pass(self, decoder: DeviceStreamDecoder | BinaryStreamDecoder, data: bytes) -> None:
        decoder.feed(data)
        for ev in decoder.events():
            self._emit(ev)


class DualStreamEncoder:
    """The encoder matching :class:`DualStreamDecoder`: a payload that is JSON text (starts with
    ``{``) goes out in the text framing the peer taught (:class:`DeviceStreamEncoder`), any other in a
    binary frame; text answers (handshake, empty frames) as the text encoder gives them."""

    def __init__(self, text: DeviceStreamEncoder, binary: BinaryStreamEncoder) -> None:
        self.text = text
        self.binary = binary
        self._out = bytearray()

    def queue_frame(self, payload: bytes) -> None:
        """Queue one encoded frame in the framing of its codec."""
        if payload[:1] == b"{":
            self.text.queue_frame(payload)
            self._out += self.text.data_to_send()
        else:
            self._out += self.binary.encode(payload)

    def handle(self, ev: StreamEvent) -> None:
        """The text link's automatic answers (:class:`Empty`, :class:`Handshake`)."""
        self.text.handle(ev)
        self._out += self.text.data_to_send()

    def data_to_send(self) -> bytes:
        """Everything to write now, in the order it was queued."""
        out, self._out = bytes(self._out), bytearray()
        return out
