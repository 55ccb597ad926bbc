"""``mgrpc dashboard``: the fleet web dashboard, the shadow service beside the broker, and (for
demos) virtual devices attached to the broker.

``mgrpc dashboard --broker mqtt://127.0.0.1:1883 --db fleet.sqlite [--listen http://127.0.0.1:8080]
[--public-url URL] [--no-shadow] [--demo-devices N] [--token-file F] [--password-file F]
[--tls-cert PEM --tls-key PEM]``

On 127.0.0.1 credentials are optional; on any other address the dashboard refuses to start without
them.

The wiring itself is :func:`mgrpc.wiring.start_fleet` and :func:`mgrpc.wiring.start_fleet_device`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
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
    p.add_argument("--db", required=True, help="SQLite file for devices, bundles, rollouts and shadows, or a "
                   "postgresql://user@host/db URL shared by several dashboard processes (workers)")
    p.add_argument("--share-group", default=None, metavar="NAME",
                   help="MQTT shared-subscription group the workers split device traffic in ($share/NAME/...; "
                   "default mgrpc-fleet with a postgresql:// --db, none with SQLite)")
    p.add_argument("--worker-id", default="", help="this worker's name in the database (default: random)")
    p.add_argument("--listen", default="http://127.0.0.1:8080", help="where to serve the dashboard")
    p.add_argument("--public-url", default="",
                   help="the dashboard URL as devices see it (default: --listen); with several workers give them "
                   "all the same one (a load balancer in front of them)")  # fmt: skip
    p.add_argument("--no-shadow", action="store_true", help="do not run the shadow service")
    p.add_argument("--token-file", help="file holding the API token (Authorization: Bearer, or ?token= once "
                   "in the browser); required with --password-file or instead of it off 127.0.0.1")
    p.add_argument("--password-file", help="htdigest file (user:realm:HA1) for browser logins (HTTP Basic)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    p.add_argument("--demo-devices", type=int, default=0, metavar="N",
                   help="also run N virtual devices on the broker (in memory; ids demo-000...)")  # fmt: skip
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Run the dashboard until SIGINT/SIGTERM."""
    from mgrpc.cli._common import EXIT_USAGE, CliError, err
    from mgrpc.fleet.errors import FleetError
    from mgrpc.fleet.security import SecurityError
    from mgrpc.wiring import start_fleet, start_fleet_device
    from updater.storage import DeviceStorage

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            msg = f"cannot read --token-file {args.token_file!r}: {e.strerror}"
            raise CliError(msg, exit_status=EXIT_USAGE) from None
        if len(token) < 16:
            raise CliError("the token in --token-file is too short (16 characters at least)", exit_status=EXIT_USAGE)
    listen = args.listen
    if args.tls_cert and listen.startswith("http://"):
        listen = "https://" + listen[len("http://") :]

    async def run() -> None:
        try:
            fleet = await start_fleet(broker=args.broker, db_path=args.db, listen=listen,
                                      public_url=args.public_url, shadow=not args.no_shadow, token=token,
                                      password_file=args.password_file, tls_cert=args.tls_cert,
                                      tls_key=args.tls_key, share_group=args.share_group,
                                      worker_id=args.worker_id)  # fmt: skip
        except SecurityError as e:
            raise CliError(str(e), exit_status=EXIT_USAGE) from None
        except FleetError as e:  # e.g. a database written by a newer mgrpc
            raise CliError(str(e)) from None
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
