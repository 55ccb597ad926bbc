"""Fleet dashboard: rollout state machine and staging, the model, the HTTP API, and every OTA method
(push, OTA.Update, shadow, polling) end to end through mosquitto, plus a device added by URL."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import aiohttp
import pytest

import transports
from mgrpc.fleet import FleetDB, FleetError, InvalidTransition, Job, Rollout, bundle_info
from mgrpc.wiring import start_fleet, start_fleet_device
from services.device import VirtualDevice
from tests.device_helpers import bundle
from tests.mosquitto import mosquitto_broker  # noqa: F401  (fixture)
from tests.services.test_shadow import wait_for
from updater.storage import DeviceStorage

# -- rollout logic (sans-I/O) --------------------------------------------------------------------


def _finish(r: Rollout, dev: str, *, ok: bool) -> None:
    j = r.jobs[dev]
    j.fire("applied")
    j.fire("online_new" if ok else "online_old")
    if ok:
        j.fire("committed")


def test_job_moves_and_invalid_moves() -> None:
    j = Job("d")
    assert j.fire("start") == "sending"
    assert j.fire("progress") == "updating" and j.percent == 0
    j.done_bytes, j.total_bytes = 50, 200
    assert j.percent == 25
    assert j.fire("applied") == "rebooting" and j.percent == 100
    assert not j.can("start")
    with pytest.raises(InvalidTransition):
        j.fire("start")
    assert j.fire("online_old") == "rolled_back" and j.terminal
    assert Job.from_json(j.to_json()) == j


def test_staged_rollout_halts_after_too_many_failures_in_first_stage() -> None:
    r = Rollout(id="r", bundle="b", version="2", method="shadow", devices=[f"d{i}" for i in range(6)],
                stage_size=2, max_failures=0)  # fmt: skip
    assert r.startable() == ["d0", "d1"]
    for d in ("d0", "d1"):
        r.jobs[d].fire("start")
    assert r.startable() == []
    _finish(r, "d0", ok=False)  # one failure > 0: stop at once
    assert r.startable() == [] and r.state == "halted"
    assert r.summary() == {"rolled_back": 1, "sending": 1, "skipped": 4}


def test_staged_rollout_continues_when_first_stage_is_good_and_respects_concurrency() -> None:
    r = Rollout(id="r", bundle="b", version="2", method="push", devices=[f"d{i}" for i in range(6)],
                stage_size=2, max_failures=1, concurrency=3)  # fmt: skip
    for d in r.startable():
        r.jobs[d].fire("start")
    _finish(r, "d0", ok=True)
    assert r.startable() == []  # d1 still running: the first stage is not over
    _finish(r, "d1", ok=False)  # 1 failure is allowed
    nxt = r.startable()
    assert nxt == ["d2", "d3", "d4"]  # concurrency 3
    for d in nxt:
        r.jobs[d].fire("start")
    assert r.startable() == []
    r.jobs["d2"].fire("error")  # the second failure: more than 1, stop
    assert r.startable() == [] and r.state == "halted" and r.jobs["d5"].state == "skipped"
    assert Rollout.from_json(r.to_json()).to_json() == r.to_json()


def test_rollout_bad_input() -> None:
    from mgrpc.errors import AppError

    cases: list[tuple[dict[str, Any], str]] = [
        ({"method": "carrier-pigeon"}, "unknown method 'carrier-pigeon'"), ({"devices": []}, "no devices selected"),
        ({"devices": ["a", "a"]}, "selected twice"), ({"stage_size": -1}, "stage_size must be >= 0"),
    ]  # fmt: skip
    for kw, message in cases:
        args: dict[str, Any] = {"id": "r", "bundle": "b", "version": "1", "method": "push", "devices": ["a"], **kw}
        with pytest.raises(FleetError, match=message) as info:
            Rollout(**args)
        assert isinstance(info.value, AppError) and isinstance(info.value, ValueError)
    assert issubclass(InvalidTransition, FleetError)


# -- the model ---------------------------------------------------------------------------------


def test_bundle_info_and_bad_bundles() -> None:
    info = bundle_info(bundle("1.1"), filename="fw.zip")
    assert (info.version, info.arch, info.size) == ("1.1", "esp32", len(bundle("1.1")))
    with pytest.raises(FleetError, match="not a firmware bundle"):
        bundle_info(b"hello")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(FleetError, match="no manifest.json"):
        bundle_info(buf.getvalue())


def test_db_persists_devices_bundles_rollouts(tmp_path) -> None:
    from mgrpc.fleet import DeviceRecord

    path = tmp_path / "fleet.sqlite"
    db = FleetDB(path)
    db.save_device(DeviceRecord(id="a", arch="esp32", version="1.0", online=True))
    info = db.add_bundle(bundle("1.1"))
    r = Rollout(id="r1", bundle=info.sha, version="1.1", method="url", devices=["a"])
    db.save_rollout(r)
    db.close()
    db = FleetDB(path)
    assert [d.id for d in db.devices()] == ["a"]
    assert db.bundle(info.sha) == info and db.bundle_data(info.sha) == bundle("1.1")
    assert [x.id for x in db.rollouts()] == ["r1"]
    with pytest.raises(FleetError):
        db.bundle_data("0" * 64)
    db.close()


async def test_device_with_a_malformed_getinfo_is_refused_clearly() -> None:
    from mgrpc.fleet import FleetApp

    class OddDevice:
        async def call(self, method: str, params: Any = None, **kw: Any) -> Any:
            return ["not", "an", "object"] if method == "Sys.GetInfo" else {}

        async def close(self) -> None:
            pass

    async def connect(url: str) -> Any:
        return OddDevice()

    db = FleetDB(":memory:")
    app = FleetApp(db, rpc_connect=connect)
    with pytest.raises(FleetError, match="Sys.GetInfo did not answer an object"):
        await app.add_device_url("tcp://127.0.0.1:1")
    assert app.devices == {}
    db.close()


# -- the dashboard, end to end ------------------------------------------------------------------


@pytest.fixture
async def fleet(mosquitto_broker, tmp_path):  # noqa: F811
    broker = mosquitto_broker().url()
    f = await start_fleet(broker=broker, db_path=tmp_path / "fleet.sqlite")
    f.broker = broker  # type: ignore[attr-defined]
    yield f
    await f.close()


async def _devices(fleet: Any, prefix: str, n: int, **kw: Any) -> list[Any]:
    for i in range(n):
        fleet.devices.append(await start_fleet_device(fleet.broker, f"{prefix}{i}", storage=DeviceStorage.in_memory(),
                                                      **kw))  # fmt: skip
    ids = [f"{prefix}{i}" for i in range(n)]
    await wait_for(lambda: all(i in fleet.app.devices and fleet.app.devices[i].online for i in ids), what="online")
    return fleet.devices[-n:]


async def _upload(session: aiohttp.ClientSession, url: str, data: bytes, name: str = "fw.zip") -> Any:
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/zip")
    async with session.post(url + "/api/bundles", data=form) as resp:
        return resp.status, await resp.json()


async def test_http_api_bad_input_is_refused_clearly(fleet) -> None:
    await _devices(fleet, "api", 1)
    async with aiohttp.ClientSession() as s:
        status, body = await _upload(s, fleet.url, b"not a zip")
        assert status == 400 and "not a firmware bundle" in body["error"]
        status, info = await _upload(s, fleet.url, bundle("1.1"))
        assert status == 200 and info["version"] == "1.1"
        cases = [
            ({"devices": ["api0"], "bundle": "nope", "method": "push"}, "unknown bundle"),
            ({"devices": ["api0"], "bundle": info["sha"], "method": "fax"}, "unknown method"),
            ({"devices": ["ghost"], "bundle": info["sha"], "method": "push"}, "unknown device"),
            ({"devices": [], "bundle": info["sha"], "method": "push"}, "no devices"),
            ({"devices": "api0", "bundle": info["sha"], "method": "push"}, "list of device ids"),
            ({"devices": ["api0"], "bundle": info["sha"], "method": "push", "commit_timeout": "x"}, "integer"),
        ]
        for body_in, msg in cases:
            async with s.post(fleet.url + "/api/rollouts", json=body_in) as resp:
                assert resp.status == 400 and msg in (await resp.json())["error"], body_in
        async with s.post(fleet.url + "/api/rollouts", data=b"{") as resp:
            assert resp.status == 400
        async with s.get(fleet.url + "/fw/" + info["sha"] + ".zip") as resp:
            assert resp.status == 200 and await resp.read() == bundle("1.1")
        async with s.get(fleet.url + "/fw/" + "0" * 64 + ".zip") as resp:
            assert resp.status == 404
        async with s.get(fleet.url + "/update", headers={"X-MGOS-Device-ID": "api0 0A0000000000"}) as resp:
            assert resp.status == 304  # nothing assigned
        async with s.get(fleet.url + "/") as resp:
            assert resp.status == 200 and "mgrpc fleet" in await resp.text()
        async with s.get(fleet.url + "/static/app.js") as resp:
            assert resp.status == 200
    assert fleet.app.rollouts == {}  # nothing was started by the bad requests


async def test_ota_update_method_with_device_progress(fleet) -> None:
    devs = await _devices(fleet, "url", 2)
    info = fleet.app.db.add_bundle(bundle("1.1"))
    seen: list[dict[str, Any]] = []
    orig = fleet.app._on_progress

    def spy(msg: Any) -> None:
        import json

        seen.append(json.loads(msg.payload))
        orig(msg)

    fleet.app._on_progress = spy
    await fleet.conn.subscribe("+/ota/progress", spy, qos=0)
    r = fleet.app.start_rollout(devices=["url0", "url1"], bundle=info.sha, method="url", commit_timeout_s=30)
    await wait_for(lambda: r.state == "finished", what="rollout finished")
    assert r.summary() == {"done": 2}
    assert all(d.fw.version == "1.1" and d.storage.is_committed for d in devs)
    sources = {p.get("source") for p in seen if p["state"] == "progress"}
    assert sources == {"url"}  # devices reported their own download progress
    assert any(p["state"] == "success" for p in seen)


async def test_poll_method(fleet) -> None:
    devs = await _devices(fleet, "poll", 2, polling=True)
    for d in devs:  # point the devices' ota-http-client at the dashboard
        d.fw.config.set({"update": {"url": fleet.app.public_url + "/update", "interval": 1}})
        d.fw.config.save()
        await d.reboot()
    await wait_for(lambda: all(p.polls >= 1 for p in (d.pollers[-1] for d in devs)), what="devices polling")
    assert all(d.fw.version == "1.0" for d in devs)  # 304: nothing to do
    info = fleet.app.db.add_bundle(bundle("1.1"))
    r = fleet.app.start_rollout(devices=["poll0"], bundle=info.sha, method="poll", commit_timeout_s=30)
    await wait_for(lambda: r.state == "finished", what="rollout finished")
    assert r.summary() == {"done": 1}
    assert devs[0].fw.version == "1.1" and devs[0].storage.is_committed
    assert devs[1].fw.version == "1.0"


async def test_push_without_autocommit_rolls_back_after_commit_timeout(fleet) -> None:
    devs = await _devices(fleet, "nac", 1)
    info = fleet.app.db.add_bundle(bundle("1.3", "no_commit"))
    r = fleet.app.start_rollout(devices=["nac0"], bundle=info.sha, method="push", commit_timeout_s=2,
                                autocommit=False)  # fmt: skip
    await wait_for(lambda: r.jobs["nac0"].state == "done", what="running uncommitted")
    assert fleet.app.devices["nac0"].committed is False and devs[0].fw.version == "1.3"
    await wait_for(lambda: r.jobs["nac0"].state == "rolled_back", what="rolled back by the commit timeout")
    assert devs[0].fw.version == "1.0" and fleet.app.devices["nac0"].version == "1.0"
    # a device being updated cannot be put in a second rollout; a finished one can
    r2 = fleet.app.start_rollout(devices=["nac0"], bundle=fleet.app.db.add_bundle(bundle("1.1")).sha, method="push",
                                 commit_timeout_s=30)  # fmt: skip
    with pytest.raises(FleetError, match="already being updated"):
        fleet.app.start_rollout(devices=["nac0"], bundle=info.sha, method="push")
    await wait_for(lambda: r2.state == "finished", what="second rollout")
    assert r2.summary() == {"done": 1} and devs[0].storage.is_committed


async def test_device_added_by_url_push_and_rollback(fleet, tmp_path) -> None:
    dev = VirtualDevice(id="wsdev", state_dir=tmp_path / "wsdev", listen=["ws://127.0.0.1:0/rpc"],
                        listen_fn=transports.listen, storage=DeviceStorage.in_memory())  # fmt: skip
    await dev.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(fleet.url + "/api/devices", json={"url": dev.urls[0]}) as resp:
                rec = await resp.json()
                assert resp.status == 200 and (rec["id"], rec["version"], rec["source"]) == ("wsdev", "1.0", "url")
            async with s.post(fleet.url + "/api/devices", json={"url": "ws://127.0.0.1:1/rpc"}) as resp:
                assert resp.status == 400 and "cannot connect" in (await resp.json())["error"]
        info = fleet.app.db.add_bundle(bundle("1.1"))
        r = fleet.app.start_rollout(devices=["wsdev"], bundle=info.sha, method="push", commit_timeout_s=30)
        await wait_for(lambda: r.state == "finished", what="push to the URL device")
        assert r.summary() == {"done": 1} and dev.fw.version == "1.1" and dev.storage.is_committed
        hang = fleet.app.db.add_bundle(bundle("1.4", "hang"))
        r = fleet.app.start_rollout(devices=["wsdev"], bundle=hang.sha, method="url", commit_timeout_s=2)
        await wait_for(lambda: r.state == "finished", what="hang rolled back")
        assert r.jobs["wsdev"].state == "rolled_back" and dev.fw.version == "1.1"
    finally:
        await dev.stop()


async def test_restart_keeps_rollouts_and_takes_back_its_own_interrupted_jobs(tmp_path) -> None:
    """A dashboard restarted under the same worker id (its heartbeat still fresh) drives the jobs its
    previous run left: nothing else would. (Taking over from a live device: test_fleet_takeover.py.)"""
    from mgrpc.fleet import DeviceRecord, FleetApp

    db = FleetDB(tmp_path / "fleet.sqlite")
    db.save_device(DeviceRecord(id="a", arch="esp32", version="1.0", source="url", url="ws://127.0.0.1:1/rpc"))
    db.save_device(DeviceRecord(id="b", arch="esp32", version="1.0", source="url", url="ws://127.0.0.1:1/rpc"))
    info = db.add_bundle(bundle("1.1"))
    r = Rollout(id="r1", bundle=info.sha, version="1.1", method="push", devices=["a", "b"])
    r.jobs["a"].fire("start")
    r.jobs["b"].fire("start")
    r.jobs["b"].fire("applied")
    for j in r.jobs.values():
        j.owner = "w1"
    db.save_rollout(r)
    db.heartbeat("w1")  # the previous run, a moment ago
    db.close()
    db = FleetDB(tmp_path / "fleet.sqlite")
    app = FleetApp(db, worker_id="w1", rpc_connect=transports.connect, send_timeout_s=1.0)
    await app.start()
    try:
        jobs = app.rollouts["r1"].jobs
        assert "worker w1 stopped in state rebooting; worker w1 took over" in jobs["b"].message
        # a: the push is tried again; the device is gone: failed, with the reason
        await wait_for(lambda: jobs["a"].state == "failed", what="a failed")
        assert "taken over after its worker stopped, but the device stayed silent" in jobs["a"].error
        assert jobs["b"].state == "rebooting"  # applied before the restart: still waiting for the device
        assert {d["id"] for d in app.state()["devices"]} == {"a", "b"}
    finally:
        await app.close()
        db.close()


def test_cli_dashboard_arguments() -> None:
    from mgrpc.cli import build_parser

    args = build_parser().parse_args(["dashboard", "--broker", "mqtt://127.0.0.1:1883", "--db", "f.sqlite"])
    assert (args.broker, args.db, args.listen, args.no_shadow) == ("mqtt://127.0.0.1:1883", "f.sqlite",
                                                                   "http://127.0.0.1:8080", False)  # fmt: skip


async def test_start_fleet_refuses_a_bad_listen_url(tmp_path) -> None:
    with pytest.raises(ValueError, match="--listen"):
        await start_fleet(broker="", db_path=tmp_path / "x.sqlite", listen="ftp://127.0.0.1:0")


def test_rollout_pause_resume_abort() -> None:
    r = Rollout(id="r", bundle="b", version="2", method="poll", devices=["a", "b", "c"], concurrency=1)
    assert r.startable() == ["a"]
    r.jobs["a"].fire("start")
    r.pause()
    _finish(r, "a", ok=True)
    assert r.startable() == [] and r.state == "paused"  # nothing starts while paused
    with pytest.raises(InvalidTransition, match="cannot be paused"):
        r.pause()
    r.resume()
    assert r.startable() == ["b"]
    r.jobs["b"].fire("start")
    assert r.abort() == ["b"]  # the started job the caller may withdraw
    assert r.state == "aborted" and r.jobs["c"].state == "skipped" and "aborted" in r.jobs["c"].message
    r.jobs["b"].fire("abort")
    assert r.summary() == {"done": 1, "skipped": 2} and r.startable() == [] and r.state == "aborted"
    for bad in (r.resume, r.abort, r.pause):
        with pytest.raises(InvalidTransition):
            bad()


async def test_control_api_and_server_sent_events(fleet) -> None:
    import json

    await _devices(fleet, "ctl", 2)
    info = fleet.app.db.add_bundle(bundle("1.1"))
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/api/events") as events:
            assert events.headers["Content-Type"].startswith("text/event-stream")

            async def next_state() -> dict[str, Any]:
                data = ""
                async for raw in events.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and data:
                        return json.loads(data)
                raise AssertionError("the event stream ended")

            first = await next_state()  # the state at once
            assert {d["id"] for d in first["devices"]} >= {"ctl0", "ctl1"} and first["csrf"]
            # devices never poll: the jobs wait, so the controls act on a live rollout
            r = fleet.app.start_rollout(devices=["ctl0", "ctl1"], bundle=info.sha, method="poll", concurrency=1)
            for action, state in (("pause", "paused"), ("resume", "running")):
                async with s.post(f"{fleet.url}/api/rollouts/{r.id}/{action}") as resp:
                    assert resp.status == 200 and (await resp.json())["state"] == state
                while True:  # the change is pushed
                    st = await next_state()
                    if st["rollouts"] and st["rollouts"][0]["state"] == state:
                        break
            async with s.post(f"{fleet.url}/api/rollouts/{r.id}/resume") as resp:
                assert resp.status == 409 and "not paused" in (await resp.json())["error"]
            async with s.post(f"{fleet.url}/api/rollouts/{r.id}/abort") as resp:
                assert resp.status == 200 and (await resp.json())["summary"] == {"skipped": 2}
            async with s.post(f"{fleet.url}/api/rollouts/nope/abort") as resp:
                assert resp.status == 404
            async with s.post(f"{fleet.url}/api/rollouts/{r.id}/explode") as resp:
                assert resp.status == 409 and "unknown action" in (await resp.json())["error"]
        # an aborted poll job is no longer offered
        async with s.get(fleet.url + "/update", headers={"X-MGOS-Device-ID": "ctl0 0A"}) as resp:
            assert resp.status == 304


async def test_shadow_desired_is_said_again_only_to_a_device_that_did_not_ask_for_it() -> None:
    """A shadow job whose device has not begun is sent desired.ota again after SHADOW_RESEND_S, unless
    the device asked for its shadow since (the answer carries it: it is only slow); then after
    SHADOW_ASKED_RESEND_S."""
    import asyncio
    from types import SimpleNamespace

    from mgrpc.fleet import DeviceRecord, FleetApp
    from mgrpc.fleet.app import SHADOW_ASKED_RESEND_S, SHADOW_RESEND_S

    sent: list[str] = []

    class Broker:
        async def publish(self, topic: str, body: str, qos: int = 0) -> None:
            sent.append(topic.split("/")[2])

    db = FleetDB(":memory:")
    app = FleetApp(db, mqtt=Broker(), public_url="http://127.0.0.1:1")
    try:
        for d in ("quiet", "asking"):
            app.devices[d] = DeviceRecord(id=d, arch="esp32", version="1.0", online=True)
        info = db.add_bundle(bundle("1.1"))
        r = app.start_rollout(devices=["quiet", "asking"], bundle=info.sha, method="shadow")
        while len(sent) < 2:  # the jobs' tasks set desired.ota
            await asyncio.sleep(0.01)
        assert sorted(sent) == ["asking", "quiet"]
        # the delta made one device ask for its shadow (a get; the other missed it)
        app._on_shadow_request(SimpleNamespace(topic="$aws/things/asking/shadow/get", payload=b"{}", retain=False))
        started = max(j.changed_at for j in r.jobs.values())
        for wait in (SHADOW_RESEND_S + 1, SHADOW_ASKED_RESEND_S + 1):
            sent.clear()
            app.tick(now=started + wait)
            await asyncio.sleep(0.05)
            # (the quiet one again at the second tick: it was said again at the first)
            assert sorted(sent) == (["quiet"] if wait < SHADOW_ASKED_RESEND_S else ["asking", "quiet"]), (wait, sent)
    finally:
        await app.close()
        db.close()


async def test_workers_split_the_devices_presence_and_shadow_requests(tmp_path) -> None:
    """Every worker receives every device's status and shadow requests (they cannot be shared
    subscriptions); each stores and answers only its share, the shares cover every device once, and
    a worker that leaves hands its share to the others (stored from what they received meanwhile)."""
    import json
    from types import SimpleNamespace

    from mgrpc.fleet import FleetApp
    from mgrpc.shadow_server import ShadowServer, ShadowStore

    class Conn:
        def __init__(self) -> None:
            self.replies: list[str] = []

        def publish_nowait(self, topic: str, payload: bytes, qos: int = 0) -> None:
            self.replies.append(topic)

    path = tmp_path / "fleet.sqlite"
    apps, conns, dbs = [], [], []
    for name in ("a", "b"):
        db = FleetDB(path)
        conn = Conn()
        srv = ShadowServer(conn, ShadowStore(path, engine=db.engine))
        apps.append(FleetApp(db, worker_id=name, share_group="g", shadow_service=srv))
        conns.append(conn)
        dbs.append(db)
    a, b = apps
    try:
        ids = [f"d{i:02d}" for i in range(40)]
        for app in apps:
            app._set_peers({"a", "b"})
        mine_a = {d for d in ids if a._serves(d)}
        mine_b = {d for d in ids if b._serves(d)}
        assert mine_a and mine_b and not mine_a & mine_b and mine_a | mine_b == set(ids)
        # a device's status reaches both; only its worker stores it
        for d in ids:
            st = {"online": True, "id": d, "arch": "esp32", "version": "1.0", "boots": 1}
            msg = SimpleNamespace(topic=f"{d}/status", payload=json.dumps(st).encode(), retain=False)
            for app in apps:
                app._on_status(msg)
        assert {d.id for d in dbs[0].devices()} == set(ids)  # every device stored once, by its worker
        assert all(d in app.devices for app in apps for d in ids)  # every worker shows every device
        # a shadow request reaches both; only its worker answers
        for d in ids:
            req = SimpleNamespace(topic=f"$aws/things/{d}/shadow/get", payload=b"{}", retain=False)
            for app in apps:
                assert app.shadow_service is not None
                app.shadow_service._on_message(req)
        answered = [{t.split("/")[2] for t in c.replies} for c in conns]
        assert answered == [mine_a, mine_b]
        # b dies; before a notices, one of b's devices goes offline: a sees it, but it is not a's to store
        b_dev = sorted(mine_b)[0]
        st = {"online": False, "id": b_dev, "boots": 1}
        a._on_status(SimpleNamespace(topic=f"{b_dev}/status", payload=json.dumps(st).encode(), retain=False))
        assert next(d for d in dbs[0].devices() if d.id == b_dev).online  # stale
        a._set_peers({"a"})  # a notices (b's heartbeat stopped)
        assert all(a._serves(d) for d in ids)
        assert not next(d for d in dbs[0].devices() if d.id == b_dev).online  # a stored it on taking over
    finally:
        for app, db in zip(apps, dbs, strict=True):
            await app.close()
            db.close()
