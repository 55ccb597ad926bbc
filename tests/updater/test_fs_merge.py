"""Device filesystem views over flash partitions, and the first-boot FS merge."""

from __future__ import annotations

import random

import pytest

from updater.bootcfg import BootFlags
from updater.bundle import make_virtual_bundle
from updater.context import UpdaterContext
from updater.errors import PowerCut
from updater.flash import Flash
from updater.fs import FlashFS, FSError, make_fs_image, merge_fs
from updater.partitions import Partition, make_layout
from updater.storage import DeviceStorage

SECTOR = 4096
BLOCKS = 8
SIZE = SECTOR * BLOCKS


def fs_with(files: dict[str, bytes], flash: Flash | None = None, offset: int = 0) -> FlashFS:
    flash = flash or Flash(None, size=SIZE, sector_size=SECTOR)
    image = make_fs_image(files, block_size=SECTOR, block_count=BLOCKS)
    for off in range(0, SIZE, SECTOR):
        flash.write(offset + off, image[off : off + SECTOR])
    return FlashFS(flash, Partition("fs", offset, SIZE))


def test_filesystem_view_operations() -> None:
    fs = fs_with({"a.txt": b"A"})
    fs.write("b.bin", bytes(range(256)) * 40)
    assert fs.list() == ["a.txt", "b.bin"]
    assert fs.read("b.bin") == bytes(range(256)) * 40
    assert fs.size("b.bin") == 10240 and fs.exists("a.txt") and not fs.exists("zz")
    fs.write("a.txt", b"replaced")
    assert fs.read("a.txt") == b"replaced"
    fs.remove("a.txt")
    assert fs.files() == {"b.bin": bytes(range(256)) * 40}
    with pytest.raises(FSError, match=r"no such file: a\.txt"):
        fs.read("a.txt")
    with pytest.raises(FSError):
        fs.remove("a.txt")
    used, total = fs.stat_fs()
    assert 0 < used <= total == SIZE
    # what was written is on the flash: a fresh mount sees it
    again = FlashFS(fs.flash, fs.part)
    assert again.list() == ["b.bin"]


def test_images_from_the_bundle_builder_mount() -> None:
    from updater.bundle import make_fs_image as bundle_fs_image

    image = bundle_fs_image({"conf0.json": b"{}"}, fs_size=SIZE, block_size=SECTOR)
    flash = Flash(None, size=SIZE, sector_size=SECTOR)
    flash.write(0, image)
    fs = FlashFS(flash, Partition("fs", 0, SIZE))
    assert fs.files() == {"conf0.json": b"{}"}
    fs.write("conf9.json", b"{}")
    assert fs.list() == ["conf0.json", "conf9.json"]


def test_blank_partition() -> None:
    flash = Flash(None, size=SIZE, sector_size=SECTOR)
    with pytest.raises(FSError):
        FlashFS(flash, Partition("fs", 0, SIZE))
    fs = FlashFS(flash, Partition("fs", 0, SIZE), format_if_blank=True)
    assert fs.list() == []


def test_merge_copies_only_missing_root_files() -> None:
    old = fs_with({"conf9.json": b"user", "conf0.json": b"old defaults", "notes.txt": b"n"})
    old._fs.mkdir("sub")  # directories are not part of the merge (root files only, as on the device)
    new = fs_with({"conf0.json": b"new defaults", "index.html": b"<p/>"})
    assert merge_fs(old, new) == ["conf9.json", "notes.txt"]
    assert new.files() == {
        "conf0.json": b"new defaults",
        "conf9.json": b"user",
        "index.html": b"<p/>",
        "notes.txt": b"n",
    }
    assert "sub" not in new.listdir()


def test_merge_is_idempotent() -> None:
    old = fs_with({"conf9.json": b"user"})
    new = fs_with({"conf0.json": b"x"})
    assert merge_fs(old, new) == ["conf9.json"]
    writes = new.flash.stats.writes
    image = new.flash.snapshot()
    assert merge_fs(old, new) == []
    assert new.flash.stats.writes == writes and new.flash.snapshot() == image


def test_merge_hook_can_refuse_files() -> None:
    old = fs_with({"conf9.json": b"user", "cache.bin": b"junk"})
    new = fs_with({})
    assert merge_fs(old, new, should_copy=lambda n: not n.endswith(".bin")) == ["conf9.json"]


