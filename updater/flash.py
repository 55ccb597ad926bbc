"""Emulated NOR flash, file-backed or in memory, with power-cut injection.

The model follows what a SPI NOR chip does:

* ``erase_sector(i)`` (or ``erase(addr, length)`` over whole sectors) sets every byte of a sector to
  ``0xFF``;
* ``write(addr, data)`` *programs*: it can only turn 1 bits into 0 bits. Asking for a 0 -> 1 change
  raises :class:`~updater.errors.FlashError` and leaves the flash unchanged (the chip would silently
  AND the bits; refusing catches the bug of a missing erase);
* ``read(addr, length)`` returns bytes.

Every erase of one sector and every ``write`` call is one *operation* (``stats.ops``). A power cut can
be armed to happen at a given operation: that operation raises :class:`~updater.errors.PowerCut`,
optionally after doing only part of its work ("torn"), and the flash stays "off" (every later operation
raises ``PowerCut`` too) until :meth:`Flash.power_on` is called -- so code that swallows the exception
cannot keep writing after the power went away.

File-backed flashes map the file shared (``mmap``): every operation stores straight into the file's
pages and nothing is cached in the process, so a SIGKILLed process leaves exactly what a power loss at
that point would leave.
"""

from __future__ import annotations

import mmap
import os
import random
from dataclasses import dataclass
from typing import Literal

from .errors import FlashError, PowerCut

__all__ = ["DEFAULT_SECTOR_SIZE", "Flash", "FlashStats", "TornMode"]

DEFAULT_SECTOR_SIZE = 4096
_PWRITE_MIN = 16384  # smaller stores go through the mapping (a system call costs more than a page fault)

TornMode = Literal[False, "keep", "random"]


@dataclass
class FlashStats:
    """Operation counters of one :class:`Flash` (mutable, reset with :meth:`reset`)."""

    reads: int = 0
    erases: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def ops(self) -> int:
        """Operations that count for power-cut injection: sector erases plus writes."""
        return self.erases + self.writes

    def reset(self) -> None:
        """Zero all counters."""
        self.reads = self.erases = self.writes = self.bytes_read = self.bytes_written = 0


@dataclass
class _Cut:
    at_op: int  # absolute op index (stats.ops value) that is cut
    torn: TornMode
    rng: random.Random


