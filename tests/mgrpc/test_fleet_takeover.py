"""Issue #16 (4): a job survives its worker. A worker that takes over another's job drives it from
where the device stands: a push cut mid-transfer goes on (no second flash), a device that already
rebooted into the bundle is only committed, an OTA.Update the dead worker never sent is sent, a commit
it never made is made. The dead worker is simulated: its jobs are written to the database with an
owner that has no heartbeat, as a SIGKILLed worker leaves them; the device's side is made real first
(the first half of the writes, or the whole update) by a client of the test.
(The two-process version with a real kill is tests/mgrpc/test_fleet_workers.py.)
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import transports
from mgrpc.fleet import DeviceRecord, FleetDB, Rollout
from mgrpc.wiring import start_fleet, start_fleet_device
from rpc.host.ota import ota_update
from services.device import VirtualDevice
from tests.device_helpers import bundle
from tests.mosquitto import mosquitto_broker  # noqa: F401  (fixture)
from tests.services.test_shadow import wait_for
from updater.storage import DeviceStorage

GHOST = "ghost"  # the worker that "died": no heartbeat in the database


def _db_with_job(path: Path, dev: DeviceRecord, method: str, events: list[str], **job_fields: Any) -> str:
    """The database as a dead worker left it: the device, the bundle, a rollout whose only job has
    made ``events`` and is owned by GHOST. Returns the rollout id."""
    db = FleetDB(path)
    try:
        db.save_device(dev)
        info = db.add_bundle(bundle("1.1"))
        r = Rollout(id=f"r-{dev.id}", bundle=info.sha, version="1.1", method=method, devices=[dev.id],
                    commit_timeout_s=60)  # fmt: skip
        for event in events:
            r.jobs[dev.id].fire(event)
        r.jobs[dev.id].owner = GHOST
        for k, v in job_fields.items():
            setattr(r.jobs[dev.id], k, v)
        db.save_rollout(r)
        return r.id
    finally:
        db.close()


async def _mqtt_device(broker: str, dev_id: str, boots: Counter[str]) -> Any:
    dev = await start_fleet_device(broker, dev_id, storage=DeviceStorage.in_memory(), start=False)
    dev.on_boot.append(lambda d, info: boots.update([d.id]) if info.first_boot else None)
    await dev.start()
    return dev


async def _finished(fleet: Any, rid: str) -> Any:
    await wait_for(lambda: rid in fleet.app.rollouts and fleet.app.rollouts[rid].state == "finished",
                   timeout_s=90, what="the rollout finished")  # fmt: skip
    return fleet.app.rollouts[rid]


async def test_push_cut_mid_transfer_goes_on_from_the_devices_offset(mosquitto_broker, tmp_path, caplog) -> None:  # noqa: F811
    broker = mosquitto_broker().url().rstrip("/")
    boots: Counter[str] = Counter()
    dev = await _mqtt_device(broker, "half", boots)
    fleet = None
    try:
        data = bundle("1.1")
        client = await transports.connect(f"{broker}/half")  # the dead worker's writes: the first half
        try:
            await client.call("OTA.Begin", {"timeout": 600, "commit_timeout": 60, "size": len(data)})
            half = len(data) // 2 // 2048 * 2048
            for off in range(0, half, 2048):
                await client.call("OTA.Write", {"offset": off, "data": base64.b64encode(data[off:off + 2048]).decode()})
            st = await client.call("OTA.Status")
            assert (st["state"], st["bytes_written"]) == (1, half)
        finally:
            await client.close()
        rid = _db_with_job(tmp_path / "fleet.sqlite", DeviceRecord(id="half", arch="esp32", version="1.0"), "push",
                           ["start", "progress"], done_bytes=half, total_bytes=len(data))  # fmt: skip
        caplog.set_level(logging.WARNING, "mgrpc.fleet")
        fleet = await start_fleet(broker=broker, db_path=tmp_path / "fleet.sqlite")
        r = await _finished(fleet, rid)
        job = r.jobs["half"]
        assert (job.state, job.owner) == ("done", fleet.app.worker_id), job
        assert (dev.fw.version, dev.storage.is_committed) == ("1.1", True)
        assert boots == {"half": 1}  # one flash, one first boot
        assert f"the push resumed at byte {half} of {len(data)}" in caplog.text  # continued, not restarted
        assert f"half taken over in state updating (worker {GHOST} stopped)" in caplog.text
    finally:
        if fleet is not None:
            await fleet.close()
        await dev.stop()


async def test_a_device_already_running_the_bundle_is_only_committed(tmp_path) -> None:
    """A device added by URL (it reports nothing by itself): the dead worker's push went through and
    the device rebooted into 1.1, uncommitted, before the job said so. The new worker asks the device
    (build id), does not flash it again, and commits."""
    boots: Counter[str] = Counter()
    dev = VirtualDevice(id="wsdev", state_dir=tmp_path / "wsdev", listen=["ws://127.0.0.1:0/rpc"],
                        listen_fn=transports.listen, storage=DeviceStorage.in_memory())  # fmt: skip
    dev.on_boot.append(lambda d, info: boots.update([d.id]) if info.first_boot else None)
    await dev.start()
    fleet = None
    try:
        client = await transports.connect(dev.urls[0])
        try:
            await ota_update(client, bundle("1.1"), commit_timeout_s=60)
        finally:
            await client.close()
        await wait_for(lambda: dev.fw.version == "1.1" and boots == {"wsdev": 1}, what="the device rebooted into 1.1")
        assert not dev.storage.is_committed
        rid = _db_with_job(tmp_path / "fleet.sqlite", DeviceRecord(id="wsdev", arch="esp32", version="1.0",
                           source="url", url=dev.urls[0]), "push", ["start", "progress"])  # fmt: skip
        fleet = await start_fleet(broker="", db_path=tmp_path / "fleet.sqlite")
        r = await _finished(fleet, rid)
        assert r.jobs["wsdev"].state == "done", r.jobs["wsdev"]
        assert (dev.fw.version, dev.storage.is_committed) == ("1.1", True)
        assert boots == {"wsdev": 1}  # not flashed a second time
        assert fleet.app.devices["wsdev"].build_id == "20260101-000000/virtual-1.1"
    finally:
        if fleet is not None:
            await fleet.close()
        await dev.stop()


async def test_ota_update_never_sent_is_sent_and_a_commit_never_made_is_made(mosquitto_broker, tmp_path) -> None:  # noqa: F811
    broker = mosquitto_broker().url().rstrip("/")
    boots: Counter[str] = Counter()
    idle = await _mqtt_device(broker, "idle", boots)
    unc = await _mqtt_device(broker, "unc", boots)
    fleet = None
    try:
        # "unc" runs 1.1 uncommitted: the dead worker moved its job to committing and died before OTA.Commit
        client = await transports.connect(f"{broker}/unc")
        try:
            await ota_update(client, bundle("1.1"), commit_timeout_s=60)
        finally:
            await client.close()
        await wait_for(lambda: unc.fw.version == "1.1" and boots == {"unc": 1}, what="unc rebooted into 1.1")
        path = tmp_path / "fleet.sqlite"
        rid_idle = _db_with_job(path, DeviceRecord(id="idle", arch="esp32", version="1.0"), "url", ["start"])
        rid_unc = _db_with_job(path, DeviceRecord(id="unc", arch="esp32", version="1.1", committed=False), "push",
                               ["start", "applied", "online_new"])  # fmt: skip
        fleet = await start_fleet(broker=broker, db_path=path)
        for rid, dev_id in ((rid_idle, "idle"), (rid_unc, "unc")):
            r = await _finished(fleet, rid)
            assert (r.jobs[dev_id].state, r.jobs[dev_id].owner) == ("done", fleet.app.worker_id), r.jobs[dev_id]
        for d in (idle, unc):
            assert (d.fw.version, d.storage.is_committed) == ("1.1", True), d.id
        assert boots == {"idle": 1, "unc": 1}
    finally:
        if fleet is not None:
            await fleet.close()
        for d in (idle, unc):
            await d.stop()


async def test_ota_update_under_way_is_followed_not_sent_again(mosquitto_broker, tmp_path) -> None:  # noqa: F811
    """The dead worker's OTA.Update reached the device, which is downloading (slowly, from another
    server): the new worker sees the download under way (state 1), sends nothing, and the job ends
    with the device's own result."""
    import asyncio

    from aiohttp import web

    broker = mosquitto_broker().url().rstrip("/")
    boots: Counter[str] = Counter()
    dev = await _mqtt_device(broker, "dl", boots)
    data = bundle("1.1")
    served: list[str] = []

    async def slow(request: web.Request) -> web.StreamResponse:
        served.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "application/zip", "Content-Length": str(len(data))})
        await resp.prepare(request)
        for off in range(0, len(data), len(data) // 10 + 1):
            await resp.write(data[off:off + len(data) // 10 + 1])
            await asyncio.sleep(0.3)
        return resp

    app = web.Application()
    app.router.add_get("/fw.zip", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = await transports.connect(f"{broker}/dl")
    call = asyncio.ensure_future(client.call("OTA.Update", {"url": f"http://127.0.0.1:{port}/fw.zip",
                                                            "commit_timeout": 60}, timeout_s=60))  # fmt: skip
    fleet = None
    try:
        await wait_for(lambda: dev.ota.state == 1, what="the device downloading")
        rid = _db_with_job(tmp_path / "fleet.sqlite", DeviceRecord(id="dl", arch="esp32", version="1.0"), "url",
                           ["start"])  # fmt: skip
        fleet = await start_fleet(broker=broker, db_path=tmp_path / "fleet.sqlite")
        r = await _finished(fleet, rid)
        assert (r.jobs["dl"].state, r.jobs["dl"].owner) == ("done", fleet.app.worker_id), r.jobs["dl"]
        assert (dev.fw.version, dev.storage.is_committed) == ("1.1", True)
        # one download (the dead worker's) and one first boot: no second OTA.Update (refused mid-download,
        # it would have failed the job; after the reboot, it would have flashed again)
        assert boots == {"dl": 1} and served == ["/fw.zip"]
    finally:
        call.cancel()
        await client.close()
        if fleet is not None:
            await fleet.close()
        await dev.stop()
        await runner.cleanup()


async def test_a_worker_thought_dead_cannot_move_a_job_another_took() -> None:
    """Fencing: a worker that was silent too long (its jobs taken over) and comes back makes no move
    from its own work on them (a late transfer error, a late 'applied'); device reports still count."""
    from mgrpc.fleet import FleetApp

    db = FleetDB(":memory:")
    try:
        info = db.add_bundle(bundle("1.1"))
        r = Rollout(id="r", bundle=info.sha, version="1.1", method="push", devices=["a"])
        r.jobs["a"].fire("start")
        r.jobs["a"].owner = "w2"  # w2 took it over from w1
        db.save_rollout(r)
        w1 = FleetApp(db, worker_id="w1")
        cached = db.rollout("r")
        assert cached is not None
        job = cached.jobs["a"]
        w1._event(cached, job, "error", error="write failed", owned=True)
        w1._event(cached, job, "applied", owned=True)
        assert (job.state, job.owner) == ("sending", "w2")
        w1._event(cached, job, "progress", done_bytes=10)  # the device's own report: any worker moves it
        stored = db.rollout("r")
        assert stored is not None and (stored.jobs["a"].state, stored.jobs["a"].owner) == ("updating", "w2")
    finally:
        db.close()


@pytest.mark.parametrize("method", ["push", "url"])
async def test_a_silent_device_fails_the_taken_over_job_with_the_reason(tmp_path, method: str) -> None:
    path = tmp_path / "fleet.sqlite"
    rid = _db_with_job(path, DeviceRecord(id="gone", arch="esp32", version="1.0", source="url",
                                          url="ws://127.0.0.1:1/rpc"), method, ["start"])  # fmt: skip
    fleet = await start_fleet(broker="", db_path=path, send_timeout_s=2.0)
    try:
        r = await _finished(fleet, rid)
        job = r.jobs["gone"]
        assert job.state == "failed" and "taken over after its worker stopped, but the device stayed silent" in job.error
        assert "no answer:" in job.error, job.error
    finally:
        await fleet.close()
