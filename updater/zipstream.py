"""Sans-I/O parser for the fw.zip stream a Mongoose OS device accepts (spec/updater.md §1).

Bytes go in with :meth:`ZipStreamParser.feed`, events come out of :meth:`ZipStreamParser.events`::

    p = ZipStreamParser()
    for chunk in source:
        p.feed(chunk)
        for ev in p.events():
            ...  # EntryStart / EntryData / EntryEnd / ArchiveEnd

The parser reads local file headers one after another, the way the device does, and never looks at
the central directory: when the next four bytes at an entry boundary are the central directory
signature it reports :class:`ArchiveEnd` and swallows everything after it.

What is accepted (the device's rules, plus one opt-in extension):

* stored entries (method 0) whose compressed and uncompressed sizes agree (``Malformed archive``);
* deflated entries (method 8) only with ``allow_deflate=True`` (otherwise
  ``Cannot handle compressed .zip``); their data is inflated on the fly and the CRC and the
  uncompressed size are checked against the header;
* names: everything up to and including the first ``/`` is stripped (``fw-1.0/app.bin`` ->
  ``app.bin``); the stripped name must be shorter than ``max_name_len`` bytes
  (``Too long file name``);
* the header CRC-32, when non-zero, is checked at the end of a processed entry (``Invalid CRC``);
  entries dropped with :meth:`ZipStreamParser.skip_current` are not checked, like on the device.

Refused with a clear message (the device cannot handle them either, see spec §1.2): data
descriptors (flag bit 3: the sizes are not in the local header), encrypted entries (flag bit 0),
ZIP64 (sizes of 0xFFFFFFFF or a ZIP64 extra record 0x0001), and any other signature at an entry
boundary (``Malformed archive (invalid file header)``).

Errors are :class:`updater.errors.UpdaterError`; once one is raised the parser stays failed and
raises the same error again. Data is never held longer than needed: file data is handed out in the
pieces it was fed in (no copy when a fed piece lies inside one entry), so a 64 MiB bundle streams in
constant memory, and feeding one byte at a time stays linear.
"""

from __future__ import annotations

import collections
import enum
import logging
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from updater.errors import UpdaterError

__all__ = [
    "CENTRAL_DIR_SIGNATURE",
    "LOCAL_HEADER_SIGNATURE",
    "ArchiveEnd",
    "EntryData",
    "EntryEnd",
    "EntryStart",
    "Event",
    "ZipStreamParser",
    "strip_first_component",
]

log = logging.getLogger("mgrpc.updater.zipstream")

LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
CENTRAL_DIR_SIGNATURE = b"PK\x01\x02"

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes, see spec/updater.md §1.1
_SIG_LEN = 4

METHOD_STORED = 0
METHOD_DEFLATED = 8

FLAG_ENCRYPTED = 0x0001
FLAG_DATA_DESCRIPTOR = 0x0008

_ZIP64_MARKER = 0xFFFFFFFF
_ZIP64_EXTRA_ID = 0x0001

# Inflate output is produced in bounded steps so a tiny, highly compressed input cannot make one
# call allocate gigabytes; the declared size bounds the total.
_INFLATE_STEP = 256 * 1024


@dataclass(frozen=True)
class EntryStart:
    """A local file header was parsed; file data follows.

    ``name`` is the stripped name (first path component removed), ``size`` the uncompressed size
    (the number of bytes :class:`EntryData` events will carry), ``crc32`` the header CRC (0 = not
    checked), ``extra`` the raw local-header extra field (signatures live there, spec §4.4).
    """

    name: str
    size: int
    crc32: int
    method: int
    flags: int
    extra: bytes
    full_name: str = ""
    compressed_size: int = 0


@dataclass(frozen=True)
class EntryData:
    """A piece of the current entry's (uncompressed) data."""

    data: bytes


@dataclass(frozen=True)
class EntryEnd:
    """The current entry's data is complete (and its CRC verified unless ``skipped``).

    ``crc32`` is the CRC-32 of the data delivered (0 for a skipped entry), whatever the header says.
    """

    name: str
    skipped: bool = False
    crc32: int = 0


@dataclass(frozen=True)
class ArchiveEnd:
    """The central directory was reached: no more entries. Later bytes are ignored."""


