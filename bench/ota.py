"""OTA goodput (firmware bytes per second): stop-and-wait (window 1, as mos) against pipelined writes.

One virtual device serves ``loop://`` and ``ws://``; a latency proxy (transports/latency.py) in front
of the WebSocket listener adds 10 ms each way, a 20 ms round trip as on Wi-Fi. The same bundle is
pushed with ``mgrpc``'s OTA client (Status → Begin → Write… → End, 512-byte chunks) for window 1 and
for the default window over both links, committing after each reboot, all in one run. A
stop-and-wait client moves at most one chunk per round trip (512 B / 20 ms = 25.6 KB/s); the
pipelined default should reach at least 10 times that. ``--sweep`` also measures other windows over the
slow link (how the default was chosen). Bounded: a few fixed-size updates, well under two minutes.

The serial column runs the device behind a link emulator (transports/linkemu.py: a pty relay that
delivers 10 bits per byte at 115200 baud) and reports goodput as a fraction of the link's limit for
base64 payload, 115200 / 10 x 3/4 = 8,640 bytes/s: our pipelined client (512-byte chunks as mos, and
2048-byte chunks, which fit the device's 4096-byte frame limit), and mos's own way — stop-and-wait
with 512-byte chunks, a handshake before every frame and 16-byte/5 ms pacing (``--no-serial`` skips).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transports
from rpc.host.ota import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, ota_update
from services.device import VirtualDevice
from transports.latency import LatencyProxy
from updater.bundle import make_virtual_bundle

ONE_WAY_DELAY_S = 0.010
BAUD = 115200
B64_LIMIT = BAUD / 10 * 3 / 4  # payload bytes/s when every byte on the wire is base64 text
APP_SIZE = 65536  # with the default LittleFS part the bundle is ~330 KB


async def rtt_s(url: str, n: int = 10) -> float:
    """Median round trip of an RPC call over ``url``."""
    client = await transports.connect(url, timeout_s=10.0)
    try:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.call("RPC.Ping")
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)
    finally:
        await client.close()


async def one_update(
    dev: VirtualDevice, url: str, fw: bytes, window: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> float:
    """Push ``fw`` over ``url`` with ``window``; returns goodput in bytes/s. Commits after the reboot."""
    boots = dev.boots
    client = await transports.connect(url, timeout_s=20.0)
    t0 = time.perf_counter()
    try:
        res = await ota_update(client, fw, window=window, chunk_size=chunk_size)
        dt = time.perf_counter() - t0
        client = res.client
    finally:
        await client.close()
    await dev.wait_booted(boots=boots + 1, timeout_s=20.0)
    assert dev.storage is not None
    dev.storage.commit()  # the next update needs a committed firmware; no need to time a commit poll
    return len(fw) / dt


async def main(sweep: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dev = VirtualDevice(
            id="esp32_BENCH", state_dir=tmp, listen=["loop://bench-ota", "ws://127.0.0.1:0/rpc"],
            listen_fn=transports.listen,
        )  # fmt: skip
        await dev.start()
        loop_url, ws_url = dev.urls
        host_port = ws_url.split("//", 1)[1].split("/", 1)[0]
        host, port = host_port.rsplit(":", 1)
        proxy = LatencyProxy(host, int(port), delay_s=ONE_WAY_DELAY_S)
        await proxy.start()
        slow_url = proxy.url_for(ws_url)
        try:
            rtt = await rtt_s(slow_url)
            links = [("loop://", loop_url), ("ws:// + 20 ms RTT", slow_url)]
            windows = [1, DEFAULT_WINDOW]
            version = iter(range(2, 1000))
            results: dict[tuple[str, int], float] = {}
            size = 0
            for name, url in links:
                for w in windows:
                    fw = make_virtual_bundle("esp32", f"{next(version)}.0", app_size=APP_SIZE)
                    size = len(fw)
                    results[name, w] = await one_update(dev, url, fw, w)
            sweep_results: dict[int, float] = {}
            if sweep:
                for w in (2, 4, 8, 12, 16, 20):
                    fw = make_virtual_bundle("esp32", f"{next(version)}.0", app_size=APP_SIZE)
                    sweep_results[w] = await one_update(dev, slow_url, fw, w)
        finally:
            await proxy.close()
            await dev.stop()

    bound = DEFAULT_CHUNK_SIZE / (2 * ONE_WAY_DELAY_S)
    print(f"OTA goodput, bundle {size} bytes, chunk {DEFAULT_CHUNK_SIZE} B, measured RTT via proxy {rtt * 1000:.1f} ms")
    print(f"{'link':<20} {'window':>6} {'KB/s':>10}")
    for (name, w), bps in results.items():
        print(f"{name:<20} {w:>6} {bps / 1000:>10.1f}")
    for name, _ in links:
        r = results[name, DEFAULT_WINDOW] / results[name, 1]
        print(f"{name:<20} pipelined (window {DEFAULT_WINDOW}) / stop-and-wait: {r:.1f}x")
    slow = results["ws:// + 20 ms RTT", DEFAULT_WINDOW]
    print(f"stop-and-wait bound 512 B / 20 ms = {bound / 1000:.1f} KB/s; pipelined over it: {slow / bound:.1f}x "
          f"(target >= 10x)")  # fmt: skip
    if sweep_results:
        print("window sweep over ws:// + 20 ms RTT:")
        for w, bps in sweep_results.items():
            print(f"  window {w:>2}: {bps / 1000:8.1f} KB/s ({bps / bound:.1f}x the bound)")


async def serial_column() -> None:
    """Goodput over an emulated 115200-baud UART, as fractions of the base64 payload limit."""
    from transports.linkemu import LinkEmulator

    cases = [
        # (label, codec, client URL options, window, chunk size, bundle app/fs size)
        ("mgrpc, pipelined, 512 B chunks", "json", "", DEFAULT_WINDOW, 512, 16384),
        ("mgrpc, pipelined, 2048 B chunks", "json", "", DEFAULT_WINDOW, 2048, 16384),
        ("mgrpc, msgpack, 2048 B chunks", "msgpack", "?codec=msgpack", DEFAULT_WINDOW, 2048, 16384),
        ("mos way: stop-and-wait, paced", "json", "?pacing=1&handshake=every", 1, 512, 8192),
    ]
    rows = []
    for i, (label, codec, opts, window, chunk, size) in enumerate(cases):
        with tempfile.TemporaryDirectory() as tmp, LinkEmulator(baud=BAUD) as link:
            dev_opts = "?codec=msgpack" if codec == "msgpack" else ""
            dev = VirtualDevice(
                id="esp32_SERIAL", state_dir=tmp, listen=[f"serial://{link.a_path}{dev_opts}"],
                listen_fn=transports.listen,
            )  # fmt: skip
            await dev.start()
            try:
                fw = make_virtual_bundle("esp32", f"7.{i}", app_size=size, fs_size=size)
                bps = await one_update(dev, f"serial://{link.b_path}{opts}", fw, window, chunk)
                rows.append((label, len(fw), bps))
            finally:
                await dev.stop()
    print(f"\nserial link at {BAUD} baud (10 bits/byte); base64 payload limit {B64_LIMIT:,.0f} B/s")
    print(f"{'client':<34} {'bundle':>8} {'B/s':>8} {'of limit':>9}")
    for label, size, bps in rows:
        print(f"{label:<34} {size:>8} {bps:>8,.0f} {bps / B64_LIMIT:>9.2f}")
    print("aim: mgrpc (JSON) >= 0.90 of the limit, msgpack > 1.0; mos's stop-and-wait cannot pass ~0.75")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also measure windows 2..20 over the slow link")
    ap.add_argument("--no-serial", action="store_true", help="skip the serial link column")
    ap.add_argument("--serial-only", action="store_true", help="only the serial link column")
    logging.basicConfig(level=logging.ERROR)
    a = ap.parse_args()
    if not a.serial_only:
        asyncio.run(main(a.sweep))
    if not a.no_serial:
        asyncio.run(serial_column())
