"""Device shadow: document model, the SQLite shadow service, and shadow OTA for 50 virtual devices
through mosquitto (10 of them offline when the URL is set; a hanging bundle rolled back)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from mgrpc.shadow_server import ShadowStore
from mgrpc.wiring import start_fleet, start_fleet_device
from services.shadow import ShadowDocument, ShadowError, ShadowTopics, delta_of, merge_state, parse_shadow_topic
from tests.mosquitto import mosquitto_broker  # noqa: F401  (fixture)
from tests.netfaults import Gate, descriptors_above_1023
from updater.bundle import make_virtual_bundle
from updater.storage import DeviceStorage


async def wait_for(pred, *, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail with ``what`` after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_update_aborted_while_reporting_does_not_finish_the_next_one(tmp_path) -> None:
    """Between the download and finish() the agent awaits its report; if the update is aborted
    then (watchdog, stack stopping) and another starts, finish() must not act on that one."""
    from aiohttp import web

    from services.device import VirtualDevice
    from services.shadow import DeviceAgent

    data = make_virtual_bundle("esp32", "7.1")

    async def fw(request: web.Request) -> web.Response:
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/fw.zip", fw)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    dev = VirtualDevice(id="race", state_dir=tmp_path / "race", storage=DeviceStorage.in_memory())
    reported: list[dict[str, Any]] = []
    others: list[Any] = []

    class FakeConn:
        async def subscribe(self, *a: Any, **kw: Any) -> None:
            pass

        def publish_nowait(self, topic: str, payload: bytes, **kw: Any) -> asyncio.Future[None]:
            obj = json.loads(payload)
            ota = ((obj.get("state") or {}).get("reported") or {}).get("ota") if isinstance(obj, dict) else None
            if ota is not None:
                reported.append(ota)
                if ota.get("message") == "Update applied, finalizing" and dev.ota is not None:
                    dev.ota.abort("Update timed out")  # the watchdog fires meanwhile ...
                    others.append(dev.ota.begin(size=1000, commit_timeout_s=0, timeout_s=None))  # ... mos ota
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

        async def close(self) -> None:
            pass

    async def connect(url: str) -> Any:
        return FakeConn()

    agent = DeviceAgent(dev, agent_url="mqtt://fake/race", connect=connect, shadow_ota=False)
    dev.listen_urls, dev.listen_fn = ["mqtt://fake/race"], agent.listen
    await dev.start()
    try:
        assert agent.session is not None and dev.ota is not None
        await agent.session._update(f"http://127.0.0.1:{port}/fw.zip", 60, None, {})
        assert others and dev.ota.update is others[0] and dev.ota.state == 1  # the other update runs on
        assert reported[-1]["code"] < 0 and "Update timed out" in reported[-1]["message"]
        assert dev.storage is not None and dev.storage.get_boot_state()["active_slot"] == 0
    finally:
        await dev.stop()
        await runner.cleanup()


async def test_update_cancelled_while_reporting_is_not_saved_as_applied(tmp_path) -> None:
    from aiohttp import web

    from services.device import VirtualDevice
    from services.shadow import STATE_FILE, DeviceAgent

    data = make_virtual_bundle("esp32", "7.2")

    async def fw(request: web.Request) -> web.Response:
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/fw.zip", fw)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    dev = VirtualDevice(id="cancel", state_dir=tmp_path / "cancel", storage=DeviceStorage.in_memory())
    held: list[asyncio.Future[None]] = []

    class SlowConn:  # the broker never acknowledges the "applied" report
        async def subscribe(self, *a: Any, **kw: Any) -> None:
            pass

        def publish_nowait(self, topic: str, payload: bytes, **kw: Any) -> asyncio.Future[None]:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if b"Update applied" in payload:
                held.append(fut)
            else:
                fut.set_result(None)
            return fut

        async def close(self) -> None:
            pass

    async def connect(url: str) -> Any:
        return SlowConn()

    agent = DeviceAgent(dev, agent_url="mqtt://fake/cancel", connect=connect, shadow_ota=False)
    dev.listen_urls, dev.listen_fn = ["mqtt://fake/cancel"], agent.listen
    await dev.start()
    try:
        assert agent.session is not None and dev.fw is not None
        task = asyncio.ensure_future(agent.session._update(f"http://127.0.0.1:{port}/fw.zip", 60, None, {}))
        await wait_for(lambda: bool(held), timeout_s=10, what="the applied report")
        task.cancel()  # what the agent's close() does when the stack stops
        with pytest.raises(asyncio.CancelledError):
            await task
        assert json.loads(dev.fw.fs.read(STATE_FILE))["phase"] == "failed"
    finally:
        await dev.stop()
        await runner.cleanup()


# -- the document model and the store ------------------------------------------------------------


def test_topics_and_parsing() -> None:
    t = ShadowTopics("dev1")
    assert t.update == "$aws/things/dev1/shadow/update"
    assert t.update_delta == "$aws/things/dev1/shadow/update/delta"
    assert t.get_accepted == "$aws/things/dev1/shadow/get/accepted"
    assert parse_shadow_topic("$aws/things/dev1/shadow/update/delta") == ("dev1", "update/delta")
    assert parse_shadow_topic("$aws/things/dev1/shadow/nope") is None
    assert parse_shadow_topic("dev1/status") is None


def test_merge_delete_and_delta() -> None:
    base = {"ota": {"url": "a", "code": 0}, "x": 1}
    assert merge_state(base, {"ota": {"code": None, "message": "m"}, "y": {"z": 2}}) == {
        "ota": {"url": "a", "message": "m"}, "x": 1, "y": {"z": 2},
    }  # fmt: skip
    assert base == {"ota": {"url": "a", "code": 0}, "x": 1}  # not modified in place
    assert delta_of({"ota": {"url": "b", "ct": 5}, "x": 1}, {"ota": {"url": "a", "ct": 5}, "x": 1}) == {
        "ota": {"url": "b"}
    }


def test_document_versions_and_rejections() -> None:
    doc = ShadowDocument()
    acc = doc.apply({"state": {"desired": {"ota": {"url": "u1"}}}, "clientToken": "t"}, now=5)
    assert acc == {"state": {"desired": {"ota": {"url": "u1"}}}, "version": 1, "timestamp": 5, "clientToken": "t"}
    assert doc.delta == {"ota": {"url": "u1"}}
    doc.apply({"state": {"reported": {"ota": {"url": "u1"}}}})
    assert doc.delta == {} and "delta" not in doc.to_json()["state"]
    with pytest.raises(ShadowError) as ei:
        doc.apply({"state": {"desired": {"a": 1}}, "version": 1})
    assert ei.value.code == 409 and doc.desired == {"ota": {"url": "u1"}}
    for bad in ({}, {"state": 3}, {"state": {"wanted": {}}}, {"state": {"desired": 5}}):
        with pytest.raises(ShadowError) as ei:
            doc.apply(bad)
        assert ei.value.code == 400
    assert doc.version == 2
    assert ShadowDocument.from_json(doc.to_json()) == doc


def test_store_answers_and_persists(tmp_path) -> None:
    path = tmp_path / "shadow.sqlite"
    store = ShadowStore(path, clock=lambda: 100)
    t = ShadowTopics("d1")
    out = dict(store.handle(t.get, b""))
    assert json.loads(out[t.get_rejected])["code"] == 404
    out = dict(store.handle(t.update, b'{"state":{"desired":{"ota":{"url":"http://x/fw.zip"}}}}'))
    assert json.loads(out[t.update_accepted])["version"] == 1
    assert json.loads(out[t.update_delta]) == {"state": {"ota": {"url": "http://x/fw.zip"}}, "version": 1,
                                               "timestamp": 100}  # fmt: skip
    assert t.update_documents in out
    out = dict(store.handle(t.update, b"{not json"))
    assert json.loads(out[t.update_rejected]) == {"code": 400, "message": "Invalid JSON"}
    # a reported-only update publishes no delta
    out = dict(store.handle(t.update, b'{"state":{"reported":{"fw":{"version":"1.0"}}}}'))
    assert t.update_delta not in out
    store.close()
    store = ShadowStore(path)  # reopened: the document survived
    out = dict(store.handle(t.get, b'{"clientToken":"c"}'))
    doc = json.loads(out[t.get_accepted])
    assert doc["version"] == 2 and doc["clientToken"] == "c"
    assert doc["state"]["delta"] == {"ota": {"url": "http://x/fw.zip"}}
    assert store.things() == ["d1"]
    assert t.delete_accepted in dict(store.handle(t.delete, b""))
    assert store.get("d1") is None
    store.close()


# -- shadow OTA through mosquitto ----------------------------------------------------------------

N_DEVICES = 50
N_OFFLINE = 10


@pytest.mark.timeout(120)
async def test_shadow_update_reaches_50_devices_and_hang_is_rolled_back(mosquitto_broker, tmp_path) -> None:  # noqa: F811
    broker = mosquitto_broker().url()
    fleet = await start_fleet(broker=broker, db_path=tmp_path / "fleet.sqlite")
    app = fleet.app
    devices: list[Any] = []
    try:
        for i in range(N_DEVICES):
            devices.append(await start_fleet_device(broker, f"sh{i:02d}", storage=DeviceStorage.in_memory()))
        ids = [d.id for d in devices]
        await wait_for(lambda: sum(1 for d in app.devices.values() if d.online) == N_DEVICES,
                       what="all devices online")  # fmt: skip
        offline = devices[-N_OFFLINE:]
        for d in offline:
            await d.stop()
        await wait_for(lambda: sum(1 for d in app.devices.values() if d.online) == N_DEVICES - N_OFFLINE,
                       what="10 devices offline")  # fmt: skip

        # 1. a good bundle by shadow to all 50; 10 are offline
        good = app.db.add_bundle(make_virtual_bundle("esp32", "1.1"), filename="fw-1.1.zip")
        r = app.start_rollout(devices=ids, bundle=good.sha, method="shadow", commit_timeout_s=15, autocommit=True)
        on_ids = ids[: N_DEVICES - N_OFFLINE]
        await wait_for(lambda: all(r.jobs[i].state == "done" for i in on_ids), timeout_s=60, what="online done")
        assert all(r.jobs[d.id].state == "sending" for d in offline)  # waiting in their shadows
        assert r.state == "running"
        for d in offline:
            await d.start()  # they come online later and find desired.ota.url
        await wait_for(lambda: r.state == "finished", timeout_s=60, what="rollout finished")
        assert r.summary() == {"done": N_DEVICES}
        for d in devices:
            assert d.fw.version == "1.1" and d.storage.is_committed, d.id
            rec = app.devices[d.id]
            assert (rec.version, rec.committed, rec.online) == ("1.1", True, True)
        url = app.bundle_url(r)
        doc = fleet.shadow.store.get("sh45")
        assert doc.reported["ota"]["url"] == url and doc.delta == {}  # success clears the delta
        boots_before = {d.id: d.boots for d in devices}

        # 2. a bundle that hangs on boot, staged: 5 first, stop if more than 0 fail
        hang = app.db.add_bundle(make_virtual_bundle("esp32", "1.2", behavior="hang"), filename="fw-hang.zip")
        r2 = app.start_rollout(devices=ids, bundle=hang.sha, method="shadow", commit_timeout_s=2, autocommit=True,
                               stage_size=5, max_failures=0)  # fmt: skip
        first = ids[:5]
        await wait_for(lambda: r2.state == "halted" and all(r2.jobs[i].terminal for i in first), timeout_s=60,
                       what="staged rollout halted, its first stage finished")  # fmt: skip
        for dev_id in first:
            job = r2.jobs[dev_id]
            assert job.state == "rolled_back", (dev_id, job)
            assert "rolled back to 1.1" in job.error
        assert r2.summary() == {"rolled_back": 5, "skipped": N_DEVICES - 5}
        for d in devices:
            assert d.fw.version == "1.1" and d.storage.is_committed, d.id
            if d.id not in first:
                assert d.boots == boots_before[d.id]  # never got the hanging bundle
            else:
                assert d.boots == boots_before[d.id] + 2  # into 1.2 (hung), back to 1.1
        # the device reported the rollback in its shadow; the delta stays (the failure is not cleared)
        doc = fleet.shadow.store.get(first[0])
        assert doc.reported["ota"]["code"] == -1 and "Rolled back" in doc.reported["ota"]["message"]
        assert "ota" in doc.delta
        # and the dashboard says so
        async with aiohttp.ClientSession() as s, s.get(fleet.url + "/api/state") as resp:
            state = await resp.json()
        shown = next(x for x in state["rollouts"] if x["id"] == r2.id)
        assert shown["state"] == "halted"
        assert {d: j["state"] for d, j in shown["jobs"].items() if d in first} == dict.fromkeys(first, "rolled_back")
    finally:
        for d in devices:
            await d.stop()
        await fleet.close()


async def test_failed_download_reports_error_and_keeps_delta(mosquitto_broker, tmp_path) -> None:  # noqa: F811
    broker = mosquitto_broker().url()
    fleet = await start_fleet(broker=broker, db_path=":memory:")
    dev = await start_fleet_device(broker, "shfail", storage=DeviceStorage.in_memory())
    try:
        await wait_for(lambda: "shfail" in fleet.app.devices and fleet.app.devices["shfail"].online)
        url = fleet.url + "/fw/" + "0" * 64 + ".zip"
        await fleet.shadow.update_desired("shfail", {"ota": {"url": url}})
        await wait_for(lambda: (fleet.shadow.store.get("shfail").reported.get("ota") or {}).get("code", 0) < 0,
                       what="error report")  # fmt: skip
        doc = fleet.shadow.store.get("shfail")
        assert doc.reported["ota"] == {"code": -404, "message": "-404 Invalid HTTP response code"}
        assert doc.delta == {"ota": {"url": url}}
        assert dev.boots == 1 and dev.fw.version == "1.0"
        # the same URL again is not retried (it is saved); a reboot does not retry it either
        await dev.reboot()
        await asyncio.sleep(0.5)
        assert dev.boots == 2 and dev.ota.state != 1
    finally:
        await dev.stop()
        await fleet.close()


async def test_device_boots_without_broker_and_connects_later(mosquitto_broker, tmp_path) -> None:  # noqa: F811
    mq = mosquitto_broker()
    broker = mq.url()
    fleet = await start_fleet(broker=broker, db_path=":memory:")
    mq.stop()
    dev = await start_fleet_device(broker, "late", storage=DeviceStorage.in_memory())
    try:
        assert dev.boots == 1 and dev.node is not None  # booted and serving, MQTT still away
        assert "late" not in fleet.app.devices
        mq.start()
        await wait_for(lambda: "late" in fleet.app.devices and fleet.app.devices["late"].online, timeout_s=30,
                       what="the device online after the broker came back")  # fmt: skip
        await wait_for(lambda: dev.agent.session.shadow_ok, what="a shadow round trip")
    finally:
        await dev.stop()
        await fleet.close()


async def test_device_keeps_trying_a_broker_that_drops_its_connections(mosquitto_broker) -> None:  # noqa: F811
    """The broker closes the first connections at once (as an overloaded one may): the device
    keeps trying, with backoff, until its session starts and it answers RPC over MQTT."""
    import transports

    mq = mosquitto_broker()
    async with Gate(mq.port, plan=["drop"] * 4) as gate:
        dev = await start_fleet_device(gate.url().rstrip("/"), "dropped", storage=DeviceStorage.in_memory())
        try:
            await wait_for(lambda: dev.agent.session.conn is not None and dev.agent.session.conn.ready,
                           what="the device's MQTT session")  # fmt: skip
            assert gate.accepted >= 5 and not gate.plan  # four dropped, then through
            async with await transports.connect(mq.url("dropped"), timeout_s=10) as c:
                assert (await c.call("Sys.GetInfo"))["id"] == "dropped"
        finally:
            await dev.stop()


async def test_device_with_descriptors_above_1023_comes_back_after_reboots(mosquitto_broker) -> None:  # noqa: F811
    """Issue #16: with 250 virtual devices in one process, ~3 % never came back after their reboot,
    their new sockets being numbered above 1023 (paho's select() loop cannot watch those). Here every
    socket of the device is numbered so."""
    import transports

    mq = mosquitto_broker()
    with descriptors_above_1023():
        dev = await start_fleet_device(mq.url().rstrip("/"), "high", storage=DeviceStorage.in_memory())
        try:
            for boots in (1, 2, 3):
                await wait_for(lambda b=boots: dev.boots == b and dev.agent.sessions == b and  # type: ignore[misc]
                               dev.agent.session.conn is not None and dev.agent.session.conn.ready,
                               what=f"the device's MQTT session of boot {boots}")  # fmt: skip
                async with await transports.connect(mq.url("high"), timeout_s=10) as c:
                    assert (await c.call("Sys.GetInfo"))["id"] == "high"
                if boots < 3:
                    dev.schedule_reboot(0.0)
        finally:
            await dev.stop()