Event = EntryStart | EntryData | EntryEnd | ArchiveEnd


def strip_first_component(name: str) -> str:
    """Drop everything up to and including the first ``/`` (the device's name rule)."""
    _, slash, rest = name.partition("/")
    return rest if slash else name


def _decode_name(raw: bytes) -> str:
    # Bit 11 says UTF-8; writers that do not set it (Python for ASCII, old tools) mostly write
    # ASCII anyway, so UTF-8 is tried first and CP437, the zip format's default, is the fallback.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp437")


def _has_zip64_record(extra: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(extra):
        header_id, length = struct.unpack_from("<HH", extra, pos)
        if header_id == _ZIP64_EXTRA_ID:
            return True
        pos += 4 + length
    return False


class _ByteQueue:
    """FIFO of fed chunks. Whole chunks are handed out without copying; joins happen only when a
    header straddles chunks, and only once enough bytes are present (so 1-byte feeds stay linear).
    """

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._head_off = 0  # bytes already consumed from _chunks[0]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(bytes(data))
            self._len += len(data)

    def clear(self) -> None:
        self._chunks.clear()
        self._head_off = 0
        self._len = 0

    def peek(self, n: int) -> bytes:
        """The first ``n`` bytes (caller made sure ``len(self) >= n``), not consumed."""
        head = self._chunks[0]
        if len(head) - self._head_off < n:
            # Merge just enough chunks to cover n bytes into one head chunk.
            parts = [head[self._head_off :]]
            have = len(parts[0])
            self._chunks.popleft()
            while have < n:
                nxt = self._chunks.popleft()
                parts.append(nxt)
                have += len(nxt)
            self._chunks.appendleft(b"".join(parts))
            self._head_off = 0
            head = self._chunks[0]
        return head[self._head_off : self._head_off + n]

    def take(self, n: int) -> bytes:
        """Consume and return up to ``n`` bytes from the head chunk (never joins chunks)."""
        head = self._chunks[0]
        avail = len(head) - self._head_off
        if self._head_off == 0 and avail <= n:
            out = head
        else:
            end = self._head_off + min(n, avail)
            out = head[self._head_off : end]
        self._consume_head(len(out))
        return out

    def drop(self, n: int) -> int:
        """Discard up to ``n`` bytes; returns how many were discarded."""
        done = 0
        while done < n and self._chunks:
            avail = len(self._chunks[0]) - self._head_off
            k = min(avail, n - done)
            self._consume_head(k)
            done += k
        return done

    def _consume_head(self, k: int) -> None:
        self._head_off += k
        self._len -= k
        if self._head_off >= len(self._chunks[0]):
            self._chunks.popleft()
            self._head_off = 0


class _State(enum.Enum):
    BOUNDARY = "boundary"  # expecting a local header or the central directory
    HEADER = "header"  # signature seen, waiting for the fixed 30 bytes + name + extra
    DATA = "data"  # streaming the current entry's data
    SKIP = "skip"  # discarding the rest of the current entry's data
    END_ENTRY = "end_entry"  # data done, verify and report EntryEnd
    ARCHIVE_END = "archive_end"  # central directory reached: swallow everything
    FAILED = "failed"


class ZipStreamParser:
    """Incremental parser of a fw.zip byte stream (see the module docstring).

    ``allow_deflate`` enables deflated entries (an extension: devices refuse them);
    ``max_name_len`` is the device's name buffer: stripped names of that many bytes or more fail.
    """

    def __init__(self, *, allow_deflate: bool = False, max_name_len: int = 50) -> None:
        self._allow_deflate = allow_deflate
        self._max_name_len = max_name_len
        self._buf = _ByteQueue()
        self._state = _State.BOUNDARY
        self._error: UpdaterError | None = None
        self._entry: EntryStart | None = None
        self._remaining = 0  # compressed bytes of the current entry still to come
        self._produced = 0  # uncompressed bytes handed out for the current entry
        self._crc = 0
        self._inflater: zlib._Decompress | None = None
        self._skipped = False
        self._consumed = 0
        # Legal states and the step that runs in each: the state table of the parser.
        self._steps: dict[_State, Callable[[], Event | None]] = {
            _State.BOUNDARY: self._step_boundary,
            _State.HEADER: self._step_header,
            _State.DATA: self._step_data,
            _State.SKIP: self._step_skip,
            _State.END_ENTRY: self._step_end_entry,
            _State.ARCHIVE_END: self._step_archive_end,
            _State.FAILED: self._step_failed,
        }

    # -- public API ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once :class:`ArchiveEnd` has been reported."""
        return self._state is _State.ARCHIVE_END

    @property
    def consumed(self) -> int:
        """Bytes of input processed so far (excluding buffered, not yet parsed bytes)."""
        return self._consumed

    @property
    def current(self) -> EntryStart | None:
        """The entry whose data is being delivered, if any."""
        return self._entry

    def feed(self, data: bytes) -> None:
        """Append input. Nothing is parsed until :meth:`events` is iterated."""
        if self._state is _State.ARCHIVE_END:
            self._consumed += len(data)
            return
        if self._state is _State.FAILED:
            return
        self._buf.append(data)

    def events(self) -> Iterator[Event]:
        """Yield every event the buffered input allows. Safe to abandon part-way and resume."""
        while True:
            ev = self._steps[self._state]()
            if ev is None:
                return
            yield ev

    __iter__ = events

    def skip_current(self) -> None:
        """Discard the rest of the current entry's data; its EntryEnd comes with ``skipped=True``."""
        if self._state is _State.DATA:
            self._skipped = True
            self._state = _State.SKIP
            self._inflater = None

    def close(self) -> None:
        """Declare the end of input: raises UpdaterError unless the archive ended properly."""
        if self._error is not None:
            raise self._error
        if self._state is not _State.ARCHIVE_END:
            raise self._fail("Malformed archive (truncated)")

    # -- steps (one per state) ----------------------------------------------------------------

    def _fail(self, message: str) -> UpdaterError:
        self._error = UpdaterError(message)
        self._state = _State.FAILED
        self._buf.clear()
        self._inflater = None
        log.debug("zip stream error: %s", message)
        return self._error

    def _step_failed(self) -> Event | None:
        assert self._error is not None
        raise self._error

    def _step_boundary(self) -> Event | None:
        if len(self._buf) < _SIG_LEN:
            return None
        sig = self._buf.peek(_SIG_LEN)
        if sig == CENTRAL_DIR_SIGNATURE:
            self._consumed += self._buf.drop(len(self._buf))
            self._state = _State.ARCHIVE_END
            return ArchiveEnd()
        if sig != LOCAL_HEADER_SIGNATURE:
            raise self._fail("Malformed archive (invalid file header)")
        self._state = _State.HEADER
        return self._step_header()

    def _step_header(self) -> Event | None:
        if len(self._buf) < _LOCAL_HEADER.size:
            return None
        (_sig, _version, flags, method, _time, _date, crc, csize, usize, name_len, extra_len) = _LOCAL_HEADER.unpack(
            self._buf.peek(_LOCAL_HEADER.size)
        )
        total = _LOCAL_HEADER.size + name_len + extra_len
        if len(self._buf) < total:
            return None
        header = self._buf.peek(total)
        raw_name = header[_LOCAL_HEADER.size : _LOCAL_HEADER.size + name_len]
        extra = header[_LOCAL_HEADER.size + name_len :]
        # Check order follows the device: method, name, sizes; then what it cannot know about.
        if method == METHOD_DEFLATED and self._allow_deflate:
            pass
        elif method != METHOD_STORED:
            raise self._fail("Cannot handle compressed .zip")
        if flags & FLAG_ENCRYPTED:
            raise self._fail("Cannot handle encrypted .zip")
        full_name = _decode_name(raw_name)
        name = strip_first_component(full_name)
        # The device's limit is on the stored bytes of the stripped name.
        _, slash, rest = raw_name.partition(b"/")
        if len(rest if slash else raw_name) >= self._max_name_len:
            raise self._fail("Too long file name")
        if csize == _ZIP64_MARKER or usize == _ZIP64_MARKER or _has_zip64_record(extra):
            raise self._fail("Malformed archive (ZIP64 is not supported)")
        if flags & FLAG_DATA_DESCRIPTOR:
            raise self._fail(
                "Malformed archive (data descriptors are not supported: sizes must be in the local header)"
            )
        if method == METHOD_STORED and csize != usize:
            raise self._fail("Malformed archive")
        self._buf.drop(total)
        self._consumed += total
        self._entry = EntryStart(
            name=name,
            size=usize,
            crc32=crc,
            method=method,
            flags=flags,
            extra=bytes(extra),
            full_name=full_name,
            compressed_size=csize,
        )
        self._remaining = csize
        self._produced = 0
        self._crc = 0
        self._skipped = False
        self._inflater = zlib.decompressobj(-15) if method == METHOD_DEFLATED else None
        self._state = _State.DATA
        return self._entry

    def _step_data(self) -> Event | None:
        entry = self._entry
        assert entry is not None
        if self._inflater is not None:
            out = self._inflate_more()
            if out is None:
                return None
            if out:
                return self._deliver(out)
            # Nothing left to produce: input used up and decompressor drained.
            self._state = _State.END_ENTRY
            return self._step_end_entry()
        if self._remaining == 0:
            self._state = _State.END_ENTRY
            return self._step_end_entry()
        if not len(self._buf):
            return None
        data = self._buf.take(self._remaining)
        self._remaining -= len(data)
        self._consumed += len(data)
        return self._deliver(data)

    def _deliver(self, data: bytes) -> EntryData:
        self._produced += len(data)
        self._crc = zlib.crc32(data, self._crc)
        return EntryData(data)

    def _inflate_more(self) -> bytes | None:
        """Next piece of inflated data, b"" when the entry is complete, None when input is needed."""
        inflater = self._inflater
        entry = self._entry
        assert inflater is not None and entry is not None
        while True:
            limit = min(_INFLATE_STEP, entry.size - self._produced + 1)
            if inflater.unconsumed_tail:
                # Input held back by the output limit of an earlier call comes first.
                out = self._inflate(inflater.unconsumed_tail, limit)
            elif self._remaining == 0:
                if inflater.eof:
                    return b""
                # zlib may still hold output for input it has fully consumed.
                out = self._inflate(b"", limit)
                if not out:
                    raise self._fail("Malformed archive (truncated deflate stream)")
            elif not len(self._buf):
                return None
            else:
                if inflater.eof:
                    raise self._fail("Malformed archive (data after the end of the deflate stream)")
                data = self._buf.take(self._remaining)
                self._remaining -= len(data)
                self._consumed += len(data)
                out = self._inflate(data, limit)
            if out:
                return out

    def _inflate(self, data: bytes, limit: int) -> bytes:
        inflater = self._inflater
        entry = self._entry
        assert inflater is not None and entry is not None
        try:
            out = inflater.decompress(data, limit)
        except zlib.error:
            raise self._fail("Malformed archive (bad deflate data)") from None
        return self._check_inflated(out)

    def _check_inflated(self, out: bytes) -> bytes:
        entry = self._entry
        assert entry is not None and self._inflater is not None
        if self._produced + len(out) > entry.size:
            raise self._fail("Malformed archive (inflated data longer than declared)")
        if self._inflater.eof and self._inflater.unused_data:
            raise self._fail("Malformed archive (data after the end of the deflate stream)")
        return out

    def _step_skip(self) -> Event | None:
        dropped = self._buf.drop(self._remaining)
        self._remaining -= dropped
        self._consumed += dropped
        if self._remaining:
            return None
        self._state = _State.END_ENTRY
        return self._step_end_entry()

    def _step_end_entry(self) -> Event | None:
        entry = self._entry
        assert entry is not None
        if not self._skipped:
            if entry.method == METHOD_DEFLATED and self._produced != entry.size:
                raise self._fail("Malformed archive (inflated size differs from the header)")
            if entry.crc32 != 0 and (self._crc & 0xFFFFFFFF) != entry.crc32:
                raise self._fail("Invalid CRC")
        self._entry = None
        self._inflater = None
        self._state = _State.BOUNDARY
        return EntryEnd(entry.name, skipped=self._skipped, crc32=0 if self._skipped else self._crc & 0xFFFFFFFF)

    def _step_archive_end(self) -> Event | None:
        self._consumed += self._buf.drop(len(self._buf))
        return None
