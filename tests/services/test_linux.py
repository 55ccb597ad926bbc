"""services.linux.LinuxDevice in process (its boot loader local, no supervisor): OTA.Update pulls a
bundle into the other slot, FS.* and Config.* stay inside the data directory, a reboot ends run()."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from aiohttp import web

import transports
from rpc.errors import RemoteError
from services.linux import LinuxDevice
from updater.bundle import BundlePart, build_bundle
from updater.fsslots import FsSlots, FsSlotStorage, LocalControl, pack_files


def _device(tmp_path: Path, name: str) -> tuple[FsSlots, LinuxDevice]:
    src = tmp_path / "app"
    src.mkdir()
    (src / "main.py").write_text("print('v1')\n")
    slots = FsSlots(tmp_path / "slots")
    slots.provision(src, version="1.0")
    info = slots.boot()
    st = FsSlotStorage(slots.root, running_slot=info.slot, control=LocalControl(slots, info.slot))
    dev = LinuxDevice(id=name, listen=[f"loop://{name}"], listen_fn=transports.listen, storage=st, env={})
    return slots, dev


async def test_pull_update_fs_and_config(tmp_path: Path) -> None:
    slots, dev = _device(tmp_path, f"lx-{tmp_path.name}")
    fw = build_bundle(platform="linux", version="2.0",
                      parts=[BundlePart("app", pack_files({"main.py": b"print('v2')\n"}), {"type": "app"})])  # fmt: skip
    app = web.Application()
    async def serve_fw(request: web.Request) -> web.Response:
        return web.Response(body=fw)

    app.router.add_get("/fw.zip", serve_fw)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await dev.start()
    served = asyncio.ensure_future(dev.serve())
    try:
        async with await transports.connect(dev.urls[0], timeout_s=10) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "1.0"
            await c.call("FS.Put", {"filename": "notes.txt", "data": base64.b64encode(b"hi").decode()})
            await c.call("Config.Set", {"config": {"device": {"location": "roof"}}, "save": True})
            with pytest.raises(RemoteError):
                await c.call("FS.Put", {"filename": "../escape.txt", "data": base64.b64encode(b"no").decode()})
            frame = await c.call_frame("OTA.Update", {"url": f"http://127.0.0.1:{port}/fw.zip", "commit_timeout": 30})
            assert frame.error is not None and (frame.error.code, frame.error.message) == (
                0, "Update applied, finalizing",
            )  # fmt: skip
        assert await asyncio.wait_for(served, 10) == "reboot"
    finally:
        await dev.close()
        await runner.cleanup()
    data = slots.data_dir(0)
    assert (data / "notes.txt").read_bytes() == b"hi" and (data / "conf9.json").exists()
    assert not (tmp_path / "slots" / "slot0" / "escape.txt").exists()
    info = slots.boot()
    assert (info.slot, info.version, info.first_boot, info.commit_timeout_s) == (1, "2.0", True, 30)
    assert (slots.data_dir(1) / "notes.txt").read_bytes() == b"hi"  # app-only update: the data came along
    assert (slots.app_dir(1) / "main.py").read_bytes() == b"print('v2')\n"
