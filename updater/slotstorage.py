"""The storage seam: what an update (and the OTA service) needs from a device's storage.

Two implementations: :class:`updater.storage.DeviceStorage` (the virtual device's emulated NOR flash:
partitions, boot config sectors, boot loader) and :class:`updater.fsslots.FsSlotStorage` (a Linux
device: two slot directories and a state record file kept by the supervisor). The
:class:`~updater.context.UpdaterContext` drives either one through these calls only::

    slot = storage.inactive_slot
    storage.begin_slot(slot)                           # forget any half-written data of that slot
    sink = storage.open_part(slot, "app", part)        # write a part: feed(), close(), verify()
    ...
    storage.copy_fs(storage.running_slot, slot)        # app-only update: the new slot gets the data
    storage.finalize_update(slot, state, fs_updated=..., commit_timeout_s=...)   # finish: switch
    storage.get_boot_state() / commit() / revert() / set_boot_state(...) / create_snapshot(...)

:class:`FlashPartWriter` is the flash implementation of :class:`PartSink` (512-byte programs, lazy
sector erase, running digests).
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from .bootcfg import SlotState
from .errors import UpdaterError
from .flash import Flash
from .manifest import Part
from .partitions import Partition

__all__ = ["WRITE_CHUNK_SIZE", "FlashPartWriter", "PartSink", "SlotStorage"]

WRITE_CHUNK_SIZE = 512  # MGOS_UPDATER_DATA_CHUNK_SIZE
_RUN_BYTES = 128 * WRITE_CHUNK_SIZE  # at most this much is handed to the flash in one run


class PartSink(Protocol):
    """One part being written into a slot.

    ``written`` counts the bytes accepted, ``crc32`` is set by :meth:`set_crc32` (the zip parser
    computes it), ``sha256`` is a running ``hashlib.sha256`` object for the app (None otherwise).
    """

    written: int
    crc32: int
    sha256: Any

    def feed(self, data: bytes) -> None:
        """Write the next bytes of the part (``UpdaterError`` when they cannot be taken)."""

    def close(self) -> None:
        """All data was fed: flush what is buffered."""

    def set_crc32(self, crc32: int) -> None:
        """The CRC-32 of the part's data."""

    def verify(self) -> None:
        """Check size and digests against the manifest part (``UpdaterError``)."""


class SlotStorage(Protocol):
    """What :class:`~updater.context.UpdaterContext` and the OTA service use of a device's storage."""

    @property
    def running_slot(self) -> int:
        """The slot the firmware runs from."""

    @property
    def inactive_slot(self) -> int:
        """The slot an update writes."""

    @property
    def is_committed(self) -> bool:
        """Whether the running firmware is committed."""

    @property
    def reboot_pending(self) -> bool:
        """The boot state already selects another slot than the running one."""

    @property
    def running_version(self) -> str:
        """Manifest version of the running firmware."""

    @property
    def running_build_id(self) -> str:
        """Manifest build_id of the running firmware."""

    def begin_slot(self, slot: int) -> None:
        """An update starts writing ``slot`` (never the running one)."""

    def part_capacity(self, slot: int, kind: str) -> int:
        """How many bytes the ``kind`` (``"app"``/``"fs"``) part of ``slot`` can take."""

    def open_part(self, slot: int, kind: str, part: Part) -> PartSink:
        """Start writing the ``kind`` part of ``slot``."""

    def copy_fs(self, src_slot: int, dst_slot: int) -> None:
        """Give ``dst_slot`` a copy of ``src_slot``'s filesystem (app-only updates)."""

    def finalize_update(self, slot: int, state: SlotState, *, fs_updated: bool, commit_timeout_s: int) -> Any:
        """Switch the boot state to the freshly written ``slot`` (uncommitted, first boot pending)."""

    def get_boot_state(self) -> dict[str, Any]:
        """The OTA.GetBootState object."""

    def set_boot_state(self, **changes: Any) -> None:
        """OTA.SetBootState."""

    def commit(self) -> bool:
        """Commit the running firmware (False if it already was)."""

    def revert(self) -> bool:
        """Switch back to the revert slot (the caller reboots); False if committed."""

    def create_snapshot(self, *, set_as_revert: bool = False, commit_timeout: int = -1) -> int:
        """OTA.CreateSnapshot: copy the running slot into the other one; returns that slot."""


