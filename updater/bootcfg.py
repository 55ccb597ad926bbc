"""Boot configuration: a sans-I/O record codec and a two-copy store on the flash.

Two copies live in the ``bootcfg0`` / ``bootcfg1`` sectors (one record each, at the sector start). Like
the CC3200 boot loader (spec/updater.md §6.1), **the copy with the smaller sequence number is newer**;
the sequence counts *down* from ``INITIAL_SEQ`` = 0xFFFFFFFFFFFFFFFE, so erased flash (all ``0xFF`` =
``TOMBSTONE_SEQ``) is always the oldest and is never a valid record.

Record byte layout (``RECORD_SIZE`` = 512 bytes, little-endian):

====== ====== =================================================================================
offset size   field
====== ====== =================================================================================
0      4      magic ``b"MGBC"``
4      2      record format version (1)
6      1      ``active_slot`` (0 or 1)
7      1      ``revert_slot`` (0 or 1)
8      4      ``flags``: bit0 COMMITTED, bit1 FIRST_BOOT (the app's "dirty" flag: running
              uncommitted), bit2 BOOT_ATTEMPT (the boot loader's one-shot permit to boot an
              uncommitted slot, STM32's FIRST_BOOT_B), bit3 MERGE_FS
12     4      ``commit_timeout_s`` (int32; 0 = none)
16     2x136  slot states, slot 0 then slot 1, each:
               +0   4  ``app_len``   bytes of app image written to the slot (0 = empty)
               +4   4  ``app_crc32`` CRC-32 of those bytes
               +8  32  ``app_sha256``
               +40 32  ``version``  manifest version, UTF-8, NUL padded
               +72 64  ``build_id`` manifest build_id, UTF-8, NUL padded (truncated to 64 bytes)
288    212    reserved, 0xFF
500    4      CRC-32 (zlib) of bytes 0..499 followed by bytes 504..511 (i.e. including ``seq``)
504    8      ``seq`` (uint64)
====== ====== =================================================================================

Write order (:meth:`BootConfigStore.save`): erase the sector of the *older* copy, program bytes 0..503
(body + CRC), then program ``seq`` last. A cut before ``seq`` is programmed leaves ``seq`` erased
(tombstone = oldest/invalid); a torn ``seq`` fails the CRC (which covers ``seq``). Either way the other,
previous copy still wins, so a torn write can never make a bad record win.
"""

from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass, field, replace
from enum import IntFlag
from typing import Any

from .flash import Flash
from .partitions import SLOT_COUNT, Layout

__all__ = [
    "INITIAL_SEQ",
    "MAX_COMMIT_TIMEOUT_S",
    "RECORD_SIZE",
    "TOMBSTONE_SEQ",
    "BootConfig",
    "BootConfigStore",
    "BootFlags",
    "SlotState",
    "decode_record",
    "encode_record",
    "newest",
    "next_record",
    "stored_identity",
]

log = logging.getLogger("mgrpc.updater.bootcfg")

MAGIC = b"MGBC"
FORMAT_VERSION = 1
RECORD_SIZE = 512
INITIAL_SEQ = 0xFFFF_FFFF_FFFF_FFFE
TOMBSTONE_SEQ = 0xFFFF_FFFF_FFFF_FFFF
MAX_COMMIT_TIMEOUT_S = 2**31 - 1
_CRC_OFF = 500
_SEQ_OFF = 504
_HEADER = struct.Struct("<4sHBBIi")  # magic, version, active, revert, flags, commit_timeout_s
_SLOT = struct.Struct("<II32s32s64s")
_SLOTS_OFF = _HEADER.size


class BootFlags(IntFlag):
    """Boot config flag bits (see the module docstring)."""

    COMMITTED = 1 << 0
    FIRST_BOOT = 1 << 1
    BOOT_ATTEMPT = 1 << 2
    MERGE_FS = 1 << 3


@dataclass(frozen=True)
class SlotState:
    """What was written to one slot's app partition (lets the boot loader refuse an incomplete image)."""

    app_len: int = 0
    app_crc32: int = 0
    app_sha256: bytes = b"\x00" * 32
    version: str = ""
    build_id: str = ""


@dataclass(frozen=True)
class BootConfig:
    """One decoded boot config record."""

    active_slot: int = 0
    revert_slot: int = 1
    flags: BootFlags = BootFlags.COMMITTED
    commit_timeout_s: int = 0
    slots: tuple[SlotState, ...] = field(default_factory=lambda: (SlotState(), SlotState()))
    seq: int = INITIAL_SEQ

    @property
    def committed(self) -> bool:
        """The active slot is committed."""
        return bool(self.flags & BootFlags.COMMITTED)

    def with_flags(self, *, set_: BootFlags = BootFlags(0), clear: BootFlags = BootFlags(0)) -> BootConfig:
        """A copy with some flag bits set and others cleared."""
        return replace(self, flags=BootFlags((self.flags | set_) & ~clear))

    def boot_state(self) -> dict[str, Any]:
        """What OTA.GetBootState answers: ``active_slot, is_committed, revert_slot, commit_timeout``."""
        return {
            "active_slot": self.active_slot,
            "is_committed": self.committed,
            "revert_slot": self.revert_slot,
            "commit_timeout": self.commit_timeout_s,
        }

    def with_slot(self, slot: int, state: SlotState) -> BootConfig:
        """A copy with slot ``slot``'s state replaced."""
        slots = list(self.slots)
        slots[slot] = state
        return replace(self, slots=tuple(slots))


def _pad(text: str, size: int) -> bytes:
    # Cut at a character boundary so a truncated name still decodes cleanly.
    raw = text.encode("utf-8")[:size].decode("utf-8", "ignore").encode("utf-8")
    return raw + b"\x00" * (size - len(raw))


