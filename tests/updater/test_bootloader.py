"""Boot loader model: first boot, reboot without commit, commit, revert, boot-state ops, snapshots."""

from __future__ import annotations

import pytest

from updater.bootcfg import BootFlags, SlotState
from updater.errors import BootError, BootStateError, SnapshotError
from updater.partitions import make_layout
from updater.storage import DeviceStorage

LAYOUT = make_layout(sector_size=4096, app_size=8192, fs_size=16384)
OLD_APP = b"old-app " * 300
NEW_APP = b"new-app!" * 500


def fresh() -> DeviceStorage:
    st = DeviceStorage.in_memory(layout=LAYOUT)
    st.factory_init(OLD_APP, {"conf9.json": b'{"user": 1}'}, version="1.0", build_id="b1")
    return st


def install_new(st: DeviceStorage, *, timeout_s: int = 60, fs_updated: bool = False) -> None:
    """What UpdaterContext does: write the inactive slot, then switch the boot config."""
    import hashlib
    import zlib

    slot = st.inactive_slot
    part = LAYOUT.app[slot]
    st.flash.erase(part.offset, part.size)
    st.flash.write(part.offset, NEW_APP)
    state = SlotState(len(NEW_APP), zlib.crc32(NEW_APP), hashlib.sha256(NEW_APP).digest(), "2.0", "b2")
    st.finalize_update(slot, state, fs_updated=fs_updated, commit_timeout_s=timeout_s)


def test_unprovisioned_flash_does_not_boot() -> None:
    st = DeviceStorage.in_memory(layout=LAYOUT)
    with pytest.raises(BootError, match="unprovisioned"):
        st.boot()
    with pytest.raises(BootStateError) as ei:
        st.get_boot_state()
    assert ei.value.code == -1


def test_factory_state() -> None:
    st = fresh()
    info = st.boot()
    assert (info.slot, info.first_boot, info.reverted, info.version) == (0, False, False, "1.0")
    assert list(st.get_boot_state().items()) == [
        ("active_slot", 0),
        ("is_committed", True),
        ("revert_slot", 1),
        ("commit_timeout", 0),
    ]
    assert st.read_app(0) == OLD_APP
    assert not st.commit()  # already committed
    assert not st.revert()


def test_first_boot_then_commit() -> None:
    st = fresh()
    st.boot()
    install_new(st, timeout_s=120)
    assert st.get_boot_state() == {"active_slot": 1, "is_committed": False, "revert_slot": 0, "commit_timeout": 120}
    info = st.boot()
    assert (info.slot, info.first_boot, info.commit_timeout_s, info.reverted) == (1, True, 120, False)
    assert st.config is not None and not st.config.flags & BootFlags.BOOT_ATTEMPT
    assert st.commit()
    assert st.get_boot_state() == {"active_slot": 1, "is_committed": True, "revert_slot": 0, "commit_timeout": 0}
    info = st.boot()
    assert (info.slot, info.first_boot, info.reverted, info.version) == (1, False, False, "2.0")


def test_commit_before_the_reboot_into_an_update_is_refused() -> None:
    st = fresh()
    st.boot()
    install_new(st, timeout_s=120)  # applied; the device has not rebooted yet
    assert not st.commit()  # the running (old) firmware is committed; the new one never ran
    assert st.get_boot_state() == {"active_slot": 1, "is_committed": False, "revert_slot": 0, "commit_timeout": 120}
    info = st.boot()
    assert (info.slot, info.first_boot) == (1, True)
    st.boot()  # a reset before the commit still falls back to the old firmware
    assert st.running_slot == 0 and st.is_committed


def test_reboot_while_dirty_boots_previous_slot() -> None:
    st = fresh()
    st.boot()
    install_new(st)
    assert st.boot().slot == 1  # first boot
    info = st.boot()  # crash / hang / power loss before commit
    assert (info.slot, info.reverted, info.first_boot) == (0, True, False)
    assert "reboot without commit" in info.reason
    assert st.get_boot_state() == {"active_slot": 0, "is_committed": True, "revert_slot": 1, "commit_timeout": 0}
    assert st.boot().slot == 0  # stays there


def test_revert_and_commit_timeout_expiry() -> None:
    st = fresh()
    st.boot()
    install_new(st, timeout_s=5)
    info = st.boot()
    assert info.commit_timeout_s == 5
    # the device's timer expired uncommitted: revert and reboot
    assert st.revert()
    info = st.boot()
    assert (info.slot, info.reverted, info.first_boot) == (0, False, False)
    assert not st.revert()


