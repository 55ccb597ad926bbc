"""Fleet updates through mosquitto: devices updated per second with one and with two dashboard
workers, where the CPU goes, and the dashboard's event latency (device progress -> browser event
stream).

1. **Throughput.** N virtual devices (default 1000; in-memory flash, one MQTT connection each, as
   real devices have; in device processes of ``--per-process``, so they use every core) are
   updated by a shadow rollout (at most 200 devices downloading at once), first by one
   ``mgrpc dashboard`` worker, then (fresh devices, fresh database) by two workers sharing the
   database and the device traffic. The database is a private PostgreSQL (Debian's packages; see
   ``tests/postgres.py``) for both runs, so only the number of workers differs; without PostgreSQL
   the one-worker run uses SQLite and the two-worker run is skipped with the reason. Two series:

   * *as they come*: every process takes what CPU it gets. On a small machine the devices, the
     broker, the database and the workers share the same cores, so this says how fast this machine
     updates a fleet, not whether a second worker adds capacity.
   * *capped*: each worker gets the same CPU budget (``--worker-cpu``, default 0.25 of a CPU; a
     cgroup v1 ``cpu`` quota per worker, which needs root), applied once the devices are online,
     in both runs. One worker is then the bottleneck (the bench prints how often each worker used
     up its quota), as when every worker has a machine of its own, and the ratio says how much
     capacity the second worker adds (2.00 = all of it). Skipped with the reason where the
     workers cannot be capped.

   Printed per run: seconds until every device was online, until 95 % of the devices ran the new
   firmware committed, devices per second over that, the ratio against one worker in the same
   series and run, the stragglers (devices not done once none has finished for 30 s), and whether
   the broker dropped messages to a worker (mosquitto's per-client queue overflowing: a worker
   too slow for its share; the bench's mosquitto queues up to 10,000 QoS 1 messages per client,
   ``max_queued_messages``, instead of the default 1000, as a fleet's broker should). Then the
   CPU seconds each part used per 1000 devices updated while the rollout ran (workers, device
   processes, mosquitto, PostgreSQL, this script), from ``/proc``: what sizing a fleet's machines
   takes, and which part is the bottleneck.
2. **Event latency.** One dashboard (in this process, SQLite) and an event-stream client (what the
   page's ``EventSource`` receives): a device's ``<id>/ota/progress`` message is published to the
   broker, and the time until the stream delivers a state with that progress is measured
   (``--events`` samples; median, p95, max).

It stops by itself: each run ends when every device is done, when none has finished for 30 s
after 95 % (stragglers are reported), when no device came online for 30 s while attaching, or after
``--budget`` seconds. The whole bench takes 5 to 6.5 minutes on the 2-core development machine.

    .venv/bin/python bench/fleet.py [--devices 1000] [--per-process 125] [--events 100]
                                    [--worker-cpu 0.25] [--series both|free|capped]

Diagnostics: ``MGRPC_BENCH_TRACE=1`` prints the jobs per state every 10 s of a rollout;
``MGRPC_BENCH_PROFILE=<prefix>`` runs each worker under cProfile (``<prefix>.<workers>w<n>``);
``MGRPC_BENCH_DEVLOG=<dir>`` writes the devices' warnings there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
DROPPED = "Outgoing messages are being dropped for client mgrpc-dashboard"  # mosquitto's log, a worker too slow
WORKER_CPU = 0.25  # the CPU budget of each worker in the capped runs
# QoS 1 messages mosquitto queues for a client that has not read them yet (its default, 1000, was
# overrun once by a capped worker that fell behind while 200 devices were updating: messages lost)
BROKER_QUEUE = 10_000


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and of its children it has reaped), from /proc."""
    out: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue  # it exited meanwhile
        fields = raw[raw.rindex(")") + 2 :].split()
        # after the name: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based in proc(5)
        out[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / _TICK)
    return out


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group of process trees (a root pid and its live descendants,
    with what their exited children used); {} where /proc is not there."""
    if not os.path.isdir("/proc"):
        return {}
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out = {}
    for name, roots in groups.items():
        total, todo = 0.0, [r for r in roots if r in table]
        while todo:
            pid = todo.pop()
            total += table[pid][1]
            todo.extend(kids.get(pid, []))
        out[name] = total
    return out


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


class CpuCap:
    """The same CPU budget for each worker: a child cgroup per worker under the cgroup v1 ``cpu``
    controller (``/sys/fs/cgroup/cpu``) with a CFS quota of ``cpus`` per period; needs root.
    :func:`cpu_cap_unavailable` says why not."""

    ROOT = Path("/sys/fs/cgroup/cpu")
    PERIOD_US = 100_000

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus
        for old in self.ROOT.glob("mgrpc-bench-fleet-*"):  # left by a bench that was killed
            if not Path(f"/proc/{old.name.rsplit('-', 1)[1]}").exists():
                for d in [*old.glob("w*/"), old]:
                    with contextlib.suppress(OSError):
                        d.rmdir()  # (only empty groups go: their processes are gone)
        self.dir = self.ROOT / f"mgrpc-bench-fleet-{os.getpid()}"
        self.dir.mkdir(exist_ok=True)
        self.groups: dict[str, Path] = {}

    def add(self, name: str, pid: int) -> None:
        """Put process ``pid`` (a worker; its threads and later children follow) into its own capped group."""
        d = self.dir / name
        d.mkdir(exist_ok=True)
        (d / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
        (d / "cpu.cfs_quota_us").write_text(str(int(self.cpus * self.PERIOD_US)))
        (d / "cgroup.procs").write_text(str(pid))
        self.groups[f"worker {name[1:]}"] = d

    def throttled(self) -> dict[str, tuple[int, int]]:
        """Per worker: (CFS periods it ran in, periods in which it used up its quota), so far."""
        out = {}
        for name, d in self.groups.items():
            stat = dict(line.split() for line in (d / "cpu.stat").read_text().splitlines() if line.strip())
            out[name] = (int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0)))
        return out

    def close(self) -> None:
        """Remove the groups (call after stopping the workers: a group with a process stays)."""
        for d in [*self.groups.values(), self.dir]:
            with contextlib.suppress(OSError):
                d.rmdir()
        self.groups.clear()


def cpu_cap_unavailable() -> str:
    """Why the workers cannot be given a CPU budget here ("" if they can)."""
    if not (CpuCap.ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CpuCap.ROOT} (cgroup v2 only, or not Linux)"
    probe = CpuCap.ROOT / f"mgrpc-bench-probe-{os.getpid()}"
    try:
        probe.mkdir()
        try:
            (probe / "cpu.cfs_quota_us").write_text(str(CpuCap.PERIOD_US // 4))
        finally:
            probe.rmdir()
    except OSError as e:
        return f"cannot make a cgroup under {CpuCap.ROOT} ({e.strerror}; root is needed)"
    return ""


def _job_counts(db: Any, rid: str) -> tuple[dict[str, int], str]:
    """Jobs per state and the rollout's state, counted by the database (cheap enough to ask often)."""
    sa, tj, tr = db.sa, db.t["jobs"], db.t["rollouts"]
    with db.engine.begin() as c:
        rows = c.execute(sa.select(tj.c.state, sa.func.count()).where(tj.c.rollout == rid).group_by(tj.c.state))
        counts = {str(state): int(k) for state, k in rows}
        state = c.execute(sa.select(tr.c.state).where(tr.c.id == rid)).scalar()
    return counts, str(state)


