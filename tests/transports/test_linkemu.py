"""The serial link emulator: byte-transparent both ways, never faster than its baud rate."""

from __future__ import annotations

import os
import random
import select
import sys
import time

import pytest

from transports.linkemu import LinkEmulator

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="ptys are POSIX only"),
    pytest.mark.timeout(30),
]


def open_tty(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    return fd


def read_exactly(fd: int, n: int, *, timeout_s: float = 10.0) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                out += os.read(fd, n - len(out))
            except BlockingIOError:
                pass
    return bytes(out)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        _, w, _ = select.select([], [fd], [], 1.0)
        if w:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            view = view[n:]


def test_transparent_both_directions() -> None:
    rnd = random.Random(7)
    data_ab = bytes(rnd.getrandbits(8) for _ in range(3000))  # every byte value, incl. 0x04, 0x11, 0x13
    data_ba = bytes(range(256)) * 4
    with LinkEmulator(baud=None) as emu:
        a, b = open_tty(emu.a_path), open_tty(emu.b_path)
        try:
            write_all(a, data_ab)
            assert read_exactly(b, len(data_ab)) == data_ab
            write_all(b, data_ba)
            assert read_exactly(a, len(data_ba)) == data_ba
            # The counter is updated right after the relay's write returns: allow it to catch up.
            deadline = time.monotonic() + 5
            while emu.stats["b_to_a"].delivered < len(data_ba) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert emu.stats["a_to_b"].delivered == len(data_ab)
            assert emu.stats["b_to_a"].delivered == len(data_ba)
        finally:
            os.close(a)
            os.close(b)


def test_rate_limited_by_byte_count() -> None:
    baud = 38400  # 3840 bytes/s with 10 bits per byte
    data = bytes(range(256)) * 8  # 2048 bytes: about half a second on the wire
    with LinkEmulator(baud=baud) as emu:
        a, b = open_tty(emu.a_path), open_tty(emu.b_path)
        try:
            write_all(a, data)
            first = read_exactly(b, 200)
            st = emu.stats["a_to_b"]
            now = time.monotonic()
            assert st.first_byte_time is not None
            allowed = (now - st.first_byte_time) * baud / 10
            # Never more bytes delivered than the line could carry since the first byte arrived.
            assert st.delivered <= allowed + 1
            assert st.delivered < len(data)
            rest = read_exactly(b, len(data) - len(first))
            assert first + rest == data
            assert emu.stats["b_to_a"].delivered == 0
        finally:
            os.close(a)
            os.close(b)


def test_paths_need_start_and_bad_baud() -> None:
    with pytest.raises(RuntimeError):
        _ = LinkEmulator().a_path
    with pytest.raises(ValueError):
        LinkEmulator(baud=0)
    emu = LinkEmulator(baud=115200).start()
    try:
        assert emu.a_path != emu.b_path and os.path.exists(emu.a_path)
        assert emu.byte_time_s == pytest.approx(10 / 115200)
    finally:
        emu.stop()
    emu.stop()  # idempotent
