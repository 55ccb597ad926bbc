"""ota-http-client polling: headers, 304, ignore_same_version, commit timeout, skipped ticks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web

from services.device import VirtualDevice
from services.polling import UpdatePoller, attach_polling, poll_headers
from tests.device_helpers import bundle
from updater.storage import DeviceStorage


class UpdateServer:
    """An update server that answers 304 unless a bundle is assigned; records the request headers."""

    def __init__(self) -> None:
        self.bundle: bytes | None = None
        self.requests: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        if self.bundle is None:
            return web.Response(status=304)
        return web.Response(body=self.bundle, content_type="application/zip")

    async def start(self) -> UpdateServer:
        app = web.Application()
        app.router.add_get("/fw.zip", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/fw.zip"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def server():
    s = await UpdateServer().start()
    yield s
    await s.stop()


async def _device(tmp_path, name: str, conf: dict[str, Any]) -> tuple[VirtualDevice, list[UpdatePoller]]:
    dev = VirtualDevice(id=name, state_dir=tmp_path / name, storage=DeviceStorage.in_memory())
    pollers = attach_polling(dev)

    def configure(node: Any, fw: Any) -> None:
        fw.config.set(conf)

    dev.setup.insert(0, configure)
    await dev.start()
    return dev, pollers


async def _wait(pred, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_headers_and_304_does_nothing(tmp_path, server: UpdateServer) -> None:
    dev, pollers = await _device(tmp_path, "poll-304", {"update": {"url": server.url, "interval": 0}})
    try:
        p = pollers[-1]
        assert await p.poll_once() == (1, "Not Modified")
        h = server.requests[-1]
        assert h["X-MGOS-Device-ID"] == f"poll-304 {dev.fw.mac}"
        assert h["X-MGOS-FW-Version"] == f"esp32 1.0 {dev.fw.build_id}"
        assert h["X-MGOS-FW-Version"] == poll_headers(dev.fw)["X-MGOS-FW-Version"]
        assert dev.boots == 1 and dev.ota.state == 0
    finally:
        await dev.stop()


async def test_interval_polls_and_updates_with_commit_timeout(tmp_path, server: UpdateServer) -> None:
    dev, _pollers = await _device(tmp_path, "poll-upd", {"update": {"url": server.url, "interval": 1,
                                                                   "commit_timeout": 1}})
    try:
        await _wait(lambda: len(server.requests) >= 1)  # the timer polls on its own
        assert dev.boots == 1
        server.bundle = bundle("1.7", "no_commit")
        info = await dev.wait_booted(boots=2, timeout_s=10)
        assert info.version == "1.7" and info.first_boot and info.commit_timeout_s == 1
        # uncommitted: the timer skips its ticks; the commit timeout rolls the device back
        info = await dev.wait_booted(boots=3, timeout_s=10)
        assert info.version == "1.0" and info.slot == 0
    finally:
        await dev.stop()


async def test_same_version_is_ignored(tmp_path, server: UpdateServer) -> None:
    dev, pollers = await _device(tmp_path, "poll-same", {"update": {"url": server.url}})
    try:
        server.bundle = bundle("1.8")
        assert (await pollers[-1].poll_once())[0] == 0
        await dev.wait_booted(boots=2)
        assert dev.fw.version == "1.8"
        p = pollers[-1]
        assert p is not pollers[0]
        code, message = await p.poll_once()  # committed 1.8 (ok firmware, no commit timeout)
        assert code == 1 and "same" in message.lower()
        await asyncio.sleep(0.3)
        assert dev.boots == 2
    finally:
        await dev.stop()


async def test_skips_while_uncommitted_or_busy(tmp_path, server: UpdateServer) -> None:
    dev, pollers = await _device(tmp_path, "poll-skip", {"update": {"url": server.url}})
    try:
        p = pollers[-1]
        dev.ota.begin(size=10, commit_timeout_s=0, timeout_s=None)
        assert await p.poll_once() is None  # an update is running
        dev.ota.abort()
        dev.storage.set_boot_state(is_committed=False)
        assert await p.poll_once() is None
        assert server.requests == []
    finally:
        await dev.stop()


async def test_disabled_without_url_or_interval(tmp_path) -> None:
    dev, pollers = await _device(tmp_path, "poll-off", {"update": {"interval": 5}})
    try:
        assert pollers[-1].start() is False and await pollers[-1].poll_once() is None
    finally:
        await dev.stop()


async def test_bad_status_is_an_error_and_keeps_running_firmware(tmp_path) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=404, text=json.dumps({}))

    app = web.Application()
    app.router.add_get("/x", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    dev, pollers = await _device(tmp_path, "poll-404", {"update": {"url": f"http://127.0.0.1:{port}/x"}})
    try:
        assert await pollers[-1].poll_once() == (-404, "Invalid HTTP response code")
        assert dev.fw.version == "1.0" and dev.ota.state != 1
    finally:
        await dev.stop()
        await runner.cleanup()
