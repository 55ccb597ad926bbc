"""Issue #16 (1): devices appear on the dashboard as soon as they are on its broker.

Plain ``mgrpc device --listen mqtt://...`` processes announce themselves (retained birth message,
last will), a device that only speaks the shadow protocol (as Mongoose OS devices do) is found by
its own shadow requests, and a killed device shows offline without waiting for anything but the
broker.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest

from mgrpc.wiring import start_fleet
from tests.mgrpc.cli_proc import DeviceProc
from tests.mosquitto import mosquitto_broker  # noqa: F401  (fixture)
from tests.services.test_shadow import wait_for
from transports.mqttconn import open_connection


@pytest.fixture
async def fleet(mosquitto_broker, tmp_path):  # noqa: F811
    broker = mosquitto_broker().url()
    f = await start_fleet(broker=broker, db_path=tmp_path / "fleet.sqlite")
    f.broker = broker.rstrip("/")  # type: ignore[attr-defined]
    yield f
    await f.close()


@pytest.mark.timeout(120)
async def test_four_plain_cli_devices_appear_and_a_killed_one_goes_offline(fleet, tmp_path) -> None:
    ids = [f"cli-{i}" for i in range(4)]

    def start(dev_id: str) -> DeviceProc:
        return DeviceProc.device(tmp_path / dev_id, fleet.broker, id=dev_id)

    procs: list[DeviceProc] = []
    try:
        for p in await asyncio.gather(*(asyncio.to_thread(start, i) for i in ids)):
            procs.append(p)
        # what `mgrpc device` prints is still the URL a client passes as --port
        assert sorted(p.urls[0] for p in procs) == sorted(f"{fleet.broker}/{i}" for i in ids)
        await wait_for(lambda: all(i in fleet.app.devices and fleet.app.devices[i].online for i in ids),
                       what="the four CLI devices online on the dashboard")  # fmt: skip
        d = fleet.app.devices["cli-0"]
        assert (d.version, d.arch, d.presence, d.url) == ("1.0", "esp32", "status", f"{fleet.broker}/cli-0")
        # a clean stop says offline; a killed process gets its last will published by the broker
        procs[1].stop()
        procs[2].proc.send_signal(signal.SIGKILL)
        await wait_for(lambda: not fleet.app.devices["cli-1"].online and not fleet.app.devices["cli-2"].online,
                       timeout_s=10, what="stopped and killed devices offline")  # fmt: skip
        assert fleet.app.devices["cli-0"].online and fleet.app.devices["cli-3"].online
        # the dashboard's RPC path reaches a discovered device (it is updatable, not just listed)
        info = await fleet.app.rpc_connect(fleet.app.device_url(fleet.app.devices["cli-3"]))
        try:
            assert (await info.call("Sys.GetInfo", timeout_s=10))["id"] == "cli-3"
        finally:
            await info.close()
    finally:
        for p in procs:
            p.stop()


async def test_a_shadow_only_device_is_discovered(fleet) -> None:
    conn = await open_connection(fleet.broker, client_id="mos-like")
    try:
        # an operator's desired update does not make a device
        await conn.publish("$aws/things/ghost/shadow/update", json.dumps({"state": {"desired": {"x": 1}}}), qos=1)
        # Mongoose OS ota-shadow reports fw_version/fw_id/app under reported.ota
        report = {"state": {"reported": {"ota": {"fw_version": "2.19.1", "fw_id": "20240101-x", "app": "demo-c",
                                                 "code": 0, "message": "idle"}}}}  # fmt: skip
        await conn.publish("$aws/things/mos-1/shadow/update", json.dumps(report), qos=1)
        await wait_for(lambda: "mos-1" in fleet.app.devices, timeout_s=10, what="shadow device discovered")
        d: Any = fleet.app.devices["mos-1"]
        assert (d.online, d.presence, d.version, d.build_id, d.app) == (True, "shadow", "2.19.1", "20240101-x",
                                                                        "demo-c")  # fmt: skip
        assert fleet.app.device_url(d) == f"{fleet.broker}/mos-1"
        assert "ghost" not in fleet.app.devices
        # persisted like any other device
        assert "mos-1" in {x.id for x in fleet.app.db.devices()}
    finally:
        await conn.close()


async def test_devices_show_offline_while_the_broker_is_away(mosquitto_broker, tmp_path) -> None:  # noqa: F811
    from mgrpc.wiring import start_fleet_device
    from updater.storage import DeviceStorage

    broker = mosquitto_broker()
    f = await start_fleet(broker=broker.url(), db_path=tmp_path / "fleet.sqlite")
    try:
        f.devices.append(await start_fleet_device(broker.url(), "b0", storage=DeviceStorage.in_memory()))
        await wait_for(lambda: "b0" in f.app.devices and f.app.devices["b0"].online, what="online")
        broker.stop()
        await wait_for(lambda: not f.app.devices["b0"].online, timeout_s=10, what="unknown = offline")
        broker.start()
        await wait_for(lambda: f.app.devices["b0"].online, timeout_s=40, what="online again after reconnect")
    finally:
        await f.close()


async def test_a_late_offline_from_an_earlier_boot_does_not_leave_a_device_offline(fleet) -> None:
    """The previous boot's last will (or its "offline" on the old connection) can reach the broker
    after the new boot's birth message: the dashboard ignores it, and the device says online again
    so the retained status is right for the next dashboard too."""
    from mgrpc.wiring import start_fleet_device
    from updater.storage import DeviceStorage

    dev = await start_fleet_device(fleet.broker, "late0", storage=DeviceStorage.in_memory())
    fleet.devices.append(dev)
    await wait_for(lambda: "late0" in fleet.app.devices and fleet.app.devices["late0"].online, what="online")
    await dev.reboot()
    await wait_for(lambda: fleet.app.devices["late0"].boots == dev.boots and fleet.app.devices["late0"].online,
                   what="online after the reboot")  # fmt: skip
    seen: list[dict[str, Any]] = []
    conn = await open_connection(fleet.broker, client_id="old-session")
    try:
        await conn.subscribe("late0/status", lambda m: seen.append(json.loads(m.payload)), qos=1)
        stale = {"online": False, "id": "late0", "boots": dev.boots - 1}
        await conn.publish("late0/status", json.dumps(stale), qos=1, retain=True)
        await wait_for(lambda: len(seen) >= 3 and seen[-1]["online"], timeout_s=10, what="the device says online again")
        assert fleet.app.devices["late0"].online
    finally:
        await conn.close()
