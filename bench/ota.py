"""OTA goodput (firmware bytes per second) of ``mgrpc ota`` with no flags, against mos's way, in one run.

WebSocket at a 20 ms round trip (a latency proxy, transports/latency.py, adds 10 ms each way), two
devices: our virtual device, and a *stock-style* one -- the same virtual device with Mongoose OS's
WebSocket limit (``?stall_over=3064``: after a longer message the connection answers nothing more, as
the real firmware in ../shared/mgos-ubuntu does) and its ``rpc.max_frame_size`` of 4096. Rows:

* "mos way": stop-and-wait, 512-byte chunks, nothing fitted to the device (``window=1``,
  ``chunk_size=512``, ``fit_to_device=False``) -- what ``mos ota`` does;
* "mgrpc default": ``ota_update(client, fw)`` with no options, i.e. ``mgrpc ota fw.zip``.

Goal: mgrpc default >= 10x the mos way and >= 250 KB/s on both devices.

Serial at 115200 baud through a link emulator (transports/linkemu.py: 10 bits per byte at the true
rate), one bundle for every row; the limits are 8,640 B/s of base64 payload and 11,520 B/s of raw
bytes. Rows:

* "mos default (emulated)": stop-and-wait, 512-byte chunks, writes paced 16 bytes / 5 ms and a
  handshake before every frame after which the whole 200 ms interval is waited -- mos's serial codec
  at 115200 without flow control (``?pacing=1&handshake=every&handshake_wait=interval``);
* "mos --rpc-uart-no-delay (emulated)": stop-and-wait, 512 B, one handshake (200 ms waited), no pacing;
* "mgrpc default": no options (chunk size and window chosen from the device);
* "mgrpc msgpack": no options but ``?codec=msgpack`` at both ends (binary frames, raw bytes).

Goals: mgrpc default >= 0.90 of the base64 limit; msgpack >= 0.95 of the raw limit. The round trip of
an ``RPC.Ping`` on each link is measured and printed. Bounded: about two minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transports
from rpc.host.ota import ota_update
from services.device import VirtualDevice
from transports.latency import LatencyProxy
from transports.ws import MGOS_WS_MESSAGE_LIMIT
from updater.bundle import make_virtual_bundle

ONE_WAY_DELAY_S = 0.010
BAUD = 115200
RAW_LIMIT = BAUD / 10  # bytes/s with 10 bits per byte on the wire
B64_LIMIT = RAW_LIMIT * 3 / 4  # payload bytes/s when every byte on the wire is base64 text
WS_APP_SIZE = 65536  # with the default LittleFS part the bundle is ~330 KB
SERIAL_PART_SIZE = 16384
MOS_WAY: dict[str, Any] = {"window": 1, "chunk_size": 512, "fit_to_device": False}
_versions = iter(range(2, 10_000))


async def rtt_s(url: str, n: int = 10) -> float:
    """Median round trip of an ``RPC.Ping`` over ``url``."""
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


async def one_update(dev: VirtualDevice, url: str, fw: bytes, **opts: Any) -> tuple[float, Any]:
    """Push ``fw`` over ``url``; returns (goodput in bytes/s, the OtaResult). Commits after the reboot."""
    boots = dev.boots
    client = await transports.connect(url, timeout_s=20.0)
    t0 = time.perf_counter()
    try:
        res = await ota_update(client, fw, reconnect=lambda: transports.connect(url, timeout_s=20.0), **opts)
        dt = time.perf_counter() - t0
        client = res.client
    finally:
        await client.close()
    await dev.wait_booted(boots=boots + 1, timeout_s=30.0)
    assert dev.storage is not None
    dev.storage.commit()  # the next update needs a committed firmware; no need to time a commit poll
    return len(fw) / dt, res


def _fw(app_size: int, fs_size: int | None = None) -> bytes:
    kw = {} if fs_size is None else {"fs_size": fs_size}
    return make_virtual_bundle("esp32", f"{next(_versions)}.0", app_size=app_size, **kw)


async def ws_section() -> bool:
    """Both devices over WebSocket at 20 ms RTT; returns whether every goal was met."""
    ok = True
    print(f"WebSocket, {2 * ONE_WAY_DELAY_S * 1000:.0f} ms round trip added by a proxy")
    print(f"{'device':<13} {'client':<34} {'chunk':>6} {'window':>6} {'KB/s':>8} {'vs mos':>7}")
    for device, listen in (("virtual", "ws://127.0.0.1:0/rpc"), ("stock-style", f"ws://127.0.0.1:0/rpc?stall_over={MGOS_WS_MESSAGE_LIMIT}")):
        with tempfile.TemporaryDirectory() as tmp:
            dev = VirtualDevice(id="esp32_BENCH", state_dir=tmp, listen=[listen], listen_fn=transports.listen)
            await dev.start()
            url = dev.urls[0].split("?", 1)[0]
            host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            proxy = LatencyProxy(host, int(port), delay_s=ONE_WAY_DELAY_S)
            await proxy.start()
            slow = proxy.url_for(url)
            try:
                rtt = await rtt_s(slow)
                mos, _ = await one_update(dev, slow, _fw(WS_APP_SIZE), **MOS_WAY)
                ours, res = await one_update(dev, slow, _fw(WS_APP_SIZE))
            finally:
                await proxy.close()
                await dev.stop()
        print(f"{device:<13} {'mos way (stop-and-wait, 512 B)':<34} {512:>6} {1:>6} {mos / 1000:>8.1f} {1:>6.1f}x")
        print(
            f"{'':<13} {'mgrpc default (no flags)':<34} {res.chunk_size:>6} {res.window:>6} {ours / 1000:>8.1f} "
            f"{ours / mos:>6.1f}x   measured RTT {rtt * 1000:.1f} ms"
        )
        met = ours >= 10 * mos and ours >= 250_000
        ok = ok and met
        print(f"{'':<13} goal >= 10x mos and >= 250 KB/s: {'met' if met else 'MISSED'}")
    return ok


async def serial_section() -> bool:
    """The serial rows (one fresh device and link each); returns whether every goal was met."""
    from transports.linkemu import LinkEmulator

    cases = [
        # (label, device codec, client URL options, ota_update options, limit)
        ("mos default (emulated)", "", "?pacing=1&handshake=every&handshake_wait=interval", MOS_WAY, B64_LIMIT),
        ("mos --rpc-uart-no-delay (emulated)", "", "?handshake_wait=interval", MOS_WAY, B64_LIMIT),
        ("mgrpc default (no flags)", "", "", {}, B64_LIMIT),
        ("mgrpc msgpack (?codec=msgpack)", "?codec=msgpack", "?codec=msgpack", {}, RAW_LIMIT),
    ]
    fw = _fw(SERIAL_PART_SIZE, SERIAL_PART_SIZE)
    rows = []
    for label, dev_opts, client_opts, opts, limit in cases:
        with tempfile.TemporaryDirectory() as tmp, LinkEmulator(baud=BAUD) as link:
            dev = VirtualDevice(
                id="esp32_SERIAL", state_dir=tmp, listen=[f"serial://{link.a_path}{dev_opts}"],
                listen_fn=transports.listen,
            )  # fmt: skip
            await dev.start()
            try:
                url = f"serial://{link.b_path}{client_opts}"
                rtt = await rtt_s(url, n=5)
                bps, res = await one_update(dev, url, fw, **opts)
                rows.append((label, res.chunk_size, res.window, bps, limit, rtt))
            finally:
                await dev.stop()
    print(f"\nSerial at {BAUD} baud (10 bits/byte), bundle {len(fw):,} bytes; limits: base64 payload "
          f"{B64_LIMIT:,.0f} B/s, raw {RAW_LIMIT:,.0f} B/s")  # fmt: skip
    print(f"{'client':<36} {'chunk':>6} {'window':>6} {'B/s':>8} {'of limit':>9} {'RTT':>8}")
    for label, chunk, window, bps, limit, rtt in rows:
        which = "raw" if limit == RAW_LIMIT else "b64"
        print(f"{label:<36} {chunk:>6} {window:>6} {bps:>8,.0f} {bps / limit:>5.2f} {which} {rtt * 1000:>6.0f} ms")
    mos = rows[0][3]
    ours, msgpack = rows[2][3], rows[3][3]
    print(f"mgrpc default / mos default: {ours / mos:.1f}x; / mos --rpc-uart-no-delay: {ours / rows[1][3]:.1f}x")
    met_json, met_bin = ours >= 0.9 * B64_LIMIT, msgpack >= 0.95 * RAW_LIMIT
    print(f"goal mgrpc default >= 0.90 of the base64 limit: {'met' if met_json else 'MISSED'} ({ours / B64_LIMIT:.3f})")
    print(f"goal msgpack >= 0.95 of the raw limit: {'met' if met_bin else 'MISSED'} ({msgpack / RAW_LIMIT:.3f})")
    return met_json and met_bin


# ../shared/mgos-ubuntu next to the repository; $MGRPC_REAL_DEVICE overrides it (as in tests/real_device.py).
ELF = (
    Path(os.environ.get("MGRPC_REAL_DEVICE") or Path(__file__).resolve().parents[2] / "shared" / "mgos-ubuntu")
    / "mgos-ubuntu.elf"
)
FAST_BAUD = 921600


async def compression_section() -> bool:
    """A real compiled binary (the mgos-ubuntu ELF, read now) as the app part, stored and deflated, over
    msgpack on an emulated 921600-baud link; the effective firmware rate against the raw link."""
    import io

    from transports.linkemu import LinkEmulator
    from updater.bundle import BundlePart, write_bundle
    from updater.partitions import make_layout
    from updater.storage import DeviceStorage

    if not ELF.exists():
        print(f"\ncompression: skipped, {ELF} is not here")
        return True
    elf = ELF.read_bytes()
    raw_limit = FAST_BAUD / 10
    print(f"\nCompressed bundles (update.allow_deflate on the device), app part = {ELF.name} ({len(elf):,} bytes),")
    print(f"msgpack at {FAST_BAUD} baud (raw limit {raw_limit:,.0f} B/s); firmware bytes per second of transfer")
    print(f"{'bundle':<10} {'bytes sent':>11} {'firmware B/s':>13} {'of raw link':>12}")
    rates = {}
    for compress in (False, True):
        out = io.BytesIO()
        part = BundlePart("app", elf, {"type": "app", "src": "app.bin", "ptn": "app_0"})
        write_bundle(out, platform="esp32", version=f"{next(_versions)}.0", parts=[part], compress=compress)
        bundle = out.getvalue()
        with tempfile.TemporaryDirectory() as tmp, LinkEmulator(baud=FAST_BAUD) as link:
            layout = make_layout(sector_size=4096, app_size=2 << 20, fs_size=256 << 10)
            storage = DeviceStorage.open(Path(tmp) / "flash.bin", layout=layout)
            dev = VirtualDevice(
                id="esp32_ELF", state_dir=tmp, listen=[f"serial://{link.a_path}?codec=msgpack"],
                listen_fn=transports.listen, storage=storage,
            )  # fmt: skip
            await dev.start()
            try:
                client = await transports.connect(f"serial://{link.b_path}?codec=msgpack", timeout_s=20.0)
                try:
                    await client.call("Config.Set", {"config": {"update": {"allow_deflate": True}}})
                    t0 = time.perf_counter()
                    res = await ota_update(client, bundle)
                    dt = time.perf_counter() - t0
                    await res.client.close()
                finally:
                    await client.close()
            finally:
                await dev.stop()
        rates[compress] = len(elf) / dt
        name = "deflated" if compress else "stored"
        print(f"{name:<10} {len(bundle):>11,} {rates[compress]:>13,.0f} {rates[compress] / raw_limit:>11.2f}x")
    met = rates[True] > raw_limit
    print(f"goal: deflate raises the firmware rate above the raw link: {'met' if met else 'MISSED'} "
          f"({rates[True] / rates[False]:.2f}x the stored bundle's rate)")  # fmt: skip
    return met


async def main(*, ws: bool, serial: bool, compression: bool) -> bool:
    ok = True
    if ws:
        ok = await ws_section() and ok
    if serial:
        ok = await serial_section() and ok
    if compression:
        ok = await compression_section() and ok
    return ok


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-serial", action="store_true", help="skip the serial rows")
    ap.add_argument("--serial-only", action="store_true", help="only the serial rows")
    ap.add_argument("--compression-only", action="store_true", help="only the compressed-bundle rows")
    logging.basicConfig(level=logging.ERROR)
    a = ap.parse_args()
    only = a.serial_only or a.compression_only
    met = asyncio.run(
        main(
            ws=not only, serial=not a.no_serial and not a.compression_only, compression=not a.serial_only
        )
    )
    print("OK: every goal met" if met else "MISSED: see the goals above")
