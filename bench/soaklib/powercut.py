"""Power cuts at seeded random flash operations across a device's whole life.

A *scenario* is a seeded random life of one device on the emulated NOR flash: power-ons (boot, with the
first-boot FS merge), file writes and removes, config saves (``services.config.DeviceConfig``), whole
updates (app + fs and app-only bundles, fed in random pieces), commits, reverts, commit-timer expiries
and snapshots (plain and ``set_as_revert``). It is first run without cuts; the flash image before every
step is kept, and so is what a power-on would boot from it (slot, version, committed, every file of the
booted slot).

A *cut* picks a random operation of the whole scenario and a mode (plain, torn keeping the old bytes,
torn with random bytes). The session (a power-on and the steps after it) that holds that operation is
replayed from its starting image with the cut armed; then the power comes back and the device boots.
The cut is *recovered* when:

* the boot finds a valid slot (its app is byte-for-byte a firmware the scenario installed, and the boot
  config's CRC of it matches), and an uncommitted slot still has a valid revert slot;
* what it boots is what a power-on before the cut step or after it would boot (for a cut during a
  power-on: also after one more power-on, since a cut inside a first boot is a reboot without commit):
  same slot, version and committed state -- so committed firmware is never lost and never replaced by
  uncommitted firmware -- and exactly the same files, so every completed file write is intact and the
  one that was cut is either wholly there or wholly absent;
* a second power-on is stable (same result, or the fall-back of an uncommitted first boot).

Anything else is *lost*, with the seed, operation and mode that reproduce it.
"""

from __future__ import annotations

import io
import random
import zipfile
from dataclasses import dataclass, field
from typing import Any

from services.config import DeviceConfig, default_config
from updater.bundle import BundlePart, make_virtual_bundle, write_bundle
from updater.context import UpdaterContext
from updater.errors import PowerCut, UpdaterError
from updater.flash import Flash, TornMode
from updater.partitions import make_layout
from updater.storage import DeviceStorage

__all__ = ["PowerCutResult", "run_cuts"]

FS_SIZE = 32 << 10
APP_SIZE = 16 << 10
LAYOUT = make_layout(sector_size=4096, app_size=APP_SIZE, fs_size=FS_SIZE)
ARCH = "esp32"
FILE_NAMES = ("data.bin", "log.txt", "user.json", "notes.md")
TORN_MODES: tuple[TornMode, ...] = (False, "keep", "random")

Outcome = tuple[int, str, bool, tuple[tuple[str, bytes], ...]]


@dataclass
class Firmware:
    """One installable firmware: the full bundle, an app-only bundle and the app image itself."""

    version: str
    full: bytes
    app_only: bytes
    app: bytes


def _firmwares() -> dict[str, Firmware]:
    out: dict[str, Firmware] = {}
    for i, version in enumerate(("1.0", "2.0", "3.0", "4.0")):
        shipped = {
            "conf0.json": b'{"debug": {"level": %d}}' % i,
            "index.html": b"<h1>%s</h1>" % version.encode() * (20 + i * 9),
        }
        full = make_virtual_bundle(ARCH, version, app_size=4000 + 1500 * i, fs_size=FS_SIZE, fs_files=shipped)
        z = zipfile.ZipFile(io.BytesIO(full))
        app = z.read("mgrpc-virtual.bin")
        buf = io.BytesIO()
        write_bundle(
            buf, platform=ARCH, version=version, name="mgrpc-virtual", build_id=f"{version}-apponly",
            parts=[BundlePart("app", app, {"type": "app", "src": "mgrpc-virtual.bin", "ptn": "app_0"})],
        )  # fmt: skip
        out[version] = Firmware(version, full, buf.getvalue(), app)
    return out


_FW: dict[str, Firmware] | None = None


def firmwares() -> dict[str, Firmware]:
    """The scenario's firmwares, built once per process."""
    global _FW
    if _FW is None:
        _FW = _firmwares()
    return _FW


