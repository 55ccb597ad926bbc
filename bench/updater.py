"""Benchmark of the Layer-1 updater (run: ``.venv/bin/python bench/updater.py``).

1. Throughput: apply a 16 MiB fw.zip to a file-backed emulated flash (UpdaterContext.process + finish),
   in 64 KiB pieces, and compare with the floor measured in the same run, each run of the updater right
   after a run of the floor (7 pairs; the ratio is the median of the pairs' ratios, robust on a shared machine):
   SHA-1 + SHA-256 + CRC-32 over the same bytes in the same pieces (the least any verifying updater must do).
2. Memory: peak traced allocation (tracemalloc) while a 4 MiB and a 64 MiB bundle are *generated as a
   stream* and fed straight into the updater (the bundle writer's output file object is the updater).
   Streaming means the peak must not grow with the bundle; the script exits 1 if it does.
"""

from __future__ import annotations

import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from updater.bundle import write_virtual_bundle
from updater.context import UpdaterContext
from updater.partitions import make_layout
from updater.storage import DeviceStorage

MIB = 1 << 20
PIECE = 64 * 1024
FS_SIZE = 64 * 1024
ARCH = "esp32"
RUNS = 7


def new_device(path: Path, app_size: int) -> DeviceStorage:
    layout = make_layout(sector_size=4096, app_size=app_size + 4096, fs_size=FS_SIZE)
    st = DeviceStorage.open(path, layout=layout)
    st.factory_init(b"\x00" * 4096, {"conf9.json": b"{}"}, version="0.1", build_id="bench-old")
    st.boot()
    return st


class FeedUpdater(io.RawIOBase):
    """A write-only file object whose writes go straight into an UpdaterContext."""

    def __init__(self, ctx: UpdaterContext) -> None:
        super().__init__()
        self.ctx = ctx

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.ctx.process(bytes(data)) < 0:
            raise RuntimeError(self.ctx.status_message)
        return len(data)


def throughput(tmp: Path) -> None:
    app_size = 16 * MIB
    buf = io.BytesIO()
    write_virtual_bundle(buf, ARCH, "2.0", app_size=app_size, fs_size=FS_SIZE)
    data = buf.getvalue()
    del buf
    view = memoryview(data)
    pieces = [bytes(view[i : i + PIECE]) for i in range(0, len(data), PIECE)]

    floor_times, apply_times = [], []
    for run in range(RUNS):
        t0 = time.perf_counter()
        sha1, sha256, crc = hashlib.sha1(), hashlib.sha256(), 0
        for p in pieces:
            sha1.update(p)
            sha256.update(p)
            crc = zlib.crc32(p, crc)
        floor_times.append(time.perf_counter() - t0)

        path = tmp / f"tput{run}.flash"
        st = new_device(path, app_size)
        ctx = UpdaterContext(st, arch=ARCH, total_size=len(data))
        st.flash.stats.reset()
        t0 = time.perf_counter()
        for p in pieces:
            if ctx.process(p) != 0:
                break
        result = ctx.finish()
        apply_times.append(time.perf_counter() - t0)
        st.close()
        os.unlink(path)
        if result <= 0:
            raise SystemExit(f"update failed: {ctx.status_message}")
    floor_s, apply_s = statistics.median(floor_times), statistics.median(apply_times)
    ratio = statistics.median(a / f for a, f in zip(apply_times, floor_times, strict=True))
    mb = len(data) / MIB
    stats = st.flash.stats
    print(f"bundle {mb:.1f} MiB, {stats.writes} flash writes, {stats.erases} erases (medians of {RUNS} runs)")
    print(f"apply to file-backed flash: {mb / apply_s:8.1f} MiB/s  ({apply_s:.3f} s)")
    print(f"floor sha1+sha256+crc32:    {mb / floor_s:8.1f} MiB/s  ({floor_s:.3f} s)")
    print(f"ratio apply/floor time:     {ratio:8.2f}x  (goal <= 1.40x; median of the {RUNS} paired runs)")


def peak_memory(tmp: Path, app_size: int) -> int:
    st = new_device(tmp / f"mem{app_size}.flash", app_size)
    ctx = UpdaterContext(st, arch=ARCH)
    tracemalloc.start()
    try:
        write_virtual_bundle(FeedUpdater(ctx), ARCH, "2.0", app_size=app_size, fs_size=FS_SIZE)
        result = ctx.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        st.close()
        os.unlink(tmp / f"mem{app_size}.flash")
    if result <= 0:
        raise SystemExit(f"update failed: {ctx.status_message}")
    return peak


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mgrpc-bench-") as d:
        tmp = Path(d)
        throughput(tmp)
        small = peak_memory(tmp, 4 * MIB)
        large = peak_memory(tmp, 64 * MIB)
    print(f"peak traced memory, 4 MiB bundle:  {small / 1024:8.0f} KiB")
    print(f"peak traced memory, 64 MiB bundle: {large / 1024:8.0f} KiB  (ratio {large / small:.2f})")
    # Streaming: the peak is a few buffers (the bundle writer's 1 MiB read chunk, the parser's
    # queue), independent of the bundle size. Allow noise, not growth.
    if large > 1.5 * small + MIB:
        print("FAIL: peak memory grows with the bundle size")
        return 1
    print("OK: peak memory does not grow with the bundle size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
