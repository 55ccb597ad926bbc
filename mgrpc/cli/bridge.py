"""``mgrpc bridge --to URL --listen URL ...``: serve a device reachable on one transport on others."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from mgrpc.cli._common import err

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``bridge`` command."""
    p = sub.add_parser(
        "bridge",
        help="expose a device reachable on one transport (--to) on others (--listen)",
        description="Forward RPC frames between a device at --to (e.g. a serial port) and clients on each "
        "--listen URL (e.g. ws://0.0.0.0:8000/rpc, mqtt://broker:1883). Frames keep every member (auth "
        "included); JSON frames are forwarded byte for byte. The device link is reopened when it drops.",
    )
    p.add_argument("--to", required=True, metavar="URL", help="where the device is (any --port URL)")
    p.add_argument("--listen", action="append", required=True, metavar="URL", help="serve the device here")
    p.add_argument("--id", help="device id to serve under (default: asked with Sys.GetInfo)")
    p.set_defaults(func=cmd_bridge)


def cmd_bridge(args: argparse.Namespace) -> int:
    """Run the bridge until SIGINT/SIGTERM."""
    from mgrpc.wiring import run_bridge

    async def run() -> int:
        bridge, listeners = await run_bridge(args.to, args.listen, device_id=args.id, timeout_s=args.timeout)
        err(f"bridging device {bridge.id} at {args.to}")
        for lst in listeners:
            print(lst.url, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for lst in listeners:
            await lst.close()
        await bridge.close()
        return 0

    return asyncio.run(run())