_BASE: bytes | None = None


def base_image() -> bytes:
    """A provisioned device running 1.0, committed, as its flash image (before its first power-on)."""
    global _BASE
    if _BASE is None:
        fw = firmwares()["1.0"]
        st = DeviceStorage.in_memory(layout=LAYOUT)
        st.factory_init(fw.app, {"conf0.json": b"{}", "conf9.json": b'{"wifi": {"sta": {"ssid": "home"}}}'})
        _BASE = st.flash.snapshot()
    return _BASE


# -- steps --------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One action of the scenario; ``run`` gets the device (None before a power-on) and returns it."""

    kind: str
    arg: Any = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}({self.arg})"


class Device:
    """The device being driven: its flash, and the storage object of the current power-on."""

    def __init__(self, flash: Flash) -> None:
        self.flash = flash
        self.st: DeviceStorage | None = None

    def run(self, step: Step) -> None:
        """Do ``step``. Package errors (:class:`UpdaterError`) are the step failing cleanly."""
        kind, arg = step.kind, step.arg
        if kind == "boot":
            self.st = DeviceStorage(self.flash, LAYOUT)
            self.st.boot()
            return
        st = self.st
        assert st is not None
        try:
            if kind == "write":
                name, data = arg
                st.fs().write(name, data)
            elif kind == "remove":
                if st.fs().exists(arg):
                    st.fs().remove(arg)
            elif kind == "config":
                cfg = DeviceConfig(st.fs(), default_config("soak", ARCH))
                cfg.set({"device": {"location": arg}, "debug": {"level": len(arg) % 4}})
                cfg.save()
            elif kind == "update":
                version, app_only, pieces = arg
                fw = firmwares()[version]
                data = fw.app_only if app_only else fw.full
                ctx = UpdaterContext(st, arch=ARCH, commit_timeout_s=30)
                pos = 0
                for size in pieces:
                    if ctx.process(data[pos : pos + size]) < 0:
                        return
                    pos += size
                if pos < len(data) and ctx.process(data[pos:]) < 0:
                    return
                ctx.finish()
            elif kind == "commit":
                st.commit()
            elif kind == "revert":
                st.revert()
            elif kind == "timeout":
                st.commit_timeout_expired()
            elif kind == "snapshot":
                st.create_snapshot(set_as_revert=arg)
            else:  # pragma: no cover - a typo in the generator
                raise AssertionError(kind)
        except UpdaterError:
            pass  # e.g. an update refused while uncommitted: the step fails cleanly


