"""A sans-I/O tar stream parser: feed bytes, read member events (the app part of a Linux bundle).

::

    p = TarStreamParser()
    p.feed(chunk)
    for ev in p.events():       # TarMember, TarData, TarMemberEnd, TarEnd
        ...
    p.close()                   # TarError if the archive stopped in the middle of a member

Formats read: POSIX ustar (with the ``prefix`` field), pax (``x`` records: ``path``, ``linkpath``,
``size``; ``g`` global records are skipped), GNU long names (``L``/``K``) and GNU base-256 sizes.
Every header's checksum is checked; a bad one is a :class:`TarError` (the archive is corrupt or not a
tar at all). The archive ends at the first all-zero block. Pax and long-name records are bounded
(:data:`MAX_META_BYTES`), so a hostile archive cannot make the parser hold much in memory; member
data is handed on as it arrives, never buffered.

The parser only reports what the archive says: refusing absolute paths, ``..``, links out of the
slot, special files or oversized entries is the extractor's job (:mod:`updater.fsslots`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .errors import UpdaterError

__all__ = ["BLOCK", "MAX_META_BYTES", "TarData", "TarEnd", "TarError", "TarMember", "TarMemberEnd", "TarStreamParser"]

BLOCK = 512
MAX_META_BYTES = 64 * 1024

# Member types as the extractor sees them (the typeflag byte, with '\0' and '7' as regular files).
REGULAR = "0"
HARDLINK = "1"
SYMLINK = "2"
DIRECTORY = "5"


class TarError(UpdaterError, ValueError):
    """The tar stream is malformed (bad checksum, truncated, oversized metadata)."""


@dataclass(frozen=True)
class TarMember:
    """A member header: ``type`` is the typeflag (``"0"`` regular, ``"1"`` hard link, ``"2"``
    symlink, ``"5"`` directory, anything else as found), ``size`` the data bytes that follow."""

    name: str
    type: str
    size: int
    mode: int
    linkname: str = ""


@dataclass(frozen=True)
class TarData:
    """A piece of the current member's data."""

    data: bytes


@dataclass(frozen=True)
class TarMemberEnd:
    """The current member's data is complete."""


@dataclass(frozen=True)
class TarEnd:
    """The end-of-archive block."""


TarEvent = TarMember | TarData | TarMemberEnd | TarEnd


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        n = field[0] & 0x7F
        for b in field[1:]:
            n = (n << 8) | b
        return n
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"Malformed archive (bad {what} field)") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(block: bytes) -> bool:
    want = _octal(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b & 0x80)
    return want in (unsigned, signed)


def _parse_pax(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            raise TarError("Malformed archive (bad pax record)")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError("Malformed archive (bad pax record)") from None
        if length <= 0 or pos + length > len(data):
            raise TarError("Malformed archive (bad pax record)")
        key, eq, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise TarError("Malformed archive (bad pax record)")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class TarStreamParser:
    """Push parser over a tar stream (see the module doc)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._events: list[TarEvent] = []
        self._remaining = 0  # data bytes of the current member still to come
        self._padding = 0  # zero bytes after the member's data
        self._meta: bytearray | None = None  # data of a pax/long-name record being collected
        self._meta_type = ""
        self._pending: dict[str, str] = {}  # path/linkpath/size overrides for the next member
        self._in_member = False
        self.ended = False
        self.offset = 0  # bytes consumed

    def feed(self, data: bytes) -> None:
        """Parse ``data``; events become available from :meth:`events`."""
        if self.ended:
            return  # the zero blocks after the end marker (and anything else) are ignored
        self._buf += data
        self._run()

    def events(self) -> Iterator[TarEvent]:
        """The events parsed so far (each returned once)."""
        while self._events:
            yield self._events.pop(0)

    def close(self) -> None:
        """The stream is complete: :class:`TarError` unless the archive ended cleanly."""
        if not self.ended:
            raise TarError("Malformed archive (truncated tar)")

    def _run(self) -> None:
        buf = self._buf
        pos = 0
        while not self.ended:
            if self._remaining:
                n = min(self._remaining, len(buf) - pos)
                if n <= 0:
                    break
                piece = bytes(buf[pos : pos + n])
                pos += n
                self._remaining -= n
                if self._meta is not None:
                    self._meta += piece
                else:
                    self._events.append(TarData(piece))
                if not self._remaining:
                    self._data_done()
                continue
            if self._padding:
                n = min(self._padding, len(buf) - pos)
                if n <= 0:
                    break
                pos += n
                self._padding -= n
                continue
            if len(buf) - pos < BLOCK:
                break
            block = bytes(buf[pos : pos + BLOCK])
            pos += BLOCK
            self._header(block)
        del buf[:pos]
        self.offset += pos

    def _data_done(self) -> None:
        if self._meta is not None:
            meta, self._meta = bytes(self._meta), None
            if self._meta_type == "x":
                self._pending.update(_parse_pax(meta))
            elif self._meta_type == "L":
                self._pending["path"] = meta.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif self._meta_type == "K":
                self._pending["linkpath"] = meta.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            return
        self._in_member = False
        self._events.append(TarMemberEnd())

    def _header(self, block: bytes) -> None:
        if block.count(0) == BLOCK:
            self.ended = True
            self._events.append(TarEnd())
            return
        if not _checksum_ok(block):
            raise TarError(f"Malformed archive (bad tar header checksum at byte {self.offset})")
        size = _octal(block[124:136], "size")
        typeflag = chr(block[156]) if block[156] else REGULAR
        self._padding = -size % BLOCK
        if typeflag in ("x", "g", "L", "K"):
            if size > MAX_META_BYTES:
                raise TarError("Malformed archive (tar metadata record too big)")
            self._remaining = size
            self._meta_type = typeflag
            self._meta = bytearray()
            if typeflag == "g":
                self._meta_type = ""  # global records: read and ignored
            if not size:
                self._data_done()
            return
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0":  # POSIX ustar: the prefix field continues the name
            prefix = _text(block[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        linkname = _text(block[157:257])
        pending, self._pending = self._pending, {}
        name = pending.get("path", name)
        linkname = pending.get("linkpath", linkname)
        if "size" in pending:
            try:
                size = int(pending["size"])
            except ValueError:
                raise TarError("Malformed archive (bad pax size)") from None
            self._padding = -size % BLOCK
        if typeflag == "7":
            typeflag = REGULAR  # contiguous file: a regular file everywhere that matters
        if typeflag in (HARDLINK, SYMLINK, DIRECTORY):
            size, self._padding = 0, 0  # these have no data, whatever the header says
        mode = _octal(block[100:108], "mode")
        self._events.append(TarMember(name, typeflag, size, mode, linkname))
        self._in_member = True
        self._remaining = size
        if not size:
            self._data_done()
