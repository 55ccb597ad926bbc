"""Deflated bundles (an mgrpc extension): refused by default, as a stock device does; accepted with
``update.allow_deflate`` -- the firmware then travels in fewer bytes than it has."""

from __future__ import annotations

import io

import pytest

import transports
from rpc.host.ota import OtaError, ota_update
from tests.device_helpers import start_device
from updater.bundle import write_virtual_bundle


def _bundle(version: str, *, compress: bool) -> bytes:
    out = io.BytesIO()
    write_virtual_bundle(out, "esp32", version, app_size=65536, fs_size=16384, compress=compress)
    return out.getvalue()


async def test_deflated_bundle_refused_by_default_accepted_when_allowed(tmp_path) -> None:
    dev = await start_device(tmp_path, "deflate", ["loop://deflate-dev"])
    try:
        packed, plain = _bundle("2.0", compress=True), _bundle("2.0", compress=False)
        assert len(packed) < len(plain)
        async with await transports.connect("loop://deflate-dev", timeout_s=10) as c:
            with pytest.raises(OtaError, match="Cannot handle compressed .zip"):
                await ota_update(c, packed)
            await c.call("Config.Set", {"config": {"update": {"allow_deflate": True}}})
            res = await ota_update(c, packed)
            await res.client.close()
        info = await dev.wait_booted(boots=2)
        assert info.version == "2.0"
    finally:
        await dev.stop()
