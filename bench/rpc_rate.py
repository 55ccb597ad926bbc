"""Calls per second through client -> loopback -> router -> handler -> reply, against a bare codec.

The baseline is the same frames through a bare ``json.loads`` + ``json.dumps`` loop (request and reply
each decoded and encoded once), measured in the same run. The ratio says how much the whole path
costs over the codec alone. Bounded: a fixed number of calls, a few seconds in all.
"""

from __future__ import annotations

import asyncio
import json
import time

from rpc.client import AsyncClient
from rpc.loopback import loop_pair
from rpc.node import Node

CALLS = 20000
CONCURRENCY = 64
PARAMS = {"key": "device.id", "n": 12345, "list": [1, 2, 3]}


def bare_codec(n: int) -> float:
    """Seconds for n request+reply encode/decode rounds with plain json."""
    req = {"src": "mos", "id": 1580229426716, "method": "Sys.Echo", "params": PARAMS}
    rep = {"id": 1580229426716, "src": "dev", "dst": "mos", "result": PARAMS}
    t0 = time.perf_counter()
    for _ in range(n):
        a = json.dumps(req, separators=(",", ":"))
        json.loads(a)
        b = json.dumps(rep, separators=(",", ":"))
        json.loads(b)
    return time.perf_counter() - t0


async def full_path(n: int, concurrency: int) -> float:
    """Seconds for n calls through the whole stack, ``concurrency`` in flight at a time."""
    dev = Node(id="dev")
    dev.add_handler("Sys.Echo", lambda ctx, p: p)
    a, b = loop_pair()
    dev.add_channel(b)
    client = AsyncClient(a)
    await client.call("Sys.Echo", PARAMS)  # warm up
    per_worker = n // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await client.call("Sys.Echo", PARAMS)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    dt = time.perf_counter() - t0
    await client.close()
    return dt * n / (per_worker * concurrency)


def main() -> None:
    """Run both measurements and print rates and the ratio."""
    base = min(bare_codec(CALLS) for _ in range(3))
    seq = asyncio.run(full_path(CALLS // 4, 1))
    par = asyncio.run(full_path(CALLS, CONCURRENCY))
    base_rate = CALLS / base
    seq_rate = CALLS // 4 / seq
    par_rate = CALLS / par
    print(f"bare json loads+dumps (req+reply): {base_rate:12,.0f} round trips/s")
    print(f"full path, 1 call in flight:       {seq_rate:12,.0f} calls/s  ratio {base_rate / seq_rate:5.1f}x")
    print(f"full path, {CONCURRENCY} in flight:          {par_rate:12,.0f} calls/s  ratio {base_rate / par_rate:5.1f}x")
    print("aim: the full path costs no more than 5x the bare codec")


if __name__ == "__main__":
    main()
