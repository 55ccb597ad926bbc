"""The chunk size ``mgrpc ota`` picks, checked against the real Mongoose OS firmware (../shared/mgos-ubuntu).

It has no OTA service, but every frame it takes in is answered (``OTA.Write`` with 404 "No handler"),
so 20 ``OTA.Write`` frames of the chosen size in flight, all answered, show the size and the default
window pass its WebSocket and UART receive paths; one step bigger over WebSocket is not answered
(Mongoose OS's 3064-byte message limit, the reason the link limit exists).
"""

from __future__ import annotations

import asyncio
import base64

import pytest

import transports
from rpc.client import AsyncClient
from rpc.errors import RemoteError, RpcTimeout
from rpc.host.ota import CHUNK_STEP, DEFAULT_WINDOW, device_frame_limit, fitted_chunk_size
from tests.real_device import real_device  # noqa: F401  (a pytest fixture)

SIZE = 300_000  # a bundle of this size: offsets of six digits


async def _writes(client: AsyncClient, chunk: int, n: int, *, timeout_s: float) -> list[object]:
    data = base64.b64encode(bytes(chunk)).decode()
    calls = [client.call("OTA.Write", {"offset": SIZE - chunk, "data": data}, timeout_s=timeout_s) for _ in range(n)]
    return await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.parametrize("link", ["ws", "serial"])
async def test_chosen_chunk_size_passes_the_real_firmware(real_device, link: str) -> None:  # noqa: F811
    dev = real_device()
    url = dev.ws_url if link == "ws" else f"serial://{dev.tty}"
    client = await transports.connect(url, timeout_s=10)
    try:
        limit = await device_frame_limit(client)
        assert limit == 4096
        chunk = fitted_chunk_size(client, limit, total_size=SIZE)
        assert chunk == (2048 if link == "ws" else 2816)
        answers = await _writes(client, chunk, DEFAULT_WINDOW, timeout_s=10)
        assert all(isinstance(a, RemoteError) and a.code == 404 for a in answers), answers
        if link == "ws":
            (lost,) = await _writes(client, chunk + 2 * CHUNK_STEP, 1, timeout_s=2)
            assert isinstance(lost, RpcTimeout)
    finally:
        await client.close()
