"""Tests for updater.zipstream: the device-compatible fw.zip stream parser."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from updater.errors import UpdaterError
from updater.zipstream import (
    ArchiveEnd,
    EntryData,
    EntryEnd,
    EntryStart,
    Event,
    ZipStreamParser,
    strip_first_component,
)

VECTORS = Path(__file__).parents[2].parent / "shared" / "vectors"


def local_header(
    name: bytes,
    data: bytes,
    *,
    method: int = 0,
    flags: int = 0,
    crc: int | None = None,
    csize: int | None = None,
    usize: int | None = None,
    extra: bytes = b"",
) -> bytes:
    """A hand-made local file header followed by ``data`` (for malformed cases)."""
    crc = zlib.crc32(data) if crc is None else crc
    csize = len(data) if csize is None else csize
    usize = len(data) if usize is None else usize
    hdr = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, method, 0, 0, crc, csize, usize, len(name), len(extra))
    return hdr + name + extra + data


CENTRAL = b"PK\x01\x02" + bytes(42)


def make_zip(files: Iterable[tuple[str, bytes]], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w", compression) as z:
        for name, data in files:
            z.writestr(name, data)
    return bio.getvalue()


def parse(data: bytes, sizes: Iterable[int] | None = None, **kw: object) -> list[Event]:
    """Feed ``data`` in pieces of the given sizes (cycled), collect all events."""
    p = ZipStreamParser(**kw)  # type: ignore[arg-type]
    out: list[Event] = []
    pos = 0
    size_list = list(sizes) if sizes is not None else [len(data) or 1]
    i = 0
    while pos < len(data):
        n = size_list[i % len(size_list)]
        i += 1
        p.feed(data[pos : pos + n])
        pos += n
        out.extend(p.events())
    out.extend(p.events())
    return out


def merged(events: list[Event]) -> list[Event]:
    """Join consecutive EntryData events so different chunkings compare equal."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, EntryData) and out and isinstance(out[-1], EntryData):
            out[-1] = EntryData(out[-1].data + ev.data)
        elif not (isinstance(ev, EntryData) and not ev.data):
            out.append(ev)
    return out


