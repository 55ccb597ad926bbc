"""Power cut at every flash operation of update -> finalize -> first boot (FS merge) -> commit.

After each cut the device is powered on again and boots. It must always boot a slot whose app matches
its manifest checksums and whose filesystem is intact: the old firmware with its untouched app and fs
partitions, or the new firmware with the new fs files plus the merged user config. Never neither.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Literal

import pytest

from updater.bundle import make_virtual_bundle
from updater.context import UpdaterContext
from updater.errors import PowerCut
from updater.flash import Flash
from updater.manifest import Manifest
from updater.partitions import make_layout
from updater.storage import DeviceStorage

FS_SIZE = 32 << 10
LAYOUT = make_layout(sector_size=4096, app_size=16 << 10, fs_size=FS_SIZE)
OLD_FILES = {"conf0.json": b'{"v": 1}', "conf9.json": b'{"wifi": "secret"}'}
NEW_SHIPPED = {"conf0.json": b'{"v": 2}', "index.html": b"<h1>v2</h1>" * 50}
NEW_FILES = {**NEW_SHIPPED, "conf9.json": OLD_FILES["conf9.json"]}
CHUNK = 700  # the source hands the zip over in pieces that do not line up with anything


def _bundle(version: str, fs_files: dict[str, bytes], app_size: int) -> tuple[bytes, Manifest, bytes]:
    data = make_virtual_bundle("esp32", version, app_size=app_size, fs_size=FS_SIZE, fs_files=fs_files)
    z = zipfile.ZipFile(io.BytesIO(data))
    return data, Manifest.parse(z.read("manifest.json")), z.read("mgrpc-virtual.bin")


OLD_BUNDLE, OLD_MANIFEST, OLD_APP = _bundle("1.0", OLD_FILES, 5000)
NEW_BUNDLE, NEW_MANIFEST, NEW_APP = _bundle("2.0", NEW_SHIPPED, 9000)


def base_image() -> bytes:
    st = DeviceStorage.in_memory(layout=LAYOUT)
    st.factory_init(OLD_APP, OLD_FILES)
    st.boot()
    return st.flash.snapshot()


BASE = base_image()


def storage_on(image: bytes) -> DeviceStorage:
    flash = Flash(None, size=LAYOUT.total_size, sector_size=LAYOUT.sector_size)
    flash.restore(image)
    return DeviceStorage(flash, LAYOUT)


def scenario(st: DeviceStorage) -> None:
    """The whole life of one update on a running, committed device."""
    st.boot()
    ctx = UpdaterContext(st, arch="esp32", commit_timeout_s=60)
    for i in range(0, len(NEW_BUNDLE), CHUNK):
        assert ctx.process(NEW_BUNDLE[i : i + CHUNK]) == 0, ctx.status_message
    assert ctx.finish() == 1, ctx.status_message
    info = st.boot()  # reboot into the new slot: first boot + FS merge
    assert (info.slot, info.first_boot) == (1, True)
    assert st.commit()


def check_manifest(app: bytes, m: Manifest) -> None:
    part = m.parts["app"]
    assert hashlib.sha1(app).hexdigest() == part.cs_sha1
    assert hashlib.sha256(app).hexdigest() == part.cs_sha256


def check_bootable(st: DeviceStorage) -> str:
    """Boot after the cut and check the result; returns "old" or "new"."""
    info = st.boot()
    app = st.read_app()
    if info.slot == 0:
        check_manifest(app, OLD_MANIFEST)
        # the old slot was never written: its partitions are exactly as provisioned
        for part in (LAYOUT.app[0], LAYOUT.fs[0]):
            assert st.flash.read(part.offset, part.size) == BASE[part.offset : part.end]
        assert st.fs().files() == OLD_FILES
        assert info.version == "1.0"
        return "old"
    assert info.slot == 1
    check_manifest(app, NEW_MANIFEST)
    assert st.fs().files() == NEW_FILES
    assert info.version == "2.0"
    return "new"


def test_uncut_run() -> None:
    st = storage_on(BASE)
    scenario(st)
    assert check_bootable(storage_on(st.flash.snapshot())) == "new"


@pytest.mark.parametrize("torn", [False, "keep", "random"])
def test_power_cut_at_every_flash_operation(torn: Literal[False, "keep", "random"]) -> None:
    reference = storage_on(BASE)
    reference.flash.stats.reset()
    scenario(reference)
    total_ops = reference.flash.stats.ops

    tried = 0
    outcomes: dict[str, int] = {"old": 0, "new": 0}
    runs = [(at, seed) for at in range(total_ops) for seed in range(4 if torn else 1)]
    for at, seed in runs:
        st = storage_on(BASE)
        st.flash.arm_power_cut(at_op=at, torn=torn, rng=random.Random(at * 1000 + seed))
        with pytest.raises(PowerCut):
            scenario(st)
        tried += seed == 0  # cut points; torn cuts are tried with several random tears each
        # power comes back: the device boots whatever the flash holds now
        st.flash.power_on()
        rebooted = DeviceStorage(st.flash, LAYOUT)
        outcome = check_bootable(rebooted)
        outcomes[outcome] += 1
        # and it is not wedged: a second boot is stable, and after a commit a new update works
        again = DeviceStorage(st.flash, LAYOUT)
        assert check_bootable(again) == outcome or outcome == "new"
        if not again.is_committed:
            assert again.commit()
        if outcome == "old":
            ctx = UpdaterContext(again, arch="esp32")
            ctx.process(NEW_BUNDLE)
            assert ctx.finish() == 1, ctx.status_message
            assert check_bootable(DeviceStorage(st.flash, LAYOUT)) == "new"

    print(f"power cuts tried ({torn or 'plain'}): {tried} of {total_ops} flash operations; outcomes {outcomes}")
    assert tried == total_ops
    # Cuts before the switch, in the merge or in the commit boot the old slot; a cut while the first
    # boot consumes its one-shot permit leaves the permit in place, so the retry is a first boot again.
    assert outcomes["old"] > 0 and outcomes["new"] > 0


def test_sigkill_mid_update_file_backed(tmp_path: Path) -> None:
    """A killed process is a power loss: the flash file then boots the old firmware, intact."""
    path = tmp_path / "dev.flash"
    path.write_bytes(BASE)
    bundle_path = tmp_path / "fw.zip"
    bundle_path.write_bytes(NEW_BUNDLE)
    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(repo)!r})
        from updater.context import UpdaterContext
        from updater.partitions import make_layout
        from updater.storage import DeviceStorage
        st = DeviceStorage.open({str(path)!r}, layout=make_layout(sector_size=4096, app_size={16 << 10},
                                                                 fs_size={FS_SIZE}), create=False)
        st.boot()
        data = open({str(bundle_path)!r}, "rb").read()
        ctx = UpdaterContext(st, arch="esp32")
        assert ctx.process(data[: len(data) // 2]) == 0, ctx.status_message
        print("half", flush=True)
        sys.stdin.read()  # wait to be killed
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"half"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    image = path.read_bytes()
    assert image != BASE  # the child did write half of the new slot
    with DeviceStorage.open(path, layout=LAYOUT, create=False) as st:
        assert check_bootable(st) == "old"
