"""Tests for updater.bundle (fw.zip builder) and updater.firmware (virtual app image)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import littlefs
import pytest

from updater.bundle import (
    DEFAULT_FS_SIZE,
    BundlePart,
    build_bundle,
    make_fs_image,
    make_virtual_bundle,
    virtual_build_id,
    write_bundle,
    write_virtual_bundle,
)
from updater.errors import UpdaterError
from updater.firmware import BEHAVIORS, MAGIC, FirmwareImage, firmware_chunks, looks_like_firmware
from updater.manifest import Manifest
from updater.zipstream import ArchiveEnd, EntryData, EntryEnd, EntryStart, ZipStreamParser

VECTORS = Path(__file__).parents[2].parent / "shared" / "vectors"


def stream_files(data: bytes, *, chunk: int = 4096, allow_deflate: bool = False) -> dict[str, bytes]:
    """Parse with our stream parser; return {stripped name: data}; asserts a clean ArchiveEnd."""
    p = ZipStreamParser(allow_deflate=allow_deflate)
    files: dict[str, bytearray] = {}
    cur = ""
    ended = False
    for pos in range(0, len(data), chunk):
        p.feed(data[pos : pos + chunk])
        for ev in p.events():
            if isinstance(ev, EntryStart):
                cur = ev.name
                files[cur] = bytearray()
            elif isinstance(ev, EntryData):
                files[cur] += ev.data
            elif isinstance(ev, ArchiveEnd):
                ended = True
            else:
                assert isinstance(ev, EntryEnd)
    assert ended
    return {k: bytes(v) for k, v in files.items()}


def simple_parts() -> list[BundlePart]:
    return [
        BundlePart("app", b"A" * 1000, {"type": "app", "ptn": "app_0"}),
        BundlePart("fs", b"F" * 300, {"type": "fs", "src": "some/dir/fs.img", "fs_size": 8192}),
        BundlePart("nvs", None, {"type": "nvs", "fill": 255, "size": 4096}),
    ]


# -- builder ---------------------------------------------------------------------------------------


def test_reproduces_generated_vector_byte_exact() -> None:
    path = VECTORS / "fw_minimal_generated.zip"
    if not path.exists():
        pytest.skip("../shared/vectors not present")
    with zipfile.ZipFile(path) as z:
        app, fs = z.read("demo.bin"), z.read("fs.img")
    data = build_bundle(
        name="demo",
        platform="esp32",
        version="1.0",
        build_id="20200101-000000/test",
        parts=[
            BundlePart("app", app, {"type": "app", "src": "demo.bin", "ptn": "app_0"}),
            BundlePart("fs", fs, {"type": "fs", "src": "fs.img", "fs_size": 300, "ptn": "fs_0"}),
        ],
    )
    assert data == path.read_bytes()


def test_bundle_layout_and_manifest() -> None:
    data = build_bundle(
        name="demo", platform="esp32", version="1.2", build_id="b1", parts=simple_parts(), attrs={"x_attr": 7}
    )
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        infos = z.infolist()
        assert [i.filename for i in infos] == ["manifest.json", "app", "fs.img"]
        for info in infos:
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.flag_bits == 0
            assert info.date_time == (1980, 0, 0, 0, 0, 0)
            assert info.extract_version == 20
        raw = z.read("manifest.json")
    # Local header: CRC and sizes present, no data descriptor.
    assert data[:4] == b"PK\x03\x04" and data[6:8] == b"\x00\x00"
    m = Manifest.parse(raw, require_build_id=True)
    assert raw.startswith(b'{\n "name": "demo",\n "platform": "esp32",\n "version": "1.2",\n "build_id": "b1",')
    assert m.obj["x_attr"] == 7
    app = m.parts["app"]
    assert (app.src, app.size) == ("app", 1000)
    assert app.cs_sha1 == hashlib.sha1(b"A" * 1000).hexdigest()
    assert app.cs_sha256 == hashlib.sha256(b"A" * 1000).hexdigest()
    assert m.parts["fs"].src == "fs.img" and m.parts["fs"].get("fs_size") == 8192
    assert m.parts["nvs"].src is None and m.parts["nvs"].get("fill") == 255
    assert stream_files(data) == {"manifest.json": raw, "app": b"A" * 1000, "fs.img": b"F" * 300}


def test_no_build_id_and_both_parse_modes() -> None:
    """A mos bundle built without --build-info has no build_id: accepted by default, refused strictly."""
    data = build_bundle(platform="esp32", version="1.0", parts=simple_parts())
    raw = stream_files(data)["manifest.json"]
    assert b"build_id" not in raw
    assert Manifest.parse(raw).build_id == ""
    with pytest.raises(UpdaterError, match="Required manifest field missing"):
        Manifest.parse(raw, require_build_id=True)


def test_dir_prefix() -> None:
    data = build_bundle(platform="esp32", version="1.0", build_id="b", parts=simple_parts(), dir_prefix="demo-1.0/")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.namelist() == ["demo-1.0/manifest.json", "demo-1.0/app", "demo-1.0/fs.img"]
    assert set(stream_files(data)) == {"manifest.json", "app", "fs.img"}


def test_compress() -> None:
    parts = [BundlePart("app", bytes(100_000), {"type": "app"})]
    data = build_bundle(platform="esp32", version="1.0", parts=parts, compress=True)
    assert len(data) < 10_000
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
        assert z.read("app") == bytes(100_000)
    with pytest.raises(UpdaterError, match=r"^Cannot handle compressed \.zip$"):
        stream_files(data)
    assert stream_files(data, allow_deflate=True)["app"] == bytes(100_000)


def test_data_sources(tmp_path: Path) -> None:
    f = tmp_path / "build" / "fw.bin"
    f.parent.mkdir()
    f.write_bytes(b"from-file" * 100)

    def factory() -> Iterator[bytes]:
        yield b"fac"
        yield b"tory"

    one_shot = iter([b"one", b"-", b"shot"])
    data = build_bundle(
        platform="esp32",
        version="1.0",
        parts=[
            BundlePart("file", f, {"type": "app"}),
            BundlePart("strpath", str(f), {"type": "x", "src": "copy.bin"}),
            BundlePart("factory", factory, {"type": "x"}),
            BundlePart("oneshot", one_shot, {"type": "x"}),
            BundlePart("mv", memoryview(b"mem"), {"type": "x"}),
        ],
    )
    files = stream_files(data)
    assert files["fw.bin"] == b"from-file" * 100
    assert files["copy.bin"] == b"from-file" * 100
    assert files["factory"] == b"factory"
    assert files["oneshot"] == b"one-shot"
    assert files["mv"] == b"mem"


def test_mapping_parts_form() -> None:
    data = build_bundle(
        platform="esp32",
        version="1.0",
        parts={"app": {"type": "app", "data": b"xyz", "ptn": "app_0"}, "nvs": {"fill": 0, "size": 10}},
    )
    m = Manifest.parse(stream_files(data)["manifest.json"])
    assert m.parts["app"].size == 3 and "data" not in m.parts["app"].attrs
    assert m.parts["nvs"].get("fill") == 0


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([BundlePart("a", b"1"), BundlePart("a", b"2")], "Duplicate part names"),
        ([BundlePart("a", b"1", {"src": "x"}), BundlePart("b", b"2", {"src": "d/x"})], "unique"),
        ([BundlePart("a", b"1", {"src": "manifest.json"})], "unique"),
        ([BundlePart("a", None, {"src": "x.bin"})], "no data"),
        ([BundlePart("a", b"1", {"cs_sha1": "0" * 40})], "checksum does not match"),
    ],
)
def test_builder_errors(parts: list[BundlePart], message: str) -> None:
    with pytest.raises(UpdaterError, match=message):
        build_bundle(platform="esp32", version="1.0", parts=parts)


def test_missing_file_is_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UpdaterError, match="Cannot read"):
        build_bundle(platform="esp32", version="1", parts=[BundlePart("a", tmp_path / "nope.bin")])


def test_changing_source_detected() -> None:
    calls = {"n": 0}

    def flaky() -> Iterator[bytes]:
        calls["n"] += 1
        yield b"x" * calls["n"]

    with pytest.raises(UpdaterError, match="changed"):
        build_bundle(platform="esp32", version="1", parts=[BundlePart("a", flaky)])


def test_matching_given_checksum_kept() -> None:
    sha1 = hashlib.sha1(b"1").hexdigest().upper()
    data = build_bundle(platform="p", version="1", parts=[BundlePart("a", b"1", {"cs_sha1": sha1})])
    assert Manifest.parse(stream_files(data)["manifest.json"]).parts["a"].cs_sha1 == sha1.lower()


class _WriteOnly(io.RawIOBase):
    """A non-seekable sink that keeps only a hash and the size (no buffering of the bundle)."""

    def __init__(self) -> None:
        self.size = 0
        self.sha = hashlib.sha256()
        self.parser = ZipStreamParser()
        self.entries: list[tuple[str, int]] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        b = bytes(b)
        self.size += len(b)
        self.sha.update(b)
        self.parser.feed(b)
        for ev in self.parser.events():
            if isinstance(ev, EntryStart):
                self.entries.append((ev.name, ev.size))
        return len(b)


def test_streaming_big_one_shot_iterable() -> None:
    """A part given as a one-shot iterable of 8 MiB is written to a write-only sink and parses."""
    rnd = random.Random(9)
    chunks = [rnd.randbytes(1 << 20) for _ in range(8)]
    sink = _WriteOnly()
    m = write_bundle(sink, platform="esp32", version="1", parts=[BundlePart("app", iter(chunks), {"type": "app"})])
    assert m.parts["app"].size == 8 << 20
    assert m.parts["app"].cs_sha256 == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert sink.parser.finished
    assert sink.entries == [("manifest.json", len(m.raw)), ("app", 8 << 20)]


def test_python_zipfile_reads_signed_and_prefixed() -> None:
    pytest.importorskip("cryptography")
    from updater.signing import generate_key

    data = build_bundle(
        platform="esp32",
        version="1",
        parts=simple_parts(),
        sign_keys=[generate_key()],
        dir_prefix="x",
    )
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        assert z.infolist()[0].extra[:2] == b"\x3a\x29"


# -- firmware image ----------------------------------------------------------------------------------


def test_firmware_roundtrip() -> None:
    im = FirmwareImage("demo", "1.1", "b/1", "esp32", "hang", b"payload", extra={"note": "x"})
    data = im.to_bytes()
    assert data.startswith(MAGIC) and looks_like_firmware(data)
    assert FirmwareImage.parse(data) == im
    assert FirmwareImage.parse(data + b"\xff" * 1000) == im  # slot tail ignored
    assert len(im) == len(data)
    hdr = json.loads(data[12 : im.header_size])
    assert hdr["behavior"] == "hang" and hdr["payload_size"] == 7 and hdr["note"] == "x"


@pytest.mark.parametrize("size", [200, 999, 1000, 1003, 1004, 1005, 1006, 4096, 100_003])
def test_firmware_sized_exact(size: int) -> None:
    im = FirmwareImage.sized("demo", "1.0", "b", "esp32", total_size=size, seed=1)
    data = im.to_bytes()
    assert len(data) == size
    assert FirmwareImage.parse(data) == im
    assert b"".join(firmware_chunks("demo", "1.0", "b", "esp32", total_size=size, seed=1, chunk_size=333)) == data


def test_firmware_sized_too_small() -> None:
    with pytest.raises(UpdaterError, match="minimum"):
        FirmwareImage.sized("demo", "1.0", "b", "esp32", total_size=20)
    with pytest.raises(UpdaterError, match="minimum"):
        next(firmware_chunks("demo", "1.0", "b", "esp32", total_size=20))


def test_firmware_behaviors() -> None:
    for b in BEHAVIORS:
        assert FirmwareImage.parse(FirmwareImage("a", "1", "b", "esp32", b).to_bytes()).behavior == b
    with pytest.raises(UpdaterError, match="behavior"):
        FirmwareImage("a", "1", "b", "esp32", "explode")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"\x7fELF" + d[4:], "Not a firmware image"),
        (lambda d: b"", "Not a firmware image"),
        (lambda d: d[:10], "Not a firmware image|truncated"),
        (lambda d: d[:30], "truncated header"),
        (lambda d: d[:-5], "truncated"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "CRC mismatch"),
        (lambda d: d[:12] + b"[" + d[13:], "bad header"),
        (lambda d: d[:8] + b"\xff\xff\xff\x00" + d[12:], "truncated header"),
    ],
)
def test_firmware_parse_errors(mutate: Any, message: str) -> None:
    data = FirmwareImage("demo", "1.0", "b", "esp32", payload=b"p" * 100).to_bytes()
    with pytest.raises(UpdaterError, match=message):
        FirmwareImage.parse(mutate(data))


def test_firmware_bad_field_types() -> None:
    body = json.dumps({"app": 1, "version": "1", "build_id": "b", "arch": "a", "behavior": "ok", "payload_size": 0})
    raw = MAGIC + len(body).to_bytes(4, "little") + body.encode()
    raw += zlib.crc32(raw).to_bytes(4, "little")
    with pytest.raises(UpdaterError, match="bad header fields"):
        FirmwareImage.parse(raw)


# -- virtual bundles ---------------------------------------------------------------------------------


def test_make_virtual_bundle() -> None:
    data = make_virtual_bundle(
        "esp32",
        "1.1",
        behavior="no_commit",
        app_size=20_000,
        fs_files={"conf0.json": b'{"a": 1}', "dir/x.txt": b"hi"},
        fs_size=64 << 10,
    )
    files = stream_files(data, chunk=777)
    m = Manifest.parse(files["manifest.json"], require_build_id=True)
    assert (m.platform, m.version, m.build_id) == ("esp32", "1.1", virtual_build_id("1.1"))
    app, fs = m.parts["app"], m.parts["fs"]
    assert (app.type, app.get("ptn"), app.size) == ("app", "app_0", 20_000)
    assert (fs.type, fs.get("ptn"), fs.get("fs_size"), fs.size) == ("fs", "fs_0", 64 << 10, 64 << 10)
    assert app.src is not None and fs.src is not None
    im = FirmwareImage.parse(files[app.src])
    assert (im.version, im.build_id, im.arch, im.behavior) == ("1.1", m.build_id, "esp32", "no_commit")
    assert len(files[app.src]) == 20_000
    # The fs image mounts with littlefs-python, block size 4096.
    ctx = littlefs.UserContext(len(files[fs.src]))
    ctx.buffer[:] = files[fs.src]
    lfs = littlefs.LittleFS(ctx, block_size=4096, block_count=16)
    with lfs.open("conf0.json", "rb") as f:
        assert f.read() == b'{"a": 1}'
    with lfs.open("dir/x.txt", "rb") as f:
        assert f.read() == b"hi"


def test_virtual_bundle_defaults_and_determinism() -> None:
    a = make_virtual_bundle("esp8266", "2.0", build_id="custom")
    b = make_virtual_bundle("esp8266", "2.0", build_id="custom")
    assert a == b
    files = stream_files(a)
    m = Manifest.parse(files["manifest.json"])
    assert m.build_id == "custom" and m.parts["fs"].get("fs_size") == DEFAULT_FS_SIZE
    ctx = littlefs.UserContext(DEFAULT_FS_SIZE)
    ctx.buffer[:] = files["fs.img"]
    lfs = littlefs.LittleFS(ctx, block_size=4096, block_count=DEFAULT_FS_SIZE // 4096)
    assert lfs.listdir("/") == ["conf0.json"]


def test_virtual_bundle_bad_args() -> None:
    with pytest.raises(UpdaterError, match="behavior"):
        make_virtual_bundle("esp32", "1", behavior="explode")
    with pytest.raises(UpdaterError, match="minimum"):
        make_virtual_bundle("esp32", "1", app_size=10)
    with pytest.raises(UpdaterError, match="fs_size"):
        make_virtual_bundle("esp32", "1", fs_size=5000)
    with pytest.raises(UpdaterError, match="fs image"):
        make_fs_image({"big.bin": bytes(100_000)}, fs_size=8192)


def test_write_virtual_bundle_streams_big_app() -> None:
    sink = _WriteOnly()
    m = write_virtual_bundle(sink, "esp32", "3.0", app_size=16 << 20, fs_size=8192)
    assert sink.parser.finished
    assert sink.entries[1] == ("mgrpc-virtual.bin", 16 << 20)
    assert m.parts["app"].size == 16 << 20