def files_of(events: list[Event]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    cur = None
    for ev in events:
        if isinstance(ev, EntryStart):
            cur = ev.name
            out[cur] = b""
        elif isinstance(ev, EntryData):
            assert cur is not None
            out[cur] += ev.data
        elif isinstance(ev, EntryEnd):
            cur = None
    return out


SAMPLE = make_zip(
    [
        ("fw-1.0/manifest.json", b'{"platform": "esp32"}'),
        ("fw-1.0/app.bin", bytes(range(256)) * 40),
        ("fw-1.0/empty.bin", b""),
        ("fw-1.0/sub/dir/fs.img", b"\xff" * 3000),
    ]
)


def test_strip_first_component() -> None:
    assert strip_first_component("name-1.0/manifest.json") == "manifest.json"
    assert strip_first_component("a/b/c") == "b/c"
    assert strip_first_component("manifest.json") == "manifest.json"
    assert strip_first_component("dir/") == ""


def test_sample_events_whole() -> None:
    evs = merged(parse(SAMPLE))
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["EntryStart", "EntryData", "EntryEnd"] * 2 + ["EntryStart", "EntryEnd"] + [
        "EntryStart",
        "EntryData",
        "EntryEnd",
        "ArchiveEnd",
    ]
    starts = [e for e in evs if isinstance(e, EntryStart)]
    assert [s.name for s in starts] == ["manifest.json", "app.bin", "empty.bin", "sub/dir/fs.img"]
    assert [s.full_name for s in starts] == [
        "fw-1.0/manifest.json",
        "fw-1.0/app.bin",
        "fw-1.0/empty.bin",
        "fw-1.0/sub/dir/fs.img",
    ]
    assert [s.size for s in starts] == [21, 10240, 0, 3000]
    assert files_of(evs)["app.bin"] == bytes(range(256)) * 40
    assert all(s.method == 0 and s.crc32 != 0 for s in starts if s.size)


@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_chunkings_identical(chunk: int) -> None:
    assert merged(parse(SAMPLE, [chunk])) == merged(parse(SAMPLE))


def test_random_chunkings_identical() -> None:
    rnd = random.Random(1234)
    want = merged(parse(SAMPLE))
    for _ in range(20):
        sizes = [rnd.randint(1, 700) for _ in range(50)]
        assert merged(parse(SAMPLE, sizes)) == want


def test_feed_everything_then_iterate_in_steps() -> None:
    p = ZipStreamParser()
    p.feed(SAMPLE)
    it = p.events()
    first = next(it)
    assert isinstance(first, EntryStart)
    # Abandon the generator and resume with a new one: nothing is lost.
    rest = list(p.events())
    assert merged([first, *rest]) == merged(parse(SAMPLE))
    assert p.finished
    assert p.consumed == len(SAMPLE)
    p.close()


def test_big_entry_streams_in_fed_pieces_without_copy() -> None:
    payload = random.Random(5).randbytes(1 << 20)
    data = make_zip([("manifest.json", b"{}"), ("big.bin", payload)])
    p = ZipStreamParser()
    got = bytearray()
    max_piece = 0
    for pos in range(0, len(data), 65536):
        p.feed(data[pos : pos + 65536])
        for ev in p.events():
            if isinstance(ev, EntryData):
                max_piece = max(max_piece, len(ev.data))
                got += ev.data
    assert p.finished
    assert bytes(got) == b"{}" + payload
    assert max_piece <= 65536


def test_one_byte_feeds_of_big_entry_complete() -> None:
    # 200 kB one byte at a time: must finish promptly (linear, not quadratic).
    payload = bytes(200_000)
    data = make_zip([("x.bin", payload)])
    p = ZipStreamParser()
    total = 0
    for i in range(len(data)):
        p.feed(data[i : i + 1])
        for ev in p.events():
            if isinstance(ev, EntryData):
                total += len(ev.data)
    assert total == len(payload) and p.finished


def test_skip_current_discards_and_skips_crc() -> None:
    bad_crc = local_header(b"a.bin", b"hello", crc=0x12345678)
    good = local_header(b"b.bin", b"world")
    data = bad_crc + good + CENTRAL
    p = ZipStreamParser()
    for piece in (data[:31], data[31:]):
        p.feed(piece)
    evs: list[Event] = []
    for ev in p.events():
        evs.append(ev)
        if isinstance(ev, EntryStart) and ev.name == "a.bin":
            p.skip_current()
    assert [type(e).__name__ for e in evs] == [
        "EntryStart",
        "EntryEnd",
        "EntryStart",
        "EntryData",
        "EntryEnd",
        "ArchiveEnd",
    ]
    assert evs[1] == EntryEnd("a.bin", skipped=True)
    assert evs[3] == EntryData(b"world")
    assert evs[4] == EntryEnd("b.bin", skipped=False, crc32=zlib.crc32(b"world"))


def test_skip_in_the_middle_of_data() -> None:
    data = local_header(b"a.bin", b"x" * 1000) + local_header(b"b.bin", b"yz") + CENTRAL
    p = ZipStreamParser()
    p.feed(data[:100])
    evs = list(p.events())
    assert isinstance(evs[-1], EntryData)
    p.skip_current()
    p.feed(data[100:])
    rest = list(p.events())
    assert rest[0] == EntryEnd("a.bin", skipped=True)
    assert files_of(rest) == {"b.bin": b"yz"}


def test_crc_zero_is_not_checked() -> None:
    evs = parse(local_header(b"a", b"data", crc=0) + CENTRAL)
    assert isinstance(evs[-1], ArchiveEnd)


def test_invalid_crc() -> None:
    with pytest.raises(UpdaterError, match=r"^Invalid CRC$"):
        parse(local_header(b"a", b"data", crc=1) + CENTRAL)


def test_bytes_after_central_directory_ignored() -> None:
    p = ZipStreamParser()
    p.feed(SAMPLE + b"garbage that is not zip")
    evs = list(p.events())
    assert isinstance(evs[-1], ArchiveEnd)
    p.feed(b"more garbage")
    assert list(p.events()) == []
    assert p.consumed == len(SAMPLE) + len(b"garbage that is not zip") + len(b"more garbage")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PK\x05\x06" + bytes(18), "Malformed archive (invalid file header)"),
        (b"MZ\x90\x00 not a zip at all..........", "Malformed archive (invalid file header)"),
        (local_header(b"a", b"d") + b"JUNK", "Malformed archive (invalid file header)"),
        (local_header(b"a", b"data", method=8), "Cannot handle compressed .zip"),
        (local_header(b"a", b"data", method=12), "Cannot handle compressed .zip"),
        (local_header(b"d/" + b"n" * 50, b""), "Too long file name"),
        (local_header(b"a", b"data", usize=5), "Malformed archive"),
        (local_header(b"a", b"", flags=0x8, crc=0, csize=0, usize=0), "data descriptors"),
        (local_header(b"a", b"", csize=0xFFFFFFFF, usize=0xFFFFFFFF), "ZIP64"),
        (local_header(b"a", b"x", extra=b"\x01\x00\x10\x00" + bytes(16)), "ZIP64"),
        (local_header(b"a", b"x", flags=0x1), "encrypted"),
    ],
)
def test_errors(data: bytes, message: str) -> None:
    with pytest.raises(UpdaterError) as exc:
        parse(data + CENTRAL)
    assert message in exc.value.message
    assert exc.value.code < 0
    if message in ("Malformed archive", "Too long file name", "Cannot handle compressed .zip"):
        assert exc.value.message == message


