"""A crash at every file-system operation of updates, boots, commits, reverts and snapshots of slot
directories, one at a time: after each, a committed slot is intact and the next boot starts it.

The crash is an exception raised instead of the n-th ``os`` call (open, write, fsync, rename,
replace, unlink, rmdir, mkdir, link, symlink), so everything after it is simply never done, as in
a power cut that loses nothing already written (what fsync guarantees for the steps before it; the
fsync ordering itself is checked by the failure injection of test_fsslots.py).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from updater.bundle import BundlePart, build_bundle
from updater.context import UpdaterContext
from updater.fsslots import FsSlots, FsSlotStorage, LocalControl, StateStore, pack_files, slot_dir, slot_matches

OPS = ("open", "write", "fsync", "rename", "replace", "unlink", "rmdir", "mkdir", "link", "symlink")


class Crash(BaseException):
    """The power went away (not an OSError: no error handler runs)."""


@functools.cache
def _bundle(version: str, *, data: bool) -> bytes:
    parts = [BundlePart("app", pack_files({"main.py": version.encode(), **{f"lib/m{i}.py": b"x" * 300 for i in range(4)}}),
                        {"type": "app", "src": "app.tar"})]  # fmt: skip
    if data:
        parts.append(BundlePart("fs", pack_files({"conf0.json": b"{}"}), {"type": "fs", "src": "fs.tar"}))
    return build_bundle(platform="linux", version=version, parts=parts)


def _update(slots: FsSlots, running: int, data: bytes) -> None:
    st = FsSlotStorage(slots.root, running_slot=running, control=LocalControl(slots, running))
    ctx = UpdaterContext(st, arch="linux", commit_timeout_s=30)
    if ctx.process(data) == 0:
        ctx.finish()


def _scenario(root: Path) -> None:
    """Update (app + data), first boot, commit; update, first boot, revert, boot; snapshot."""
    slots = FsSlots(root)
    info = slots.boot()
    if not info.first_boot and slots.config is not None and slots.config.committed:
        _update(slots, info.slot, _bundle("2.0", data=True))
    info = slots.boot()
    if info.first_boot:
        slots.handle("commit", {}, running=info.slot)
    info = slots.boot()
    _update(slots, info.slot, _bundle("3.0", data=False))
    info = slots.boot()
    if info.first_boot:
        slots.handle("revert", {}, running=info.slot)
    info = slots.boot()
    slots.handle("snapshot", {}, running=info.slot)


def _invariant(root: Path) -> None:
    cfg = StateStore(root).load()
    assert cfg is not None, "no state record"
    slot = cfg.active_slot if cfg.committed else cfg.revert_slot
    assert slot_matches(slot_dir(root, slot), cfg.slots[slot]), f"committed slot {slot} is not intact"
    info = FsSlots(root).boot()
    cfg = StateStore(root).load()
    assert cfg is not None and slot_matches(slot_dir(root, info.slot), cfg.slots[info.slot])


def _crashing(monkeypatch: pytest.MonkeyPatch, at: int) -> Callable[[], int]:
    calls = 0

    def wrap(name: str) -> Callable[..., object]:
        # fsync is counted but skipped (the test makes it a no-op): in this crash model nothing
        # after the crash point happens, so no cached write can be lost, and 200+ runs stay fast.
        real = getattr(os, name)

        def op(*a: object, **k: object) -> object:
            nonlocal calls
            calls += 1
            if calls == at:
                raise Crash(f"power cut at {name} #{at}")
            return real(*a, **k)

        return op

    for name in OPS:
        monkeypatch.setattr(os, name, wrap(name))
    return lambda: calls


def test_a_crash_at_every_file_operation_leaves_a_committed_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    factory = tmp_path / "factory"
    factory.mkdir()
    (factory / "main.py").write_text("1.0")
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # see _crashing: speed only, same calls made
    points = 0
    at = 1
    while True:
        root = tmp_path / f"run{at}"
        FsSlots(root).provision(factory, version="1.0")
        with monkeypatch.context() as m:
            count = _crashing(m, at)
            try:
                _scenario(root)
                crashed = False
            except Crash:
                crashed = True
            total = count()
        _invariant(root)  # the os functions are the real ones again
        if not crashed:
            break
        shutil.rmtree(root)
        points += 1
        at += 1
    print(f"\ncrash points checked: {points} (the whole scenario makes {total} file-system calls)")
    assert points >= 100 and points == total