class FlashPartWriter:
    """Streams one part into a flash partition: lazy sector erase, 512-byte programs, running digests.

    The CRC-32 is not computed here: the zip parser computes it over the same bytes and hands it over
    with the entry's end (:meth:`set_crc32`). SHA-1 runs only when the manifest gives ``cs_sha1``;
    SHA-256 always for the app (the boot config keeps it), for other parts only with ``cs_sha256``.
    """

    def __init__(self, flash: Flash, partition: Partition, part: Part, *, kind: str) -> None:
        self.flash = flash
        self.partition = partition
        self.part = part
        self.written = 0  # bytes accepted (programmed or buffered)
        self._flushed = 0  # bytes programmed
        self._erased_to = partition.offset  # absolute end of the erased area
        self._buf = bytearray()
        self.crc32 = 0
        self.sha1 = hashlib.sha1() if part.cs_sha1 is not None else None
        self.sha256 = hashlib.sha256() if kind == "app" or part.cs_sha256 is not None else None

    def feed(self, data: bytes) -> None:
        """Program ``data`` (whole 512-byte programs; a tail waits for the next call)."""
        n = len(data)
        if self.written + n > self.partition.size:
            raise UpdaterError("Image too big")
        self.written += n
        if self.sha1 is not None:
            self.sha1.update(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        start = 0
        head = b""
        if self._buf:
            # Complete the pending program first; it goes out at the head of the next run.
            start = min(n, WRITE_CHUNK_SIZE - len(self._buf))
            self._buf += data[:start]
            if len(self._buf) < WRITE_CHUNK_SIZE:
                return
            head = bytes(self._buf)
            self._buf.clear()
        stop = n - (n - start) % WRITE_CHUNK_SIZE
        # Runs of a bounded size, handed over as (data, start, stop): nothing is copied here.
        for off in range(start, max(stop, start + 1) if head else stop, _RUN_BYTES):
            self._program(data, off, min(off + _RUN_BYTES, stop), head)
            head = b""
        if stop < n:
            self._buf += data[stop:]

    def close(self) -> None:
        """Program the buffered tail."""
        if self._buf:
            self._program(bytes(self._buf), 0, len(self._buf))
            self._buf.clear()

    def set_crc32(self, crc32: int) -> None:
        """The CRC-32 of the part's data, as the zip parser computed it."""
        self.crc32 = crc32

    def _program(self, data: bytes, start: int, stop: int, head: bytes = b"") -> None:
        # One call per run; the flash still counts (and can cut) every erase and 512-byte program.
        stop = max(start, stop)
        self._erased_to = self.flash.write_run(
            self.partition.offset + self._flushed, data, chunk_size=WRITE_CHUNK_SIZE, erased_to=self._erased_to,
            start=start, stop=stop, head=head,
        )  # fmt: skip
        self._flushed += len(head) + stop - start

    def verify(self) -> None:
        """``Invalid size`` / ``Digest mismatch`` against the manifest part."""
        verify_digests(self.part, self.written, self.sha1, self.sha256)


def verify_digests(part: Part, written: int, sha1: Any, sha256: Any) -> None:
    """The part checks every sink makes: size, then SHA-1 and SHA-256 when the manifest gives them."""
    if part.size is not None and written != part.size:
        raise UpdaterError("Invalid size")
    if sha1 is not None and sha1.hexdigest() != part.cs_sha1:
        raise UpdaterError("Digest mismatch")
    if part.cs_sha256 is not None and sha256 is not None and sha256.hexdigest() != part.cs_sha256:
        raise UpdaterError("Digest mismatch")
