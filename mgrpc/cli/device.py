"""``mgrpc device``: run a virtual device until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from mgrpc.cli._common import err

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``device`` command."""
    p = sub.add_parser(
        "device",
        help="run a virtual device (flash file, boot loader, OTA) serving RPC",
        description="Run a virtual Mongoose OS device. Its flash lives in STATE/flash.bin, so stopping "
        "and starting it again (even with kill -9) behaves like a power cycle. Each --listen URL is "
        "served (tcp://, udp://, ws://HOST:PORT/rpc, http://HOST:PORT/rpc, serial:///dev/ttyX, "
        "mqtt://BROKER:PORT, ble://); port 0 picks a free port. After every boot the URLs a client "
        "passes as --port are printed on stdout, one per line (for MQTT: mqtt://BROKER:PORT/ID).",
    )
    p.add_argument("--id", required=True, help="device id (device.id)")
    p.add_argument("--state", required=True, help="state directory (holds flash.bin)")
    p.add_argument("--arch", default="esp32", help="platform the firmware must match (default esp32)")
    p.add_argument("--listen", action="append", default=[], metavar="URL", help="serve RPC on URL (repeatable)")
    p.add_argument("--watchdog", type=float, default=30.0, help="seconds before a hung firmware is reset")
    p.add_argument("--auth-file", help="htdigest password file for RPC digest auth")
    p.add_argument("--acl", help="RPC ACL JSON (or @file), e.g. '[{\"method\":\"*\",\"acl\":\"+admin\"}]'")
    p.add_argument("--auth-domain", default="RPC", help="digest realm (rpc.auth_domain)")
    p.set_defaults(func=cmd_device)


def cmd_device(args: argparse.Namespace) -> int:
    """Run the device until SIGINT/SIGTERM."""
    from mgrpc.wiring import virtual_device
    from rpc.auth import Acl, Authenticator
    from services.device import VirtualDevice

    auth = None
    if args.auth_file or args.acl:
        auth = Authenticator(
            password_file=args.auth_file, realm=args.auth_domain, acl=Acl.parse(args.acl) if args.acl else None
        )

    async def run() -> None:
        dev = virtual_device(
            id=args.id, state_dir=args.state, arch=args.arch, listen=args.listen, watchdog_s=args.watchdog, auth=auth
        )

        def booted(d: VirtualDevice, info: Any) -> None:
            err(f"booted slot {info.slot}, firmware {info.version}" + (" (uncommitted)" if info.first_boot else ""))
            for lst, url in zip(d.listeners, d.urls, strict=False):
                print(getattr(lst, "client_url", url), flush=True)

        dev.on_boot.append(booted)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await dev.start()
        try:
            await stop.wait()
        finally:
            await dev.stop()

    asyncio.run(run())
    return 0
