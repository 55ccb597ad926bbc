"""A serial link emulator: two pty pairs joined by a relay that runs at a chosen baud rate.

``LinkEmulator(baud=115200)`` gives two tty paths (``a_path``, ``b_path``); bytes written on one
come out of the other, in both directions, no faster than ``baud / bits_per_byte`` bytes per
second (10 bits per byte: 8N1). Open the paths with any serial software (our ``serial://``
transport, pyserial, ``mos``). ``baud=None`` relays at full speed.

The line model: a byte takes ``bits_per_byte / baud`` seconds on the wire and the wire is idle
otherwise, so the number of bytes delivered by time *t* never exceeds
``(t - first_byte_time) * baud / bits_per_byte`` (see :attr:`LinkEmulator.stats`). The relay is a
thread, so the emulator serves blocking benchmarks and asyncio tests alike. POSIX only.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field

__all__ = ["DirectionStats", "LinkEmulator"]

log = logging.getLogger("mgrpc.linkemu")

_MAX_PENDING = 65536  # bytes held per direction before the relay stops reading (back-pressure)
_MIN_WAIT_S = 0.001  # release bytes in batches of at least ~1 ms to avoid spinning


@dataclass(slots=True)
class DirectionStats:
    """Counters of one direction (``a_to_b`` or ``b_to_a``)."""

    received: int = 0  # bytes read from the sending side
    delivered: int = 0  # bytes written to the receiving side
    first_byte_time: float | None = None  # time.monotonic() of the first byte read


@dataclass(slots=True)
class _Direction:
    src: int
    dst: int
    stats: DirectionStats = field(default_factory=DirectionStats)
    pending: bytearray = field(default_factory=bytearray)
    line_time: float = 0.0  # when the last released byte finished on the wire


class LinkEmulator:
    """Relay between two pty pairs at ``baud`` (None = unlimited). Use :meth:`start` / :meth:`stop`."""

    def __init__(self, *, baud: int | None = 115200, bits_per_byte: int = 10) -> None:
        if baud is not None and baud <= 0:
            raise ValueError("baud must be positive (or None for no limit)")
        self.baud = baud
        self.bits_per_byte = bits_per_byte
        self._fds: list[int] = []
        self._paths: tuple[str, str] | None = None
        self._dirs: list[_Direction] = []
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._running = False

    # -- public -----------------------------------------------------------------------------------
    @property
    def byte_time_s(self) -> float:
        """Seconds one byte takes on the wire (0 without a limit)."""
        return self.bits_per_byte / self.baud if self.baud else 0.0

    @property
    def a_path(self) -> str:
        """The tty path of end A."""
        return self.paths[0]

    @property
    def b_path(self) -> str:
        """The tty path of end B."""
        return self.paths[1]

    @property
    def paths(self) -> tuple[str, str]:
        """Both tty paths (available after :meth:`start`)."""
        if self._paths is None:
            raise RuntimeError("LinkEmulator is not started")
        return self._paths

    @property
    def stats(self) -> dict[str, DirectionStats]:
        """Byte counters: ``{"a_to_b": ..., "b_to_a": ...}``."""
        return {"a_to_b": self._dirs[0].stats, "b_to_a": self._dirs[1].stats}

    def start(self) -> LinkEmulator:
        """Create the pty pairs and start relaying; returns self."""
        if self._running:
            return self
        ma, sa = os.openpty()
        mb, sb = os.openpty()
        # The slave ends stay open here so a client closing its end never hangs up the line.
        for fd in (sa, sb):
            tty.setraw(fd)
        for fd in (ma, mb):
            os.set_blocking(fd, False)
        self._fds = [ma, sa, mb, sb]
        self._paths = (os.ttyname(sa), os.ttyname(sb))
        self._dirs = [_Direction(ma, mb), _Direction(mb, ma)]
        self._wake_r, self._wake_w = os.pipe()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="mgrpc-linkemu", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop relaying and close the ptys."""
        if not self._running:
            return
        self._running = False
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        for fd in (*self._fds, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- relay ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._running:
                self._step()
        except Exception:
            log.exception("link emulator relay failed")

    def _step(self) -> None:
        now = time.monotonic()
        byte_time = self.byte_time_s
        readers = [self._wake_r]
        writers: list[int] = []
        timeout: float | None = None
        for d in self._dirs:
            if len(d.pending) < _MAX_PENDING:
                readers.append(d.src)
            if not d.pending:
                continue
            if byte_time == 0:
                writers.append(d.dst)
                continue
            due = d.line_time + byte_time - now
            if due <= 0:
                writers.append(d.dst)
            else:
                timeout = due if timeout is None else min(timeout, due)
        if timeout is not None:
            timeout = max(timeout, _MIN_WAIT_S)
        r, w, _ = select.select(readers, writers, [], timeout)
        if self._wake_r in r:
            return
        now = time.monotonic()
        for d in self._dirs:
            if d.src in r:
                self._read(d, now)
            if d.dst in w or (d.pending and byte_time and d.line_time + byte_time <= now):
                self._release(d, now)

    def _read(self, d: _Direction, now: float) -> None:
        try:
            data = os.read(d.src, _MAX_PENDING - len(d.pending))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: no slave open; cannot happen while we hold it, but stay alive
            return
        if not data:
            return
        if not d.pending:
            d.line_time = max(d.line_time, now)  # the line was idle: the next byte starts now
        if d.stats.first_byte_time is None:
            d.stats.first_byte_time = now
        d.pending += data
        d.stats.received += len(data)

    def _release(self, d: _Direction, now: float) -> None:
        byte_time = self.byte_time_s
        n = len(d.pending) if byte_time == 0 else min(len(d.pending), int((now - d.line_time) / byte_time))
        if n <= 0:
            return
        try:
            written = os.write(d.dst, bytes(d.pending[:n]))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        del d.pending[:written]
        d.stats.delivered += written
        d.line_time += written * byte_time