def stored_identity(version: str, build_id: str) -> tuple[str, str]:
    """``(version, build_id)`` as a record keeps them (cut to 32 and 64 bytes), for comparisons
    with what the boot config reports about a slot."""
    return _unpad(_pad(version, 32)), _unpad(_pad(build_id, 64))


def _unpad(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "replace")


def _crc(record: bytes | bytearray) -> int:
    return zlib.crc32(record[_SEQ_OFF:], zlib.crc32(record[:_CRC_OFF]))


def encode_record(cfg: BootConfig) -> bytes:
    """Encode ``cfg`` (including ``cfg.seq``) into a ``RECORD_SIZE``-byte record."""
    for slot in (cfg.active_slot, cfg.revert_slot):
        if not 0 <= slot < SLOT_COUNT:
            raise ValueError(f"slot {slot} out of range")
    if len(cfg.slots) != SLOT_COUNT:
        raise ValueError(f"need {SLOT_COUNT} slot states")
    if not 0 <= cfg.seq < TOMBSTONE_SEQ:
        raise ValueError(f"seq {cfg.seq:#x} out of range")
    if not -(2**31) <= cfg.commit_timeout_s < 2**31:
        raise ValueError(f"commit_timeout_s {cfg.commit_timeout_s} does not fit 32 bits")
    rec = bytearray(b"\xff" * RECORD_SIZE)
    _HEADER.pack_into(
        rec, 0, MAGIC, FORMAT_VERSION, cfg.active_slot, cfg.revert_slot, int(cfg.flags), cfg.commit_timeout_s
    )
    for i, s in enumerate(cfg.slots):
        if len(s.app_sha256) != 32:
            raise ValueError("app_sha256 must be 32 bytes")
        _SLOT.pack_into(
            rec, _SLOTS_OFF + i * _SLOT.size, s.app_len, s.app_crc32, s.app_sha256, _pad(s.version, 32),
            _pad(s.build_id, 64),
        )
    struct.pack_into("<Q", rec, _SEQ_OFF, cfg.seq)
    struct.pack_into("<I", rec, _CRC_OFF, _crc(rec))
    return bytes(rec)


def decode_record(data: bytes) -> BootConfig | None:
    """Decode a record; ``None`` for erased, torn or foreign bytes (bad magic, CRC or seq)."""
    if len(data) < RECORD_SIZE:
        return None
    data = data[:RECORD_SIZE]
    (seq,) = struct.unpack_from("<Q", data, _SEQ_OFF)
    (crc,) = struct.unpack_from("<I", data, _CRC_OFF)
    if seq == TOMBSTONE_SEQ or crc != _crc(data):
        return None
    magic, version, active, revert, flags, timeout = _HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != FORMAT_VERSION or active >= SLOT_COUNT or revert >= SLOT_COUNT:
        return None
    slots = []
    for i in range(SLOT_COUNT):
        ln, crc32, sha, ver, bid = _SLOT.unpack_from(data, _SLOTS_OFF + i * _SLOT.size)
        slots.append(SlotState(ln, crc32, sha, _unpad(ver), _unpad(bid)))
    return BootConfig(active, revert, BootFlags(flags), timeout, tuple(slots), seq)


def newest(records: list[BootConfig | None]) -> tuple[int, BootConfig] | None:
    """Index and record of the newest valid record (smallest seq), or ``None``."""
    valid = [(r.seq, i, r) for i, r in enumerate(records) if r is not None]
    if not valid:
        return None
    _, idx, rec = min(valid)
    return idx, rec


def next_record(copies: list[BootConfig | None], cfg: BootConfig) -> tuple[int, BootConfig]:
    """Where ``cfg`` goes to become the newest record (the copy not holding the current one) and
    ``cfg`` with its sequence number (one below the current record's; the first is INITIAL_SEQ)."""
    best = newest(copies)
    if best is None:
        return 0, replace(cfg, seq=INITIAL_SEQ)
    current_idx, current = best
    return 1 - current_idx, replace(cfg, seq=current.seq - 1)


class BootConfigStore:
    """The two boot config copies on a flash, per a :class:`~updater.partitions.Layout`."""

    def __init__(self, flash: Flash, layout: Layout) -> None:
        small = [p.name for p in layout.bootcfg if p.size < RECORD_SIZE]
        if small:
            # A record would spill into the next partition (the other copy, or app_0).
            raise ValueError(f"boot config partitions {', '.join(small)} are smaller than a {RECORD_SIZE}-byte record")
        self.flash = flash
        self.layout = layout

    def read_copies(self) -> list[BootConfig | None]:
        """Both copies, decoded (``None`` = invalid/erased)."""
        return [decode_record(self.flash.read(p.offset, RECORD_SIZE)) for p in self.layout.bootcfg]

    def load(self) -> BootConfig | None:
        """The newest valid record, or ``None`` when neither copy is valid (unprovisioned flash)."""
        best = newest(self.read_copies())
        return None if best is None else best[1]

    def save(self, cfg: BootConfig) -> BootConfig:
        """Write ``cfg`` as the new newest record into the older copy; returns it with its new seq."""
        target, new = next_record(self.read_copies(), cfg)
        rec = encode_record(new)
        part = self.layout.bootcfg[target]
        self.flash.erase(part.offset, part.size)
        self.flash.write(part.offset, rec[:_SEQ_OFF])
        self.flash.write(part.offset + _SEQ_OFF, rec[_SEQ_OFF:])
        log.debug("boot config seq %#x written to copy %d: %s", new.seq, target, new)
        stored = decode_record(rec)  # what a reader will see (long strings truncated)
        assert stored is not None
        return stored
