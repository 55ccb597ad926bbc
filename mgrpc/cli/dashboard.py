"""``mgrpc dashboard``: the fleet web dashboard, the shadow service beside the broker, and (for
demos) virtual devices attached to the broker.

``mgrpc dashboard --broker mqtt://127.0.0.1:1883 --db fleet.sqlite [--listen http://127.0.0.1:8080]
[--public-url URL] [--no-shadow] [--demo-devices N]``

The wiring itself is :func:`mgrpc.wiring.start_fleet` and :func:`mgrpc.wiring.start_fleet_device`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``dashboard`` command."""
    p = sub.add_parser(
        "dashboard",
        help="fleet web dashboard: devices over MQTT or by URL, staged OTA rollouts with live progress",
        description="Serve the fleet dashboard. Devices are seen over MQTT (<id>/status, <id>/ota/progress "
        "and their shadow) or added by RPC URL; the operator selects devices, uploads a fw.zip and "
        "chooses the method (push over RPC, OTA.Update, shadow desired.ota.url, HTTP polling). The "
        "shadow service ($aws/things/<id>/shadow/...) runs here too, in the same SQLite file, "
        "unless --no-shadow.",
    )
    p.add_argument("--broker", default="", help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--db", required=True, help="SQLite file for devices, bundles, rollouts and shadows")
    p.add_argument("--listen", default="http://127.0.0.1:8080", help="where to serve the dashboard")
    p.add_argument("--public-url", default="", help="the dashboard URL as devices see it (default: --listen)")
    p.add_argument("--no-shadow", action="store_true", help="do not run the shadow service")
    p.add_argument("--demo-devices", type=int, default=0, metavar="N",
                   help="also run N virtual devices on the broker (in memory; ids demo-000...)")  # fmt: skip
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Run the dashboard until SIGINT/SIGTERM."""
    from mgrpc.cli._common import err
    from mgrpc.wiring import start_fleet, start_fleet_device
    from updater.storage import DeviceStorage

    async def run() -> None:
        fleet = await start_fleet(broker=args.broker, db_path=args.db, listen=args.listen,
                                  public_url=args.public_url, shadow=not args.no_shadow)  # fmt: skip
        try:
            for i in range(max(0, args.demo_devices)):
                fleet.devices.append(await start_fleet_device(
                    args.broker, f"demo-{i:03d}", storage=DeviceStorage.in_memory(), autocommit=True))
            print(f"dashboard on {fleet.url}/", flush=True)
            base = fleet.app.public_url
            err(f"devices download bundles from {base}/fw/<sha>.zip and poll {base}/update")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await fleet.close()

    asyncio.run(run())
    return 0