class Flash:
    """A NOR flash of ``size`` bytes in sectors of ``sector_size`` bytes.

    ``path=None`` keeps the content in a ``bytearray`` (fast tests); otherwise the content is the file at
    ``path`` (created erased, i.e. all ``0xFF``, when missing and ``create`` is true). An existing file
    must be exactly ``size`` bytes long; ``size=None`` takes the size of an existing file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        size: int | None = None,
        sector_size: int = DEFAULT_SECTOR_SIZE,
        create: bool = True,
    ) -> None:
        if sector_size <= 0 or sector_size & (sector_size - 1):
            raise ValueError(f"sector_size must be a power of two, got {sector_size}")
        self.sector_size = sector_size
        self.path = None if path is None else os.fspath(path)
        self.stats = FlashStats()
        self._cut: _Cut | None = None
        self._dead = False
        self._fd: int | None = None
        self._mem: bytearray | mmap.mmap | None = None
        if self.path is None:
            if size is None:
                raise ValueError("an in-memory flash needs a size")
            self._check_size(size)
            self._mem = bytearray(b"\xff" * size)
            self.size = size
            return
        exists = os.path.exists(self.path)
        if not exists and not create:
            raise FileNotFoundError(f"flash file {self.path!r} does not exist")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        try:
            actual = os.fstat(fd).st_size
            if exists and actual:
                if size is not None and actual != size:
                    raise FlashError(f"flash file {self.path!r} is {actual} bytes, expected {size}")
                size = actual
            else:
                if size is None:
                    raise ValueError("a new flash file needs a size")
                self._check_size(size)
                # A new chip comes erased; write the 0xFF in sector-sized pieces to bound memory.
                blank = b"\xff" * sector_size
                for off in range(0, size, sector_size):
                    os.pwrite(fd, blank, off)
            self._check_size(size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.size = size
        # A shared mapping: every store lands in the file's page cache at once, which a killed
        # process cannot take back (only an OS crash could, and that is not what we model).
        self._mem = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)

    def _check_size(self, size: int) -> None:
        if size <= 0 or size % self.sector_size:
            raise ValueError(f"flash size {size} is not a positive multiple of the sector size {self.sector_size}")

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the backing file (in-memory flashes keep their content)."""
        if self._fd is not None:
            assert isinstance(self._mem, mmap.mmap)
            self._mem.close()
            self._mem = None
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Flash:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sector_count(self) -> int:
        """Number of sectors."""
        return self.size // self.sector_size

    @property
    def powered(self) -> bool:
        """False after an injected power cut, until :meth:`power_on`."""
        return not self._dead

    def arm_power_cut(self, *, at_op: int, torn: TornMode = False, rng: random.Random | None = None) -> None:
        """Cut the power at the ``at_op``-th erase/write from now (0 = the very next one).

        ``torn=False``: the operation does nothing. ``"keep"``: a random-length prefix of it is done and
        the rest keeps its old bytes. ``"random"``: as ``"keep"``, but the undone part of an erase reads as
        random bytes and a write leaves one half-programmed byte at the boundary.
        """
        if at_op < 0:
            raise ValueError("at_op must be >= 0")
        if torn not in (False, "keep", "random"):
            raise ValueError(f"torn must be False, 'keep' or 'random', not {torn!r}")
        self._cut = _Cut(self.stats.ops + at_op, torn, rng or random.Random(at_op))

    def power_on(self) -> None:
        """Bring the flash back after a power cut (the content is whatever the cut left)."""
        self._dead = False
        self._cut = None

    # -- raw access --------------------------------------------------------------------------------

    def _raw_read(self, addr: int, length: int) -> bytes:
        if self._mem is None:
            raise FlashError("flash is closed")
        return bytes(self._mem[addr : addr + length])

    def _raw_write(self, addr: int, data: bytes) -> None:
        if self._mem is None:
            raise FlashError("flash is closed")
        self._mem[addr : addr + len(data)] = data

    def _check_range(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > self.size:
            raise FlashError(f"range 0x{addr:x}+{length} is outside the flash (size 0x{self.size:x})")

    def _begin_op(self) -> _Cut | None:
        """Account one erase/write; return the armed cut when this is the operation it hits."""
        if self._dead:
            raise PowerCut("flash is powered off")
        cut = self._cut
        if cut is not None and self.stats.ops == cut.at_op:
            self._cut = None
            self._dead = True
            return cut
        return None

    # -- public operations -------------------------------------------------------------------------

    def read(self, addr: int, length: int) -> bytes:
        """Read ``length`` bytes at ``addr``."""
        if self._dead:
            raise PowerCut("flash is powered off")
        self._check_range(addr, length)
        self.stats.reads += 1
        self.stats.bytes_read += length
        return self._raw_read(addr, length)

    def erase_sector(self, index: int) -> None:
        """Erase sector ``index`` (all bytes become ``0xFF``). One operation."""
        if not 0 <= index < self.sector_count:
            raise FlashError(f"sector {index} is outside the flash ({self.sector_count} sectors)")
        cut = self._begin_op()
        addr = index * self.sector_size
        if cut is not None:
            if cut.torn:
                done = cut.rng.randrange(self.sector_size)
                rest = self.sector_size - done
                tail = self._raw_read(addr + done, rest)
                if cut.torn == "random":
                    tail = cut.rng.randbytes(rest)
                self._raw_write(addr, b"\xff" * done + tail)
            raise PowerCut(f"power cut during erase of sector {index}")
        self.stats.erases += 1
        self._raw_write(addr, b"\xff" * self.sector_size)

    def erase(self, addr: int, length: int) -> None:
        """Erase whole sectors covering ``[addr, addr+length)``; both must be sector-aligned."""
        if addr % self.sector_size or length % self.sector_size:
            raise FlashError(f"erase of 0x{addr:x}+{length} is not sector-aligned ({self.sector_size})")
        self._check_range(addr, length)
        first = addr // self.sector_size
        for index in range(first, first + length // self.sector_size):
            self.erase_sector(index)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Program ``data`` at ``addr``: bits may only go from 1 to 0. One operation."""
        data = bytes(data)
        self._check_range(addr, len(data))
        if not data:
            return
        old = self._raw_read(addr, len(data))
        # Whole-buffer bit test via big ints: fast, and it checks before anything is changed.
        new_int = int.from_bytes(data, "little")
        if int.from_bytes(old, "little") & new_int != new_int:
            bad = next(i for i, (o, n) in enumerate(zip(old, data, strict=True)) if o & n != n)
            raise FlashError(
                f"programming 0x{addr + bad:x}: 0x{old[bad]:02x} -> 0x{data[bad]:02x} needs an erase first"
            )
        cut = self._begin_op()
        if cut is not None:
            if cut.torn:
                done = cut.rng.randrange(len(data))
                partial = data[:done]
                if cut.torn == "random":
                    # The byte being programmed when the power went: some of its bits made it.
                    mask = cut.rng.randrange(256)
                    partial += bytes([old[done] & (data[done] | mask)])
                if partial:
                    self._raw_write(addr, partial)
            raise PowerCut(f"power cut during write of {len(data)} bytes at 0x{addr:x}")
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        self._raw_write(addr, data)

    def write_run(
        self,
        addr: int,
        data: bytes | bytearray | memoryview,
        *,
        chunk_size: int,
        erased_to: int,
        start: int = 0,
        stop: int | None = None,
        head: bytes = b"",
    ) -> int:
        """Stream ``head + data[start:stop]`` to ``addr`` the way a flash driver does; return the new
        ``erased_to``.

        (``start``/``stop`` spare the caller a copy of a slice; ``head``, whole chunks, is what the
        caller completed from an earlier piece of its input, so it need not be a run of its own.)

        The run is a sequence of ordinary operations: ``data`` is cut into ``chunk_size`` programs
        (from ``addr``); before each one, the sectors from ``erased_to`` (a sector boundary: everything
        below it counts as erased already) up to the end of that program are erased one by one; a
        program whose bytes are all ``0xFF`` is skipped (it would change nothing). Each erase and each
        program is one operation, counted, cut and torn exactly as :meth:`erase_sector` and
        :meth:`write` would count, cut and tear it.

        When no armed power cut falls inside the run and the bytes to be programmed below
        ``erased_to`` are still erased (the normal case), the run's end state is stored at once
        instead of operation by operation: the same bytes and counters, a fraction of the time.
        """
        sector = self.sector_size
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if erased_to % sector:
            raise ValueError(f"erased_to 0x{erased_to:x} is not a sector boundary")
        if len(head) % chunk_size:
            raise ValueError(f"head must be whole {chunk_size}-byte chunks, not {len(head)} bytes")
        whole = memoryview(data).cast("B")
        view = whole[start:stop]
        length = len(view)
        if not length and not head:
            return erased_to
        body_addr = addr + len(head)
        end = body_addr + length
        new_erased_to = max(erased_to, -(-end // sector) * sector)
        n_erases = (new_erased_to - erased_to) // sector
        if isinstance(data, bytes | bytearray):
            skipped = self._blank_chunks(data, chunk_size, start, start + length)
        else:
            skipped = self._blank_chunks(view.tobytes(), chunk_size, 0, length)
        blank_bytes = sum(min(chunk_size, length - i * chunk_size) for i in skipped)
        head_blank = self._blank_chunks(head, chunk_size, 0, len(head)) if head else []
        blank_bytes += chunk_size * len(head_blank)
        n_writes = -(-length // chunk_size) + len(head) // chunk_size - len(skipped) - len(head_blank)
        cut = self._cut
        mem = self._mem
        fast = (
            mem is not None
            and not self._dead
            and addr >= 0
            and new_erased_to <= self.size
            and (cut is None or cut.at_op >= self.stats.ops + n_erases + n_writes)
        )
        if fast and addr < erased_to:
            # Bytes in an already erased sector must still read 0xFF (a program cannot set bits).
            stop = min(end, erased_to)
            fast = mem[addr:stop] == b"\xff" * (stop - addr)  # type: ignore[index]
        if not fast:
            ops_view = memoryview(head + view.tobytes()) if head else view
            return self._write_run_ops(addr, ops_view, chunk_size, erased_to)
        assert mem is not None
        if erased_to < addr:
            self._store(erased_to, b"\xff" * (addr - erased_to))
        if head:
            self._store(addr, head)
        self._store(body_addr, view)
        if new_erased_to > end:
            self._store(end, b"\xff" * (new_erased_to - end))
        self.stats.erases += n_erases
        self.stats.writes += n_writes
        self.stats.bytes_written += len(head) + length - blank_bytes
        return new_erased_to

    def _store(self, addr: int, data: bytes | memoryview) -> None:
        """Store bytes as they are (no program rules): a file-backed flash writes big ones with pwrite.

        Into the same page cache the shared mapping shows (so just as durable against a kill), and
        without the page fault per 4 KiB page that storing through the fresh mapping costs.
        """
        if self._fd is not None and len(data) >= _PWRITE_MIN:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], addr + done)
        else:
            assert self._mem is not None
            self._mem[addr : addr + len(data)] = data

    @staticmethod
    def _blank_chunks(data: bytes | bytearray, chunk_size: int, start: int, stop: int) -> list[int]:
        """Indexes of the all-0xFF chunks of ``data[start:stop]`` (a search for a blank run rules most
        data out)."""
        length = stop - start
        tail = length % chunk_size
        blank = b"\xff" * chunk_size
        view = memoryview(data)
        if data.find(blank, start, stop) < 0 and not (tail and view[stop - tail : stop] == b"\xff" * tail):
            return []
        return [
            i
            for i, off in enumerate(range(start, stop, chunk_size))
            if view[off : min(off + chunk_size, stop)] == blank[: min(chunk_size, stop - off)]
        ]

    def _write_run_ops(self, addr: int, view: memoryview, chunk_size: int, erased_to: int) -> int:
        """:meth:`write_run` operation by operation (a power cut or an odd case is in the run)."""
        sector = self.sector_size
        for off in range(0, len(view), chunk_size):
            piece = view[off : off + chunk_size]
            start = addr + off
            stop = start + len(piece)
            while erased_to < stop:
                self.erase_sector(erased_to // sector)
                erased_to += sector
            if piece != b"\xff" * len(piece):
                self.write(start, piece)
        return erased_to

    def snapshot(self) -> bytes:
        """The whole content (not counted as a read; for tests and copies)."""
        return self._raw_read(0, self.size)

    def restore(self, image: bytes) -> None:
        """Replace the whole content (not counted; for tests that replay from a saved state)."""
        if len(image) != self.size:
            raise ValueError(f"image is {len(image)} bytes, flash is {self.size}")
        self._raw_write(0, image)
