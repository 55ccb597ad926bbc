"""Fleet updates through mosquitto: devices updated per second with one and with two dashboard
workers, and the dashboard's event latency (device progress -> browser event stream).

1. **Throughput.** N virtual devices (default 1000; in-memory flash, one MQTT connection each, as
   real devices have; in device processes of ``--per-process``, so they use every core) are
   updated by a shadow rollout (at most 200 devices downloading at once), first by one
   ``mgrpc dashboard`` worker, then (fresh devices, fresh database) by two workers sharing the
   database and the device traffic (MQTT shared subscriptions). The database is a private
   PostgreSQL (Debian's packages; see ``tests/postgres.py``) for both runs, so only the number of
   workers differs; without PostgreSQL the one-worker run uses SQLite and the two-worker run is
   skipped with the reason. Printed: the time until 95 % of the devices run the new firmware
   committed, devices per second over that, the ratio two workers / one worker measured in the same
   run, and the stragglers (devices not done once none has finished for 30 s).
2. **Event latency.** One dashboard (in this process, SQLite) and an event-stream client (what the
   page's ``EventSource`` receives): a device's ``<id>/ota/progress`` message is published to the
   broker, and the time until the stream delivers a state with that progress is measured
   (``--events`` samples; median, p95, max).

    .venv/bin/python bench/fleet.py [--devices 1000] [--per-process 125] [--events 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgrpc.wiring import start_fleet, start_fleet_device
from tests.mosquitto import Mosquitto, find_mosquitto, free_port
from updater.bundle import make_virtual_bundle
from updater.storage import DeviceStorage

STALL_S = 30.0  # after 95 %, no device finishing for this long ends the run (stragglers are counted)
CONCURRENCY = 200  # devices downloading at once (a staged fleet rollout; the same for both runs)


def raise_fd_limit(want: int) -> int:
    """Raise the soft open-files limit towards ``want`` (mosquitto and the children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def device_process(broker: str, prefix: str, start: int, count: int) -> None:
    """Child process: run devices ``<prefix><start>`` ... until stdin closes."""
    devices = []
    try:
        for i in range(start, start + count):
            devices.append(await start_fleet_device(broker, f"{prefix}{i:04d}", storage=DeviceStorage.in_memory()))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        for d in devices:
            await d.stop()


async def _spawn(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        if p.returncode is None:
            if p.stdin is not None:
                p.stdin.close()
            p.terminate()
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), 30)
        except TimeoutError:
            p.kill()
            await p.wait()