@pytest.mark.parametrize("torn", [False, "keep", "random"])
def test_merge_interrupted_at_every_op_then_rerun(torn: str) -> None:
    """LittleFS keeps the new fs mountable through a cut; re-running the merge completes it."""
    flash = Flash(None, size=2 * SIZE, sector_size=SECTOR)
    fs_with({"conf9.json": b"user" * 300, "b": b"bb", "c": b"c" * 5000}, flash, 0)
    fs_with({"conf0.json": b"new"}, flash, SIZE)
    image = flash.snapshot()
    old_part, new_part = Partition("old", 0, SIZE), Partition("new", SIZE, SIZE)
    flash.stats.reset()
    merge_fs(FlashFS(flash, old_part), FlashFS(flash, new_part))
    total = flash.stats.ops
    assert total > 0
    expected = {"conf0.json": b"new", "conf9.json": b"user" * 300, "b": b"bb", "c": b"c" * 5000}
    for at in range(total):
        flash.restore(image)
        flash.arm_power_cut(at_op=at, torn=torn, rng=random.Random(at))  # type: ignore[arg-type]
        with pytest.raises(PowerCut):
            merge_fs(FlashFS(flash, old_part), FlashFS(flash, new_part))
        flash.power_on()
        assert flash.read(0, SIZE) == image[:SIZE]  # the old fs is only read
        new = FlashFS(flash, new_part)
        done = new.files()
        assert all(expected[k] == v for k, v in done.items())  # no half-written file is visible
        merge_fs(FlashFS(flash, old_part), new)
        assert FlashFS(flash, new_part).files() == expected


def test_shipped_conf9_replaces_users_settings() -> None:
    layout = make_layout(sector_size=SECTOR, app_size=16 << 10, fs_size=SIZE)
    st = DeviceStorage.in_memory(layout=layout)
    st.factory_init(b"old" * 100, {"conf9.json": b'{"user": 1}', "keep.txt": b"k"}, version="1.0", build_id="")
    st.boot()
    bundle = make_virtual_bundle(
        "esp32", "2.0", app_size=4000, fs_size=SIZE, fs_files={"conf0.json": b"{}", "conf9.json": b'{"shipped": 1}'}
    )
    ctx = UpdaterContext(st, arch="esp32")
    ctx.process(bundle)
    assert ctx.finish() == 1
    info = st.boot()
    assert info.merged_files == ("keep.txt",)
    assert st.fs().files() == {"conf0.json": b"{}", "conf9.json": b'{"shipped": 1}', "keep.txt": b"k"}
    # merge flag is cleared once done: later boots do not merge again
    assert st.config is not None and not st.config.flags & BootFlags.MERGE_FS


def test_merge_that_does_not_fit_is_a_failed_init_and_reverts() -> None:
    """The old files may not fit beside the new image's: boot() reverts instead of raising."""
    layout = make_layout(sector_size=SECTOR, app_size=16 << 10, fs_size=SIZE)
    st = DeviceStorage.in_memory(layout=layout)
    user = {"conf0.json": b"{}", "big.bin": bytes(range(256)) * 70}
    st.factory_init(b"old" * 100, user, version="1.0", build_id="")
    st.boot()
    bundle = make_virtual_bundle("esp32", "2.0", app_size=4000, fs_size=SIZE,
                                 fs_files={"other.bin": bytes(range(256)) * 70})  # fmt: skip
    ctx = UpdaterContext(st, arch="esp32")
    ctx.process(bundle)
    assert ctx.finish() == 1
    info = st.boot()
    assert (info.slot, info.version, info.reverted) == (0, "1.0", True)
    assert "fs merge into slot 1 failed" in info.reason
    assert st.is_committed and st.fs().files() == user  # the old firmware and its files, intact


def test_running_fs_is_one_shared_mount_per_boot() -> None:
    layout = make_layout(sector_size=SECTOR, app_size=16 << 10, fs_size=SIZE)
    st = DeviceStorage.in_memory(layout=layout)
    st.factory_init(b"app" * 100, {"a": b"1"}, version="1.0", build_id="")
    st.boot()
    fs = st.fs()
    assert st.fs() is fs and st.fs(0) is fs
    with pytest.raises(FSError):
        st.fs(1)  # another slot gets its own mount; slot 1 is blank, so it does not mount
    for i in range(20):  # many writes through the shared mount stay consistent
        st.fs().write(f"f{i}", bytes([i]) * 100)
    st.boot()
    assert st.fs() is not fs
    assert st.fs().files() == {"a": b"1", **{f"f{i}": bytes([i]) * 100 for i in range(20)}}
