"""ota-http-server on the virtual device: ``curl -F file=@fw.zip http://IP/update`` and friends."""

from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest

import transports
from tests.device_helpers import bundle, start_device


async def _post_file(url: str, data: bytes, **fields: str) -> tuple[int, str]:
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    form.add_field("file", data, filename="fw.zip", content_type="application/zip")
    async with aiohttp.ClientSession() as s, s.post(url, data=form) as resp:
        return resp.status, await resp.text()


async def test_multipart_push_then_commit_endpoint(tmp_path) -> None:
    dev = await start_device(tmp_path, "http-push", ["http://127.0.0.1:0/rpc"])
    base = dev.urls[0].rsplit("/rpc", 1)[0]
    try:
        status, text = await _post_file(f"{base}/update", bundle("4.1"), commit_timeout="120")
        assert (status, text) == (200, "Update applied, finalizing\r\n")
        info = await dev.wait_booted(boots=2)
        assert info.version == "4.1" and info.first_boot and info.commit_timeout_s == 120
        assert dev.ota is not None and dev.storage is not None
        seen_committed: list[bool] = []  # what a progress listener (the shadow status) learns
        dev.ota.on_progress.append(lambda *_: seen_committed.append(dev.storage.is_committed))  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/update/commit") as r:
                assert (r.status, await r.text()) == (200, "Ok\r\n")
            assert seen_committed == [True]  # the commit is announced, as OTA.Commit announces it
            async with s.get(f"{base}/update/commit") as r:  # already committed
                assert (r.status, await r.text()) == (400, "Error\r\n")
        async with await transports.connect(dev.urls[0]) as c:
            assert (await c.call("OTA.GetBootState"))["is_committed"] is True
    finally:
        await dev.stop()


async def test_bad_bundle_push_is_refused_and_revert_endpoint(tmp_path) -> None:
    dev = await start_device(tmp_path, "http-bad", ["http://127.0.0.1:0/rpc"])
    base = dev.urls[0].rsplit("/rpc", 1)[0]
    try:
        status, text = await _post_file(f"{base}/update", bundle("4.2", arch="esp8266"))
        assert status == 500 and text.endswith("Wrong platform\r\n")
        assert dev.boots == 1
        status, _ = await _post_file(f"{base}/update", bundle("4.3"), commit_timeout="60")
        assert status == 200
        await dev.wait_booted(boots=2)
        async with aiohttp.ClientSession() as s, s.get(f"{base}/update/revert") as r:
            assert (r.status, await r.text()) == (200, "Ok\r\n")
        info = await dev.wait_booted(boots=3)
        assert info.version == "1.0"
    finally:
        await dev.stop()


async def test_pull_by_url(tmp_path) -> None:
    from aiohttp import web

    app = web.Application()
    async def fw(request: web.Request) -> web.Response:
        return web.Response(body=bundle("4.4"))

    app.router.add_get("/fw.zip", fw)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    dev = await start_device(tmp_path, "http-pull", ["http://127.0.0.1:0/rpc"])
    base = dev.urls[0].rsplit("/rpc", 1)[0]
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/update") as r:
                assert (r.status, await r.text()) == (400, "Update URL not specified and none is configured.\r\n")
            async with s.get(f"{base}/update", params={"url": f"http://127.0.0.1:{port}/fw.zip"}) as r:
                assert r.status == 200 and "Update applied, finalizing" in await r.text()
        assert (await dev.wait_booted(boots=2)).version == "4.4"
    finally:
        await dev.stop()
        await runner.cleanup()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_form_upload(tmp_path) -> None:
    dev = await start_device(tmp_path, "http-curl", ["http://127.0.0.1:0/rpc"])
    base = dev.urls[0].rsplit("/rpc", 1)[0]
    fw = tmp_path / "fw.zip"
    fw.write_bytes(bundle("4.5"))
    try:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-F", f"file=@{fw}", f"{base}/update", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and out == b"Update applied, finalizing\r\n"
        assert (await dev.wait_booted(boots=2)).version == "4.5"
    finally:
        await dev.stop()


