"""A program for a Linux device (a gateway, a Pi) that embeds the mgRPC stack and is updated over the air.

It serves Sys.*, Config.*, FS.* and OTA.* (plus its own ``Demo.Hello``) on the URLs the supervisor
passes in MGRPC_RPC_URL (ws://, http://, mqtt://, tcp://, ...). Updates arrive as fw.zip bundles
built with ``mgrpc fw build --app-dir app/``; the supervisor starts the new version uncommitted and
goes back to this one if it crashes, hangs or is not committed in time. See ../README.md.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

GREETING = "hello from the Linux device"


def hello(ctx: Any, params: Any) -> dict[str, Any]:
    """``Demo.Hello``: what this version says, and where it runs from."""
    return {"greeting": GREETING, "slot": int(os.environ.get("MGRPC_SLOT", "-1"))}


async def main() -> int:
    from mgrpc.wiring import linux_device

    dev = linux_device(app="linux-demo")
    dev.setup.append(lambda node, fw: node.add_handler("Demo.Hello", hello))
    await dev.start()
    print(f"linux-demo {dev.storage.running_version} serving", " ".join(dev.urls), flush=True)
    reason = await dev.serve()
    print(f"linux-demo: {reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
