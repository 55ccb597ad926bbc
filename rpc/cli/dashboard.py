"""``mgrpc dashboard``: the fleet web dashboard, the shadow service beside the broker, and (for
demos) virtual devices attached to the broker.

``mgrpc dashboard --broker mqtt://127.0.0.1:1883 --db fleet.sqlite [--listen http://127.0.0.1:8080]
[--public-url URL] [--no-shadow] [--demo-devices N]``

This module is also the composition root the fleet tests and ``bench/fleet.py`` use: it wires
:mod:`transports.mqtt` connections into the services (:func:`start_fleet`, :func:`start_fleet_device`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Fleet", "register", "start_fleet", "start_fleet_device"]


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


@dataclass
class Fleet:
    """A running dashboard (and shadow service): what :func:`start_fleet` returns."""

    app: Any  # services.fleet.FleetApp
    url: str
    runner: Any
    conn: Any | None
    shadow: Any | None
    db: Any
    devices: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        """Stop devices, the dashboard, the shadow service and the MQTT connection."""
        for dev in self.devices:
            with contextlib.suppress(Exception):
                await dev.stop()
        await self.app.close()
        await self.runner.cleanup()
        if self.shadow is not None:
            await self.shadow.close()
        if self.conn is not None:
            await self.conn.close()
        self.db.close()


async def start_fleet(
    *, broker: str, db_path: str | Path, listen: str = "http://127.0.0.1:0", public_url: str = "",
    shadow: bool = True, **app_kw: Any,
) -> Fleet:  # fmt: skip
    """Start the dashboard (and the shadow service) on ``listen``; port 0 picks a free port."""
    from aiohttp import web

    import transports
    from services.fleet import FleetApp, FleetDB
    from services.shadow_server import ShadowServer, ShadowStore
    from transports.mqtt import open_connection

    u = urlsplit(listen)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"--listen must be http://HOST:PORT, not {listen!r}")
    db = FleetDB(db_path)
    conn = None
    shadow_srv = None
    broker_base = ""
    runner: Any = None
    try:
        if broker:
            b = urlsplit(broker)
            broker_base = f"{b.scheme}://{b.netloc}"
            conn = await open_connection(broker_base, client_id=f"mgrpc-dashboard-{id(db) & 0xFFFFFF:06x}")
            if shadow:
                shadow_srv = await ShadowServer(conn, ShadowStore(db_path)).start()
        fleet_app = FleetApp(db, mqtt=conn, rpc_connect=transports.connect, broker_url=broker_base, **app_kw)
        runner = web.AppRunner(fleet_app.web_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, u.hostname, u.port if u.port is not None else 80)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://{u.hostname}:{port}"
        fleet_app.public_url = (public_url or url).rstrip("/")
        await fleet_app.start()
    except BaseException:
        if runner is not None:
            await runner.cleanup()
        if conn is not None:
            await conn.close()
        db.close()
        raise
    return Fleet(fleet_app, url, runner, conn, shadow_srv, db)


async def start_fleet_device(
    broker: str, dev_id: str, *, state_dir: str | Path | None = None, storage: Any = None,
    autocommit: bool | None = None, polling: bool = False, start: bool = True, **dev_kw: Any,
) -> Any:  # fmt: skip
    """A virtual device attached to the broker: RPC over MQTT, presence, progress, shadow OTA.

    ``storage`` (e.g. ``DeviceStorage.in_memory()``) avoids a flash file; ``polling`` runs
    ota-http-client polling from its ``update.*`` config.
    """
    from services.device import VirtualDevice
    from services.polling import attach_polling
    from services.shadow import DeviceAgent
    from transports.mqtt import MqttDeviceChannel, open_connection

    b = urlsplit(broker)
    agent_url = f"{b.scheme}://{b.netloc}/{dev_id}"
    dev: Any = VirtualDevice(
        id=dev_id, state_dir=state_dir or Path(tempfile.gettempdir()) / "mgrpc-fleet" / dev_id,
        listen=[agent_url], storage=storage, **dev_kw,
    )  # fmt: skip

    async def connect(url: str) -> Any:
        # A killed device process must show offline: the broker publishes this retained will.
        will = (f"{dev_id}/status", json.dumps({"online": False, "id": dev_id}).encode(), 1, True)
        return await open_connection(f"{b.scheme}://{b.netloc}", client_id=dev_id, will=will)

    async def serve_rpc(conn: Any, node: Any) -> Any:
        ch = MqttDeviceChannel(conn, dev_id, owns_connection=False)
        node.add_channel(ch, default=True, address="*")
        await ch.start()
        return ch

    agent = DeviceAgent(dev, agent_url=agent_url, connect=connect, serve_rpc=serve_rpc, autocommit=autocommit)
    dev.listen_fn = agent.listen
    dev.agent = agent
    if polling:
        dev.pollers = attach_polling(dev)
    if start:
        await dev.start()
    return dev


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Run the dashboard until SIGINT/SIGTERM."""
    from rpc.cli._common import err
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

    try:
        asyncio.run(run())
    except (OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0
