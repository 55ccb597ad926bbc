"""The OTA write window, sans I/O: which ``OTA.Write`` to send next and what a failure means.

A device processes writes in arrival order and insists on contiguous offsets, so a host may keep
several writes in flight on one connection (spec/ota.md §2; mos keeps one). This object holds the
rules and nothing else; the caller sends the writes and reports what came back::

    w = WriteWindow(len(fw), chunk_size=512, window=20)
    while not w.done:
        while (nxt := w.next_write()) is not None:
            send(*nxt)                        # (offset, length)
        offset, error = wait_for_an_answer()
        step = w.ack(offset) if error is None else w.failed(offset, error)
        if isinstance(step, Resync):          # ask the device where it stands (OTA.Status)
            w.device_position(bytes_written)
        elif isinstance(step, GiveUp):
            abort(step.offset, step.cause)

Rules:

* At most ``window`` writes are in flight; chunks are ``chunk_size`` bytes, the last one shorter.
* Answers may be reported in any order. ``acked`` is the contiguous prefix known written.
* A failure opens a *round*: no new writes until every write in flight has been reported (their
  answers still count: a later write that succeeded means the device has everything before it).
  The round is charged to its lowest failed offset; the others are echoes of that one (a device
  refuses every write after a missing offset). When the round closes, ``ack``/``failed`` return
  :class:`Resync` (ask the device, then :meth:`WriteWindow.device_position`) or, once one offset
  has failed ``attempts`` times, :class:`GiveUp`.
* :meth:`WriteWindow.device_position` moves the window to where the device stands: after a failed
  round, after a reconnect, or to resume an update in progress.
"""

from __future__ import annotations

from dataclasses import dataclass

from rpc.errors import UsageError

__all__ = ["GiveUp", "Resync", "Step", "WriteWindow"]


@dataclass(frozen=True, slots=True)
class Resync:
    """A failed round is over: find out where the device stands, then call ``device_position``.

    ``offset`` is the failed write the round is charged to, ``attempt`` how often it has failed so
    far, ``cause`` its first failure, and ``fallback`` the best position known without asking (the
    end of the furthest write acknowledged, at least ``offset``).
    """

    offset: int
    attempt: int
    cause: BaseException
    fallback: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The write at ``offset`` failed ``attempt`` times (its first failure: ``cause``); stop."""

    offset: int
    attempt: int
    cause: BaseException


Step = Resync | GiveUp | None
"""What to do after reporting an answer: None = carry on (send ``next_write()``s, report answers)."""


class WriteWindow:
    """Which writes to send for a file of ``size`` bytes; see the module doc for the rules."""

    def __init__(self, size: int, *, chunk_size: int, window: int, attempts: int = 3, start: int = 0) -> None:
        if size < 0:
            raise UsageError("size must not be negative")
        if chunk_size <= 0:
            raise UsageError("chunk size must be positive")
        if window < 1:
            raise UsageError("window must be at least 1")
        if attempts < 1:
            raise UsageError("attempts must be at least 1")
        self.size = size
        self.chunk_size = chunk_size
        self.window = window
        self.attempts = attempts
        self.acked = 0
        """Bytes known written: every write below this offset was acknowledged (or the device said so)."""
        self._next = 0
        self._in_flight: dict[int, int] = {}  # offset -> length
        self._acked_ahead: dict[int, int] = {}  # acknowledged beyond ``acked`` (answers out of order)
        self._high = 0  # end of the furthest acknowledged write since the last resync
        self._round: dict[int, BaseException] = {}  # failures of the open round, by offset
        self._failures: dict[int, int] = {}
        self._first_error: dict[int, BaseException] = {}  # the first cause says more than a later echo
        self._gave_up = False
        self.device_position(start)

    @property
    def done(self) -> bool:
        """Every byte is acknowledged and nothing is in flight."""
        return self.acked >= self.size and not self._in_flight

    @property
    def in_flight(self) -> int:
        """Writes sent and not yet reported."""
        return len(self._in_flight)

    @property
    def failing(self) -> bool:
        """A failed round is open (or the window gave up): no new writes until it is resolved."""
        return bool(self._round) or self._gave_up

    def next_write(self) -> tuple[int, int] | None:
        """The next write to send as ``(offset, length)``, now counted in flight; None if there is none.

        None while the window is full, everything is sent, or a failed round is open.
        """
        if self.failing or len(self._in_flight) >= self.window or self._next >= self.size:
            return None
        offset = self._next
        length = min(self.chunk_size, self.size - offset)
        self._in_flight[offset] = length
        self._next = offset + length
        return offset, length

    def ack(self, offset: int) -> Step:
        """The write at ``offset`` succeeded. Returns the round's outcome if this answer closed one."""
        length = self._take(offset)
        self._high = max(self._high, offset + length)
        self._acked_ahead[offset] = length
        while self.acked in self._acked_ahead:
            self.acked += self._acked_ahead.pop(self.acked)
        return self._close_round()

    def failed(self, offset: int, exc: BaseException) -> Step:
        """The write at ``offset`` failed with ``exc``. Returns the round's outcome once nothing is in flight."""
        self._take(offset)
        self._round.setdefault(offset, exc)
        return self._close_round()

    def note_failure(self, offset: int, exc: BaseException) -> None:
        """A write at ``offset`` failed before this window took over (e.g. a lone first write that
        tried the chunk size): it counts as one of the offset's attempts, and its cause comes first."""
        self._first_error.setdefault(offset, exc)
        self._failures[offset] = self._failures.get(offset, 0) + 1

    def device_position(self, pos: int) -> None:
        """The device has ``pos`` bytes (OTA.Status ``bytes_written``): continue writing from there.

        Closes a failed round. Only valid with nothing in flight, and not after :class:`GiveUp`.
        """
        if self._in_flight:
            raise UsageError(f"device_position({pos}) with {len(self._in_flight)} writes in flight")
        if self._gave_up:
            raise UsageError("the window gave up")
        if not 0 <= pos <= self.size:
            raise UsageError(f"device position {pos} is outside 0..{self.size}")
        self.acked = self._next = self._high = pos
        self._acked_ahead.clear()
        self._round.clear()

    def _take(self, offset: int) -> int:
        try:
            return self._in_flight.pop(offset)
        except KeyError:
            raise UsageError(f"no write in flight at offset {offset}") from None

    def _close_round(self) -> Step:
        if not self._round or self._in_flight or self._gave_up:
            return None
        offset = min(self._round)
        cause = self._first_error.setdefault(offset, self._round[offset])
        attempt = self._failures[offset] = self._failures.get(offset, 0) + 1
        if attempt >= self.attempts:
            self._gave_up = True
            return GiveUp(offset, attempt, cause)
        # The round stays open (no new writes) until device_position says where to go on.
        return Resync(offset, attempt, cause, max(self._high, offset))
