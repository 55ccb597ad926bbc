"""``kill -9`` of a virtual device process in the middle of ``mgrpc ota``, over ws, tcp, serial and mqtt.

One chain per transport, the chains running side by side. A run: the device (``mgrpc device``, its flash
in a file) serves RPC; ``mgrpc ota fw.zip --commit`` starts updating it to the firmware it does not run;
at a random moment the device is killed with
SIGKILL and started again on the same flash file and address. The moment is drawn evenly over the
phases of an update (start-up and ``OTA.Status``, ``OTA.Begin``, the writes, ``OTA.End``, the reboot
and first boot, the commit), at a random time within the phase. The ``mgrpc ota`` that was running either
rides out the restart (it reconnects and resumes) or fails; a failed one is run once more (the user's
retry, which resumes or starts over). Then the device must answer and run either the new firmware,
committed (the update *completed*), or the firmware it had committed before (*kept*). Anything else --
no answer, no boot, another version, uncommitted firmware left behind -- counts as *bricked*.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Kill9Result", "run_kill9"]

TRANSPORTS = ("ws", "tcp", "serial", "mqtt")
VERSIONS = ("2.0", "3.0")
READY_S = 30.0
CLIENT_S = 90.0


@dataclass
class Kill9Result:
    """Runs, how they ended, and what went wrong (with the run that shows it)."""

    runs: int = 0
    completed: int = 0
    kept_old: int = 0
    bricked: int = 0
    kills: int = 0
    kills_mid_update: int = 0  # the device was killed while `mgrpc ota` was still running
    resumed: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)
    by_transport: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Chain:
    """One transport's device, addresses and bundle files."""

    def __init__(self, transport: str, workdir: Path, broker_port: int | None, rng: random.Random) -> None:
        self.transport = transport
        self.rng = rng
        self.state = workdir / transport
        self.state.mkdir(parents=True, exist_ok=True)
        self.device_id = f"k9{transport}"
        self.link: Any = None
        if transport in ("ws", "tcp"):
            port = _free_port()
            path = "/rpc" if transport == "ws" else ""
            self.listen = self.client_url = f"{transport}://127.0.0.1:{port}{path}"
        elif transport == "serial":
            from transports.linkemu import LinkEmulator

            self.link = LinkEmulator(baud=None).start()
            self.listen = f"serial://{self.link.a_path}"
            self.client_url = f"serial://{self.link.b_path}"
        else:
            self.listen = f"mqtt://127.0.0.1:{broker_port}"
            self.client_url = f"mqtt://127.0.0.1:{broker_port}/{self.device_id}"
        self.proc: asyncio.subprocess.Process | None = None
        self.write_s = 0.5  # replaced by the write time of the first, uncut update
        self.completed = self.kept = self.bricked = self.runs = 0

    async def start(self) -> None:
        """Start the device and wait until it serves."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mgrpc", "device", "--id", self.device_id, "--state", str(self.state),
            "--listen", self.listen, "--watchdog", "5",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), READY_S)
        if not line.strip():
            raise RuntimeError(f"{self.transport} device did not start")

    async def kill(self) -> None:
        """SIGKILL: a power cut for the process (its flash file keeps what was written)."""
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                await self.kill()
        if self.link is not None:
            self.link.stop()

    async def ota(self, bundle: Path) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mgrpc", "--port", self.client_url, "--timeout", "5s",
            "ota", str(bundle), "--commit", "--window", self.rng.choice(["1", "8"]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

    async def state_of(self) -> tuple[str, bool]:
        """(running version, committed), asked over the chain's own transport."""
        import transports

        async with await transports.connect(self.client_url, timeout_s=5) as c:
            info = await c.call("Sys.GetInfo")
            boot = await c.call("OTA.GetBootState")
        return str(info["fw_version"]), bool(boot["is_committed"])

    async def state_with_retries(self, deadline_s: float = 30.0) -> tuple[str, bool]:
        end = time.monotonic() + deadline_s
        while True:
            try:
                return await self.state_of()
            except Exception:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.3)


# Moments to cut at: a line ``mgrpc ota`` prints, then a random delay up to the given bound (None: the
# time the uncut run spent writing). "" is the start of the process (start-up, connect, OTA.Status).
PHASES: dict[str, float | None] = {
    "": 1.0,
    "Starting an update": 0.05,
    "Writing data...": None,
    "Finalizing update...": 0.2,
    "Waiting for the device to come back...": 1.2,
    "committing": 0.05,
}


