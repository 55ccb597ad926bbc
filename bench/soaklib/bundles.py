"""Malformed fw.zip bundles through the updater (``UpdaterContext`` on the emulated flash).

Kinds of damage, each from a seeded generator: truncated; bit-flipped (anywhere, or in a local header);
wrong sizes in a local header; bad zip headers (signature, flags for data descriptors or encryption,
compression methods, ZIP64 markers); hostile manifests (random values in every field, parts that point
at the running slot's partitions, huge sizes, path traversal in ``src``, duplicate and missing parts);
zip bombs (a deflate entry inflating far past its header and the partition, tried with deflate allowed);
huge names (a 65,535-byte name). Every bundle is fed in random pieces.

A bundle *fails the soak* when the updater raises anything but :class:`updater.errors.UpdaterError`
(``process``/``finish`` must turn every failure into a negative result), runs past the per-bundle
bound, writes the running slot (its app or fs partition) or changes the boot config without reporting
success. Every 200 bundles, and at the end, the device must still boot its committed firmware.
"""

from __future__ import annotations

import io
import json
import random
import signal
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from updater.bundle import make_virtual_bundle
from updater.context import UpdaterContext
from updater.errors import UpdaterError
from updater.flash import Flash
from updater.partitions import make_layout
from updater.storage import DeviceStorage

__all__ = ["BundleResult", "run_bundles"]

FS_SIZE = 32 << 10
LAYOUT = make_layout(sector_size=4096, app_size=16 << 10, fs_size=FS_SIZE)
ARCH = "esp32"
HANG_S = 10.0
LOCAL = b"PK\x03\x04"


