"""``kill -9`` of the virtual device process at random points of an update, many times over.

After every kill the device is started again on the same flash file; it must boot and serve RPC,
running either the old or the new firmware, never neither.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

import transports
from tests.device_helpers import bundle, push

RUNS = 20


async def _spawn(state: Path) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mgrpc", "device", "--id", "k9", "--state", str(state),
        "--listen", "ws://127.0.0.1:0/rpc", "--watchdog", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.startswith(b"ws://"), line
    return proc, line.decode().strip()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()


async def test_kill9_during_updates_never_bricks(tmp_path: Path) -> None:
    rng = random.Random(1234)
    state = tmp_path / "k9"
    versions = {"1.0"}
    data = bundle("9.1")
    seen: list[str] = []
    for _ in range(RUNS):
        proc, url = await _spawn(state)
        try:
            async with await transports.connect(url, timeout_s=10) as c:
                info = await c.call("Sys.GetInfo")
                assert info["fw_version"] in versions | {"9.1"}, info
                seen.append(info["fw_version"])
                bs = await c.call("OTA.GetBootState")
                if not bs["is_committed"]:
                    if rng.random() < 0.5:
                        await c.call("OTA.Commit")
                    continue  # leave it dirty: the kill below is a reboot while uncommitted
                st = await c.call("OTA.Status")
                if st["state"] == 1:
                    continue
                which = data if info["fw_version"] != "9.1" else bundle("1.0")
                task = asyncio.ensure_future(push(c, which, commit_timeout=60))
                await asyncio.sleep(rng.uniform(0.0, 0.6))
        except (OSError, TimeoutError):
            pass  # the device may be rebooting right now; that is a fine moment to pull the plug
        finally:
            await _kill(proc)
            if "task" in locals():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                del task
    # after all that, it still boots and serves
    proc, url = await _spawn(state)
    try:
        async with await transports.connect(url, timeout_s=10) as c:
            assert (await c.call("Sys.GetInfo"))["fw_version"] in ("1.0", "9.1")
            assert await c.call("RPC.Ping")
    finally:
        await _kill(proc)
    assert len(seen) == RUNS