async def throughput(n: int, workers: int, db_url: str, *, per_process: int, budget_s: float) -> dict[str, Any]:
    """Attach ``n`` devices, start ``workers`` dashboards on ``db_url``, roll a bundle out; seconds taken."""
    import aiohttp

    from mgrpc.fleet import FleetDB

    bundle = make_virtual_bundle("esp32", "2.0", app_size=8192)
    with tempfile.TemporaryDirectory(prefix="mgrpc-bench-fleet-") as tmp, Mosquitto(workdir=Path(tmp) / "mq") as mq:
        broker = mq.url().rstrip("/")
        if "://" not in db_url:
            db_url = str(Path(tmp) / db_url)
        port1 = free_port()
        url1 = f"http://127.0.0.1:{port1}"
        procs: list[asyncio.subprocess.Process] = []
        db = FleetDB(db_url)
        try:
            for w in range(workers):
                listen = url1 if w == 0 else "http://127.0.0.1:0"
                prof = ["-m", "cProfile", "-o", os.environ["MGRPC_BENCH_PROFILE"]] if (
                    w == 0 and os.environ.get("MGRPC_BENCH_PROFILE")) else []  # fmt: skip
                p = await _spawn(sys.executable, *prof, "-m", "mgrpc", "dashboard", "--broker", broker, "--db", db_url,
                                 "--listen", listen, "--public-url", url1, "--worker-id", f"w{w + 1}")  # fmt: skip
                procs.append(p)
                assert p.stdout is not None
                line = (await asyncio.wait_for(p.stdout.readline(), 60)).decode()
                if not line.startswith("dashboard on"):
                    raise RuntimeError(f"worker {w + 1} did not start: {line!r}")
            t0 = time.perf_counter()
            for start in range(0, n, per_process):
                procs.append(await _spawn(sys.executable, __file__, "--device-process", "b", str(start),
                                          str(min(per_process, n - start)), "--broker", broker))  # fmt: skip
            ids = [f"b{i:04d}" for i in range(n)]
            want = set(ids)
            while True:
                online = {d.id for d in db.devices() if d.online} & want
                if len(online) == n:
                    break
                if time.perf_counter() - t0 > budget_s or any(p.returncode is not None for p in procs):
                    raise TimeoutError(f"only {len(online)} of {n} devices came online")
                await asyncio.sleep(0.5)
            attach_s = time.perf_counter() - t0
            await asyncio.sleep(2.0)  # every worker has seen every device (they learn from the database each second)
            async with aiohttp.ClientSession() as s:
                form = aiohttp.FormData()
                form.add_field("file", bundle, filename="fw.zip", content_type="application/zip")
                async with s.post(url1 + "/api/bundles", data=form) as resp:
                    sha = (await resp.json())["sha"]
                t1 = time.perf_counter()
                body = {"devices": ids, "bundle": sha, "method": "shadow", "commit_timeout": 600,
                        "concurrency": CONCURRENCY}
                async with s.post(url1 + "/api/rollouts", json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"rollout refused: {await resp.text()}")
                    rid = (await resp.json())["id"]
            t95 = 0.0
            last, last_change = -1, time.perf_counter()
            while True:
                r = db.rollout(rid)
                summary = r.summary() if r else {}
                done = summary.get("done", 0)
                now = time.perf_counter()
                if done >= 0.95 * n and not t95:
                    t95 = now - t1
                if done != last:
                    last, last_change = done, now
                if done == n or (r is not None and r.state != "running" and r.settled):
                    break
                if now - t1 > budget_s or (t95 and now - last_change > STALL_S):
                    break  # the rest are stragglers: reported, not waited for
                await asyncio.sleep(0.25)
            if not t95:
                errors = Counter(j.error for j in r.jobs.values() if j.error).most_common(2) if r else []
                raise RuntimeError(f"rollout reached {summary} in {time.perf_counter() - t1:.0f} s; errors: {errors}")
            return {"attach_s": attach_s, "update_s": last_change - t1, "t95_s": t95, "done": done,
                    "left": n - done, "summary": summary}  # type: ignore[dict-item]
        finally:
            await _stop(procs)
            db.close()