class Hang(BaseException):
    """The alarm went off during one bundle."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def local_entry(
    name: bytes, data: bytes, *, method: int = 0, flags: int = 0, crc: int | None = None,
    csize: int | None = None, usize: int | None = None, extra: bytes = b"", raw: bytes | None = None,
) -> bytes:  # fmt: skip
    """One zip local file header and its data, every field overridable."""
    body = data if raw is None else raw
    return struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0,
        zlib.crc32(data) if crc is None else crc,
        len(body) if csize is None else csize,
        len(data) if usize is None else usize,
        len(name) & 0xFFFF, len(extra),
    ) + name + extra + body  # fmt: skip


CENTRAL = b"PK\x01\x02" + b"\x00" * 42 + b"PK\x05\x06" + b"\x00" * 18


def _manifest_of(data: bytes) -> dict[str, Any]:
    z = zipfile.ZipFile(io.BytesIO(data))
    obj: dict[str, Any] = json.loads(z.read("manifest.json"))
    return obj


def _files_of(data: bytes) -> dict[str, bytes]:
    z = zipfile.ZipFile(io.BytesIO(data))
    return {n: z.read(n) for n in z.namelist()}


class Generator:
    """Seeded malformed bundles."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.valid = [
            make_virtual_bundle(ARCH, "2.0", app_size=6000, fs_size=FS_SIZE),
            make_virtual_bundle(ARCH, "3.0", app_size=12000, fs_size=FS_SIZE, fs_files={"a.txt": b"A" * 900}),
        ]
        self.manifest = _manifest_of(self.valid[0])
        self.files = _files_of(self.valid[0])
        # A bomb: 64 MiB of zeros deflates to ~64 KiB; the header claims the app's real size.
        self.bomb = zlib.compressobj(9, zlib.DEFLATED, -15).compress(b"\0" * (64 << 20))
        self.kinds = [
            self.truncated, self.bit_flipped, self.header_flipped, self.wrong_sizes, self.bad_headers,
            self.hostile_manifest, self.hostile_manifest, self.zip_bomb, self.huge_name, self.shuffled,
        ]  # fmt: skip

    def make(self) -> tuple[str, bytes, bool]:
        """``(kind, bundle bytes, allow_deflate)``."""
        fn = self.rng.choice(self.kinds)
        data, deflate = fn()
        return fn.__name__, data, deflate

    # -- kinds ----------------------------------------------------------------------------------------

    def truncated(self) -> tuple[bytes, bool]:
        data = self.rng.choice(self.valid)
        return data[: self.rng.randrange(len(data))], False

    def bit_flipped(self) -> tuple[bytes, bool]:
        data = bytearray(self.rng.choice(self.valid))
        for _ in range(self.rng.randrange(1, 5)):
            i = self.rng.randrange(len(data))
            data[i] ^= 1 << self.rng.randrange(8)
        return bytes(data), False

    def header_flipped(self) -> tuple[bytes, bool]:
        data = bytearray(self.rng.choice(self.valid))
        offsets = [i for i in range(len(data) - 4) if data[i : i + 4] == LOCAL]
        at = self.rng.choice(offsets) + self.rng.randrange(30)
        data[at] = self.rng.randrange(256)
        return bytes(data), self.rng.random() < 0.5

    def wrong_sizes(self) -> tuple[bytes, bool]:
        rng = self.rng
        name, data = rng.choice([(n, d) for n, d in self.files.items()])
        sizes = [0, 1, len(data) - 1, len(data) + 1, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)]
        csize, usize = rng.choice(sizes), rng.choice([*sizes, len(data)])
        entries = [local_entry(b"manifest.json", self.files["manifest.json"])] if name != "manifest.json" else []
        entries.append(local_entry(name.encode(), data, csize=csize, usize=usize))
        return b"".join(entries) + CENTRAL, rng.random() < 0.5

    def bad_headers(self) -> tuple[bytes, bool]:
        rng = self.rng
        m = self.files["manifest.json"]
        variant = rng.randrange(6)
        if variant == 0:
            head = local_entry(b"manifest.json", m, flags=rng.choice([1, 8, 9, 0x41, 0xFFFF]))
        elif variant == 1:
            head = local_entry(b"manifest.json", m, method=rng.choice([1, 8, 9, 12, 14, 99, 0xFFFF]))
        elif variant == 2:
            head = local_entry(b"manifest.json", m, extra=struct.pack("<HH", 1, 16) + b"\xff" * 16)
        elif variant == 3:
            head = rng.choice([b"PK\x05\x06", b"PK\x07\x08", b"PK\x06\x06", b"MZ\x90\x00"]) + m
        elif variant == 4:
            head = local_entry(b"manifest.json", m, crc=rng.randrange(1, 1 << 32))
        else:
            raw = zlib.compressobj(9, zlib.DEFLATED, -15)
            comp = raw.compress(m) + raw.flush()
            comp = comp[: rng.randrange(len(comp))] + rng.randbytes(rng.randrange(0, 20))
            head = local_entry(b"manifest.json", m, method=8, raw=comp)
        rest = b"".join(local_entry(n.encode(), d) for n, d in self.files.items() if n != "manifest.json")
        return head + rest + CENTRAL, variant == 5

    def hostile_manifest(self) -> tuple[bytes, bool]:
        rng = self.rng
        man = json.loads(json.dumps(self.manifest))
        hostile: list[Any] = [
            None, -1, 0, 2**63, 1e308, "", "app_1", "fs_1", "bootcfg0", "../../../etc/passwd", "/dev/mem",
            [], {}, "x" * 5000, True, "esp32c3", "ESP32", "0" * 40, "g" * 64, {"type": "app"},
        ]  # fmt: skip
        for _ in range(rng.randrange(1, 4)):
            where = rng.random()
            if not isinstance(man, dict):
                break
            if where < 0.25:
                man[rng.choice(["platform", "version", "build_id", "name", "parts", "extra"])] = rng.choice(hostile)
            elif where < 0.8 and isinstance(man.get("parts"), dict) and man["parts"]:
                part = man["parts"][rng.choice(list(man["parts"]))]
                if isinstance(part, dict):
                    key = rng.choice(["type", "src", "size", "cs_sha1", "cs_sha256", "ptn", "fs_size", "addr",
                                      "update", "encrypt"])  # fmt: skip
                    part[key] = rng.choice(hostile)
            elif where < 0.9 and isinstance(man.get("parts"), dict):
                man["parts"][rng.choice(["app2", "boot", "fs", "nvs"])] = {
                    "type": rng.choice(["app", "fs", "boot", "bootloader", "data"]),
                    "src": rng.choice(["mgrpc-virtual.bin", "fs.img", "missing.bin", "manifest.json"]),
                    "ptn": rng.choice(["app_0", "app_1", "fs_0", "fs_1", "boot"]),
                    "size": rng.choice([0, 10, 6000, 2**40]),
                }
            else:
                man = rng.choice([[], "manifest", 5, None, {"parts": [1, 2]}, {}])
        text = json.dumps(man).encode() if rng.random() < 0.9 else json.dumps(man).encode()[:-3]
        if rng.random() < 0.1:
            text = b"{" * 20000 + b"}" * 20000
        entries = [local_entry(b"manifest.json", text)]
        entries += [local_entry(n.encode(), d) for n, d in self.files.items() if n != "manifest.json"]
        if rng.random() < 0.3:
            entries.insert(rng.randrange(1, len(entries) + 1), rng.choice(entries))  # a duplicate entry
        return b"".join(entries) + CENTRAL, False

    def zip_bomb(self) -> tuple[bytes, bool]:
        rng = self.rng
        app = self.files["mgrpc-virtual.bin"]
        usize = rng.choice([len(app), 64 << 20, 0xFFFFFFFE])
        bomb = local_entry(b"mgrpc-virtual.bin", app, method=8, raw=self.bomb, usize=usize, crc=zlib.crc32(app))
        entries = [local_entry(b"manifest.json", self.files["manifest.json"]), bomb]
        return b"".join(entries) + CENTRAL, True

    def huge_name(self) -> tuple[bytes, bool]:
        rng = self.rng
        name = rng.choice([b"a" * 65535, b"d/" * 30000 + b"manifest.json", b"\xff\xfe" * 1000, b"../" * 500])
        entries = [local_entry(name, self.files["manifest.json"])]
        if rng.random() < 0.5:
            entries.insert(0, local_entry(b"manifest.json", self.files["manifest.json"]))
        return b"".join(entries) + CENTRAL, False

    def shuffled(self) -> tuple[bytes, bool]:
        entries = [local_entry(n.encode(), d) for n, d in self.files.items()]
        self.rng.shuffle(entries)
        if self.rng.random() < 0.5:
            entries.pop(self.rng.randrange(len(entries)))
        return b"".join(entries) + CENTRAL, False