def test_name_length_limit_boundary() -> None:
    ok = parse(local_header(b"dir/" + b"n" * 49, b"") + CENTRAL)
    assert isinstance(ok[0], EntryStart) and len(ok[0].name) == 49
    with pytest.raises(UpdaterError, match="Too long file name"):
        parse(local_header(b"n" * 20, b"") + CENTRAL, max_name_len=20)
    # The limit counts stored bytes; a CP437 (non-UTF-8) name is decoded, not re-measured.
    cp437 = parse(local_header(b"\x81" * 49, b"") + CENTRAL)
    assert isinstance(cp437[0], EntryStart) and cp437[0].name == "\u00fc" * 49


def test_error_is_sticky() -> None:
    p = ZipStreamParser()
    p.feed(b"XXXXYYYY")
    with pytest.raises(UpdaterError):
        list(p.events())
    p.feed(SAMPLE)
    with pytest.raises(UpdaterError, match="invalid file header"):
        list(p.events())
    with pytest.raises(UpdaterError):
        p.close()


def test_close_on_truncated_stream() -> None:
    p = ZipStreamParser()
    p.feed(SAMPLE[:500])
    list(p.events())
    assert not p.finished
    with pytest.raises(UpdaterError, match="truncated"):
        p.close()


def test_extra_field_is_reported() -> None:
    extra = b"\x3a\x29\x05\x00" + b'{"a":'[:5]
    evs = parse(local_header(b"manifest.json", b"{}", extra=extra) + CENTRAL)
    assert isinstance(evs[0], EntryStart) and evs[0].extra == extra


def test_python_data_descriptor_zip_refused() -> None:
    # zipfile writes data descriptors when the output is not seekable.
    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self.buf = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.buf += b
            return len(b)

    out = Unseekable()
    with zipfile.ZipFile(out, "w") as z, z.open("manifest.json", "w") as f:
        f.write(b"{}")
    with pytest.raises(UpdaterError, match="data descriptors"):
        parse(bytes(out.buf))


# -- deflate extension -------------------------------------------------------------------------

DEFLATED = make_zip(
    [("m/manifest.json", b'{"a": 1}' * 50), ("m/app.bin", random.Random(3).randbytes(5000) + bytes(100_000))],
    compression=zipfile.ZIP_DEFLATED,
)


def test_deflate_refused_by_default() -> None:
    with pytest.raises(UpdaterError) as exc:
        parse(DEFLATED)
    assert exc.value.message == "Cannot handle compressed .zip"


@pytest.mark.parametrize("chunk", [1, 7, 512, 100_000])
def test_deflate_allowed(chunk: int) -> None:
    evs = parse(DEFLATED, [chunk], allow_deflate=True)
    with zipfile.ZipFile(io.BytesIO(DEFLATED)) as z:
        want = {strip_first_component(n): z.read(n) for n in z.namelist()}
    assert files_of(evs) == want
    starts = [e for e in evs if isinstance(e, EntryStart)]
    assert all(s.method == 8 and s.compressed_size < s.size for s in starts)
    assert isinstance(evs[-1], ArchiveEnd)


def test_deflate_skip() -> None:
    p = ZipStreamParser(allow_deflate=True)
    p.feed(DEFLATED)
    names = []
    for ev in p.events():
        if isinstance(ev, EntryStart):
            p.skip_current()
        if isinstance(ev, EntryEnd):
            names.append((ev.name, ev.skipped))
    assert names == [("manifest.json", True), ("app.bin", True)]
    assert p.finished


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("usize", "message"),
    [(99, "longer than declared"), (101, "inflated size differs")],
)
def test_deflate_size_mismatch(usize: int, message: str) -> None:
    raw = b"a" * 100
    comp = _deflate(raw)
    bad = local_header(b"x", comp, method=8, crc=zlib.crc32(raw), usize=usize)
    with pytest.raises(UpdaterError, match=message):
        parse(bad + CENTRAL, allow_deflate=True)