async def event_latency(samples: int) -> list[float]:
    """Seconds from publishing a device's progress message to the event stream delivering it."""
    import aiohttp

    from transports.mqttconn import open_connection

    with tempfile.TemporaryDirectory(prefix="mgrpc-bench-events-") as tmp, Mosquitto(workdir=Path(tmp) / "mq") as mq:
        broker = mq.url().rstrip("/")
        fleet = await start_fleet(broker=broker, db_path=Path(tmp) / "fleet.sqlite")
        dev = await open_connection(broker, client_id="lat0")
        try:
            status = {"online": True, "id": "lat0", "arch": "esp32", "version": "1.0", "committed": True, "boots": 1}
            await dev.publish("lat0/status", json.dumps(status), qos=1, retain=True)
            while "lat0" not in fleet.app.devices:
                await asyncio.sleep(0.02)
            info = fleet.app.db.add_bundle(make_virtual_bundle("esp32", "2.0", app_size=8192))
            # a polling job waits for the device: its progress reports move the row on the page
            r = fleet.app.start_rollout(devices=["lat0"], bundle=info.sha, method="poll")
            total = 1_000_000
            out: list[float] = []
            async with aiohttp.ClientSession() as s, s.get(fleet.url + "/api/events") as events:
                pending: dict[int, float] = {}
                seen: asyncio.Queue[tuple[int, float]] = asyncio.Queue()

                async def read() -> None:
                    async for raw in events.content:
                        line = raw.decode()
                        if line.startswith("data: "):
                            t = time.perf_counter()
                            st = json.loads(line[6:])
                            for ro in st["rollouts"]:
                                if ro["id"] == r.id:
                                    await seen.put((ro["jobs"]["lat0"]["done"], t))

                reader = asyncio.ensure_future(read())
                try:
                    for i in range(1, samples + 1):
                        done = i * 1000
                        pending[done] = time.perf_counter()
                        msg = {"state": "progress", "done": done, "total": total, "percent": done * 100 // total}
                        dev.publish_nowait("lat0/ota/progress", json.dumps(msg).encode(), qos=0)
                        while True:
                            got, t = await asyncio.wait_for(seen.get(), 10)
                            if got == done:
                                out.append(t - pending[done])
                                break
                        await asyncio.sleep(0.06)  # past the stream's 50 ms coalescing window
                finally:
                    reader.cancel()
            return out
        finally:
            await dev.close()
            await fleet.close()


def main() -> int:
    """Run both parts and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000, help="virtual devices in the throughput runs")
    ap.add_argument("--per-process", type=int, default=125, help="devices per device process")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds allowed per run (attach, then update)")
    ap.add_argument("--events", type=int, default=100, help="event-latency samples")
    ap.add_argument("--device-process", nargs=3, metavar=("PREFIX", "START", "COUNT"), help=argparse.SUPPRESS)
    ap.add_argument("--broker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (servers, children) when stopped
    if args.device_process:
        prefix, start, count = args.device_process
        if os.environ.get("MGRPC_BENCH_DEVLOG"):  # diagnostics: the devices' warnings, one file per process
            logging.basicConfig(level=logging.WARNING, force=True,
                                filename=f"{os.environ['MGRPC_BENCH_DEVLOG']}/{prefix}{start}.log")  # fmt: skip
        asyncio.run(device_process(args.broker, prefix, int(start), int(count)))
        return 0
    if find_mosquitto() is None:
        print("mosquitto is not installed; `make system-deps` installs it", file=sys.stderr)
        return 1
    n = args.devices
    fds = raise_fd_limit(4 * n + 512)

    lat = asyncio.run(event_latency(args.events))
    lat_ms = sorted(1000 * x for x in lat)
    p95 = lat_ms[max(0, int(len(lat_ms) * 0.95) - 1)]
    med = statistics.median(lat_ms)
    print(f"dashboard event latency (device progress on the broker -> event stream), {len(lat_ms)} samples: "
          f"median {med:.1f} ms, p95 {p95:.1f} ms, max {lat_ms[-1]:.1f} ms", flush=True)  # fmt: skip

    from tests.postgres import PostgresServer, postgres_unavailable

    why = postgres_unavailable()
    pg = None
    if not why:
        try:
            pg = PostgresServer().start()
        except (RuntimeError, OSError) as e:
            why = f"PostgreSQL did not start: {e}"
    if 2 * n + 64 > fds:
        print(f"throughput skipped: needs ~{2 * n + 64} open files, the limit is {fds}")
        return 0
    print(f"shadow rollout of a 73 KiB bundle to {n} virtual devices through mosquitto, database "
          f"{'PostgreSQL' if pg else 'SQLite'}", flush=True)  # fmt: skip
    print(f"{'workers':>7} {'attach s':>9} {'95% s':>7} {'devices/s':>10} {'ratio':>6}  stragglers")
    base = None
    try:
        for workers in (1, 2):
            if pg is None and workers == 2:
                print(f"{workers:>7}  skipped: {why}")
                continue
            db = pg.create_database(f"bench{workers}") if pg else "fleet.sqlite"
            try:
                res = asyncio.run(throughput(n, workers, db, per_process=args.per_process, budget_s=args.budget))
            except (OSError, TimeoutError, RuntimeError) as e:
                print(f"{workers:>7}  failed: {e}", flush=True)
                continue
            rate = 0.95 * n / res["t95_s"]
            base = base or rate
            left = f"{res['left']} not done ({res['summary']})" if res["left"] else "none"
            cols = f"{workers:>7} {res['attach_s']:>9.1f} {res['t95_s']:>7.1f} {rate:>10.1f} {rate / base:>6.2f}"
            print(f"{cols}  {left}", flush=True)
    finally:
        if pg is not None:
            pg.stop()
    print("devices/s: 95 % of the devices updated and committed / the time that took; ratio: against one "
          "worker, measured in the same run; stragglers: devices still not done when none had finished for "
          f"{STALL_S:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
