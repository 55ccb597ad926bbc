"""services.ota_http.fetch_update: the download belongs to one update, and ends it when cut off."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from services.device import VirtualDevice
from services.ota import OtaState
from services.ota_http import fetch_update
from tests.device_helpers import bundle
from updater.storage import DeviceStorage


class StallingServer:
    """Serves a bundle: the first half at once, the rest only after :attr:`release` is set."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.half_sent = asyncio.Event()
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(self.data)
        await resp.prepare(request)
        half = len(self.data) // 2
        await resp.write(self.data[:half])
        self.half_sent.set()
        await self.release.wait()
        await resp.write(self.data[half:])
        return resp

    async def start(self) -> StallingServer:
        app = web.Application()
        app.router.add_get("/fw.zip", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/fw.zip"
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def server():
    s = await StallingServer(bundle("5.1")).start()
    yield s
    await s.stop()


@pytest.fixture
async def device(tmp_path):
    dev = VirtualDevice(id="fetch", state_dir=tmp_path / "fetch", storage=DeviceStorage.in_memory())
    await dev.start()
    yield dev
    await dev.stop()


async def _until_some_data_arrived(u) -> None:
    for _ in range(500):  # bounded wait for the first chunks to reach the updater
        if u.written > 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no data arrived")


async def test_cancelled_download_ends_the_update(device: VirtualDevice, server: StallingServer) -> None:
    svc = device.ota
    assert svc is not None
    u = svc.begin(size=None, commit_timeout_s=0, timeout_s=None, source="url")
    task = asyncio.ensure_future(fetch_update(svc, u, server.url))
    await server.half_sent.wait()
    await _until_some_data_arrived(u)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (svc.state, svc.msg) == (OtaState.IDLE, "Update aborted")
    assert device.storage is not None and device.storage.get_boot_state()["active_slot"] == 0
    svc.begin(size=None, commit_timeout_s=0, timeout_s=None)  # another update may start at once


async def test_download_aborted_meanwhile_never_feeds_the_next_update(
    device: VirtualDevice, server: StallingServer
) -> None:
    svc = device.ota
    assert svc is not None
    u = svc.begin(size=None, commit_timeout_s=0, timeout_s=None, source="url")
    task = asyncio.ensure_future(fetch_update(svc, u, server.url))
    await server.half_sent.wait()
    await _until_some_data_arrived(u)
    svc.abort("Update timed out")  # what the no-progress watchdog does
    u2 = svc.begin(size=1000, commit_timeout_s=0, timeout_s=None)  # e.g. mos ota starts a new one
    server.release.set()
    code, message = await task
    assert (code, message) == (-5, "Update timed out")
    assert svc.update is u2 and svc.state == OtaState.PROGRESS
    assert u2.written == 0 and u2.ctx.bytes_processed == 0


async def test_slow_download_is_not_cut_by_an_overall_client_timeout(
    device: VirtualDevice, server: StallingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a stall longer than the update's no-progress timeout may end a download, never its total length."""
    import aiohttp.client

    # Stand-in for aiohttp's default 5-minute total limit, scaled down so the download outlasts it.
    monkeypatch.setattr(aiohttp.client, "DEFAULT_TIMEOUT", aiohttp.ClientTimeout(total=0.2))
    svc = device.ota
    assert svc is not None
    u = svc.begin(size=None, commit_timeout_s=0, timeout_s=None, source="url")
    task = asyncio.ensure_future(fetch_update(svc, u, server.url, finalize=False))
    await server.half_sent.wait()
    await asyncio.sleep(0.5)  # the download is still progressing from the updater's point of view
    server.release.set()
    assert await task == (0, "downloaded")
    assert u.written == len(server.data)


async def test_late_answer_for_an_aborted_update_leaves_the_next_one_alone(device: VirtualDevice) -> None:
    async def not_modified(request: web.Request) -> web.Response:
        return web.Response(status=304)

    app = web.Application()
    app.router.add_get("/fw.zip", not_modified)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        svc = device.ota
        assert svc is not None
        u = svc.begin(size=None, commit_timeout_s=0, timeout_s=None, source="poll")
        svc.abort("Update timed out")  # the watchdog gave up on it before the server answered
        u2 = svc.begin(size=1000, commit_timeout_s=0, timeout_s=None)
        assert await fetch_update(svc, u, f"http://127.0.0.1:{port}/fw.zip") == (1, "Not Modified")
        assert svc.update is u2 and (svc.state, svc.msg) == (OtaState.PROGRESS, "progress")
    finally:
        await runner.cleanup()


async def test_update_timeout_zero_means_no_watchdog(device: VirtualDevice) -> None:
    """``update.timeout = 0`` must not abort every update at once."""
    from services.ota import OtaService

    assert device.fw is not None
    svc = OtaService(device.fw, default_timeout_s=0)
    u = svc.begin(size=None, commit_timeout_s=0, timeout_s=None)
    for _ in range(3):
        await asyncio.sleep(0)  # let a (wrongly) zero-delay watchdog run
    assert svc.state == OtaState.PROGRESS and svc.update is u
    svc.abort()
