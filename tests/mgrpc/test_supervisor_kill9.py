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
from collections import Counter
from pathlib import Path

from tests.mgrpc.cli_proc import ROOT, cli_env
from updater.bundle import BundlePart, build_bundle
from updater.fsslots import FsSlots, StateStore, pack_files, slot_dir, slot_matches

HERE = Path(__file__).parent
TARGET_KILLS = 205  # at least 200, whatever share of the program kills lands
MAX_SUPERVISOR_RUNS = 150
MIN_KILLS = 200
MIN_UPDATES, MIN_COMMITS, MIN_REVERTS = 20, 5, 5


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


def _events(log: Path) -> dict[str, int]:
    text = log.read_text()
    return {k: text.count(k) for k in ("update installed", "committed slot", "reverted", "first boot", "hung")}


def _enough(log: Path) -> bool:
    """Kills have landed among enough finished updates, commits and reverts."""
    e = _events(log)
    return e["update installed"] >= MIN_UPDATES and e["committed slot"] >= MIN_COMMITS and e["reverted"] >= MIN_REVERTS


def _wait_phase(phase_file: Path, pid: int, phases: tuple[str, ...], timeout_s: float = 1.0) -> None:
    """Wait (bounded) until program ``pid`` reports one of ``phases``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            who, what = phase_file.read_text().split()
        except (OSError, ValueError):
            who, what = "", ""
        if who == str(pid) and what in phases:
            return
        time.sleep(0.002)


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
    phase_file = tmp_path / "phase"
    env = cli_env({"K9_PIDFILE": str(pidfile), "K9_BUNDLES": str(bundles), "K9_PHASE": str(phase_file)})
    landed: Counter[str] = Counter()  # what the program was doing when a kill (of either) came

    def tally(pid: int | None) -> None:
        try:
            who, what = phase_file.read_text().split()
        except (OSError, ValueError):
            who, what = "", ""
        landed[what if pid is not None and who == str(pid) else "starting"] += 1
    argv = [sys.executable, "-m", "mgrpc", "supervise", "--slots", str(root), "--heartbeat-timeout", "0.4s",
            "--start-timeout", "1s", "--restart-delay", "0.02s", "--stop-timeout", "0.3s", "--",
            sys.executable, "main.py"]  # fmt: skip
    kills = {"supervisor": 0, "program": 0}
    recovered = lost = orphans = 0
    killed: set[int] = set()
    started = time.monotonic()
    with log.open("w") as logf:
        while (kills["supervisor"] + kills["program"] < TARGET_KILLS or not _enough(log)) and (
            kills["supervisor"] < MAX_SUPERVISOR_RUNS
        ):
            # Every fifth start is left alone longer, so updates also finish, commit and revert
            # (how many do in the others depends on the machine's load).
            gentle = kills["supervisor"] % 5 == 4
            pidfile.unlink(missing_ok=True)
            sup = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=logf, env=env, cwd=ROOT)
            for _ in range(0 if gentle else rng.choice([2, 3, 3, 4, 5])):
                pid = _next_program(pidfile, killed)
                if pid is None:
                    continue
                if rng.random() < 0.3:
                    # Aim at an update in progress: on a loaded machine the program spends most of a
                    # short life starting up, and random moments would seldom land inside one.
                    _wait_phase(phase_file, pid, ("update", "finalize"))
                    time.sleep(rng.uniform(0.0, 0.03))
                else:
                    time.sleep(rng.uniform(0.02, 0.2))
                killed.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # it ended by itself meanwhile (a crash release, a restart)
                tally(pid)
                kills["program"] += 1
                # Checked at once, while the supervisor reacts (a power cut could come now too).
                if _committed_slot_ok(root):
                    recovered += 1
                else:
                    lost += 1
            time.sleep(rng.uniform(0.6, 1.2) if gentle else rng.uniform(0.0, 0.4))
            program = int(pidfile.read_text()) if pidfile.exists() else None
            sup.send_signal(signal.SIGKILL)
            tally(program if program is not None and _alive(program) else None)
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
    events = _events(log)
    total = kills["supervisor"] + kills["program"]
    print(f"\nkill -9: {total} kills ({kills['supervisor']} supervisor, {kills['program']} program) in {elapsed:.0f} s;"
          f" recovered {recovered}, lost {lost}, orphaned programs {orphans}; the program was {dict(landed)};"
          f" the supervisor saw {events}")  # fmt: skip
    assert total >= MIN_KILLS
    assert lost == 0 and orphans == 0
    assert recovered == total
    # Enough of each to matter: the kills landed among real updates, commits and reverts.
    # (A commit or revert request takes about a millisecond, so few kills land inside one; the record
    # writes they make are covered step by step by tests/updater/test_fsslots.py's failure injection.)
    assert landed["update"] + landed["finalize"] >= 10, landed
    assert _enough(log), events
    # And the device still boots: a fresh supervisor start decides from what the kills left.
    info = FsSlots(root).boot()
    assert slot_matches(slot_dir(root, info.slot), StateStore(root).load().slots[info.slot])  # type: ignore[union-attr]