def _next_step(rng: random.Random, dev: Device, versions: list[str]) -> Step:
    st = dev.st
    assert st is not None
    committed = st.is_committed
    r = rng.random()
    if r < 0.18:
        return Step("boot")
    if r < 0.38:
        size = rng.choice((0, 1, 17, 300, 1000, 2500))
        return Step("write", (rng.choice(FILE_NAMES), rng.randbytes(size)))
    if r < 0.43:
        return Step("remove", rng.choice(FILE_NAMES))
    if r < 0.55:
        return Step("config", rng.choice(("lab", "attic", "field-7", "x" * rng.randrange(1, 40))))
    if r < 0.72 and committed:
        running = st.running_version
        version = rng.choice([v for v in versions if v != running])
        fw = firmwares()[version]
        total = len(fw.full)
        pieces = tuple(rng.randrange(1, 3000) for _ in range(total // 1000 + 2))
        return Step("update", (version, rng.random() < 0.3, pieces))
    if r < 0.85 and not committed:
        return Step("commit")
    if r < 0.90 and not committed:
        return Step(rng.choice(("revert", "timeout")))
    if r < 0.95 and committed:
        return Step("snapshot", rng.random() < 0.5)
    return Step("boot")


# -- the reference run and its boot outcomes ------------------------------------------------------------


def boot_outcome(image: bytes, *, boots: int = 1) -> Outcome:
    """What ``boots`` power-ons of a device holding ``image`` end up running (raises if it cannot boot)."""
    flash = Flash(None, size=LAYOUT.total_size, sector_size=LAYOUT.sector_size)
    flash.restore(image)
    st = DeviceStorage(flash, LAYOUT)
    for _ in range(boots - 1):
        DeviceStorage(flash, LAYOUT).boot()
    return _outcome(st)


def _outcome(st: DeviceStorage) -> Outcome:
    info = st.boot()
    return (info.slot, info.version, st.is_committed, tuple(sorted(st.fs().files().items())))


@dataclass
class Scenario:
    """A seeded life of one device: its steps, the op count before each, and the image before each."""

    seed: int
    steps: list[Step] = field(default_factory=list)
    ops_before: list[int] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)  # images[k] = flash before step k; last = final
    total_ops: int = 0
    _outcomes: dict[tuple[int, int], Outcome] = field(default_factory=dict)

    @classmethod
    def generate(cls, seed: int, n_steps: int) -> Scenario:
        """Run a random life of ``n_steps`` steps without cuts, recording what a cut replay needs."""
        rng = random.Random(seed)
        sc = cls(seed)
        flash = Flash(None, size=LAYOUT.total_size, sector_size=LAYOUT.sector_size)
        flash.restore(base_image())
        dev = Device(flash)
        versions = list(firmwares())
        for k in range(n_steps):
            step = Step("boot") if k == 0 else _next_step(rng, dev, versions)
            sc.steps.append(step)
            sc.ops_before.append(flash.stats.ops)
            sc.images.append(flash.snapshot())
            dev.run(step)
        sc.total_ops = flash.stats.ops
        sc.images.append(flash.snapshot())
        return sc

    def step_at(self, op: int) -> int:
        """Index of the step that performs operation ``op`` of the scenario."""
        k = 0
        for i, before in enumerate(self.ops_before):
            if before <= op:
                k = i
        return k

    def session_start(self, k: int) -> int:
        """Index of the power-on that step ``k`` runs under."""
        while self.steps[k].kind != "boot":
            k -= 1
        return k

    def outcome(self, k: int, boots: int = 1) -> Outcome:
        """Power-on outcome of the image before step ``k`` (cached)."""
        key = (k, boots)
        if key not in self._outcomes:
            self._outcomes[key] = boot_outcome(self.images[k], boots=boots)
        return self._outcomes[key]


# -- cuts ---------------------------------------------------------------------------------------------------


@dataclass
class PowerCutResult:
    """Counts of one batch of cuts, and a description of each loss."""

    tried: int = 0
    recovered: int = 0
    lost: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    by_step: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, other: PowerCutResult) -> None:
        """Merge another batch into this one."""
        self.tried += other.tried
        self.recovered += other.recovered
        self.lost += other.lost
        for mine, theirs in ((self.by_mode, other.by_mode), (self.by_step, other.by_step)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        self.failures.extend(other.failures)


def _check_valid(st: DeviceStorage) -> None:
    """The booted slot is a firmware we installed, and an uncommitted one keeps a valid revert slot."""
    cfg = st.loader.load()
    slot = st.running_slot
    version = cfg.slots[slot].version
    fw = firmwares().get(version)
    if fw is None or st.read_app() != fw.app:
        raise AssertionError(f"slot {slot} runs an app that is not firmware {version!r}")
    if not st.loader.slot_valid(cfg, slot):
        raise AssertionError(f"boot config CRC does not match slot {slot}")
    if not cfg.committed and not st.loader.slot_valid(cfg, cfg.revert_slot):
        raise AssertionError(f"uncommitted slot {slot} has no valid revert slot {cfg.revert_slot}")


def cut_once(sc: Scenario, op: int, torn: TornMode, tear_seed: int) -> str | None:
    """Cut the power at operation ``op`` of ``sc``; returns None when recovered, else what went wrong."""
    k = sc.step_at(op)
    start = sc.session_start(k)
    flash = Flash(None, size=LAYOUT.total_size, sector_size=LAYOUT.sector_size)
    flash.restore(sc.images[start])
    flash.arm_power_cut(at_op=op - sc.ops_before[start], torn=torn, rng=random.Random(tear_seed))
    dev = Device(flash)
    try:
        for step in sc.steps[start : k + 1]:
            dev.run(step)
    except PowerCut:
        pass
    else:
        return f"the cut at op {op} (step {k} {sc.steps[k]}) never happened"
    flash.power_on()
    try:
        st = DeviceStorage(flash, LAYOUT)
        got = _outcome(st)
        _check_valid(st)
    except Exception as exc:  # any failure to boot is a loss, reported with what reproduces it
        return f"boot after the cut failed: {type(exc).__name__}: {exc}"
    allowed = {sc.outcome(k), sc.outcome(k + 1)}
    if sc.steps[k].kind == "boot":
        allowed |= {sc.outcome(k, 2), sc.outcome(k + 1, 2)}
    if got not in allowed:
        return f"booted {_show(got)}; a power-on before or after the step boots one of {[_show(a) for a in allowed]}"
    try:
        again = DeviceStorage(flash, LAYOUT)
        second = _outcome(again)
        _check_valid(again)
    except Exception as exc:
        return f"second boot failed: {type(exc).__name__}: {exc}"
    if second != got and got[2]:
        return f"unstable: a committed {_show(got)} booted {_show(second)} next time"
    return None


def _show(o: Outcome) -> str:
    slot, version, committed, files = o
    return f"slot {slot} v{version} {'committed' if committed else 'uncommitted'} files {[n for n, _ in files]}"


def run_cuts(seed: int, cuts: int, *, steps: int = 14, cuts_per_scenario: int = 60) -> PowerCutResult:
    """``cuts`` power cuts over scenarios seeded from ``seed``."""
    rng = random.Random(seed)
    res = PowerCutResult()
    done = 0
    while done < cuts:
        sc = Scenario.generate(rng.randrange(1 << 30), steps)
        if sc.total_ops == 0:
            continue
        # Half the cuts hit a uniformly random operation (so long steps such as updates get most of
        # them), half a random operation of a uniformly chosen step (so one-write steps such as
        # commits and config saves get their share).
        busy = [k for k in range(len(sc.steps)) if sc.ops_before[k] < _ops_after(sc, k)]
        for _ in range(min(cuts_per_scenario, cuts - done)):
            if rng.random() < 0.5:
                op = rng.randrange(sc.total_ops)
            else:
                k = rng.choice(busy)
                op = rng.randrange(sc.ops_before[k], _ops_after(sc, k))
            torn = rng.choice(TORN_MODES)
            tear_seed = rng.randrange(1 << 30)
            why = cut_once(sc, op, torn, tear_seed)
            done += 1
            res.tried += 1
            mode = torn or "plain"
            res.by_mode[mode] = res.by_mode.get(mode, 0) + 1
            kind = sc.steps[sc.step_at(op)].kind
            res.by_step[kind] = res.by_step.get(kind, 0) + 1
            if why is None:
                res.recovered += 1
            else:
                res.lost += 1
                res.failures.append(f"scenario seed {sc.seed} op {op} torn={torn!r} tear {tear_seed}: {why}")
    return res


def _ops_after(sc: Scenario, k: int) -> int:
    return sc.ops_before[k + 1] if k + 1 < len(sc.steps) else sc.total_ops


def reproduce(scenario_seed: int, op: int, torn: TornMode, tear_seed: int, *, steps: int = 14) -> str | None:
    """Re-run one reported cut (for debugging and regression tests)."""
    return cut_once(Scenario.generate(scenario_seed, steps), op, torn, tear_seed)