class ClientRun:
    """A running ``mgrpc ota``: its output lines as they come, with the time each arrived."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append((time.monotonic(), line.decode(errors="replace").rstrip()))
            self._changed.set()
        self._changed.set()

    def seen(self, marker: str) -> float | None:
        """When a line containing ``marker`` arrived (None if not yet)."""
        return next((t for t, line in self.lines if marker in line), None)

    async def wait_line(self, marker: str, timeout_s: float) -> bool:
        """Wait for a line containing ``marker``; False if the process ended (or timed out) first."""
        end = time.monotonic() + timeout_s
        while self.seen(marker) is None:
            if self._reader.done() or time.monotonic() > end:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, end - time.monotonic()))
            except TimeoutError:
                pass
        return True

    async def finish(self) -> tuple[int, str]:
        """Exit status and the last two lines (the result or the error)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), CLIENT_S)
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            self._reader.cancel()
            return -9, "mgrpc ota did not finish"
        return self.proc.returncode or 0, " | ".join(line for _, line in self.lines[-2:])


async def _run_chain(chain: Chain, runs: int, bundles: dict[str, Path], res: Kill9Result) -> None:
    await chain.start()
    try:
        version, committed = await chain.state_with_retries()
        if not committed:
            raise RuntimeError("a fresh device runs uncommitted firmware")
        for i in range(runs):
            old = version
            target = VERSIONS[0] if old != VERSIONS[0] else VERSIONS[1]
            client = ClientRun(await chain.ota(bundles[target]))
            cut = i > 0  # the first run is uncut: it measures how long the writes take here
            if cut:
                phase = chain.rng.choice(list(PHASES))
                bound = PHASES[phase]
                if await client.wait_line(phase, CLIENT_S):
                    await asyncio.sleep(chain.rng.uniform(0, chain.write_s if bound is None else bound))
                res.by_phase[phase or "start-up"] = res.by_phase.get(phase or "start-up", 0) + 1
                res.kills_mid_update += client.proc.returncode is None
                await chain.kill()
                res.kills += 1
                await chain.start()
            rc, last = await client.finish()
            if not cut:
                began, ended = client.seen("Writing data..."), client.seen("Finalizing update...")
                if began is not None and ended is not None:
                    chain.write_s = max(0.01, ended - began)
            if rc != 0:
                res.resumed += 1  # the user runs the command again
                rc, last = await ClientRun(await chain.ota(bundles[target])).finish()
            what = f"{chain.transport} run {i} ({old} -> {target}, client exit {rc} {last!r})"
            try:
                version, committed = await chain.state_with_retries()
            except Exception as exc:
                res.bricked += 1
                chain.bricked += 1
                res.failures.append(f"{what}: the device does not answer after the restart: {exc!r}")
                await chain.kill()
                await chain.start()
                version, committed = await chain.state_with_retries()
                continue
            if not cut:
                if not (version == target and committed and rc == 0):
                    res.failures.append(f"{what}: an update without a kill failed (device on {version})")
                continue
            res.runs += 1
            chain.runs += 1
            if version == target and committed and rc == 0:
                res.completed += 1
                chain.completed += 1
            elif version == old and committed:
                res.kept_old += 1
                chain.kept += 1
                if rc == 0:
                    res.failures.append(f"{what}: mgrpc ota reported success but the device runs {old}")
            else:
                res.bricked += 1
                chain.bricked += 1
                res.failures.append(f"{what}: device runs {version} {'committed' if committed else 'uncommitted'}")
    finally:
        await chain.stop()
        res.by_transport[chain.transport] = (
            f"{chain.runs} runs/{chain.completed} completed/{chain.kept} kept/{chain.bricked} bricked"
        )


def run_kill9(runs: int, *, seed: int = 1, parallel: int = 2) -> Kill9Result:
    """``runs`` kill -9 runs spread over the four transports (``parallel`` is unused: one chain each)."""
    return asyncio.run(_main(runs, seed))


async def _main(runs: int, seed: int) -> Kill9Result:
    from tests.mosquitto import Mosquitto
    from updater.bundle import make_virtual_bundle

    res = Kill9Result()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="mgrpc-kill9-") as tmp:
        work = Path(tmp)
        bundles = {}
        for v in VERSIONS:
            bundles[v] = work / f"fw-{v}.zip"
            bundles[v].write_bytes(make_virtual_bundle("esp32", v, app_size=48 << 10))
        broker = Mosquitto(workdir=work / "mosquitto").start()
        try:
            per = [runs // len(TRANSPORTS) + (i < runs % len(TRANSPORTS)) for i in range(len(TRANSPORTS))]
            # Each chain does one extra, uncut run first (it measures the update time of its transport).
            chains = [Chain(t, work, broker.port, random.Random(rng.randrange(1 << 30))) for t in TRANSPORTS]
            results = await asyncio.gather(
                *(_run_chain(c, n + 1, bundles, res) for c, n in zip(chains, per, strict=True) if n > 0),
                return_exceptions=True,
            )
            for c, r in zip(chains, results, strict=False):
                if isinstance(r, BaseException):
                    res.failures.append(f"{c.transport} chain stopped: {r!r}")
        finally:
            with contextlib.suppress(Exception):
                broker.stop()
    return res
