"""End to end: virtual device updated, committed, rolled back, reverted, over loopback and WebSocket."""

from __future__ import annotations

import asyncio
import base64

import pytest
from aiohttp import web

import transports
from rpc.errors import RemoteError
from tests.device_helpers import bundle, push, start_device

URLS = {"loop": "loop://{name}", "ws": "ws://127.0.0.1:0/rpc"}


@pytest.fixture(params=["loop", "ws"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _dev(tmp_path, kind: str, name: str, **kw):
    dev = await start_device(tmp_path, name, [URLS[kind].format(name=name)], **kw)
    return dev, dev.urls[0]


async def test_update_reboot_commit(tmp_path, kind: str) -> None:
    dev, url = await _dev(tmp_path, kind, f"e2e-commit-{kind}")
    try:
        async with await transports.connect(url) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.0"
            assert await push(c, bundle("1.1")) is None
        info = await dev.wait_booted(boots=2)
        assert info.first_boot and info.slot == 1
        async with await transports.connect(url) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.1"
            assert await c.call("OTA.GetBootState") == {
                "active_slot": 1, "is_committed": False, "revert_slot": 0, "commit_timeout": 300,
            }  # fmt: skip
            assert await c.call("OTA.Commit") is None
            state = await c.call("OTA.GetBootState")
            assert state["is_committed"] is True and state["active_slot"] == 1
            with pytest.raises(RemoteError) as ei:
                await c.call("OTA.Commit")  # already committed
            assert ei.value.code == -1
        # a later reboot keeps the committed firmware
        await dev.reboot()
        async with await transports.connect(url) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.1"
    finally:
        await dev.stop()


async def test_no_commit_rolls_back_after_commit_timeout(tmp_path, kind: str) -> None:
    dev, url = await _dev(tmp_path, kind, f"e2e-timeout-{kind}")
    try:
        async with await transports.connect(url) as c:
            await push(c, bundle("1.2", "no_commit"), commit_timeout=1)
        assert (await dev.wait_booted(boots=2)).version == "1.2"
        info = await dev.wait_booted(boots=3, timeout_s=10)
        assert info.slot == 0 and not info.first_boot
        async with await transports.connect(url) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.0"
            assert (await c.call("OTA.GetBootState"))["is_committed"] is True
    finally:
        await dev.stop()


async def test_crashing_firmware_rolls_back(tmp_path, kind: str) -> None:
    dev, url = await _dev(tmp_path, kind, f"e2e-crash-{kind}")
    try:
        async with await transports.connect(url) as c:
            await push(c, bundle("1.3", "crash"))
        info = await dev.wait_booted(boots=2)
        assert info.slot == 0 and info.reverted
        async with await transports.connect(url) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.0"
    finally:
        await dev.stop()


async def test_hanging_firmware_rolls_back_by_hardware_timer(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-hang")
    try:
        async with await transports.connect(url) as c:
            await push(c, bundle("1.4", "hang"), commit_timeout=1)
        info = await dev.wait_booted(boots=2)
        assert info.version == "1.4" and dev.node is None  # hung: nothing serves RPC
        with pytest.raises(OSError):
            await transports.connect(url)
        info = await dev.wait_booted(boots=3, timeout_s=10)
        assert info.version == "1.0"
        async with await transports.connect(url) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.0"
    finally:
        await dev.stop()


async def test_ota_revert(tmp_path, kind: str) -> None:
    dev, url = await _dev(tmp_path, kind, f"e2e-revert-{kind}")
    try:
        async with await transports.connect(url) as c:
            await push(c, bundle("1.5"))
        await dev.wait_booted(boots=2)
        async with await transports.connect(url) as c:
            assert await c.call("OTA.Revert") is None
        info = await dev.wait_booted(boots=3)
        assert info.slot == 0
        async with await transports.connect(url) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.0"
            with pytest.raises(RemoteError) as ei:
                await c.call("OTA.Revert")  # committed firmware cannot be reverted
            assert ei.value.code == -1
    finally:
        await dev.stop()


async def test_duplicate_and_out_of_order_writes(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-writes")
    data = bundle("1.6")
    try:
        async with await transports.connect(url) as c:
            await c.call("OTA.Begin", {"timeout": 600, "commit_timeout": 300, "size": len(data)})

            def w(off: int, n: int = 512):
                return {"offset": off, "data": base64.b64encode(data[off : off + n]).decode()}

            assert await c.call("OTA.Write", w(0)) is None
            assert await c.call("OTA.Write", w(0)) is None  # exact duplicate: idempotent
            with pytest.raises(RemoteError, match="Expected offset 512, got 1024"):
                await c.call("OTA.Write", w(1024))  # gap
            with pytest.raises(RemoteError, match="Expected offset 512, got 256"):
                await c.call("OTA.Write", w(256))  # overlap
            st = await c.call("OTA.Status")
            assert st["state"] == 1 and st["bytes_written"] == 512
            for off in range(512, len(data), 512):
                await c.call("OTA.Write", w(off))
            assert await c.call("OTA.End") is None
        assert (await dev.wait_booted(boots=2)).version == "1.6"
    finally:
        await dev.stop()


async def test_end_before_all_data_aborts_to_idle(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-abort")
    data = bundle("1.7")
    try:
        async with await transports.connect(url) as c:
            before = dev.storage.flash.read(0, dev.storage.layout.total_size)  # type: ignore[union-attr]
            await c.call("OTA.Begin", {"timeout": 600, "commit_timeout": 300, "size": len(data)})
            await c.call("OTA.Write", {"offset": 0, "data": base64.b64encode(data[:512]).decode()})
            with pytest.raises(RemoteError, match="Update aborted"):
                await c.call("OTA.End")
            st = await c.call("OTA.Status")
            assert st["state"] == 0
            # the running slot and boot config are untouched (only the inactive slot was written)
            lay = dev.storage.layout  # type: ignore[union-attr]
            after = dev.storage.flash.read(0, lay.total_size)  # type: ignore[union-attr]
            for part in (lay.app[0], lay.fs[0]):
                assert before[part.offset : part.offset + part.size] == after[part.offset : part.offset + part.size]
            assert await c.call("OTA.GetBootState") == {
                "active_slot": 0, "is_committed": True, "revert_slot": 1, "commit_timeout": 0,
            }  # fmt: skip
            # and a fresh update works afterwards
            assert await push(c, data) is None
        assert (await dev.wait_booted(boots=2)).version == "1.7"
    finally:
        await dev.stop()


async def test_snapshot_refused_while_an_update_runs(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-snapshot-busy")
    data = bundle("1.8")
    try:
        async with await transports.connect(url) as c:
            await c.call("OTA.Begin", {"timeout": 600, "commit_timeout": 300, "size": len(data)})
            half = len(data) // 2 // 512 * 512
            for off in range(0, len(data), 512):
                if off == half:  # the snapshot would overwrite the slot being written
                    with pytest.raises(RemoteError, match="update is in progress"):
                        await c.call("OTA.CreateSnapshot", {})
                await c.call("OTA.Write", {"offset": off, "data": base64.b64encode(data[off : off + 512]).decode()})
            assert await c.call("OTA.End") is None
        info = await dev.wait_booted(boots=2)
        assert (info.version, info.reverted) == ("1.8", False)
    finally:
        await dev.stop()


async def test_end_with_an_incomplete_archive_says_so(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-short-zip")
    data = bundle("1.9")[:4096]  # a truncated archive, announced with its (short) size
    try:
        async with await transports.connect(url) as c:
            await c.call("OTA.Begin", {"timeout": 600, "commit_timeout": 300, "size": len(data)})
            for off in range(0, len(data), 512):
                await c.call("OTA.Write", {"offset": off, "data": base64.b64encode(data[off : off + 512]).decode()})
            with pytest.raises(RemoteError) as ei:
                await c.call("OTA.End")
            assert ei.value.message == "Update aborted: the archive is incomplete after 4096 bytes"
            assert (await c.call("OTA.Status"))["state"] == 0
    finally:
        await dev.stop()


async def test_set_boot_state_codes(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-setboot")
    try:
        async with await transports.connect(url) as c:
            before = await c.call("OTA.GetBootState")
            # commit_timeout < 0 is recognised and stores nothing (ota.md §1.10): success, no change
            assert await c.call("OTA.SetBootState", {"commit_timeout": -1}) is None
            assert await c.call("OTA.GetBootState") == before
            with pytest.raises(RemoteError) as ei:
                await c.call("OTA.SetBootState", {"bogus": 1})
            assert ei.value.code == -2  # no recognised field
            assert await c.call("OTA.SetBootState", {"commit_timeout": 42}) is None
            assert (await c.call("OTA.GetBootState"))["commit_timeout"] == 42
    finally:
        await dev.stop()


async def test_bad_bundle_rejected_running_slot_intact(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-bad")
    try:
        async with await transports.connect(url) as c:
            with pytest.raises(RemoteError) as ei:
                await push(c, bundle("2.0", arch="esp8266"))
            assert ei.value.message == "Wrong platform"
            assert (await c.call("OTA.Status"))["state"] == 2
            corrupt = bytearray(bundle("2.1"))
            corrupt[2000] ^= 0xFF
            with pytest.raises(RemoteError):
                await push(c, bytes(corrupt))
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.0"
            assert (await c.call("OTA.GetBootState"))["is_committed"] is True
        await dev.reboot()
        assert dev.boot_info is not None and dev.boot_info.version == "1.0"
    finally:
        await dev.stop()


async def test_update_refused_while_uncommitted(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-uncommitted")
    try:
        async with await transports.connect(url) as c:
            await push(c, bundle("1.1"))
        await dev.wait_booted(boots=2)
        async with await transports.connect(url) as c:
            with pytest.raises(RemoteError, match="Previous update has not been committed yet"):
                await c.call("OTA.Begin", {"timeout": 600, "commit_timeout": 300, "size": 10})
    finally:
        await dev.stop()


@pytest.fixture
async def http_server():
    """A local HTTP server with a good bundle, a truncated one and a 404."""
    good = bundle("3.0")

    async def full(request: web.Request) -> web.StreamResponse:
        return web.Response(body=good, content_type="application/zip")

    async def truncated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(good))})
        await resp.prepare(request)
        await resp.write(good[: len(good) // 2])
        request.transport.close()  # type: ignore[union-attr]
        return resp

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/fw.zip")

    app = web.Application()
    app.router.add_get("/fw.zip", full)
    app.router.add_get("/half.zip", truncated)
    app.router.add_get("/moved.zip", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_ota_update_from_url(tmp_path, http_server: str) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-pull")
    try:
        async with await transports.connect(url) as c:
            with pytest.raises(RemoteError) as ei:
                await c.call("OTA.Update", {"url": f"{http_server}/missing.zip", "commit_timeout": 300})
            assert (ei.value.code, ei.value.message) == (-404, "-404 Invalid HTTP response code")
            with pytest.raises(RemoteError) as ei:
                await c.call("OTA.Update", {"url": f"{http_server}/half.zip", "commit_timeout": 300})
            assert ei.value.code < 0
            with pytest.raises(RemoteError, match="Malformed request"):
                await c.call("OTA.Update", {})
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.0"
            frame = await c.call_frame("OTA.Update", {"url": f"{http_server}/moved.zip", "commit_timeout": 300})
            assert frame.error is not None and frame.error.code == 0
            assert frame.error.message == "Update applied, finalizing"
        info = await dev.wait_booted(boots=2)
        assert info.version == "3.0" and info.first_boot
    finally:
        await dev.stop()


async def test_fs_and_config_services(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-fs")
    try:
        async with await transports.connect(url) as c:
            assert await c.call("FS.List") == ["conf0.json"]
            payload = bytes(range(256)) * 8
            assert await c.call("FS.Put", {"filename": "blob.bin", "data": base64.b64encode(payload[:1000]).decode()}) is None
            await c.call("FS.Put", {"filename": "blob.bin", "data": base64.b64encode(payload[1000:]).decode(), "append": True})
            got = await c.call("FS.Get", {"filename": "blob.bin", "offset": 100, "len": 50})
            assert base64.b64decode(got["data"]) == payload[100:150] and got["left"] == len(payload) - 150
            assert await c.call("FS.ListExt") == [
                {"name": "blob.bin", "size": 2048},
                {"name": "conf0.json", "size": len(b'{"device": {"id": "e2e-fs"}}')},
            ]
            with pytest.raises(RemoteError, match='failed to open file "nope"'):
                await c.call("FS.Get", {"filename": "nope"})
            with pytest.raises(RemoteError, match="filename is required"):
                await c.call("FS.Get", {})
            await c.call("FS.Remove", {"filename": "blob.bin"})
            assert await c.call("Config.Get", {"key": "device.id"}) == "e2e-fs"
            with pytest.raises(RemoteError) as ei:
                await c.call("Config.Get", {"key": "no.such"})
            assert (ei.value.code, ei.value.message) == (404, "invalid config key")
            await c.call("Config.Set", {"config": {"debug": {"level": 3}}, "save": True})
            with pytest.raises(RemoteError, match="invalid config key"):
                await c.call("Config.Set", {"config": {"bogus": 1}})
            for bad_level in ("x", 12, -1, None):  # refused before anything is applied or written
                with pytest.raises(RemoteError) as ei:
                    await c.call("Config.Set", {"config": {"debug": {"level": 1}}, "save": True, "level": bad_level})
                assert (ei.value.code, ei.value.message) == (400, "invalid level (0..9)")
            assert await c.call("Config.Get", {"key": "debug.level"}) == 3
            assert "conf9.json" in await c.call("FS.List")
            assert not any(n.startswith("conf1") or "-" in n for n in await c.call("FS.List"))
        await dev.reboot()
        async with await transports.connect(url) as c:
            assert await c.call("Config.Get", {"key": "debug.level"}) == 3
    finally:
        await dev.stop()


async def test_conf9_survives_update_and_reboot_via_rpc(tmp_path) -> None:
    dev, url = await _dev(tmp_path, "loop", "e2e-conf9")
    try:
        async with await transports.connect(url) as c:
            await c.call("Config.Set", {"config": {"debug": {"level": 4}}, "save": True})
            await push(c, bundle("1.8"))
        await dev.wait_booted(boots=2)
        async with await transports.connect(url) as c:
            assert await c.call("Config.Get", {"key": "debug.level"}) == 4
            assert await c.call("Sys.Reboot", {"delay_ms": 10}) is None
            with pytest.raises(RemoteError, match="invalid delay value"):
                await c.call("Sys.Reboot", {"delay_ms": -1})
        await dev.wait_booted(boots=3)
        # rebooting while uncommitted falls back to the old slot: the boot loader's dirty rule
        assert dev.boot_info is not None and dev.boot_info.version == "1.0"
    finally:
        await dev.stop()
    await asyncio.sleep(0)


async def test_small_fs_image_mounts_and_grows_to_the_partition(tmp_path) -> None:
    from updater.bundle import make_virtual_bundle

    dev, url = await _dev(tmp_path, "loop", "e2e-smallfs")
    small = make_virtual_bundle("esp32", "1.9", fs_size=16384, app_size=8192,
                                fs_files={"conf0.json": b"{}", "index.html": b"hi"})  # fmt: skip
    try:
        async with await transports.connect(url) as c:
            await c.call("FS.Put", {"filename": "conf9.json", "data": base64.b64encode(b'{"debug":{"level":3}}').decode()})
            await push(c, small, commit_timeout=0)
        info = await dev.wait_booted(boots=2)
        assert info.version == "1.9" and not info.reverted
        async with await transports.connect(url) as c:
            assert sorted(await c.call("FS.List")) == ["conf0.json", "conf9.json", "index.html"]
            info_ = await c.call("Sys.GetInfo")
            assert info_["fs_size"] == dev.storage.layout.fs[1].size  # type: ignore[union-attr]
            assert await c.call("Config.Get", {"key": "debug.level"}) == 3
    finally:
        await dev.stop()
