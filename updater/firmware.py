"""The app image format the virtual device "runs" (the ``app`` part of a virtual fw.zip).

A real device's app part is machine code; ours is a small self-describing image so the virtual device
can boot it, report its version and misbehave on purpose:

=======  ==========  ==================================================================
offset   size        field
=======  ==========  ==================================================================
0        8           magic ``b"MGVFW\\x00\\x01\\n"`` (format version 1)
8        4           ``n``: length of the header JSON, uint32 little-endian
12       n           header: compact UTF-8 JSON object ``{"app", "version", "build_id", "arch",
                     "behavior", "payload_size"}`` (unknown keys are kept in ``extra``),
                     possibly followed by spaces (used to hit an exact image size)
12+n     p           payload (``payload_size`` bytes: padding to make the image a given size)
12+n+p   4           CRC-32 of bytes ``0 .. 12+n+p-1``, uint32 little-endian
=======  ==========  ==================================================================

The trailing CRC lets the boot loader tell a complete image from a torn or partly erased one; it is
at the end so an image can be written in one streaming pass. Bytes after the CRC are ignored (a flash
slot is usually larger than the image it holds).

``behavior`` tells the virtual device what the firmware does once booted:

* ``ok`` - boots and works (commits when told to);
* ``crash`` - fails during init, so the device reverts at once (spec/updater.md §5.2: init failed);
* ``hang`` - never gets far enough to commit; the commit timeout / watchdog must revert it;
* ``no_commit`` - runs normally but never commits on its own (shadow autocommit etc. ignored).
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from updater.errors import UpdaterError

__all__ = ["BEHAVIORS", "MAGIC", "FirmwareImage", "firmware_chunks", "looks_like_firmware"]

MAGIC = b"MGVFW\x00\x01\n"
BEHAVIORS = ("ok", "crash", "hang", "no_commit")
_LEN = struct.Struct("<I")
_FIXED = len(MAGIC) + _LEN.size
_MAX_HEADER = 64 * 1024  # a header larger than this is not one of ours
_KNOWN = ("app", "version", "build_id", "arch", "behavior", "payload_size")


def looks_like_firmware(data: bytes) -> bool:
    """True if ``data`` starts with the image magic (cheap check, no validation)."""
    return data[: len(MAGIC)] == MAGIC


def _header_bytes(app: str, version: str, build_id: str, arch: str, behavior: str, payload_size: int,
                  extra: dict[str, Any], pad: int = 0) -> bytes:  # fmt: skip
    if behavior not in BEHAVIORS:
        raise UpdaterError(f"Invalid firmware behavior {behavior!r} (valid: {', '.join(BEHAVIORS)})")
    hdr = {"app": app, "version": version, "build_id": build_id, "arch": arch, "behavior": behavior}
    hdr["payload_size"] = payload_size  # type: ignore[assignment]
    hdr.update({k: v for k, v in extra.items() if k not in _KNOWN})
    # Trailing spaces (valid JSON whitespace) let an image hit an exact size when the payload_size
    # digits would otherwise make it jump over it.
    body = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b" " * pad
    return MAGIC + _LEN.pack(len(body)) + body


def _plan(app: str, version: str, build_id: str, arch: str, behavior: str, total_size: int) -> tuple[bytes, int]:
    """Header bytes and payload size for an image of exactly ``total_size`` bytes."""
    min_size = len(_header_bytes(app, version, build_id, arch, behavior, 0, {})) + 4
    if total_size < min_size:
        raise UpdaterError(f"Firmware image cannot be {total_size} bytes (minimum {min_size})")
    payload_size = total_size - min_size
    while True:
        hdr = _header_bytes(app, version, build_id, arch, behavior, payload_size, {})
        slack = total_size - (len(hdr) + 4 + payload_size)
        if slack >= 0:
            return _header_bytes(app, version, build_id, arch, behavior, payload_size, {}, slack), payload_size
        payload_size -= 1


@dataclass(frozen=True)
class FirmwareImage:
    """A virtual-device app image (see the module docstring for the byte format)."""

    app: str
    version: str
    build_id: str
    arch: str
    behavior: str = "ok"
    payload: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)
    header_pad: int = 0  # trailing spaces after the header JSON (see sized())

    def __post_init__(self) -> None:
        if self.behavior not in BEHAVIORS:
            raise UpdaterError(f"Invalid firmware behavior {self.behavior!r} (valid: {', '.join(BEHAVIORS)})")

    @classmethod
    def sized(
        cls,
        app: str,
        version: str,
        build_id: str,
        arch: str,
        behavior: str = "ok",
        *,
        total_size: int,
        seed: int = 0,
    ) -> FirmwareImage:
        """An image of exactly ``total_size`` bytes, padded with deterministic pseudo-random payload."""
        header, payload_size = _plan(app, version, build_id, arch, behavior, total_size)
        payload = random.Random(seed).randbytes(payload_size)
        pad = len(header) - len(_header_bytes(app, version, build_id, arch, behavior, payload_size, {}))
        return cls(app, version, build_id, arch, behavior, payload, header_pad=pad)

    @property
    def header_size(self) -> int:
        """Bytes before the payload (magic, length, header JSON)."""
        return len(self._header())

    def _header(self) -> bytes:
        return _header_bytes(
            self.app, self.version, self.build_id, self.arch, self.behavior, len(self.payload), self.extra,
            self.header_pad,
        )  # fmt: skip

    def to_bytes(self) -> bytes:
        """The image bytes: magic, header, payload, CRC-32."""
        body = self._header() + self.payload
        return body + _LEN.pack(zlib.crc32(body))

    def __len__(self) -> int:
        return self.header_size + len(self.payload) + 4

    @classmethod
    def parse(cls, data: bytes) -> FirmwareImage:
        """Parse an image (trailing bytes after the CRC are ignored).

        Raises UpdaterError ``Not a firmware image`` (no magic / unreadable header) or
        ``Corrupt firmware image`` (truncated, CRC mismatch, bad fields).
        """
        data = bytes(data)
        if not looks_like_firmware(data) or len(data) < _FIXED:
            raise UpdaterError("Not a firmware image (bad magic)")
        (n,) = _LEN.unpack_from(data, len(MAGIC))
        if n > _MAX_HEADER or len(data) < _FIXED + n:
            raise UpdaterError("Corrupt firmware image (truncated header)")
        try:
            hdr = json.loads(data[_FIXED : _FIXED + n])
        except ValueError:
            raise UpdaterError("Corrupt firmware image (bad header)") from None
        if not isinstance(hdr, dict):
            raise UpdaterError("Corrupt firmware image (bad header)")
        strings = [hdr.get(k) for k in ("app", "version", "build_id", "arch", "behavior")]
        size = hdr.get("payload_size")
        if not all(isinstance(s, str) for s in strings) or not isinstance(size, int) or size < 0:
            raise UpdaterError("Corrupt firmware image (bad header fields)")
        end = _FIXED + n + size
        if len(data) < end + 4:
            raise UpdaterError("Corrupt firmware image (truncated)")
        (crc,) = _LEN.unpack_from(data, end)
        if zlib.crc32(data[:end]) != crc:
            raise UpdaterError("Corrupt firmware image (CRC mismatch)")
        if hdr["behavior"] not in BEHAVIORS:
            raise UpdaterError(f"Corrupt firmware image (unknown behavior {hdr['behavior']!r})")
        extra = {k: v for k, v in hdr.items() if k not in _KNOWN}
        body = data[_FIXED : _FIXED + n]
        return cls(
            hdr["app"], hdr["version"], hdr["build_id"], hdr["arch"], hdr["behavior"],
            data[_FIXED + n : end], extra, len(body) - len(body.rstrip(b" ")),
        )  # fmt: skip


def firmware_chunks(
    app: str,
    version: str,
    build_id: str,
    arch: str,
    behavior: str = "ok",
    *,
    total_size: int,
    seed: int = 0,
    chunk_size: int = 1 << 20,
) -> Iterator[bytes]:
    """The bytes of ``FirmwareImage.sized(...)`` as chunks, without building the image in memory
    (for very large images, e.g. 64 MiB benchmark bundles). Identical output to ``sized().to_bytes()``.
    """
    hdr, payload_size = _plan(app, version, build_id, arch, behavior, total_size)
    crc = zlib.crc32(hdr)
    yield hdr
    rnd = random.Random(seed)
    left = payload_size
    # random.Random.randbytes(n) is a prefix-stable stream only for whole 4-byte words, so generate in
    # multiples of 4 and keep the generator state continuous.
    step = max(4, chunk_size - chunk_size % 4)
    while left > 0:
        n = min(step, left)
        chunk = rnd.randbytes(n)
        crc = zlib.crc32(chunk, crc)
        yield chunk
        left -= n
    yield _LEN.pack(crc)