@dataclass
class BundleResult:
    """Bundles tried, refused cleanly, accepted (harmless damage), and failures with reproducers."""

    tried: int = 0
    refused: int = 0
    accepted: int = 0
    uncaught: int = 0
    hangs: int = 0
    running_written: int = 0
    boot_checks: int = 0
    boot_failures: int = 0
    slowest_s: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, other: BundleResult) -> None:
        """Merge another batch."""
        for name in ("tried", "refused", "accepted", "uncaught", "hangs", "running_written", "boot_checks",
                     "boot_failures"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.slowest_s = max(self.slowest_s, other.slowest_s)
        for k, n in other.by_kind.items():
            self.by_kind[k] = self.by_kind.get(k, 0) + n
        self.failures.extend(other.failures)

    @property
    def bad(self) -> int:
        """Everything that counts as a loss."""
        return self.uncaught + self.hangs + self.running_written + self.boot_failures


class Device:
    """A running, committed device on an in-memory flash, resettable to its provisioned image."""

    def __init__(self) -> None:
        self.flash = Flash(None, size=LAYOUT.total_size, sector_size=LAYOUT.sector_size)
        st = DeviceStorage(self.flash, LAYOUT)
        app = _files_of(make_virtual_bundle(ARCH, "1.0", app_size=5000, fs_size=FS_SIZE))["mgrpc-virtual.bin"]
        st.factory_init(app, {"conf0.json": b"{}", "conf9.json": b'{"a": 1}'})
        st.boot()
        self.base = self.flash.snapshot()
        self.reset()

    def reset(self) -> None:
        """Back to the provisioned image (after a bundle that was accepted)."""
        self.flash.restore(self.base)
        self.st = DeviceStorage(self.flash, LAYOUT)
        self.st.boot()
        self.slot = self.st.running_slot
        self.guarded = [self.layout_range(p) for p in (LAYOUT.app[self.slot], LAYOUT.fs[self.slot])]
        self.guarded_bytes = [self.flash.read(a, n) for a, n in self.guarded]
        self.cfg_ranges = [(b.offset, b.size) for b in LAYOUT.bootcfg]
        self.cfg_bytes = [self.flash.read(a, n) for a, n in self.cfg_ranges]

    @staticmethod
    def layout_range(part: Any) -> tuple[int, int]:
        return part.offset, part.size

    def running_intact(self) -> bool:
        return all(self.flash.read(a, n) == b for (a, n), b in zip(self.guarded, self.guarded_bytes, strict=True))

    def bootcfg_unchanged(self) -> bool:
        return all(self.flash.read(a, n) == b for (a, n), b in zip(self.cfg_ranges, self.cfg_bytes, strict=True))

    def boots_committed(self) -> bool:
        info = DeviceStorage(self.flash, LAYOUT).boot()
        return info.slot == self.slot and info.version == "1.0" and not info.first_boot


def _feed(ctx: UpdaterContext, data: bytes, rng: random.Random) -> int:
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 512, 4096, 65536]) if rng.random() < 0.5 else len(data)
        rc = ctx.process(data[pos : pos + n])
        pos += n
        if rc != 0:
            return rc
    return ctx.finish()


