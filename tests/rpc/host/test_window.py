"""rpc.host.window: the sans-I/O OTA write window, driven through whole sequences.

A small simulated device (contiguous offsets, in arrival order, faults injected by offset) answers
the writes; answers are reported to the window in send order, in random orders, and with failures,
and every run must end with the device holding each byte exactly once in order.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpc.errors import UsageError
from rpc.host.window import GiveUp, Resync, WriteWindow


class Refused(Exception):
    """The simulated device refused a write."""


class SimDevice:
    """Takes writes in arrival order; only the write at ``bytes_written`` is accepted (an exact repeat
    of the last one too); ``refuse[offset]`` refuses that offset that many more times."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bytes_written = 0
        self.last: tuple[int, int] | None = None
        self.refuse: dict[int, int] = {}

    def write(self, offset: int, length: int) -> Exception | None:
        if self.refuse.get(offset, 0) > 0:
            self.refuse[offset] -= 1
            return Refused(f"refused {offset}")
        if (offset, length) == self.last:
            return None
        if offset != self.bytes_written:
            return Refused(f"offset {offset} != {self.bytes_written}")
        self.bytes_written += length
        self.last = (offset, length)
        return None


def drive(w: WriteWindow, dev: SimDevice, rng: random.Random | None = None) -> tuple[list[object], int]:
    """Run the window against ``dev`` to the end; answers reported in send order, or shuffled by ``rng``.

    The device sees the writes in send order (it answers them as they arrive); only the order in
    which the host *reports* the answers varies. Returns the non-None steps and the peak in flight.
    """
    steps: list[object] = []
    peak = 0
    for _ in range(10_000):
        if w.done:
            return steps, peak
        sent: list[tuple[int, int]] = []
        while (nxt := w.next_write()) is not None:
            sent.append(nxt)
        peak = max(peak, w.in_flight)
        answers = [(off, dev.write(off, n)) for off, n in sent]
        if rng is not None:
            rng.shuffle(answers)
        for off, err in answers:
            step = w.ack(off) if err is None else w.failed(off, err)
            if step is not None:
                steps.append(step)
                if isinstance(step, GiveUp):
                    return steps, peak
                assert isinstance(step, Resync)
                w.device_position(dev.bytes_written)
    raise AssertionError("the window did not finish")


def test_send_order_without_faults():
    w = WriteWindow(5000, chunk_size=512, window=4)
    writes = []
    while (nxt := w.next_write()) is not None:
        writes.append(nxt)
    assert writes == [(0, 512), (512, 512), (1024, 512), (1536, 512)]  # the window is full
    assert w.ack(0) is None and w.acked == 512
    assert w.next_write() == (2048, 512)
    for off in (512, 1024, 1536, 2048):
        w.ack(off)
    rest = []
    while (nxt := w.next_write()) is not None:
        rest.append(nxt)
        w.ack(nxt[0])
    assert rest[-1] == (4608, 392)  # the last chunk is short
    assert w.done and w.acked == 5000


def test_out_of_order_acks_advance_only_the_contiguous_prefix():
    w = WriteWindow(2048, chunk_size=512, window=4)
    for _ in range(4):
        w.next_write()
    w.ack(1024)
    w.ack(1536)
    assert w.acked == 0 and not w.done
    w.ack(0)
    assert w.acked == 512
    w.ack(512)
    assert w.acked == 2048 and w.done


@pytest.mark.parametrize("window", [1, 3, 20])
def test_start_resumes_at_the_device_position(window):
    w = WriteWindow(3000, chunk_size=1000, window=window, start=1000)
    assert w.acked == 1000 and w.next_write() == (1000, 1000)
    dev = SimDevice(3000)
    dev.bytes_written = 1000
    w2 = WriteWindow(3000, chunk_size=1000, window=window, start=1000)
    drive(w2, dev)
    assert w2.done and dev.bytes_written == 3000


def test_failure_opens_a_round_until_everything_in_flight_is_reported():
    w = WriteWindow(4096, chunk_size=512, window=4)
    for _ in range(4):
        w.next_write()
    err = Refused("no")
    assert w.failed(512, err) is None
    assert w.failing and w.next_write() is None  # no new writes while the round is open
    assert w.ack(0) is None
    assert w.failed(1536, Refused("echo")) is None
    step = w.ack(1024)  # a later write landed: the device has everything up to its end
    assert step == Resync(offset=512, attempt=1, cause=err, fallback=1536)
    assert w.next_write() is None
    w.device_position(1536)
    assert not w.failing and w.acked == 1536 and w.next_write() == (1536, 512)


