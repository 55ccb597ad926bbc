"""The sans-I/O tar parser: the formats tarfile writes, fed whole, byte by byte and in random splits."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from updater.tarstream import TarData, TarEnd, TarError, TarMember, TarMemberEnd, TarStreamParser

LONG = "d" * 120 + "/" + "f" * 130 + ".txt"


def _archive(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in (("a.txt", b"hello"), (LONG, b"x" * 1500), ("empty", b"")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o640
            tar.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("sym")
        link.type = tarfile.SYMTYPE
        link.linkname = "l" * 150
        tar.addfile(link)
    return buf.getvalue()


def _parse(data: bytes, pieces: list[int]) -> list[tuple[str, str, int, int, str, bytes]]:
    p = TarStreamParser()
    out: list[tuple[str, str, int, int, str, bytes]] = []
    cur: list[object] = []
    pos = 0
    for n in [*pieces, len(data)]:
        p.feed(data[pos : pos + n])
        pos += n
        for ev in p.events():
            if isinstance(ev, TarMember):
                cur = [ev.name, ev.type, ev.size, ev.mode, ev.linkname, b""]
            elif isinstance(ev, TarData):
                cur[5] += ev.data  # type: ignore[operator]
            elif isinstance(ev, TarMemberEnd):
                out.append(tuple(cur))  # type: ignore[arg-type]
            else:
                assert isinstance(ev, TarEnd)
    p.close()
    return out


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_formats_and_splits(fmt: int) -> None:
    data = _archive(fmt)
    want = [
        ("a.txt", "0", 5, 0o640, "", b"hello"),
        (LONG, "0", 1500, 0o640, "", b"x" * 1500),
        ("empty", "0", 0, 0o640, "", b""),
        ("sym", "2", 0, 0o644, "l" * 150, b""),
    ]
    assert _parse(data, []) == want
    assert _parse(data, [1] * len(data)) == want
    rng = random.Random(fmt)
    for _ in range(20):
        assert _parse(data, [rng.randint(1, 900) for _ in range(30)]) == want


def test_truncated_and_corrupt() -> None:
    data = _archive(tarfile.PAX_FORMAT)
    p = TarStreamParser()
    p.feed(data[:700])
    list(p.events())
    with pytest.raises(TarError, match="truncated"):
        p.close()
    bad = bytearray(data)
    bad[0] ^= 1
    with pytest.raises(TarError, match="checksum"):
        TarStreamParser().feed(bytes(bad))
    with pytest.raises(TarError):
        TarStreamParser().feed(b"PK\x03\x04" + b"\x01" * 600)  # not a tar at all
