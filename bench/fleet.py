"""Fleet update time through mosquitto: N virtual devices in this process, one dashboard, one bundle.

For each N (default 10, 100, 1000) the bench starts a fresh mosquitto, the dashboard with its shadow
service, and N virtual devices (in-memory flash, one MQTT connection each, as real devices have; in
worker processes of ``--per-process`` devices, because paho's ``select()`` loop cannot watch file
descriptors above 1023, which caps one process at about 330 connections),
then times a rollout of one bundle to all of them until every device runs it committed. It prints
the time per N, the time per device, and the growth against the smallest N measured in the same
run (the baseline): ``ratio`` = t(N) / t(N0) and the exponent k of t ~ N^k (1 = linear).

    .venv/bin/python bench/fleet.py [--sizes 10,100,1000] [--method shadow|push|url]

A size the machine cannot hold (file descriptors, memory, time budget ``--budget`` seconds per size)
is reported as skipped and the bench goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgrpc.wiring import start_fleet, start_fleet_device
from tests.mosquitto import Mosquitto, find_mosquitto
from updater.bundle import make_virtual_bundle
from updater.storage import DeviceStorage


def raise_fd_limit(want: int) -> int:
    """Raise the soft open-files limit towards ``want`` (mosquitto and the workers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def worker(broker: str, start: int, count: int) -> None:
    """Worker process: run devices ``b<start>`` .. ``b<start+count-1>`` until stdin closes."""
    devices = []
    try:
        for i in range(start, start + count):
            devices.append(await start_fleet_device(broker, f"b{i:04d}", storage=DeviceStorage.in_memory()))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        for d in devices:
            await d.stop()


async def run_size(n: int, *, method: str, bundle: bytes, budget_s: float, per_process: int) -> dict[str, float]:
    """One measurement: attach ``n`` devices (in worker processes), roll ``bundle`` out, wait for all done."""
    with tempfile.TemporaryDirectory(prefix="mgrpc-bench-fleet-") as tmp, Mosquitto(workdir=Path(tmp) / "mq") as mq:
        broker = mq.url()
        fleet = await start_fleet(broker=broker, db_path=Path(tmp) / "fleet.sqlite", send_timeout_s=budget_s)
        procs: list[asyncio.subprocess.Process] = []
        try:
            t0 = time.perf_counter()
            for start in range(0, n, per_process):
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--worker", str(start), str(min(per_process, n - start)),
                    "--broker", broker, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                ))  # fmt: skip
            ids = [f"b{i:04d}" for i in range(n)]
            app = fleet.app
            while sum(1 for i in ids if i in app.devices and app.devices[i].online) < n:
                if time.perf_counter() - t0 > budget_s or any(p.returncode is not None for p in procs):
                    raise TimeoutError(f"only {sum(1 for i in ids if i in app.devices)} of {n} devices came online")
                await asyncio.sleep(0.05)
            attach_s = time.perf_counter() - t0
            info = app.db.add_bundle(bundle)
            t1 = time.perf_counter()
            r = app.start_rollout(devices=ids, bundle=info.sha, method=method, commit_timeout_s=600, autocommit=True,
                                  concurrency=0 if method == "shadow" else 32)  # fmt: skip
            while r.state == "running":
                if time.perf_counter() - t1 > budget_s:
                    raise TimeoutError(f"rollout not finished within {budget_s:g} s: {r.summary()}")
                await asyncio.sleep(0.05)
            update_s = time.perf_counter() - t1
            summary = r.summary()
            if summary != {"done": n}:
                raise RuntimeError(f"rollout ended {r.state}: {summary}")
            return {"n": n, "attach_s": attach_s, "update_s": update_s}
        finally:
            for p in procs:
                if p.stdin is not None:
                    p.stdin.close()
            for p in procs:
                try:
                    await asyncio.wait_for(p.wait(), 30)
                except TimeoutError:
                    p.kill()
                    await p.wait()
            await fleet.close()


def main() -> int:
    """Run the bench and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="comma-separated device counts")
    ap.add_argument("--method", default="shadow", choices=("shadow", "push", "url"))
    ap.add_argument("--budget", type=float, default=600.0, help="seconds allowed per size (attach, then update)")
    ap.add_argument("--per-process", type=int, default=250,
                    help="devices per worker process (paho's select() loop limits one process to ~330)")
    ap.add_argument("--worker", nargs=2, type=int, metavar=("START", "COUNT"), help=argparse.SUPPRESS)
    ap.add_argument("--broker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.worker:
        asyncio.run(worker(args.broker, *args.worker))
        return 0
    if find_mosquitto() is None:
        print("mosquitto is not installed; `make system-deps` installs it", file=sys.stderr)
        return 1
    sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    fds = raise_fd_limit(4 * max(sizes) + 256)
    bundle = make_virtual_bundle("esp32", "2.0", app_size=8192)
    print(f"fleet update through mosquitto, method {args.method}, bundle {len(bundle)} bytes, open files {fds}")
    print(f"{'N':>6} {'attach s':>9} {'update s':>9} {'ms/device':>10} {'ratio':>7} {'exponent':>9}")
    base: dict[str, float] | None = None
    for n in sizes:
        if 2 * n + 64 > fds:
            print(f"{n:>6}  skipped: needs ~{2 * n + 64} open files, the limit is {fds}")
            continue
        try:
            res = asyncio.run(run_size(n, method=args.method, bundle=bundle, budget_s=args.budget,
                                       per_process=args.per_process))
        except (OSError, TimeoutError, RuntimeError, MemoryError) as e:
            print(f"{n:>6}  skipped: {e}")
            continue
        if base is None:
            base = res
        ratio = res["update_s"] / base["update_s"]
        expo = math.log(ratio) / math.log(n / base["n"]) if n != base["n"] else float("nan")
        print(f"{n:>6} {res['attach_s']:>9.2f} {res['update_s']:>9.2f} {1000 * res['update_s'] / n:>10.1f} "
              f"{ratio:>7.2f} {expo:>9.2f}", flush=True)  # fmt: skip
    print("ratio: update time against the smallest N; exponent k in t ~ N^k (1.0 = linear growth)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