def test_round_is_charged_to_its_lowest_failed_offset_with_its_first_cause():
    w = WriteWindow(2048, chunk_size=512, window=4)
    for _ in range(4):
        w.next_write()
    first = Refused("first")
    w.failed(1024, Refused("echo"))  # reported before the real cause
    w.failed(512, first)
    w.ack(0)
    step = w.failed(1536, Refused("echo"))
    assert isinstance(step, Resync) and step.offset == 512 and step.cause is first and step.fallback == 512
    w.device_position(512)
    for _ in range(3):
        w.next_write()
    later = Refused("later")
    w.failed(512, later)
    w.failed(1024, Refused("echo"))
    step = w.failed(1536, Refused("echo"))
    # Second failure of the same offset; the first cause is kept (it says more than a later echo).
    assert isinstance(step, Resync) and step.attempt == 2 and step.cause is first


@pytest.mark.parametrize("window", [1, 4])
def test_gives_up_after_attempts_failures_of_one_offset(window):
    dev = SimDevice(4096)
    dev.refuse[1024] = 99
    w = WriteWindow(4096, chunk_size=512, window=window, attempts=3)
    steps, _ = drive(w, dev)
    assert [type(s) for s in steps] == [Resync, Resync, GiveUp]
    assert [s.attempt for s in steps] == [1, 2, 3]  # type: ignore[attr-defined]
    assert all(s.offset == 1024 for s in steps)  # type: ignore[attr-defined]
    assert str(steps[-1].cause) == "refused 1024"  # type: ignore[attr-defined]
    assert w.failing and not w.done and w.next_write() is None
    with pytest.raises(UsageError):
        w.device_position(1024)


@pytest.mark.parametrize("window", [1, 4])
def test_recovers_within_attempts(window):
    dev = SimDevice(4096)
    dev.refuse[1024] = 2
    w = WriteWindow(4096, chunk_size=512, window=window, attempts=3)
    steps, _ = drive(w, dev)
    assert w.done and dev.bytes_written == 4096
    assert [type(s) for s in steps] == [Resync, Resync]


def test_resync_backwards_after_a_reconnect_rewrites_from_there():
    # A lost connection: the device kept fewer bytes than were acknowledged before the cut.
    w = WriteWindow(3072, chunk_size=1024, window=2)
    w.next_write()
    w.next_write()
    w.ack(0)
    step = w.failed(1024, ConnectionError("cut"))
    assert isinstance(step, Resync) and step.fallback == 1024
    w.device_position(512)
    assert w.acked == 512 and w.next_write() == (512, 1024)


def test_misuse_is_refused():
    with pytest.raises(UsageError):
        WriteWindow(10, chunk_size=0, window=1)
    with pytest.raises(UsageError):
        WriteWindow(10, chunk_size=1, window=0)
    with pytest.raises(UsageError):
        WriteWindow(10, chunk_size=1, window=1, attempts=0)
    with pytest.raises(UsageError):
        WriteWindow(10, chunk_size=1, window=1, start=11)
    w = WriteWindow(10, chunk_size=4, window=2)
    with pytest.raises(UsageError, match="no write in flight at offset 0"):
        w.ack(0)
    w.next_write()
    with pytest.raises(UsageError, match="in flight"):
        w.device_position(0)
    w.ack(0)
    with pytest.raises(UsageError):
        w.ack(0)  # reported twice


def test_empty_file_is_done_at_once():
    w = WriteWindow(0, chunk_size=512, window=4)
    assert w.done and w.next_write() is None


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 5000),
    chunk_size=st.integers(1, 700),
    window=st.integers(1, 20),
    refusals=st.dictionaries(st.integers(0, 5000), st.integers(1, 2), max_size=4),
    seed=st.integers(0, 2**32 - 1),
    shuffle=st.booleans(),
)
def test_any_answer_order_and_faults_end_with_every_byte_once(size, chunk_size, window, refusals, seed, shuffle):
    dev = SimDevice(size)
    dev.refuse = dict(refusals)
    w = WriteWindow(size, chunk_size=chunk_size, window=window, attempts=3)
    steps, peak = drive(w, dev, random.Random(seed) if shuffle else None)
    assert peak <= window
    # At most 2 refusals per offset with 3 attempts: the update always completes.
    assert w.done and w.acked == size and dev.bytes_written == size
    assert all(isinstance(s, Resync) for s in steps)