async def test_push_cut_off_mid_upload_aborts_the_update(tmp_path) -> None:
    """A client that goes away mid-upload must not leave the device 'in progress' until the watchdog."""
    dev = await start_device(tmp_path, "http-cut", ["http://127.0.0.1:0/rpc"])
    base = dev.urls[0].rsplit("/rpc", 1)[0]
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    boundary = "mgrpc-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="fw.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode() + bundle("4.6") + f"\r\n--{boundary}--\r\n".encode()
    try:
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /update HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + body[: len(body) // 2]
        )
        await writer.drain()
        assert dev.ota is not None
        for _ in range(250):  # until the device has started the update
            if dev.ota.state == 1:
                break
            await asyncio.sleep(0.02)
        assert dev.ota.state == 1
        writer.close()
        for _ in range(250):  # bounded: the device notices the closed connection
            if dev.ota.state != 1:
                break
            await asyncio.sleep(0.02)
        assert (dev.ota.state, dev.ota.msg) == (0, "Update aborted")
        status, text = await _post_file(f"{base}/update", bundle("4.6"))
        assert (status, text) == (200, "Update applied, finalizing\r\n")
        assert (await dev.wait_booted(boots=2)).version == "4.6"
    finally:
        await dev.stop()


async def test_out_of_range_commit_timeout_is_a_clear_400(tmp_path) -> None:
    dev = await start_device(tmp_path, "http-ct", ["http://127.0.0.1:0/rpc"])
    base = dev.urls[0].rsplit("/rpc", 1)[0]
    try:
        form = aiohttp.FormData()
        form.add_field("file", bundle("4.7"), filename="fw.zip", content_type="application/zip")
        form.add_field("commit_timeout", "99999999999")  # after the file: the update is already running
        async with aiohttp.ClientSession() as s, s.post(f"{base}/update", data=form) as resp:
            assert resp.status == 400 and "commit_timeout" in await resp.text()
        async with aiohttp.ClientSession() as s:
            params = {"url": "http://127.0.0.1:1/fw.zip", "commit_timeout": "99999999999"}
            async with s.get(f"{base}/update", params=params) as r:
                assert r.status == 400 and "commit_timeout" in await r.text()
        assert dev.ota is not None and dev.ota.state != 1  # nothing left running
        status, text = await _post_file(f"{base}/update", bundle("4.7"), commit_timeout="60")
        assert (status, text) == (200, "Update applied, finalizing\r\n")
        assert (await dev.wait_booted(boots=2)).commit_timeout_s == 60
    finally:
        await dev.stop()


@pytest.mark.parametrize("cut", ["half", "before_end"])
async def test_upload_whose_update_was_aborted_never_feeds_the_next_one(tmp_path, cut: str) -> None:
    dev = await start_device(tmp_path, "http-stale", ["http://127.0.0.1:0/rpc"])
    base = dev.urls[0].rsplit("/rpc", 1)[0]
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    boundary = "mgrpc-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="fw.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode() + bundle("4.8") + (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--{boundary}--\r\n'
    ).encode()
    # "half": cut in the middle of the file; "before_end": the file is complete, a later field is
    # not (the update is then aborted between its last chunk and the finalize).
    split = len(body) // 2 if cut == "half" else len(body) - len(boundary) - 10
    want = 1 if cut == "half" else len(bundle("4.8"))
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST /update HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode() + body[:split]
        )
        await writer.drain()
        svc = dev.ota
        assert svc is not None
        for _ in range(250):  # until the device has started the update
            if svc.state == 1 and svc.update is not None and svc.update.written >= want:
                break
            await asyncio.sleep(0.02)
        svc.abort("Update timed out")  # what the no-progress watchdog does
        u2 = svc.begin(size=1000, commit_timeout_s=0, timeout_s=None)  # e.g. mos ota starts a new one
        writer.write(body[split:])
        await writer.drain()
        head = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 500") and b"Update timed out" in head
        assert svc.update is u2 and svc.state == 1 and u2.written == 0
    finally:
        await dev.stop()
