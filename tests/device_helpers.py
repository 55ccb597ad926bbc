"""Helpers for tests that run virtual devices."""

from __future__ import annotations

import base64
import functools
from pathlib import Path
from typing import Any

import transports
from rpc.client import AsyncClient
from services.device import VirtualDevice
from updater.bundle import make_virtual_bundle


@functools.lru_cache(maxsize=16)
def bundle(version: str, behavior: str = "ok", arch: str = "esp32") -> bytes:
    """A virtual-device fw.zip (cached: building the LittleFS image takes a moment)."""
    return make_virtual_bundle(arch, version, behavior=behavior)


async def start_device(tmp_path: Path, name: str, urls: list[str], **kw: Any) -> VirtualDevice:
    dev = VirtualDevice(id=name, state_dir=tmp_path / name, listen=urls, listen_fn=transports.listen, **kw)
    await dev.start()
    return dev


async def push(client: AsyncClient, data: bytes, *, commit_timeout: int = 300, chunk: int = 512) -> Any:
    """The mos ota sequence with raw calls (Status, Begin, Write..., End)."""
    status = await client.call("OTA.Status")
    assert status["state"] in (0, 2)
    await client.call("OTA.Begin", {"timeout": 600, "commit_timeout": commit_timeout, "size": len(data)})
    for off in range(0, len(data), chunk):
        await client.call("OTA.Write", {"offset": off, "data": base64.b64encode(data[off : off + chunk]).decode()})
    return await client.call("OTA.End")
