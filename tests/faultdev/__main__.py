"""``python -m tests.faultdev --fault NAME --transport ws``: serve the fault device until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import sys

from tests.faultdev import FAULTS, TRANSPORTS, FaultDevice


async def _main(args: argparse.Namespace) -> None:
    broker = None
    if args.broker:
        host, _, port = args.broker.rpartition(":")
        broker = (host or "127.0.0.1", int(port))
    dev = await FaultDevice(args.fault, auth=args.auth or None).start(args.transport, broker=broker)
    sys.stdout.write(f"READY {dev.url}\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await dev.close()


def main() -> None:
    """Parse the command line and serve."""
    p = argparse.ArgumentParser(prog="python -m tests.faultdev", description=__doc__)
    p.add_argument("--fault", choices=sorted(FAULTS), help="the one rule to break (default: none)")
    p.add_argument("--transport", choices=TRANSPORTS, default="ws")
    p.add_argument("--broker", help="MQTT broker HOST:PORT (for --transport mqtt)")
    p.add_argument("--auth", action="store_true", help="demand digest auth (user:s3cret, realm RPC) with the ACL")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    args = p.parse_args()
    if args.list:
        for f in FAULTS.values():
            sys.stdout.write(f"{f.name:34} {f.check:28} {f.transport:6} {f.section}: {f.rule}\n")
        return
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        pass


main()
