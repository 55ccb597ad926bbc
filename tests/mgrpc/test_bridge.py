"""Bridges: a call and a full OTA through serial -> WebSocket and MQTT -> serial bridges."""

from __future__ import annotations

import pytest

import transports
from mgrpc.wiring import run_bridge
from rpc.errors import RemoteError
from rpc.frame import parse_frame
from tests.device_helpers import bundle, push, start_device
from transports.linkemu import LinkEmulator


@pytest.fixture
def serial_link():
    with LinkEmulator(baud=None) as emu:
        yield emu


async def _check_device_through(url: str, dev, *, version: str) -> None:
    async with await transports.connect(url, timeout_s=10) as c:
        info = await c.call("Sys.GetInfo")
        assert info["id"] == dev.id and info["fw_version"] == "1.0"
        with pytest.raises(RemoteError, match="No handler for Foo.Bar"):
            await c.call("Foo.Bar")
        frame = await c.call_frame("RPC.Ping")
        assert frame.raw is not None and parse_frame(frame.raw).result == {"channel_info": "UART0"}
        assert await push(c, bundle(version)) is None
    booted = await dev.wait_booted(boots=2, timeout_s=20)
    assert booted.version == version


async def test_serial_device_served_on_websocket(tmp_path, serial_link: LinkEmulator) -> None:
    dev = await start_device(tmp_path, "bridged-serial", [f"serial://{serial_link.a_path}"])
    bridge, listeners = await run_bridge(f"serial://{serial_link.b_path}", ["ws://127.0.0.1:0/rpc"])
    try:
        assert bridge.id == "bridged-serial"
        await _check_device_through(listeners[0].url, dev, version="5.1")
        # the bridge reconnects after the device rebooted (its serial port was closed and reopened)
        async with await transports.connect(listeners[0].url, timeout_s=10) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] == "5.1"
            assert await c.call("OTA.Commit") is None
    finally:
        for lst in listeners:
            await lst.close()
        await bridge.close()
        await dev.stop()


async def test_mqtt_clients_reach_a_serial_device(tmp_path, serial_link: LinkEmulator) -> None:
    from tests.mosquitto import Mosquitto, require_mosquitto

    require_mosquitto()
    broker = Mosquitto().start()
    dev = await start_device(tmp_path, "bridged-mqtt", [f"serial://{serial_link.a_path}"])
    bridge, listeners = await run_bridge(f"serial://{serial_link.b_path}", [f"mqtt://127.0.0.1:{broker.port}"])
    try:
        await _check_device_through(f"mqtt://127.0.0.1:{broker.port}/bridged-mqtt", dev, version="5.2")
    finally:
        for lst in listeners:
            await lst.close()
        await bridge.close()
        await dev.stop()
        broker.stop()


async def test_upstream_that_fails_to_start_is_retried() -> None:
    import asyncio

    from rpc.bridge import BridgeNode
    from rpc.errors import TransportError
    from tests.helpers import RecordingChannel

    class FlakyStart(RecordingChannel):
        async def start(self) -> None:
            if attempts == 1:
                raise TransportError("port vanished while opening")

    attempts = 0
    opened: list[FlakyStart] = []

    async def open_upstream() -> FlakyStart:
        nonlocal attempts
        attempts += 1
        ch = FlakyStart()
        opened.append(ch)
        return ch

    bridge = BridgeNode("dev", open_upstream)
    try:
        await asyncio.wait_for(bridge.start(), 10)
        assert attempts == 2 and bridge.upstream is opened[1] and opened[0].closed
    finally:
        await bridge.close()


async def test_run_bridge_cleans_up_when_a_listen_url_fails() -> None:
    from rpc.errors import UsageError
    from rpc.node import Node

    dev = Node(id="leaky")
    dev_lst = await transports.listen("loop://bridge-cleanup-dev", dev)
    try:
        with pytest.raises(UsageError):
            await run_bridge(
                "loop://bridge-cleanup-dev",
                ["loop://bridge-cleanup-front", "udp://127.0.0.1:0?nosuch=1"],
                device_id="leaky",
            )
        # the first listener was closed again (its name is free) and the upstream link is gone
        again = await transports.listen("loop://bridge-cleanup-front", Node(id="x"))
        await again.close()
        assert dev.channels == []
    finally:
        await dev_lst.close()
