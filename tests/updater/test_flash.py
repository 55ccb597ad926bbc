"""Emulated NOR flash: erase/program semantics, counters, power cuts, file write-through."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from updater.errors import FlashError, PowerCut
from updater.flash import Flash

SECTOR = 256


@pytest.fixture(params=["memory", "file"])
def flash(request: pytest.FixtureRequest, tmp_path: Path) -> Flash:
    path = None if request.param == "memory" else tmp_path / "f.flash"
    f = Flash(path, size=8 * SECTOR, sector_size=SECTOR)
    yield f
    f.close()


def test_new_flash_is_erased(flash: Flash) -> None:
    assert flash.read(0, flash.size) == b"\xff" * flash.size
    assert flash.sector_count == 8


def test_program_clears_bits_only(flash: Flash) -> None:
    flash.write(10, b"\x0f\xf0")
    assert flash.read(10, 2) == b"\x0f\xf0"
    flash.write(10, b"\x0e\x00")  # clearing more bits is fine
    assert flash.read(10, 2) == b"\x0e\x00"
    with pytest.raises(FlashError, match="needs an erase"):
        flash.write(10, b"\x0f\x00")  # 0 -> 1 on bit 0 of the first byte
    assert flash.read(10, 2) == b"\x0e\x00"  # refused write changed nothing


def test_erase_sets_sector_to_ff(flash: Flash) -> None:
    flash.write(SECTOR - 1, b"\x00\x00")  # straddles sectors 0 and 1
    flash.erase_sector(1)
    assert flash.read(SECTOR - 1, 2) == b"\x00\xff"
    flash.erase(0, 2 * SECTOR)
    assert flash.read(0, 2 * SECTOR) == b"\xff" * 2 * SECTOR


def test_erase_must_be_aligned_and_in_range(flash: Flash) -> None:
    with pytest.raises(FlashError, match="not sector-aligned"):
        flash.erase(1, SECTOR)
    with pytest.raises(FlashError):
        flash.erase_sector(8)
    with pytest.raises(FlashError, match="outside"):
        flash.write(flash.size - 1, b"\x00\x00")
    with pytest.raises(FlashError, match="outside"):
        flash.read(flash.size, 1)


def test_stats_count_operations(flash: Flash) -> None:
    flash.erase(0, 2 * SECTOR)
    flash.write(0, b"abc")
    flash.write(100, b"d")
    flash.read(0, 4)
    s = flash.stats
    assert (s.erases, s.writes, s.reads, s.bytes_written, s.bytes_read, s.ops) == (2, 2, 1, 4, 4, 4)
    s.reset()
    assert s.ops == 0


def test_power_cut_plain_does_nothing_and_stays_off(flash: Flash) -> None:
    flash.write(0, b"\x00")
    flash.arm_power_cut(at_op=1)
    flash.write(1, b"\x11")  # op 0 from arming: done
    with pytest.raises(PowerCut):
        flash.write(2, b"\x22")  # op 1: cut
    assert not flash.powered
    with pytest.raises(PowerCut):
        flash.read(0, 1)
    with pytest.raises(PowerCut):
        flash.erase_sector(0)
    flash.power_on()
    assert flash.read(0, 3) == b"\x00\x11\xff"


def test_power_cut_torn_write_keep_does_a_prefix(flash: Flash) -> None:
    data = bytes(range(200))
    flash.arm_power_cut(at_op=0, torn="keep", rng=random.Random(5))
    with pytest.raises(PowerCut):
        flash.write(0, data)
    flash.power_on()
    got = flash.read(0, 200)
    done = next((i for i in range(200) if got[i] != data[i]), 200)
    assert 0 <= done < 200
    assert got[:done] == data[:done] and got[done:] == b"\xff" * (200 - done)


def test_power_cut_torn_write_random_half_programs_one_byte(flash: Flash) -> None:
    flash.arm_power_cut(at_op=0, torn="random", rng=random.Random(1))
    data = b"\x00" * 100
    with pytest.raises(PowerCut):
        flash.write(0, data)
    flash.power_on()
    got = flash.read(0, 100)
    done = got.index(next(b for b in got if b != 0)) if any(got) else 100
    # prefix programmed, at most one partially programmed byte, rest untouched
    assert got[:done] == b"\x00" * done
    assert got[done + 1 :] == b"\xff" * (100 - done - 1)


@pytest.mark.parametrize("torn", ["keep", "random"])
def test_power_cut_torn_erase(flash: Flash, torn: str) -> None:
    flash.write(0, b"\x00" * SECTOR)
    flash.arm_power_cut(at_op=0, torn=torn, rng=random.Random(3))  # type: ignore[arg-type]
    with pytest.raises(PowerCut):
        flash.erase_sector(0)
    flash.power_on()
    got = flash.read(0, SECTOR)
    done = next(i for i in range(SECTOR + 1) if i == SECTOR or got[i] != 0xFF)
    assert done < SECTOR  # really torn
    if torn == "keep":
        assert got[done:] == b"\x00" * (SECTOR - done)
    assert flash.stats.erases == 0  # a cut operation is not counted as done


def test_cut_op_is_not_counted(flash: Flash) -> None:
    flash.arm_power_cut(at_op=2)
    flash.erase_sector(0)
    flash.write(0, b"\x00")
    with pytest.raises(PowerCut):
        flash.write(1, b"\x00")
    assert flash.stats.ops == 2


def test_file_backed_persists(tmp_path: Path) -> None:
    path = tmp_path / "p.flash"
    with Flash(path, size=4 * SECTOR, sector_size=SECTOR) as f:
        f.write(5, b"hello")
    assert path.stat().st_size == 4 * SECTOR
    with Flash(path, sector_size=SECTOR) as f:
        assert f.size == 4 * SECTOR
        assert f.read(5, 5) == b"hello"
    with pytest.raises(FlashError, match="expected"):
        Flash(path, size=8 * SECTOR, sector_size=SECTOR)
    with pytest.raises(FileNotFoundError):
        Flash(tmp_path / "missing.flash", size=SECTOR, sector_size=SECTOR, create=False)


def test_bad_geometry() -> None:
    with pytest.raises(ValueError):
        Flash(None, size=1000, sector_size=256)
    with pytest.raises(ValueError):
        Flash(None, size=1024, sector_size=100)


def test_sigkill_leaves_written_data(tmp_path: Path) -> None:
    """Every operation is written through: a killed process leaves what a power loss would."""
    path = tmp_path / "k.flash"
    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(repo)!r})
        from updater.flash import Flash
        f = Flash({str(path)!r}, size=4 * {SECTOR}, sector_size={SECTOR})
        f.write(0, b"written-before-kill")
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with Flash(path, sector_size=SECTOR) as f:
        assert f.read(0, 19) == b"written-before-kill"


def test_closed_file_flash_refuses_access(tmp_path: Path) -> None:
    f = Flash(tmp_path / "c.flash", size=2 * SECTOR, sector_size=SECTOR)
    f.close()
    f.close()  # idempotent
    with pytest.raises(FlashError, match="closed"):
        f.read(0, 1)


def _run_op_by_op(flash: Flash, addr: int, data: bytes, chunk: int, erased_to: int) -> int:
    """The reference for write_run: the driver loop done with single erase/write calls."""
    for off in range(0, len(data), chunk):
        piece = data[off : off + chunk]
        stop = addr + off + len(piece)
        while erased_to < stop:
            flash.erase_sector(erased_to // flash.sector_size)
            erased_to += flash.sector_size
        if piece.count(0xFF) != len(piece):
            flash.write(addr + off, piece)
    return erased_to


def _run_cases() -> list[tuple[str, bytes, int, int, int]]:
    rng = random.Random(7)
    noise = rng.randbytes(3 * SECTOR + 40)
    blanks = noise[:64] + b"\xff" * 96 + noise[:300] + b"\xff" * 20  # a blank chunk and a blank tail
    return [
        # (name, data, addr, erased_to, pre-programmed byte below erased_to or -1)
        ("fresh", noise, SECTOR, SECTOR, -1),
        ("blank chunks", blanks, SECTOR, SECTOR, -1),
        ("blank first chunk", b"\xff" * 32 + noise[:100], SECTOR, SECTOR, -1),
        ("continues an erased sector", noise[:500], SECTOR + 64, 2 * SECTOR, -1),
        ("gap below the run", noise[:200], 3 * SECTOR + 32, SECTOR, -1),
        ("needs an erase", noise[:500], SECTOR + 64, 2 * SECTOR, SECTOR + 100),
    ]


def _prepared(case: tuple[str, bytes, int, int, int]) -> Flash:
    """Old content everywhere; the sectors from addr's up to erased_to erased, with the bytes below
    addr in them programmed (an earlier run), and optionally one more byte programmed."""
    _, _, addr, erased_to, programmed = case
    f = Flash(None, size=8 * SECTOR, sector_size=SECTOR)
    f.restore(random.Random(1).randbytes(f.size))
    first = addr - addr % SECTOR
    for index in range(first // SECTOR, erased_to // SECTOR):
        f.erase_sector(index)
    if first < addr < erased_to:
        f.write(first, b"\x00" * (addr - first))
    if programmed >= 0:
        f.write(programmed, b"\x00")
    f.stats.reset()
    return f


def _reference_cut(case: tuple[str, bytes, int, int, int], at: int, torn: str) -> Flash:
    f = _prepared(case)
    f.arm_power_cut(at_op=at, torn=torn, rng=random.Random(at))  # type: ignore[arg-type]
    return f


@pytest.mark.parametrize("case", _run_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("torn", [False, "keep", "random"])
def test_write_run_is_the_same_operations(case: tuple[str, bytes, int, int, int], torn: str) -> None:
    """write_run leaves the bytes, counters and power-cut outcomes of the op-by-op loop, at every cut."""
    _, data, addr, erased_to, _ = case
    chunk = 32

    def outcome(f: Flash, fn: object) -> tuple[object, ...]:
        try:
            result: object = fn(f, addr, data, chunk, erased_to)  # type: ignore[operator]
        except (FlashError, PowerCut) as exc:
            result = type(exc).__name__
        return (result, f.snapshot(), f.stats.erases, f.stats.writes, f.stats.bytes_written, f.powered)

    def by_run(f: Flash, a: int, d: bytes, c: int, e: int) -> int:
        # handed over inside a bigger buffer (start/stop), as the updater does
        return f.write_run(a, b"\x00\x01" + d + b"\xff", chunk_size=c, erased_to=e, start=2, stop=2 + len(d))

    def by_run_with_head(f: Flash, a: int, d: bytes, c: int, e: int) -> int:
        # the first chunk handed over separately (a chunk the caller completed from an earlier piece)
        return f.write_run(a, b"\x07" + d[c:], chunk_size=c, erased_to=e, start=1, head=d[:c])

    reference = outcome(_prepared(case), _run_op_by_op)
    assert outcome(_prepared(case), by_run) == reference
    assert outcome(_prepared(case), by_run_with_head) == reference
    total_ops = reference[2] + reference[3]  # type: ignore[operator]
    assert total_ops > 0
    for at in range(total_ops + 1):
        expected_f, got_f = _prepared(case), _prepared(case)
        expected_f.arm_power_cut(at_op=at, torn=torn, rng=random.Random(at))  # type: ignore[arg-type]
        got_f.arm_power_cut(at_op=at, torn=torn, rng=random.Random(at))  # type: ignore[arg-type]
        assert outcome(got_f, by_run) == outcome(expected_f, _run_op_by_op), at
        head_f = _prepared(case)
        head_f.arm_power_cut(at_op=at, torn=torn, rng=random.Random(at))  # type: ignore[arg-type]
        assert outcome(head_f, by_run_with_head) == outcome(_reference_cut(case, at, torn), _run_op_by_op), at


def test_write_run_refuses_an_unaligned_erase_mark(flash: Flash) -> None:
    with pytest.raises(ValueError, match="sector boundary"):
        flash.write_run(0, b"\x00", chunk_size=16, erased_to=5)
    with pytest.raises(ValueError, match="chunk_size"):
        flash.write_run(0, b"\x00", chunk_size=0, erased_to=0)
    with pytest.raises(ValueError, match="whole 16-byte chunks"):
        flash.write_run(0, b"\x00", chunk_size=16, erased_to=0, head=b"\x00" * 5)
