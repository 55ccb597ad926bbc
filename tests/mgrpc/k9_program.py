"""The program of the kill -9 test (copied into every slot as main.py): it commits, reverts, updates
and snapshots at random, as fast as it can, while the test kills it and its supervisor.

Its slot's ``behavior`` file says how this version behaves: ``ok``, ``crash`` (exits at start),
``hang`` (stops its heartbeats) or ``nocommit`` (runs, never commits).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

from updater.context import UpdaterContext
from updater.errors import UpdaterError
from updater.fsslots import FsSlotStorage, SupervisorClient


def phase(name: str) -> None:
    """What the program is doing now, for the test's tally of where its kills landed."""
    Path(os.environ["K9_PHASE"]).write_text(f"{os.getpid()} {name}")


def main() -> int:
    behavior = Path("behavior").read_text().strip()
    pidfile = Path(os.environ["K9_PIDFILE"])
    tmp = pidfile.with_name(pidfile.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, pidfile)
    if behavior == "crash":
        return 3
    sup = SupervisorClient.from_env()
    st = FsSlotStorage.from_env()
    interval = float(os.environ["MGRPC_HEARTBEAT_S"])

    def beat() -> None:
        while behavior != "hang":
            try:
                sup.request("heartbeat")
            except UpdaterError:
                os._exit(4)  # stale or gone: a leftover must not linger
            time.sleep(interval)

    threading.Thread(target=beat, daemon=True).start()
    rng = random.Random()
    phase(behavior)
    if behavior in ("hang", "nocommit"):
        time.sleep(60)
        return 0
    if not st.is_committed:
        time.sleep(rng.uniform(0, 0.05))
        if rng.random() < 0.15:
            phase("revert")
            sup.request("revert")
        else:
            phase("commit")
            sup.request("commit")
        phase("idle")
        time.sleep(rng.uniform(0, 0.3))  # runs a while, then restarts (an update to apply next)
        sup.request("reboot")
        time.sleep(60)
        return 0
    if rng.random() < 0.1:
        phase("snapshot")
        sup.request("snapshot", set_as_revert=False, commit_timeout=-1)
    phase("update")
    bundles = sorted(Path(os.environ["K9_BUNDLES"]).iterdir())
    data = rng.choice(bundles).read_bytes()
    ctx = UpdaterContext(st, arch="linux", commit_timeout_s=1, total_size=len(data))
    for off in range(0, len(data), 4096):
        if ctx.process(data[off : off + 4096]) != 0:
            break
    phase("finalize")
    if ctx.finish() > 0:
        phase("idle")
        time.sleep(rng.uniform(0, 0.2))
        sup.request("reboot")
    time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
