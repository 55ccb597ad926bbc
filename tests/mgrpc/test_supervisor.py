"""The supervisor's decisions, in process: a hang (no heartbeat) and a missing commit revert, a
commit timeout of 0 commits on the first heartbeat, a committed program that hangs is restarted in
its slot, and requests from another start are refused."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from mgrpc.supervisor import Supervisor, SupervisorError
from updater.bundle import BundlePart, build_bundle
from updater.context import UpdaterContext
from updater.errors import UpdaterError
from updater.fsslots import FsSlots, FsSlotStorage, LocalControl, StaleBoot, SupervisorClient, pack_files

PROGRAM = b'''
import os, sys, time
from pathlib import Path
from updater.fsslots import SupervisorClient, commit
behavior = Path("behavior").read_text()
sup = SupervisorClient.from_env()
print("running", os.environ["MGRPC_SLOT"], behavior, flush=True)
if behavior == "crash":
    sys.exit(1)
for i in range(10_000):
    if behavior == "hang" or (behavior == "hang-later" and i > 3):
        time.sleep(60)
    sup.request("heartbeat")
    if behavior == "commit" and i == 2:
        assert commit() is True and commit() is False  # the one library call
    time.sleep(float(os.environ["MGRPC_HEARTBEAT_S"]))
'''


def _slots(tmp_path: Path, behavior: str = "ok") -> FsSlots:
    src = tmp_path / "factory"
    src.mkdir()
    (src / "main.py").write_bytes(PROGRAM)
    (src / "behavior").write_text(behavior)
    slots = FsSlots(tmp_path / "slots")
    slots.provision(src, version="1.0")
    return slots


def _install(slots: FsSlots, behavior: str, *, commit_timeout_s: int) -> None:
    cfg = slots.config
    assert cfg is not None and cfg.committed
    running = cfg.active_slot
    app = pack_files({"main.py": PROGRAM, "behavior": behavior.encode()})
    data = build_bundle(platform="linux", version=f"2.0-{behavior}",
                        parts=[BundlePart("app", app, {"type": "app", "src": "app.tar"})])  # fmt: skip
    st = FsSlotStorage(slots.root, running_slot=running, control=LocalControl(slots, running))
    ctx = UpdaterContext(st, arch="linux", commit_timeout_s=commit_timeout_s)
    assert ctx.process(data) == 0 and ctx.finish() == 1, ctx.status_message


async def _until(events: list[str], text: str, *, count: int = 1, timeout_s: float = 15.0) -> None:
    async def wait() -> None:
        while sum(text in e for e in events) < count:
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(wait(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"no {text!r} (x{count}) in {events}") from None


async def _supervise(slots: FsSlots, **kw: float) -> tuple[Supervisor, list[str], asyncio.Task[None]]:
    events: list[str] = []
    sup = Supervisor(slots.root, [sys.executable, "main.py"], restart_delay_s=0.05, term_grace_s=1.0,
                     on_event=events.append, **kw)  # fmt: skip
    return sup, events, asyncio.ensure_future(sup.run())


async def _stop(sup: Supervisor, task: asyncio.Task[None]) -> None:
    sup.stop()
    await asyncio.wait_for(task, 10)


@pytest.mark.parametrize(
    ("behavior", "commit_timeout_s", "why"),
    [("hang", 30, "hung before committing"), ("ok", 1, "no commit within 1 s"), ("crash", 30, "exited 1 before")],
)
async def test_bad_release_is_reverted(tmp_path: Path, behavior: str, commit_timeout_s: int, why: str) -> None:
    slots = _slots(tmp_path)
    _install(slots, behavior, commit_timeout_s=commit_timeout_s)
    sup, events, task = await _supervise(slots, heartbeat_timeout_s=0.6, start_timeout_s=1.0)
    try:
        await _until(events, "boot slot 0 version 1.0 (committed")
    finally:
        await _stop(sup, task)
    text = "\n".join(events)
    assert "boot slot 1 version 2.0-" + behavior + " (first boot, uncommitted)" in text
    assert why in text and "reverted:" in text
    cfg = slots.config
    assert cfg is not None and cfg.committed and cfg.active_slot == 0


async def test_commit_timeout_zero_commits_on_first_heartbeat(tmp_path: Path) -> None:
    slots = _slots(tmp_path)
    _install(slots, "ok", commit_timeout_s=0)
    sup, events, task = await _supervise(slots, heartbeat_timeout_s=1.0)
    try:
        await _until(events, "committed: came up")
    finally:
        await _stop(sup, task)
    cfg = slots.config
    assert cfg is not None and cfg.committed and cfg.active_slot == 1


async def test_program_commit_and_committed_hang_restarts_same_slot(tmp_path: Path) -> None:
    slots = _slots(tmp_path)
    _install(slots, "commit", commit_timeout_s=30)
    sup, events, task = await _supervise(slots, heartbeat_timeout_s=0.6)
    try:
        await _until(events, "committed slot 1 (by the program)")
    finally:
        await _stop(sup, task)
    _install(slots, "hang-later", commit_timeout_s=0)  # committed on its first heartbeat, then hangs
    sup, events, task = await _supervise(slots, heartbeat_timeout_s=0.6)
    try:
        await _until(events, "program hung (no heartbeat)", count=2)
    finally:
        await _stop(sup, task)
    boots = [e for e in events if e.startswith("boot slot")]
    assert boots[0].startswith("boot slot 0 version 2.0-hang-later (first boot")
    assert all(b.startswith("boot slot 0 version 2.0-hang-later (committed)") for b in boots[1:]), boots


async def test_stale_and_unknown_requests(tmp_path: Path) -> None:
    slots = _slots(tmp_path)
    sup, events, task = await _supervise(slots, heartbeat_timeout_s=5.0)
    try:
        await _until(events, "started pid")
        # The blocking client runs in a thread: the supervisor serves it from this event loop.
        stale = SupervisorClient(sup.address, "not-this-boot")
        with pytest.raises(StaleBoot):
            await asyncio.to_thread(stale.request, "commit")
        with pytest.raises(StaleBoot):
            await stale.heartbeat()
        assert sup.run_ is not None
        current = SupervisorClient(sup.address, sup.run_.boot_id)
        assert await asyncio.to_thread(current.request, "commit") is False  # already committed
        with pytest.raises(UpdaterError, match="unknown request"):
            await asyncio.to_thread(current.request, "format-disk")
        bogus = {"app_len": 1, "app_crc32": 0, "app_sha256": "00" * 32, "version": "x", "build_id": ""}
        with pytest.raises(UpdaterError, match="Failed to set boot config"):  # slot 1 holds no such image
            await asyncio.to_thread(lambda: current.request("finalize", slot=1, state=bogus))
        second = Supervisor(slots.root, [sys.executable, "main.py"])
        with pytest.raises(SupervisorError, match="another supervisor"):
            await second.run()
    finally:
        await _stop(sup, task)
    cfg = slots.config
    assert cfg is not None and cfg.committed and cfg.active_slot == 0


async def test_committed_program_that_keeps_exiting_is_restarted_with_a_growing_delay(tmp_path: Path) -> None:
    slots = _slots(tmp_path, behavior="crash")
    sup, events, task = await _supervise(slots, heartbeat_timeout_s=1.0)
    try:
        await _until(events, "restarting in 0.2 s")
    finally:
        await _stop(sup, task)
    delays = [e for e in events if e.startswith("restarting in")]
    assert delays[:3] == ["restarting in 0.05 s", "restarting in 0.1 s", "restarting in 0.2 s"]
    cfg = slots.config
    assert cfg is not None and cfg.committed and cfg.active_slot == 0  # nothing to fall back to: same slot
