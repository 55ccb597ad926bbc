"""Every updater error of spec/updater.md and ota.md §8 that applies: message, and nothing lost.

Each case checks that the running slot's app bytes, both boot config sectors, the running fs partition
and its files are byte-identical before and after the failed update, and that the device still boots
the old firmware.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import pytest

from updater.bundle import BundlePart, build_bundle, make_virtual_bundle
from updater.context import UpdaterContext
from updater.partitions import make_layout
from updater.storage import DeviceStorage

FS_SIZE = 32 << 10
LAYOUT = make_layout(sector_size=4096, app_size=16 << 10, fs_size=FS_SIZE)
OLD_FILES = {"conf0.json": b'{"v": 1}', "conf9.json": b'{"user": true}'}
APP = b"new application image " * 200


def device() -> DeviceStorage:
    st = DeviceStorage.in_memory(layout=LAYOUT)
    st.factory_init(b"old app " * 500, OLD_FILES, version="1.0", build_id="b1")
    st.boot()
    return st


def protected(st: DeviceStorage) -> tuple[bytes, bytes, bytes, dict[str, bytes]]:
    """What an update must never touch."""
    slot = st.running_slot
    app, fs = LAYOUT.app[slot], LAYOUT.fs[slot]
    cfg = st.flash.read(0, LAYOUT.bootcfg[1].end)
    return cfg, st.flash.read(app.offset, app.size), st.flash.read(fs.offset, fs.size), st.fs().files()


def part(data: bytes, **kw: Any) -> dict[str, Any]:
    obj = {"size": len(data), "cs_sha1": hashlib.sha1(data).hexdigest(), "cs_sha256": hashlib.sha256(data).hexdigest()}
    obj.update(kw)
    return obj


def manifest(**overrides: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "name": "t",
        "platform": "esp32",
        "version": "2.0",
        "build_id": "b2",
        "parts": {"app": part(APP, type="app", src="app.bin")},
    }
    m.update(overrides)
    return {k: v for k, v in m.items() if v is not None}


def raw_zip(entries: list[tuple[str, bytes]], *, compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def bundle(m: dict[str, Any] | bytes, files: list[tuple[str, bytes]] | None = None) -> bytes:
    body = m if isinstance(m, bytes) else json.dumps(m).encode()
    return raw_zip([("manifest.json", body), *(files if files is not None else [("app.bin", APP)])])


def patch_first_entry_after_manifest(data: bytes, offset_in_header: int, value: bytes) -> bytes:
    """Overwrite bytes of the second local header (the first part file)."""
    second = data.index(b"PK\x03\x04", 4)
    out = bytearray(data)
    out[second + offset_in_header : second + offset_in_header + len(value)] = value
    return bytes(out)


def flip_data_byte(data: bytes, needle: bytes) -> bytes:
    i = data.index(needle, data.index(b"PK\x03\x04", 4))
    out = bytearray(data)
    out[i] ^= 0x01
    return bytes(out)


def valid() -> bytes:
    return bundle(manifest())


CASES: list[tuple[str, Callable[[], bytes], dict[str, Any], str]] = [
    ("garbage", lambda: b"this is not a zip file at all" * 3, {}, "Malformed archive (invalid file header)"),
    ("deflated", lambda: raw_zip([("manifest.json", json.dumps(manifest()).encode()), ("app.bin", APP)],
                                 compress=zipfile.ZIP_DEFLATED), {}, "Cannot handle compressed .zip"),
    ("long name", lambda: bundle(manifest(parts={"app": part(APP, type="app", src="a" * 60)}), [("a" * 60, APP)]),
     {}, "Too long file name"),
    ("sizes differ", lambda: patch_first_entry_after_manifest(valid(), 22, struct.pack("<I", 5)), {},
     "Malformed archive"),
    ("bad crc", lambda: flip_data_byte(valid(), b"new application"), {}, "Invalid CRC"),
    ("manifest not json", lambda: bundle(b"{not json"), {}, "Failed to parse manifest"),
    ("manifest not object", lambda: bundle(b"[1, 2]"), {}, "Failed to parse manifest"),
    ("no version", lambda: bundle(manifest(version=None)), {}, "Required manifest field missing"),
    ("no parts", lambda: bundle(manifest(parts=None)), {}, "Required manifest field missing"),
    ("wrong platform", lambda: bundle(manifest(platform="esp8266")), {}, "Wrong platform"),
    ("bad checksum format", lambda: bundle(manifest(parts={"app": part(APP, type="app", src="app.bin",
                                                                       cs_sha1="xyz")})),
     {}, "Invalid checksum format"),
    ("sha1 mismatch", lambda: bundle(manifest(parts={"app": part(APP, type="app", src="app.bin",
                                                                 cs_sha1="0" * 40)})), {}, "Digest mismatch"),
    ("sha256 mismatch", lambda: bundle(manifest(parts={"app": part(APP, type="app", src="app.bin",
                                                                   cs_sha256="0" * 64)})), {}, "Digest mismatch"),
    ("size mismatch", lambda: bundle(manifest(parts={"app": part(APP, type="app", src="app.bin", size=7)})), {},
     "Invalid size"),
    ("too big (manifest)", lambda: bundle(manifest(parts={"app": part(APP, type="app", src="app.bin",
                                                                      size=1 << 20)})), {}, "Image too big"),
    ("too big (data)", lambda: bundle(manifest(parts={"app": {"type": "app", "src": "app.bin"}}),
                                      [("app.bin", b"x" * (LAYOUT.app[1].size + 1))]), {}, "Image too big"),
    ("no app part", lambda: bundle(manifest(parts={"fs": part(b"fs", type="fs", src="fs.img")}), [("fs.img", b"fs")]),
     {}, "Incomplete update package"),
    ("app file missing", lambda: bundle(manifest(), []), {}, "Incomplete update package"),
    ("fs file missing", lambda: bundle(manifest(parts={"app": part(APP, type="app", src="app.bin"),
                                                       "fs": part(b"x" * 100, type="fs", src="fs.img")})),
     {}, "Incomplete update package"),
    ("manifest not first", lambda: raw_zip([("app.bin", APP), ("manifest.json", json.dumps(manifest()).encode())]),
     {}, "Malformed archive (manifest.json must be the first entry)"),
    ("manifest too large", lambda: bundle(manifest(description="x" * 70000)), {}, "Out of memory"),
    ("truncated", lambda: valid()[: len(valid()) // 2], {}, "Not all data was processed"),
    ("empty", lambda: b"", {}, "Not all data was processed"),
]


@pytest.mark.parametrize(("data_fn", "opts", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_and_loses_nothing(data_fn: Callable[[], bytes], opts: dict[str, Any], message: str) -> None:
    st = device()
    before = protected(st)
    data = data_fn()
    ctx = UpdaterContext(st, arch="esp32", **opts)
    for i in range(0, len(data), 333):
        if ctx.process(data[i : i + 333]) != 0:
            break
    result = ctx.finish()
    assert result < 0
    assert ctx.status_message == message
    assert not ctx.reboot_required
    assert protected(st) == before
    info = st.boot()
    assert (info.slot, info.reverted, info.first_boot) == (0, False, False)
    assert st.fs().files() == OLD_FILES


def test_sanity_the_valid_bundle_is_accepted() -> None:
    st = device()
    ctx = UpdaterContext(st, arch="esp32")
    assert ctx.process(valid()) == 0
    assert ctx.finish() == 1


def test_refused_while_uncommitted() -> None:
    st = device()
    good = make_virtual_bundle("esp32", "2.0", app_size=6000, fs_size=FS_SIZE)
    ctx = UpdaterContext(st, arch="esp32")
    ctx.process(good)
    assert ctx.finish() == 1
    assert st.boot().first_boot
    before = protected(st)
    ctx = UpdaterContext(st, arch="esp32")
    assert ctx.process(make_virtual_bundle("esp32", "3.0", app_size=6000, fs_size=FS_SIZE)) < 0
    assert ctx.status_message == "Previous update has not been committed yet"
    assert ctx.finish() < 0
    assert protected(st) == before


def test_finish_twice_and_abort() -> None:
    st = device()
    before = protected(st)
    ctx = UpdaterContext(st, arch="esp32")
    ctx.process(valid()[:100])
    assert ctx.abort() < 0 and ctx.status_message == "Update aborted"
    assert ctx.process(valid()[100:]) < 0  # swallowed after the end
    assert ctx.finish() < 0
    assert protected(st) == before


def test_signature_required_but_wrong_key() -> None:
    pytest.importorskip("cryptography")
    from updater import signing

    signer, other = signing.generate_key(), signing.generate_key()
    data = make_virtual_bundle("esp32", "2.0", app_size=6000, fs_size=FS_SIZE, sign_keys=[signer])
    for keys, mask in (([signing.public_key_b64(other)], 1), ([], 1), ([signing.public_key_b64(signer)], 0)):
        st = device()
        before = protected(st)
        ctx = UpdaterContext(st, arch="esp32", keys=keys, sig_req_mask=mask)
        assert ctx.process(data) < 0
        assert ctx.status_message.startswith("Signature check failed")
        assert protected(st) == before


def test_unsigned_bundle_ignored_mask_accepts() -> None:
    st = device()
    parts = [BundlePart("app", APP, {"type": "app", "src": "app.bin"})]
    data = build_bundle(platform="esp32", version="2.0", build_id="b2", parts=parts)
    ctx = UpdaterContext(st, arch="esp32", sig_req_mask=-1)
    ctx.process(data)
    assert ctx.finish() == 1


def test_refused_while_reboot_pending() -> None:
    st = device()
    ctx = UpdaterContext(st, arch="esp32")
    ctx.process(make_virtual_bundle("esp32", "2.0", app_size=6000, fs_size=FS_SIZE))
    assert ctx.finish() == 1
    st.boot()
    assert st.revert()  # the device would reboot into slot 0 now; it has not yet
    before = protected(st)
    slot0 = st.flash.read(LAYOUT.app[0].offset, LAYOUT.fs[0].end - LAYOUT.app[0].offset)
    ctx = UpdaterContext(st, arch="esp32")
    assert ctx.process(make_virtual_bundle("esp32", "3.0", app_size=6000, fs_size=FS_SIZE)) < 0
    assert ctx.status_message == "Reboot pending, cannot update now"
    assert protected(st) == before
    assert st.flash.read(LAYOUT.app[0].offset, LAYOUT.fs[0].end - LAYOUT.app[0].offset) == slot0
    assert st.boot().slot == 0


def test_begin_handler_can_abort() -> None:
    st = device()
    before = protected(st)
    seen = []

    def on_begin(m: Any) -> bool:
        seen.append((m.version, m.build_id))
        return False

    ctx = UpdaterContext(st, arch="esp32", on_begin=on_begin)
    assert ctx.process(valid()) < 0
    assert ctx.status_message == "OTA aborted by the MGOS_EVENT_OTA_BEGIN handler"
    assert seen == [("2.0", "b2")]
    assert protected(st) == before
    ctx = UpdaterContext(st, arch="esp32", on_begin=lambda m: None)  # None = go on
    ctx.process(valid())
    assert ctx.finish() == 1


def test_flash_failure_is_write_failed() -> None:
    from updater.errors import FlashError

    st = device()
    before = protected(st)
    real_write_run = st.flash.write_run
    calls = {"n": 0}

    def failing_write_run(addr: int, data: bytes, *, chunk_size: int, erased_to: int, **kw: int) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise FlashError("simulated program failure")
        return real_write_run(addr, data, chunk_size=chunk_size, erased_to=erased_to, **kw)

    st.flash.write_run = failing_write_run  # type: ignore[method-assign]
    ctx = UpdaterContext(st, arch="esp32")
    assert ctx.process(valid()) < 0
    assert (ctx.status_message, ctx.result) == ("Write failed", -11)
    assert calls["n"] == 2
    st.flash.write_run = real_write_run  # type: ignore[method-assign]
    assert ctx.finish() < 0
    assert protected(st) == before


def test_boot_state_changed_during_update() -> None:
    st = device()
    st.create_snapshot()  # slot 1 now holds a valid copy of slot 0
    data = valid()
    ctx = UpdaterContext(st, arch="esp32")
    assert ctx.process(data[:100]) == 0  # started, nothing of slot 1 written yet
    st.set_boot_state(active_slot=1)  # someone switched slots meanwhile
    before = protected(st)
    slot1 = st.flash.read(LAYOUT.app[1].offset, LAYOUT.fs[1].end - LAYOUT.app[1].offset)
    assert ctx.process(data[100:]) < 0
    assert ctx.finish() < 0 and ctx.status_message == "Failed to set boot config"
    assert protected(st) == before
    # the slot that became active was not written either
    assert st.flash.read(LAYOUT.app[1].offset, LAYOUT.fs[1].end - LAYOUT.app[1].offset) == slot1
    assert st.boot().slot == 1
