"""``mgrpc supervise --slots DIR -- CMD ARGS...``: run a program from A/B slot directories, commit or
roll back its updates (:mod:`mgrpc.supervisor`)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from mgrpc.cli._common import CliError, duration_arg, err

__all__ = ["register"]

HELP = "run a program from A/B slot directories; roll back updates that crash, hang or never commit"


def register(sub: Any) -> None:
    """Add the ``supervise`` command."""
    p = sub.add_parser(
        "supervise",
        help=HELP,
        description="Start CMD in the active slot of DIR (its app/ directory is the working directory) "
        "and play the device's boot loader for it: an update written by the program's OTA service "
        "(mgrpc ota, POST /update, OTA.Update) is started uncommitted; if the program crashes, stops "
        "sending heartbeats or does not commit within the update's commit timeout, the previous slot "
        "is started again. The program finds its slot, data directory, RPC URLs and this supervisor "
        "in MGRPC_SLOT, MGRPC_SLOT_DIR, MGRPC_DATA_DIR, MGRPC_RPC_URL and MGRPC_SUPERVISOR. The first "
        "run installs --factory DIR as slot 0.",
    )
    p.add_argument("--slots", required=True, metavar="DIR", help="the slots directory (state record, slot0/, slot1/)")
    p.add_argument("--factory", metavar="APPDIR", help="install this program directory as slot 0 of an empty DIR")
    p.add_argument("--factory-data", metavar="DATADIR", help="initial data directory for --factory (e.g. conf0.json)")
    p.add_argument("--factory-version", default="1.0", help="version of the --factory program (default 1.0)")
    p.add_argument("--rpc-url", action="append", default=[], metavar="URL",
                   help="URL the program should serve RPC on (repeatable; passed as MGRPC_RPC_URL)")  # fmt: skip
    p.add_argument("--heartbeat-timeout", type=duration_arg, default=duration_arg("10s"),
                   help="a program silent this long is hung and killed (0: none needed; default 10s)")  # fmt: skip
    p.add_argument("--start-timeout", type=duration_arg, default=duration_arg("30s"),
                   help="time for the first heartbeat after a start (default 30s)")  # fmt: skip
    p.add_argument("--restart-delay", type=duration_arg, default=duration_arg("1s"),
                   help="first wait before restarting a crashed committed program; doubles up to 30s")  # fmt: skip
    p.add_argument("--stop-timeout", type=duration_arg, default=duration_arg("5s"),
                   help="grace between SIGTERM and SIGKILL when the program is stopped (default 5s)")  # fmt: skip
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the program to run")
    p.set_defaults(func=cmd_supervise)


def cmd_supervise(args: argparse.Namespace) -> int:
    """Run the supervisor until SIGINT/SIGTERM."""
    from mgrpc.supervisor import Supervisor, SupervisorError
    from updater.fsslots import FsSlots

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("no program given: mgrpc supervise --slots DIR -- CMD ARGS...")
    if args.factory:
        slots = FsSlots(args.slots)
        if slots.config is None:
            slots.provision(args.factory, data_src=args.factory_data, version=args.factory_version)
            err(f"supervise: installed {args.factory} as slot 0 (version {args.factory_version})")

    async def run() -> None:
        sup = Supervisor(
            args.slots, command, heartbeat_timeout_s=args.heartbeat_timeout, start_timeout_s=args.start_timeout,
            restart_delay_s=args.restart_delay, term_grace_s=args.stop_timeout, rpc_urls=args.rpc_url,
            on_event=lambda text: err(f"supervise: {text}"),
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sup.stop)
        await sup.run()

    try:
        asyncio.run(run())
    except SupervisorError as exc:
        raise CliError(str(exc)) from None
    return 0