def run_bundles(seed: int, count: int) -> BundleResult:
    """``count`` malformed bundles from ``seed`` through one device's updater."""
    rng = random.Random(seed)
    gen = Generator(rng)
    dev = Device()
    res = BundleResult()
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(count):
            kind, data, deflate = gen.make()
            res.by_kind[kind] = res.by_kind.get(kind, 0) + 1
            split_seed = rng.randrange(1 << 30)
            what = f"{kind} bundle (seed {seed}, #{i}, {len(data)} bytes, deflate={deflate}, split {split_seed})"
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, HANG_S)
            rc = -1
            try:
                ctx = UpdaterContext(dev.st, arch=ARCH, allow_deflate=deflate, total_size=len(data))
                rc = _feed(ctx, data, random.Random(split_seed))
            except Hang:
                res.hangs += 1
                res.failures.append(f"hang > {HANG_S}s: {what}")
            except UpdaterError as exc:
                res.uncaught += 1  # process()/finish() must report failures as results, not raise
                res.failures.append(f"UpdaterError escaped: {exc}: {what}")
            except Exception as exc:
                res.uncaught += 1
                if len(res.failures) < 20:
                    res.failures.append(f"{type(exc).__name__}: {exc}: {what}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            res.slowest_s = max(res.slowest_s, time.perf_counter() - t0)
            res.tried += 1
            if not dev.running_intact():
                res.running_written += 1
                res.failures.append(f"running slot written: {what}")
                dev.reset()
                continue
            if rc == 1:
                res.accepted += 1  # damage the checks cannot see (e.g. a flipped bit in zip padding)
                dev.reset()
                continue
            res.refused += 1
            if not dev.bootcfg_unchanged():
                res.running_written += 1
                res.failures.append(f"boot config changed by a refused bundle: {what}")
                dev.reset()
            if i % 200 == 199 or i == count - 1:
                res.boot_checks += 1
                try:
                    ok = dev.boots_committed()
                except Exception as exc:
                    ok = False
                    res.failures.append(f"boot failed: {exc}")
                if not ok:
                    res.boot_failures += 1
                    res.failures.append(f"the device no longer boots its committed firmware after {what}")
                dev.reset()
    finally:
        signal.signal(signal.SIGALRM, old)
    return res
