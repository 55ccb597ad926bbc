"""``kill -9`` of the supervisor and of its program at random moments of updates, commits, reverts and
snapshots, hundreds of times: the slots directory must always hold a runnable committed slot, the
program must never outlive its supervisor, and the next start must boot."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.mgrpc.cli_proc import ROOT, cli_env
from updater.bundle import BundlePart, build_bundle
from updater.fsslots import FsSlots, StateStore, pack_files, slot_dir, slot_matches

HERE = Path(__file__).parent
TARGET_KILLS = 220  # at least 200, whatever share of the program kills lands
MAX_SUPERVISOR_RUNS = 150
MIN_KILLS = 200


def _bundles(where: Path) -> Path:
    out = where / "bundles"
    out.mkdir()
    program = (HERE / "k9_program.py").read_bytes()
    rng = random.Random(7)
    for i, behavior in enumerate(["ok", "ok", "ok", "ok", "crash", "hang", "nocommit"]):
        files = {"main.py": program, "behavior": behavior.encode()}
        files.update({f"lib/f{n}.bin": rng.randbytes(8192) for n in range(12)})
        data = build_bundle(platform="linux", version=f"{i}.{behavior}",
                            parts=[BundlePart("app", pack_files(files), {"type": "app", "src": "app.tar"})])  # fmt: skip
        (out / f"{i}-{behavior}.zip").write_bytes(data)
    return out


def _committed_slot_ok(root: Path) -> bool:
    """The invariant: the record names a committed slot (the active one, or the revert slot of an
    uncommitted first boot) and that slot's directory holds exactly its image."""
    cfg = StateStore(root).load()
    if cfg is None:
        return False
    slot = cfg.active_slot if cfg.committed else cfg.revert_slot
    return slot_matches(slot_dir(root, slot), cfg.slots[slot])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _next_program(pidfile: Path, killed: set[int], timeout_s: float = 1.0) -> int | None:
    """The pid of a running program started after the ones already killed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and pid not in killed and _alive(pid):
            return pid
        time.sleep(0.005)
    return None


def test_kill9_never_leaves_the_device_without_a_committed_slot(tmp_path: Path) -> None:
    rng = random.Random(20261206)
    root = tmp_path / "slots"
    factory = tmp_path / "factory"
    factory.mkdir()
    (factory / "main.py").write_bytes((HERE / "k9_program.py").read_bytes())
    (factory / "behavior").write_text("ok")
    FsSlots(root).provision(factory, version="factory")
    bundles = _bundles(tmp_path)
    pidfile = tmp_path / "program.pid"
    log = tmp_path / "supervisor.log"
    env = cli_env({"K9_PIDFILE": str(pidfile), "K9_BUNDLES": str(bundles)})
    argv = [sys.executable, "-m", "mgrpc", "supervise", "--slots", str(root), "--heartbeat-timeout", "0.4s",
            "--start-timeout", "1s", "--restart-delay", "0.02s", "--stop-timeout", "0.3s", "--",
            sys.executable, "main.py"]  # fmt: skip
    kills = {"supervisor": 0, "program": 0}
    recovered = lost = orphans = 0
    killed: set[int] = set()
    started = time.monotonic()
    with log.open("w") as logf:
        while kills["supervisor"] + kills["program"] < TARGET_KILLS and kills["supervisor"] < MAX_SUPERVISOR_RUNS:
            pidfile.unlink(missing_ok=True)
            sup = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=logf, env=env, cwd=ROOT)
            for _ in range(rng.choice([1, 2, 2, 3, 4])):
                pid = _next_program(pidfile, killed)
                if pid is None:
                    continue
                time.sleep(rng.uniform(0.0, 0.15))
                killed.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # it ended by itself meanwhile (a crash release, a restart)
                kills["program"] += 1
                # Checked at once, while the supervisor reacts (a power cut could come now too).
                if _committed_slot_ok(root):
                    recovered += 1
                else:
                    lost += 1
            time.sleep(rng.uniform(0.0, 0.4))
            program = int(pidfile.read_text()) if pidfile.exists() else None
            sup.send_signal(signal.SIGKILL)
            sup.wait(10)
            assert sup.returncode == -signal.SIGKILL, f"the supervisor ended on its own: see {log}"
            kills["supervisor"] += 1
            if program is not None and not _wait_gone(program):
                orphans += 1
                os.kill(program, signal.SIGKILL)
            if _committed_slot_ok(root):
                recovered += 1
            else:
                lost += 1
    elapsed = time.monotonic() - started
    text = log.read_text()
    events = {k: text.count(k) for k in ("update installed", "committed slot", "reverted", "first boot", "hung")}
    total = kills["supervisor"] + kills["program"]
    print(f"\nkill -9: {total} kills ({kills['supervisor']} supervisor, {kills['program']} program) in {elapsed:.0f} s;"
          f" recovered {recovered}, lost {lost}, orphaned programs {orphans}; supervisor saw {events}")  # fmt: skip
    assert total >= MIN_KILLS
    assert lost == 0 and orphans == 0
    assert recovered == total
    # Enough of each to matter: the kills landed among real updates, commits and reverts.
    assert events["update installed"] >= 20 and events["committed slot"] >= 10 and events["reverted"] >= 5, events
    # And the device still boots: a fresh supervisor start decides from what the kills left.
    info = FsSlots(root).boot()
    assert slot_matches(slot_dir(root, info.slot), StateStore(root).load().slots[info.slot])  # type: ignore[union-attr]