def test_deflate_corrupt_and_crc() -> None:
    raw = b"hello world" * 10
    comp = _deflate(raw)
    with pytest.raises(UpdaterError, match="Invalid CRC"):
        parse(local_header(b"x", comp, method=8, crc=1, usize=len(raw)) + CENTRAL, allow_deflate=True)
    with pytest.raises(UpdaterError, match="Malformed archive"):
        parse(local_header(b"x", b"\xff" * 20, method=8, usize=5) + CENTRAL, allow_deflate=True)
    with pytest.raises(UpdaterError, match="truncated deflate"):
        parse(local_header(b"x", comp[:-3], method=8, usize=len(raw)) + CENTRAL, allow_deflate=True)


def test_deflate_bomb_is_bounded() -> None:
    raw = bytes(50_000_000)
    comp = _deflate(raw)
    with pytest.raises(UpdaterError, match="longer than declared"):
        parse(local_header(b"x", comp, method=8, usize=10) + CENTRAL, allow_deflate=True)


# -- vectors ---------------------------------------------------------------------------------------


def test_vector_fw_minimal_generated() -> None:
    path = VECTORS / "fw_minimal_generated.zip"
    if not path.exists():
        pytest.skip("../shared/vectors not present")
    data = path.read_bytes()
    want = merged(parse(data))
    starts = [e for e in want if isinstance(e, EntryStart)]
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        assert [s.name for s in starts] == [i.filename for i in infos]
        assert [s.size for s in starts] == [i.file_size for i in infos]
        assert files_of(want) == {i.filename: z.read(i) for i in infos}
    assert [s.name for s in starts] == ["manifest.json", "demo.bin", "fs.img"]
    assert isinstance(want[-1], ArchiveEnd)
    for sizes in ([1], [7], [512], [3, 1000, 1, 64]):
        assert merged(parse(data, sizes)) == want


# -- properties ------------------------------------------------------------------------------------

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=30)
_files = st.lists(st.tuples(_names, st.binary(max_size=3000)), min_size=1, max_size=5, unique_by=lambda t: t[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=_files, prefix=st.sampled_from(["", "dir-1.0/"]), seed=st.integers(0, 2**32 - 1))
def test_property_chunking_invariant(files: list[tuple[str, bytes]], prefix: str, seed: int) -> None:
    data = make_zip([(prefix + n, d) for n, d in files])
    rnd = random.Random(seed)
    want = merged(parse(data))
    assert files_of(want) == dict(files)
    sizes = [rnd.randint(1, 200) for _ in range(30)]
    assert merged(parse(data, sizes)) == want
    assert merged(parse(data, [1])) == want


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), allow_deflate=st.booleans(), chunk=st.integers(1, 64))
def test_property_arbitrary_bytes_only_updater_error(data: bytes, allow_deflate: bool, chunk: int) -> None:
    try:
        parse(data, [chunk], allow_deflate=allow_deflate)
    except UpdaterError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=120),
    pos=st.integers(0, 2000),
    allow_deflate=st.booleans(),
)
def test_property_corrupted_zip_only_updater_error(data: bytes, pos: int, allow_deflate: bool) -> None:
    base = DEFLATED if allow_deflate else SAMPLE
    pos = pos % len(base)
    corrupted = base[:pos] + data + base[pos + len(data) :]
    try:
        parse(corrupted, [97], allow_deflate=allow_deflate)
    except UpdaterError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=_files,
    prefix=st.sampled_from([None, "fw-1.0"]),
    compress=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_our_builder_any_chunking(
    files: list[tuple[str, bytes]], prefix: str | None, compress: bool, seed: int
) -> None:
    from updater.bundle import BundlePart, build_bundle

    files = [(n, d) for n, d in files if n != "manifest.json"]
    parts = [BundlePart(f"p{i}", d, {"type": "x", "src": n}) for i, (n, d) in enumerate(files)]
    data = build_bundle(platform="esp32", version="1.0", parts=parts, compress=compress, dir_prefix=prefix)
    want = merged(parse(data, allow_deflate=compress))
    got = files_of(want)
    assert next(iter(got)) == "manifest.json"
    assert {k: v for k, v in got.items() if k != "manifest.json"} == dict(files)
    rnd = random.Random(seed)
    for sizes in ([1], [7], [512], [rnd.randint(1, 300) for _ in range(40)]):
        assert merged(parse(data, sizes, allow_deflate=compress)) == want
