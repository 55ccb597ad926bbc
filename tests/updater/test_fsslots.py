"""Filesystem slots: the state record, tar extraction rules, and whole updates through UpdaterContext."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from updater.bootcfg import BootConfig, BootFlags, SlotState, decode_record
from updater.bundle import BundlePart, build_bundle
from updater.context import UpdaterContext
from updater.fsslots import (
    DirFS,
    FsSlots,
    FsSlotStorage,
    LocalControl,
    StateError,
    StateStore,
    pack_files,
    pack_tree,
    slot_dir,
)

ARCH = "linux"


def linux_bundle(version: str, app: dict[str, bytes], data: dict[str, bytes] | None = None, **app_attrs: object) -> bytes:
    parts: dict[str, dict[str, object]] = {"app": {"type": "app", "src": "app.tar", **app_attrs}}
    tars = {"app": pack_files(app)}
    if data is not None:
        parts["fs"] = {"type": "fs", "src": "fs.tar"}
        tars["fs"] = pack_files(data)
    return build_bundle(
        platform=ARCH, version=version, build_id=f"b/{version}",
        parts=[BundlePart(name, tars[name], attrs) for name, attrs in parts.items()],
    )  # fmt: skip


def provisioned(tmp_path: Path) -> FsSlots:
    src = tmp_path / "factory"
    (src / "lib").mkdir(parents=True)
    (src / "main.py").write_text("print('v1')\n")
    (src / "lib" / "util.py").write_text("X = 1\n")
    data = tmp_path / "factory-data"
    data.mkdir()
    (data / "conf0.json").write_text('{"device": {"id": "d1"}}')
    slots = FsSlots(tmp_path / "slots")
    slots.provision(src, data_src=data, version="1.0", build_id="factory")
    return slots


def apply(slots: FsSlots, running: int, data: bytes, *, commit_timeout_s: int = 30, piece: int = 700) -> tuple[int, str]:
    st = FsSlotStorage(slots.root, running_slot=running, control=LocalControl(slots, running))
    ctx = UpdaterContext(st, arch=ARCH, commit_timeout_s=commit_timeout_s, total_size=len(data))
    for off in range(0, len(data), piece):
        r = ctx.process(data[off : off + piece])
        if r != 0:
            return r, ctx.status_message
    return ctx.finish(), ctx.status_message


# -- the state record ----------------------------------------------------------------------------------


def test_state_record_sequence_counts_down_and_newest_wins(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() is None
    a = store.save(BootConfig(active_slot=0))
    b = store.save(replace(a, active_slot=1))
    assert b.seq == a.seq - 1
    assert store.load() == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.0", "state.1"]
    # A torn (short) or corrupted newest copy: the other one wins.
    raw = store.path(1).read_bytes()
    store.path(1).write_bytes(raw[:300])
    assert store.load() == a
    store.path(1).write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    assert store.load() == a


@pytest.mark.parametrize(
    ("op", "nth", "before_rename"),
    [("write", 1, True), ("fsync", 1, True), ("replace", 1, True), ("fsync", 2, False)],
    ids=["write", "fsync-file", "rename", "fsync-dir"],
)
def test_failing_fsync_or_rename_never_leaves_a_half_written_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, nth: int, before_rename: bool
) -> None:
    """A save whose ``nth`` call of ``op`` fails: the record read afterwards is the previous one (failure
    before the rename) or the complete new one (the directory fsync after it failed); no copy is ever
    unreadable, no temp file stays, and the next save works."""
    store = StateStore(tmp_path)
    current = store.save(BootConfig(active_slot=0))
    real = getattr(os, op)
    for step in range(20):
        want = replace(current, active_slot=step % 2, commit_timeout_s=step + 1)
        calls = 0

        def boom(*a: object, **k: object) -> object:
            nonlocal calls
            calls += 1
            if calls == nth:
                raise OSError(5, f"injected {op} failure")
            return real(*a, **k)

        monkeypatch.setattr(os, op, boom)
        try:
            with pytest.raises(StateError):
                store.save(want)
        finally:
            monkeypatch.setattr(os, op, real)
        got = store.load()
        assert got == (current if before_rename else replace(want, seq=current.seq - 1))
        for copy in (0, 1):
            if store.path(copy).exists():
                assert decode_record(store.path(copy).read_bytes()) is not None
        assert not list(tmp_path.glob("*.~tmp")), "a temp file was left behind"
        current = store.save(replace(got, commit_timeout_s=0))
        assert store.load() == current


# -- tar extraction rules ------------------------------------------------------------------------------


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti in members:
            d = (data or {}).get(ti.name)
            if d is not None:
                ti.size = len(d)
            tar.addfile(ti, io.BytesIO(d) if d is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    return ti


def _bundle_with_app_tar(version: str, app_tar: bytes) -> bytes:
    return build_bundle(platform=ARCH, version=version, parts=[BundlePart("app", app_tar, {"type": "app", "src": "app.tar"})])


UNSAFE = {
    "absolute path": [_member("/etc/passwd")],
    "dot-dot": [_member("lib/../../x")],
    "symlink out (absolute)": [_member("l", tarfile.SYMTYPE, "/etc")],
    "symlink out (relative)": [_member("lib/l", tarfile.SYMTYPE, "../../outside")],
    "through a link": [_member("inside", tarfile.DIRTYPE), _member("l", tarfile.SYMTYPE, "inside/../.."), _member("l/x")],
    "hard link to nothing": [_member("h", tarfile.LNKTYPE, "/etc/shadow")],
    "fifo": [_member("f", tarfile.FIFOTYPE)],
    "device": [_member("d", tarfile.CHRTYPE)],
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused_and_nothing_leaves_the_slot(tmp_path: Path, case: str) -> None:
    slots = provisioned(tmp_path)
    before = slots.state.load()
    members = UNSAFE[case]
    data = {m.name: b"evil" for m in members if m.type == tarfile.REGTYPE}
    r, msg = apply(slots, 0, _bundle_with_app_tar("2.0", _tar(members, data)))
    assert r < 0 and msg.startswith("Unsafe archive"), (r, msg)
    assert slots.state.load() == before
    assert not (tmp_path / "outside").exists() and not (tmp_path / "x").exists()
    assert (slot_dir(slots.root, 0) / "app" / "main.py").read_text() == "print('v1')\n"


def test_oversized_entries_and_parts_are_refused(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    big = pack_files({"main.py": b"x" * 5000})
    st = FsSlotStorage(slots.root, running_slot=0, control=LocalControl(slots, 0), max_file_bytes=4096)
    ctx = UpdaterContext(st, arch=ARCH)
    assert ctx.process(_bundle_with_app_tar("2.0", big)) < 0
    assert "5000 bytes" in ctx.status_message
    st = FsSlotStorage(slots.root, running_slot=0, control=LocalControl(slots, 0), app_capacity=4096)
    ctx = UpdaterContext(st, arch=ARCH)
    assert ctx.process(_bundle_with_app_tar("2.0", big)) < 0
    assert ctx.status_message == "Image too big"


def test_digest_mismatch_and_truncated_tar(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    tar = pack_files({"main.py": b"v2"})
    for key, bad in (("cs_sha256", "0" * 64), ("cs_sha1", "0" * 40), ("size", len(tar) + 1)):
        manifest = {"name": "x", "platform": ARCH, "version": "2.0",
                    "parts": {"app": {"type": "app", "src": "app.tar", key: bad}}}  # fmt: skip
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("manifest.json", json.dumps(manifest))
            z.writestr("app.tar", tar)
        r, msg = apply(slots, 0, buf.getvalue())
        assert (r, msg) == (-1, "Invalid size" if key == "size" else "Digest mismatch"), key
    tar = pack_files({"main.py": b"v2" * 600})
    r, msg = apply(slots, 0, _bundle_with_app_tar("2.0", tar[:1024]))
    assert r < 0 and "truncated" in msg
    bad = bytearray(pack_files({"main.py": b"v2"}))
    bad[101] ^= 0x55  # the mode field of the first header: its checksum no longer matches
    r, msg = apply(slots, 0, _bundle_with_app_tar("2.0", bytes(bad)))
    assert r < 0 and "Malformed archive" in msg
    assert slots.boot().slot == 0


def test_links_inside_the_slot_are_kept(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    members = [
        _member("bin", tarfile.DIRTYPE), _member("bin/run.sh"), _member("run", tarfile.SYMTYPE, "bin/run.sh"),
        _member("copy.sh", tarfile.LNKTYPE, "bin/run.sh"), _member("bin/up", tarfile.SYMTYPE, "../run"),
    ]  # fmt: skip
    assert apply(slots, 0, _bundle_with_app_tar("2.0", _tar(members, {"bin/run.sh": b"#!/bin/sh\n"})))[0] == 1
    info = slots.boot()
    app = slots.app_dir(info.slot)
    assert info.slot == 1 and (app / "run").read_bytes() == b"#!/bin/sh\n" and (app / "copy.sh").is_file()


# -- whole updates -----------------------------------------------------------------------------------------


def test_update_first_boot_merge_commit(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    assert slots.boot().slot == 0
    DirFS(slots.data_dir(0)).write("conf9.json", b'{"wifi": 1}')
    bundle = linux_bundle("2.0", {"main.py": b"print('v2')\n", "pkg/mod.py": b"Y = 2\n"}, {"conf0.json": b"{}"})
    assert apply(slots, 0, bundle) == (1, "Update applied, finalizing")
    cfg = slots.state.load()
    assert cfg is not None and cfg.active_slot == 1 and not cfg.committed and cfg.commit_timeout_s == 30
    info = slots.boot()
    assert (info.slot, info.first_boot, info.version, info.merged_files) == (1, True, "2.0", ("conf9.json",))
    data = DirFS(slots.data_dir(1)).files()
    assert data == {"conf0.json": b"{}", "conf9.json": b'{"wifi": 1}'}  # shipped file wins, user's kept
    assert (slots.app_dir(1) / "pkg" / "mod.py").read_bytes() == b"Y = 2\n"
    assert not (slots.app_dir(1) / "lib").exists()
    st = FsSlotStorage(slots.root, running_slot=1, control=LocalControl(slots, 1))
    assert st.commit() is True and st.commit() is False
    assert slots.boot() == replace(info, first_boot=False, commit_timeout_s=0, merged_files=(), reason="committed")


def test_reboot_without_commit_reverts_and_app_only_update_copies_data(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    slots.boot()
    DirFS(slots.data_dir(0)).write("conf9.json", b"mine")
    assert apply(slots, 0, linux_bundle("2.0", {"main.py": b"v2"}))[0] == 1
    first = slots.boot()
    assert first.first_boot and first.slot == 1
    assert DirFS(slots.data_dir(1)).files()["conf9.json"] == b"mine"
    again = slots.boot()  # the program died before committing: back to slot 0, committed
    assert (again.slot, again.reverted, again.first_boot) == (0, True, False)
    cfg = slots.state.load()
    assert cfg is not None and cfg.committed and cfg.active_slot == 0


def test_refusals_before_writing(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    slots.boot()
    assert apply(slots, 0, linux_bundle("2.0", {"main.py": b"v2"}))[0] == 1
    # Running slot 0 while the record now selects slot 1: no second update, no commit of slot 1.
    st = FsSlotStorage(slots.root, running_slot=0, control=LocalControl(slots, 0))
    assert st.reboot_pending and st.commit() is False
    assert apply(slots, 0, linux_bundle("3.0", {"main.py": b"v3"}))[1] == "Previous update has not been committed yet"
    slots.boot()
    assert apply(slots, 1, linux_bundle("3.0", {"main.py": b"v3"}))[1] == "Previous update has not been committed yet"
    st = FsSlotStorage(slots.root, running_slot=1, control=LocalControl(slots, 1))
    assert st.commit() is True
    no_app = build_bundle(
        platform=ARCH, version="9", parts=[BundlePart("fs", pack_files({}), {"type": "fs", "src": "fs.tar"})]
    )
    assert apply(slots, 1, no_app)[1] == "Incomplete update package"
    other = build_bundle(platform="esp32", version="9", parts=[BundlePart("app", b"x", {"type": "app"})])
    assert apply(slots, 1, other)[1].startswith("Wrong platform")
    assert slots.boot().slot == 1


def test_half_installed_slot_is_never_booted(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    slots.boot()
    assert apply(slots, 0, linux_bundle("2.0", {"main.py": b"v2", "b.py": b"b"}))[0] == 1
    (slots.app_dir(1) / "b.py").unlink()  # e.g. a disk that lost the file
    info = slots.boot()
    assert (info.slot, info.reverted) == (0, True)


def test_snapshot_and_set_boot_state(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    slots.boot()
    st = FsSlotStorage(slots.root, running_slot=0, control=LocalControl(slots, 0))
    assert st.create_snapshot() == 1
    assert (slots.app_dir(1) / "lib" / "util.py").read_text() == "X = 1\n"
    st.set_boot_state(active_slot=1)
    assert st.get_boot_state()["active_slot"] == 1 and slots.boot().slot == 1


def test_pack_tree_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c.txt").write_bytes(b"c")
    (src / "top.py").write_bytes(b"t")
    os.symlink("a/b/c.txt", src / "link")
    one, two = io.BytesIO(), io.BytesIO()
    pack_tree(src, one)
    pack_tree(src, two)
    assert one.getvalue() == two.getvalue()
    slots = provisioned(tmp_path)
    slots.boot()
    assert apply(slots, 0, _bundle_with_app_tar("2.0", one.getvalue()))[0] == 1
    app = slots.app_dir(slots.boot().slot)
    assert (app / "link").read_bytes() == b"c" and (app / "top.py").read_bytes() == b"t"


def test_dirfs_refuses_names_outside_the_directory(tmp_path: Path) -> None:
    fs = DirFS(tmp_path)
    fs.write("a.json", b"1")
    assert fs.list() == ["a.json"] and fs.read("/a.json") == b"1"
    for bad in ("../x", "sub/x", "..", ""):
        with pytest.raises(OSError):
            fs.write(bad, b"no")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_factory_slot_record(tmp_path: Path) -> None:
    slots = provisioned(tmp_path)
    cfg = slots.state.load()
    assert cfg is not None and cfg.flags == BootFlags.COMMITTED and cfg.slots[1] == SlotState()
    assert cfg.slots[0].version == "1.0" and slots.loader.slot_valid(cfg, 0) and not slots.loader.slot_valid(cfg, 1)


@pytest.mark.parametrize(("op", "nth"), [("rename", 1), ("rename", 2), ("fsync", 1), ("fsync", 20)])
def test_disk_failures_during_an_update_leave_the_running_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, nth: int
) -> None:
    """The n-th rename (swapping the new slot in) or fsync (of an extracted file) fails: the update
    fails with the flash path's messages, the record still boots slot 0, and a retry succeeds."""
    slots = provisioned(tmp_path)
    slots.boot()
    FsSlotStorage(slots.root, running_slot=0, control=LocalControl(slots, 0)).create_snapshot()
    before = slots.state.load()  # slot 1 holds a snapshot: the swap renames it away first
    bundle = linux_bundle("2.0", {f"m{i}.py": b"x" * 100 for i in range(30)})
    real = getattr(os, op)
    calls = 0

    def boom(*a: object, **k: object) -> object:
        nonlocal calls
        calls += 1
        if calls == nth:
            raise OSError(5, f"injected {op} failure")
        return real(*a, **k)

    monkeypatch.setattr(os, op, boom)
    try:
        r, msg = apply(slots, 0, bundle)
    finally:
        monkeypatch.setattr(os, op, real)
    assert calls >= nth and r < 0 and msg in ("Write failed", "Failed to set boot config"), (calls, r, msg)
    assert slots.state.load() == before
    info = slots.boot()
    assert (info.slot, info.version) == (0, "1.0")
    assert apply(slots, 0, bundle)[0] == 1
    assert slots.boot().version == "2.0"
