"""JSON-RPC 2.0 calls per second through client -> loopback -> router -> jsonrpcserver -> handler, against
the same calls in mgRPC measured in the same run (docs/protocol/jsonrpc.md).

The dialect costs more per call than mgRPC (jsonrpcserver validates each request against its JSON
schema, binds params, and the reply is serialised from its response objects); the ratio says how much.
mgRPC frames never enter that path. Bounded: a fixed number of calls, a few seconds in all.
"""

from __future__ import annotations

import asyncio
import time

from rpc.client import AsyncClient
from rpc.jsonrpc import JsonRpcCodec
from rpc.loopback import loop_pair
from rpc.node import Node

CALLS = 4000
CONCURRENCY = 16
PARAMS = {"key": "device.id", "n": 12345, "list": [1, 2, 3]}


async def calls_per_s(n: int, *, jsonrpc: bool) -> float:
    """Calls per second over an in-process link, ``CONCURRENCY`` in flight, in one dialect."""
    dev = Node(id="dev")
    dev.add_handler("Sys.Echo", lambda ctx, p: p)
    a, b = loop_pair(codec_a=JsonRpcCodec() if jsonrpc else None)
    dev.add_channel(b)
    client = AsyncClient(a)
    await client.call("Sys.Echo", PARAMS)  # warm up (and load jsonrpcserver)
    per_worker = n // CONCURRENCY

    async def worker() -> None:
        for _ in range(per_worker):
            await client.call("Sys.Echo", PARAMS)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    dt = time.perf_counter() - t0
    await client.close()
    await dev.close()
    return per_worker * CONCURRENCY / dt


def main() -> None:
    """Measure both dialects (best of 3 each) and print the rates and their ratio."""
    mgrpc = max(asyncio.run(calls_per_s(CALLS, jsonrpc=False)) for _ in range(3))
    jsonrpc = max(asyncio.run(calls_per_s(CALLS, jsonrpc=True)) for _ in range(3))
    print(f"mgRPC frames:          {mgrpc:10,.0f} calls/s")
    print(f"JSON-RPC 2.0 requests: {jsonrpc:10,.0f} calls/s  ratio {mgrpc / jsonrpc:4.1f}x the mgRPC cost per call")


if __name__ == "__main__":
    main()