async def throughput(n: int, workers: int, db_url: str, *, per_process: int, budget_s: float,
                     db_pid: int | None = None, cap: CpuCap | None = None) -> dict[str, Any]:  # fmt: skip
    """Attach ``n`` devices, start ``workers`` dashboards on ``db_url``, roll a bundle out: seconds
    taken, and the CPU seconds each part used while the rollout ran (``db_pid``: the database
    server's main process, when it is ours to measure; ``cap``: the CPU budget given to each worker)."""
    import aiohttp

    from mgrpc.fleet import FleetDB

    bundle = make_virtual_bundle("esp32", "2.0", app_size=8192)
    broker_conf = f"max_queued_messages {BROKER_QUEUE}"
    with (tempfile.TemporaryDirectory(prefix="mgrpc-bench-fleet-") as tmp,
          Mosquitto(workdir=Path(tmp) / "mq", extra_config=broker_conf) as mq):  # fmt: skip
        broker = mq.url().rstrip("/")
        if "://" not in db_url:
            db_url = str(Path(tmp) / db_url)
        port1 = free_port()
        url1 = f"http://127.0.0.1:{port1}"
        procs: list[asyncio.subprocess.Process] = []
        worker_procs: list[asyncio.subprocess.Process] = []
        db = FleetDB(db_url)
        try:
            for w in range(workers):
                listen = url1 if w == 0 else "http://127.0.0.1:0"
                out = f"{os.environ.get('MGRPC_BENCH_PROFILE')}.{workers}w{w + 1}{'c' if cap else ''}"
                prof = ["-m", "cProfile", "-o", out] if os.environ.get("MGRPC_BENCH_PROFILE") else []
                p = await _spawn(sys.executable, *prof, "-m", "mgrpc", "dashboard", "--broker", broker, "--db", db_url,
                                 "--listen", listen, "--public-url", url1, "--worker-id", f"w{w + 1}")  # fmt: skip
                procs.append(p)
                worker_procs.append(p)
                assert p.stdout is not None
                line = (await asyncio.wait_for(p.stdout.readline(), 60)).decode()
                if not line.startswith("dashboard on"):
                    raise RuntimeError(f"worker {w + 1} did not start: {line!r}")
            t0 = time.perf_counter()
            device_procs = []
            for start in range(0, n, per_process):
                device_procs.append(await _spawn(sys.executable, __file__, "--device-process", "b", str(start),
                                                 str(min(per_process, n - start)), "--broker", broker))  # fmt: skip
            procs.extend(device_procs)
            ids = [f"b{i:04d}" for i in range(n)]
            want = set(ids)
            seen, seen_at = 0, time.perf_counter()
            while True:
                online = {d.id for d in db.devices() if d.online} & want
                if len(online) == n:
                    break
                now = time.perf_counter()
                if len(online) > seen:
                    seen, seen_at = len(online), now
                if now - t0 > budget_s or now - seen_at > STALL_S or any(p.returncode is not None for p in procs):
                    drops = mq.log().count(DROPPED)
                    why = f" (the broker dropped messages to a worker: logged {drops} times)" if drops else ""
                    raise TimeoutError(f"only {len(online)} of {n} devices came online{why}")
                await asyncio.sleep(1.0)
            attach_s = time.perf_counter() - t0
            await asyncio.sleep(2.0)  # every worker has seen every device (they learn from the database each second)
            if cap is not None:  # from now on: the rollout is what is measured, not the devices' first connections
                for w, p in enumerate(worker_procs):
                    cap.add(f"w{w + 1}", p.pid)
            groups = {f"worker {w + 1}": [p.pid] for w, p in enumerate(worker_procs)}
            groups |= {"devices": [p.pid for p in device_procs], "broker": [mq.proc.pid] if mq.proc else []}
            if db_pid:
                groups["database"] = [db_pid]

            def cpu_now() -> dict[str, float]:
                t = os.times()
                return {**cpu_seconds(groups), "bench": t.user + t.system}

            async with aiohttp.ClientSession() as s:
                form = aiohttp.FormData()
                form.add_field("file", bundle, filename="fw.zip", content_type="application/zip")
                async with s.post(url1 + "/api/bundles", data=form) as resp:
                    sha = (await resp.json())["sha"]
                cpu0, throttled0 = cpu_now(), cap.throttled() if cap else {}
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
                summary, state = _job_counts(db, rid)
                if os.environ.get("MGRPC_BENCH_TRACE") and int(time.perf_counter() * 4) % 40 == 0:  # every 10 s
                    print(f"{time.perf_counter() - t1:.0f} s {summary}", file=sys.stderr, flush=True)
                done = summary.get("done", 0)
                now = time.perf_counter()
                if done >= 0.95 * n and not t95:
                    t95 = now - t1
                if done != last:
                    last, last_change = done, now
                settled = sum(summary.get(k, 0) for k in ("done", "failed", "rolled_back", "skipped", "queued")) == n
                if done == n or (state != "running" and settled):
                    break
                if now - t1 > budget_s or (t95 and now - last_change > STALL_S):
                    break  # the rest are stragglers: reported, not waited for
                await asyncio.sleep(0.25)
            cpu1, throttled1 = cpu_now(), cap.throttled() if cap else {}
            wall = time.perf_counter() - t1
            if not t95:
                r = db.rollout(rid)
                errors = Counter(j.error for j in r.jobs.values() if j.error).most_common(2) if r else []
                raise RuntimeError(f"rollout reached {summary} in {time.perf_counter() - t1:.0f} s; errors: {errors}")
            # A worker that falls behind by more than the broker's queue for it loses messages (mosquitto
            # logs it): its devices' moves are then missing, the run is not a fair measure.
            drops = mq.log().count(DROPPED)
            cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
            throttled = {k: (throttled1[k][0] - throttled0[k][0], throttled1[k][1] - throttled0[k][1])
                         for k in throttled1}  # fmt: skip
            return {"attach_s": attach_s, "update_s": last_change - t1, "t95_s": t95, "done": done,
                    "left": n - done, "summary": summary, "cpu": cpu, "wall_s": wall, "throttled": throttled,
                    "drops": drops}  # fmt: skip
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
    ap.add_argument("--worker-cpu", type=float, default=WORKER_CPU,
                    help="the CPU budget of each worker in the capped runs (in CPUs; 0: no capped runs)")
    ap.add_argument("--series", choices=("both", "free", "capped"), default="both",
                    help="which throughput runs: workers as they come, capped, or both")
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
    began = time.perf_counter()

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
    db_pid = pg.pid() if pg else None
    cap_why = cpu_cap_unavailable() if args.worker_cpu > 0 else "--worker-cpu 0"
    series: list[tuple[str, str, float | None]] = []
    if args.series in ("both", "free"):
        series.append(("as they come", "workers as they come: every process takes what CPU it gets", None))
    if args.series in ("both", "capped"):
        series.append((f"capped at {args.worker_cpu:g} CPU", f"each worker capped at {args.worker_cpu:g} CPU "
                       "(a cgroup quota, from when the devices are online)", args.worker_cpu))  # fmt: skip
    print(f"shadow rollout of a 73 KiB bundle to {n} virtual devices ({args.per_process} per process) through "
          f"mosquitto, database {'PostgreSQL' if pg else 'SQLite'}, {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    breakdown: list[str] = []
    try:
        for label, title, budget in series:
            print(f"-- {title}")
            if budget is not None and cap_why:
                print(f"   skipped: cannot cap the workers' CPU: {cap_why}", flush=True)
                continue
            print(f"{'workers':>7} {'attach s':>9} {'95% s':>7} {'devices/s':>10} {'ratio':>6}  stragglers", flush=True)
            base = None
            for workers in (1, 2):
                if pg is None and workers == 2:
                    print(f"{workers:>7}  skipped: {why}")
                    continue
                db = pg.create_database(f"bench{workers}{'c' if budget else ''}") if pg else "fleet.sqlite"
                cap = None
                try:
                    if budget is not None:
                        cap = CpuCap(budget)
                    res = asyncio.run(throughput(n, workers, db, per_process=args.per_process, budget_s=args.budget,
                                                 db_pid=db_pid, cap=cap))  # fmt: skip
                except (OSError, TimeoutError, RuntimeError) as e:
                    print(f"{workers:>7}  failed: {e}", flush=True)
                    continue
                finally:
                    if cap is not None:
                        cap.close()
                rate = 0.95 * n / res["t95_s"]
                if workers == 1:
                    base = rate
                left = f"{res['left']} not done ({res['summary']})" if res["left"] else "none"
                if res["drops"]:
                    left += f"; the broker dropped messages to a worker (logged {res['drops']} times)"
                ratio = f"{rate / base:.2f}" if base else "-"
                cols = f"{workers:>7} {res['attach_s']:>9.1f} {res['t95_s']:>7.1f} {rate:>10.1f} {ratio:>6}"
                print(f"{cols}  {left}", flush=True)
                breakdown.append(_cpu_line(f"{workers} worker{'s' if workers > 1 else ''}, {label}", res))
    finally:
        if pg is not None:
            pg.stop()
    print("devices/s: 95 % of the devices updated and committed / the time that took; ratio: against one "
          "worker in the same series, measured in the same run; stragglers: devices still not done when none "
          f"had finished for {STALL_S:g} s")
    if breakdown:
        print("CPU seconds per 1000 devices updated, while the rollout ran (busy: of all CPUs over that time):")
        print("\n".join(breakdown))
    print(f"the bench took {time.perf_counter() - began:.0f} s")
    return 0


def _cpu_line(title: str, res: dict[str, Any]) -> str:
    """One run's CPU seconds per 1000 devices updated, by part, and the workers' quota use."""
    cpu: dict[str, float] = res["cpu"]
    if len(cpu) <= 1:  # only this script's own
        return f"  {title}: (no /proc: not measured)"
    per = 1000.0 / max(1, res["done"])
    workers = {k: v for k, v in cpu.items() if k.startswith("worker")}
    parts = [f"workers {per * sum(workers.values()):.1f}"]
    if len(workers) > 1:
        parts[0] += " (" + " + ".join(f"{per * v:.1f}" for v in workers.values()) + ")"
    names = {"devices": "devices", "broker": "mosquitto", "database": "PostgreSQL", "bench": "this script"}
    parts += [f"{names[k]} {per * cpu[k]:.1f}" for k in names if k in cpu]
    busy = sum(cpu.values()) / (res["wall_s"] * (os.cpu_count() or 1))
    line = f"  {title}: {', '.join(parts)}; total {per * sum(cpu.values()):.1f}, busy {100 * busy:.0f} %"
    for name, (periods, throttled) in res["throttled"].items():
        line += f"; {name} used up its quota in {100 * throttled / max(1, periods):.0f} % of its periods"
    return line


if __name__ == "__main__":
    sys.exit(main())
