"""Inputs the soak's router fuzzer (bench/soak.py) found failing in the device services, kept as tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

import transports
from rpc.errors import RemoteError
from services.device import VirtualDevice
from updater.storage import DeviceStorage


@pytest.fixture
async def client(tmp_path) -> AsyncIterator[object]:
    dev = VirtualDevice(id="esp32_FZ", state_dir=tmp_path, storage=DeviceStorage.in_memory(),
                        listen=[f"loop://fz-{tmp_path.name}"], listen_fn=transports.listen)  # fmt: skip
    await dev.start()
    try:
        async with await transports.connect(dev.urls[0], timeout_s=5) as c:
            yield c
    finally:
        await dev.stop()


async def test_config_get_with_a_level_and_a_key_that_is_not_a_string(client) -> None:
    # {"level":1,"key":{...}} raised AttributeError in the handler ("internal error" 500 and a traceback)
    full = await client.call("Config.Get", {"level": 1, "key": {"src": 419920}})
    assert isinstance(full, dict) and "device" in full
    assert json.dumps(await client.call("Config.Get", {"level": False, "key": {"x": ["%n%s"]}}))


@pytest.mark.parametrize("level", [-1, 10, 2**31])
async def test_config_get_level_out_of_range_is_a_400(client, level: int) -> None:
    # a level of 2**31 made load_levels try to read conf0..conf2147483648.json
    with pytest.raises(RemoteError) as e:
        await client.call("Config.Get", {"level": level})
    assert e.value.code == 400 and "level" in e.value.message