def test_incomplete_new_image_is_never_booted() -> None:
    st = fresh()
    st.boot()
    install_new(st)
    # damage the new image after the boot config switch
    st.flash.erase_sector(LAYOUT.app[1].offset // 4096)
    info = st.boot()
    assert (info.slot, info.reverted) == (0, True)
    assert "image invalid" in info.reason


def test_no_bootable_slot() -> None:
    st = fresh()
    st.flash.erase_sector(LAYOUT.app[0].offset // 4096)
    with pytest.raises(BootError, match="No bootable slot"):
        st.boot()


def test_set_boot_state_errors_and_subset() -> None:
    st = fresh()
    st.boot()
    for bad, code in [
        ({}, -2),
        ({"unknown": 1}, -2),
        ({"active_slot": 2}, -3),
        ({"active_slot": True}, -3),
        ({"revert_slot": -1}, -3),
        ({"is_committed": 1}, -3),
        ({"active_slot": 1}, -3),  # slot 1 holds no valid image
        ({"commit_timeout": "x"}, -4),
    ]:
        with pytest.raises(BootStateError) as ei:
            st.set_boot_state(**bad)
        assert ei.value.code == code, bad
    assert st.get_boot_state() == {"active_slot": 0, "is_committed": True, "revert_slot": 1, "commit_timeout": 0}
    st.set_boot_state(commit_timeout=30)
    st.set_boot_state(commit_timeout=-1)  # negative: ignored
    assert st.get_boot_state()["commit_timeout"] == 30
    st.set_boot_state(revert_slot=0)
    assert st.get_boot_state()["revert_slot"] == 0


def test_set_boot_state_uncommitted_arms_one_first_boot() -> None:
    st = fresh()
    st.boot()
    slot = st.create_snapshot()
    assert slot == 1
    st.set_boot_state(active_slot=1, revert_slot=0, is_committed=False)
    info = st.boot()
    assert (info.slot, info.first_boot) == (1, True)
    assert st.boot().slot == 0  # no commit: back


def test_snapshot_copies_app_and_fs() -> None:
    st = fresh()
    st.boot()
    st.fs().write("extra.txt", b"data")
    assert st.create_snapshot() == 1
    assert st.read_app(1) == OLD_APP
    assert st.fs(1).files() == st.fs(0).files()
    assert st.get_boot_state()["is_committed"] is True


def test_snapshot_set_as_revert() -> None:
    st = fresh()
    st.boot()
    assert st.create_snapshot(set_as_revert=True, commit_timeout=10) == 1
    assert st.get_boot_state() == {"active_slot": 0, "is_committed": False, "revert_slot": 1, "commit_timeout": 10}
    with pytest.raises(SnapshotError) as ei:
        st.create_snapshot()
    assert (ei.value.code, ei.value.message) == (-1, "Cannot create snapshots in uncommitted state")
    info = st.boot()  # rebooted without commit: the snapshot runs
    assert (info.slot, info.reverted) == (1, True)
    assert st.read_app(1) == OLD_APP


def test_snapshot_without_boot_state() -> None:
    st = DeviceStorage.in_memory(layout=LAYOUT)
    with pytest.raises(SnapshotError) as ei:
        st.loader.create_snapshot()
    assert (ei.value.code, ei.value.message) == (-2, "Failed to get boot state")


def test_commit_timeout_expired_reverts_only_when_uncommitted() -> None:
    st = fresh()
    st.boot()
    assert not st.commit_timeout_expired()
    install_new(st, timeout_s=5)
    assert st.boot().commit_timeout_s == 5
    assert st.commit_timeout_expired()
    assert st.reboot_pending
    info = st.boot()
    assert (info.slot, info.first_boot) == (0, False)
    assert not st.reboot_pending


def test_commit_timeout_range() -> None:
    from updater.context import UpdaterContext

    st = fresh()
    st.boot()
    with pytest.raises(BootStateError) as ei:
        st.set_boot_state(commit_timeout=2**31)
    assert ei.value.code == -4
    with pytest.raises(SnapshotError) as se:
        st.create_snapshot(set_as_revert=True, commit_timeout=2**31)
    assert (se.value.code, se.value.message) == (-4, "Failed to set commit timeout")
    with pytest.raises(ValueError):
        UpdaterContext(st, arch="esp32", commit_timeout_s=2**31)
    st.set_boot_state(commit_timeout=2**31 - 1)
    assert st.get_boot_state()["commit_timeout"] == 2**31 - 1
