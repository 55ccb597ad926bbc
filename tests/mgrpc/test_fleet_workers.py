"""Issue #16 (4): a fleet served by several dashboard processes (workers) sharing one PostgreSQL
database and splitting the device traffic through MQTT shared subscriptions.

Two ``mgrpc dashboard`` workers run against a private PostgreSQL (Debian's packages) and mosquitto;
one is killed (SIGKILL) in the middle of a staged shadow rollout. Every device must end up updated
exactly once (one first boot into the new firmware each) and no job may be lost. Skips with the
reason when PostgreSQL cannot be run here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from typing import Any

import aiohttp
import pytest

from mgrpc.fleet import FleetDB
from mgrpc.wiring import start_fleet_device
from tests.device_helpers import bundle
from tests.mgrpc.cli_proc import DeviceProc
from tests.mosquitto import free_port, mosquitto_broker  # noqa: F401  (fixture)
from tests.postgres import postgres_server  # noqa: F401  (fixture)
from tests.services.test_shadow import wait_for
from updater.storage import DeviceStorage

N = 12


def _worker(broker: str, db: str, name: str, public_url: str = "", listen: str = "http://127.0.0.1:0") -> DeviceProc:
    argv = ["-v", "dashboard", "--broker", broker, "--db", db, "--listen", listen, "--worker-id", name]
    if public_url:
        argv += ["--public-url", public_url]
    return DeviceProc(argv, n_urls=1, timeout_s=60)


def _url(proc: DeviceProc) -> str:
    line = proc.urls[0]
    assert line.startswith("dashboard on "), line
    return line.split()[-1].rstrip("/")


async def _state(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(url + "/api/state") as resp:
        assert resp.status == 200
        return await resp.json()


@pytest.mark.timeout(300)
async def test_two_workers_one_killed_mid_rollout_every_device_updated_exactly_once(
    mosquitto_broker, postgres_server, tmp_path  # noqa: F811
) -> None:
    broker = mosquitto_broker().url().rstrip("/")
    db_url = postgres_server.create_database("fleet")
    first_boots: Counter[str] = Counter()
    devices: list[Any] = []
    workers: list[DeviceProc] = []
    db = FleetDB(db_url)
    rid = url1 = ""
    try:
        for i in range(N):
            dev = await start_fleet_device(broker, f"w{i:02d}", storage=DeviceStorage.in_memory(), start=False)
            dev.on_boot.append(lambda d, info: first_boots.update([d.id]) if info.first_boot else None)
            await dev.start()
            devices.append(dev)
        # Devices download from one address (a load balancer in production; worker 1 here), so a job
        # taken over by another worker offers the device the very same URL. Worker 2 starts first: it
        # holds the shadow-service lease when it is killed, so that fails over too.
        port1 = free_port()
        url1 = f"http://127.0.0.1:{port1}"
        w2 = await asyncio.to_thread(_worker, broker, db_url, "w2", url1)
        workers.append(w2)
        url2 = _url(w2)
        w1 = await asyncio.to_thread(_worker, broker, db_url, "w1", "", url1)
        workers.append(w1)
        assert _url(w1) == url1
        ids = sorted(d.id for d in devices)
        async with aiohttp.ClientSession() as s:
            for url in (url1, url2):
                for _ in range(600):
                    st = await _state(s, url)
                    if sum(1 for d in st["devices"] if d["online"] and d["id"] in ids) == N:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"{url} does not see the {N} devices online")
            form = aiohttp.FormData()
            form.add_field("file", bundle("1.1"), filename="fw.zip", content_type="application/zip")
            async with s.post(url2 + "/api/bundles", data=form) as resp:
                assert resp.status == 200
                sha = (await resp.json())["sha"]
            body = {"devices": ids, "bundle": sha, "method": "shadow", "commit_timeout": 120, "concurrency": 3}
            async with s.post(url2 + "/api/rollouts", json=body) as resp:
                assert resp.status == 200, await resp.text()
                rid = (await resp.json())["id"]

        def summary() -> dict[str, int]:
            r = db.rollout(rid)
            return r.summary() if r else {}

        # kill worker 2 in the middle: some devices done, others not yet started
        await wait_for(lambda: summary().get("done", 0) >= 2, timeout_s=120, what="first devices updated")
        owners = {j.owner for j in db.rollout(rid).jobs.values()}  # type: ignore[union-attr]
        w2.proc.send_signal(signal.SIGKILL)
        w2.proc.wait(10)
        left = N - summary().get("done", 0)
        assert left > 0, "the rollout finished before the kill: nothing was tested"
        await wait_for(lambda: summary() == {"done": N}, timeout_s=180, what="every device done")

        def state() -> str:
            r = db.rollout(rid)
            return r.state if r else ""

        # The worker marks the rollout finished on its own loop, just after the last job is done.
        await wait_for(lambda: state() == "finished", timeout_s=30, what="the rollout marked finished")
        r = db.rollout(rid)
        assert r is not None and r.state == "finished"
        taken = [x for x in w1.err_lines if "requeued" in x or "answering the shadow" in x]
        print(f"killed w2 with {left} of {N} devices left; worker 1 took over: {''.join(taken)}")
        assert {j.owner for j in r.jobs.values()} <= {"w1", "w2"}
        assert owners & {"w1", "w2"}, owners
        # every device runs the new firmware, committed, and went through exactly one update
        for d in devices:
            assert (d.fw.version, bool(d.storage.is_committed)) == ("1.1", True), d.id
        assert dict(first_boots) == dict.fromkeys(ids, 1), first_boots
        # the surviving worker shows it (it reads other workers' changes from the database once a second)
        async with aiohttp.ClientSession() as s:
            row: dict[str, object] = {}
            for _ in range(100):
                st = await _state(s, url1)
                row = next(x for x in st["rollouts"] if x["id"] == rid)
                if row["summary"] == {"done": N} and row["state"] == "finished":
                    break
                await asyncio.sleep(0.1)
            assert row["summary"] == {"done": N} and row["state"] == "finished", row
    except BaseException:
        with contextlib.suppress(Exception):
            fr = db.rollout(rid)
            print({d: (j.state, j.owner, j.message) for d, j in fr.jobs.items()})  # type: ignore[union-attr]
        with contextlib.suppress(Exception):
            async with aiohttp.ClientSession() as s:
                print("worker 1 shows", (await _state(s, url1))["rollouts"][0]["summary"])
        for w in workers:  # what the workers said, for the failure report
            print(f"--- worker stderr (last 80 lines) ---\n{''.join(w.err_lines[-80:])}")
        raise
    finally:
        for w in workers:
            w.stop()
        for d in devices:
            await d.stop()
        db.close()
