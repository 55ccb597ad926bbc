"""Listeners under abuse (issue #14 §4): every device listener abused at once-per-listener, on 127.0.0.1.

A virtual device process (``mgrpc device``) serves all its listeners together: tcp, udp, ws and http (one
server), serial (a pty whose other end this process holds), mqtt (a mosquitto on 127.0.0.1) and ble
(bumble's in-process air, which the device reaches through an HCI-over-TCP bridge). The listen URLs
carry the limits under test (:data:`TCP_OPTS`, :data:`WEB_OPTS`, ...). For each listener in turn:

1. *baseline*: a well-behaved client of that listener (connected once, for the whole run) calls
   ``RPC.Ping`` every :data:`PACE_S`; its latencies are the baseline;
2. *abuse*: an abuser process (``python -m bench.soaklib.listeners abuser``, one for the run, so its
   own work does not slow the measuring process) applies every kind of abuse the listener can get -- idle connections,
   slowloris heads, half-sent frames, upgraded WebSockets that never speak, oversized frames, invalid
   UTF-8 and other junk, floods far beyond ``max_queue_length``, a peer that never reads -- while the same
   client keeps calling at the same pace; meanwhile the device's sockets on the listener's port are
   counted from ``/proc`` every :data:`SAMPLE_S`;
3. the abuser reports what it applied and whether the device did what it must (closed slowloris heads,
   answered every flood request, cut the peer that never reads, ...); the serial link, which has one
   host end, is abused from this process between the client's own frames.

The whole runs three times (:data:`ROUNDS`): once, then with twice the abuse, then with twice the abuse
again. Memory: the device's RSS is read after the warm-up and after each round. What the device holds
is bounded by its limits, not by how much abuse it has seen, so the third round, a repeat of the second,
may add at most :data:`MEM_SLACK_MIB` (the first two grow it while the allocator settles at the
high-water marks of the bigger bursts). Latency: the median call under abuse must stay within
:data:`LATENCY_RATIO` times the baseline median plus :data:`LATENCY_ALLOWANCE_S` (three processes share
two cores here: the device, the abuser and this one), and no call of the well-behaved client may fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import statistics
import struct
import sys
import tempfile
import time
import tty
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LISTENERS", "ListenerFigures", "ListenersResult", "run_listeners"]

LISTENERS = ("tcp", "udp", "ws", "http", "serial", "mqtt", "ble")
DEVICE_ID = "soakdev"
PACE_S = 0.01  # the well-behaved client's pause between calls
BASELINE_CALLS = 50
MIN_ABUSE_CALLS = 20
SAMPLE_S = 0.05
CALL_TIMEOUT_S = 10.0
ABUSER_TIMEOUT_S = 120.0
NONREADER_S = 30.0  # a peer that never reads must be cut within this
LATENCY_RATIO = 3.0
LATENCY_ALLOWANCE_S = 0.002
MEM_SLACK_MIB = 4.0
ROUNDS = (1, 2, 2)  # how much abuse each round applies, in multiples of BASE x scale

TCP_MAX_CONNS = 16
WEB_MAX_CONNS = 32
HEADER_TIMEOUT_S = 0.5
TCP_OPTS = f"max_conns={TCP_MAX_CONNS}&max_out_buffer=262144"
WEB_OPTS = f"max_conns={WEB_MAX_CONNS}&header_timeout={HEADER_TIMEOUT_S:g}&idle_timeout=10"
UDP_OPTS = "max_peers=16"
SERIAL_OPTS = "max_out_buffer=262144"

# What each abuser applies per round at scale 1, times the round's multiplier (ROUNDS). "junk" is how
# many times each input of JUNK is sent.
BASE: dict[str, dict[str, int]] = {
    "tcp": {"idle": 200, "slow": 40, "junk": 5, "flood": 1500, "nonreader": 1},
    "udp": {"peers": 60, "junk": 5, "flood": 1500},
    "ws": {"idle": 120, "slow": 40, "silent": 30, "junk": 3, "flood": 1500, "nonreader": 1},
    "http": {"idle": 60, "slow": 40, "junk": 3, "flood": 250},
    "serial": {"junk": 5, "flood": 1500, "unread": 1000},
    "mqtt": {"junk": 3, "flood": 1000},
    "ble": {"idle": 2, "junk": 1, "nonreader": 1},
}
# At least this many whatever the scale: a limit is only tested when it is exceeded.
FLOOR: dict[str, dict[str, int]] = {
    "tcp": {"idle": 2 * TCP_MAX_CONNS, "slow": 4, "flood": 100},
    "udp": {"peers": 20, "flood": 100},
    "ws": {"idle": WEB_MAX_CONNS + 4, "slow": 4, "silent": 4, "flood": 100},
    "http": {"idle": 8, "slow": 4, "flood": 40},
    "serial": {"flood": 100, "unread": 400},
    "mqtt": {"flood": 100},
    "ble": {"idle": 1},
}

JUNK: list[tuple[str, bytes]] = [
    ("oversized", b'{"id":1,"src":"abuser","method":"RPC.Ping","params":"' + b"A" * 60_000 + b'"}'),
    ("invalid UTF-8", b'{"id":2,"src":"abuser","method":"RPC.Ping","params":"\xff\xfe\xc3\x28"}'),
    ("lone surrogate", b'{"id":3,"src":"abuser","method":"RPC.Ping","params":"\\ud800"}'),
    ("binary", bytes(range(256)) * 8),
    ("framing bytes", b'"""' * 300 + b"\x04" * 50),
    ("deep nesting", b"[" * 5000),
    ("huge integer", b'{"id":4,"src":"abuser","method":"RPC.Ping","params":' + b"9" * 400 + b"}"),
    ("not an object", b"null"),
]


def counts(listener: str, scale: float, times: int, *, first: bool) -> dict[str, int]:
    """What the abuser of ``listener`` applies in a round of ``times`` x the base at ``scale``.

    Every kind at least :data:`FLOOR`; a kind without a floor at least once in the ``first`` round.
    """
    out = {}
    for kind, base in BASE[listener].items():
        n = round(base * scale * times)
        out[kind] = max(n, FLOOR[listener].get(kind, 0), 1 if first else 0)
    return out


def calls(n: int, scale: float) -> int:
    """How many calls of the well-behaved client: ``n`` at scale 1, no fewer than 10."""
    return max(10, round(n * min(1.0, scale)))


# ================================================================================================
# results


@dataclass
class ListenerFigures:
    """One listener over both rounds."""

    name: str
    applied: Counter[str] = field(default_factory=Counter)
    base_s: list[float] = field(default_factory=list)
    abused_s: list[float] = field(default_factory=list)
    calls_failed: list[str] = field(default_factory=list)
    held_max: int | None = None  # the device's sockets on the listener's port, at most
    limit: int | None = None
    notes: Counter[str] = field(default_factory=Counter)  # what the abuser saw the device do
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this listener's baselines and abuse

    @property
    def total(self) -> int:
        """Abusive connections and inputs applied."""
        return sum(self.applied.values())

    @property
    def base_median(self) -> float:
        """The well-behaved client's median call without abuse."""
        return statistics.median(self.base_s) if self.base_s else float("nan")

    @property
    def abused_median(self) -> float:
        """The same client's median call under abuse."""
        return statistics.median(self.abused_s) if self.abused_s else float("nan")

    @staticmethod
    def p95(values: list[float]) -> float:
        """The 95th percentile (nan when empty)."""
        return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else float("nan")

    @property
    def ratio(self) -> float:
        """Median under abuse over median without."""
        return self.abused_median / self.base_median if self.base_s and self.abused_s else float("nan")

    @property
    def latency_ok(self) -> bool:
        """Within :data:`LATENCY_RATIO` times the baseline plus :data:`LATENCY_ALLOWANCE_S`."""
        return bool(self.abused_s) and self.abused_median <= LATENCY_RATIO * self.base_median + LATENCY_ALLOWANCE_S

    @property
    def ok(self) -> bool:
        """No failed call, latency within bound, held sockets within the limit, nothing the abuser flagged."""
        held_ok = self.limit is None or (self.held_max is not None and self.held_max <= self.limit)
        return not self.calls_failed and self.latency_ok and held_ok and not self.failures


@dataclass
class ListenersResult:
    """Every listener, and the device's memory."""

    listeners: dict[str, ListenerFigures] = field(default_factory=dict)
    rss_mib: list[float] = field(default_factory=list)  # after the warm-up, then after each round
    peak_rss_mib: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Abusive connections and inputs over every listener and both rounds."""
        return sum(f.total for f in self.listeners.values())

    @property
    def mem_ok(self) -> bool:
        """The last round, a repeat of the one before, grew the device by at most :data:`MEM_SLACK_MIB`."""
        return len(self.rss_mib) == len(ROUNDS) + 1 and self.rss_mib[-1] - self.rss_mib[-2] <= MEM_SLACK_MIB

    @property
    def ok(self) -> bool:
        """Every listener passed, memory bounded, no harness failure."""
        return all(f.ok for f in self.listeners.values()) and self.mem_ok and not self.failures


# ================================================================================================
# the device process, seen from outside


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_mib(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of ``pid`` in MiB."""
    rss = hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def held_sockets(pid: int, port: int) -> int:
    """Connected TCP sockets of ``pid`` whose local port is ``port`` (what the listener holds)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A":  # LISTEN
                    continue
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] in inodes:
                    n += 1
    return n


class Device:
    """``mgrpc device`` with every listener; its client URLs as printed."""

    def __init__(self, state: Path, listen: list[str]) -> None:
        self.state = state
        self.listen = listen
        self.proc: asyncio.subprocess.Process | None = None
        self.urls: list[str] = []

    @property
    def pid(self) -> int:
        """The device process's id."""
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        """Start it and read the URLs it serves."""
        args = [sys.executable, "-m", "mgrpc", "device", "--id", DEVICE_ID, "--state", str(self.state)]
        for url in self.listen:
            args += ["--listen", url]
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        for _ in self.listen:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError("the device process ended while starting")
            self.urls.append(line.decode().strip())

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# ================================================================================================
# the serial link: this process holds the host end


class SerialHost:
    """The host end of the device's pty: frames out, replies in; junk between frames during abuse."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.rx = bytearray()
        self.reading = False
        self.answered = 0  # replies with a result seen
        self.junk: list[bytes] = []  # while abused, one of these goes before each call, in turn
        self.junk_written = 0
        self._bytes_read = 0
        self._next_id = 100_000
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()  # one writer at a time: a frame is never cut by another

    def start_reading(self) -> None:
        """Watch the master end."""
        if not self.reading:
            asyncio.get_running_loop().add_reader(self.master, self._readable)
            self.reading = True

    def stop_reading(self) -> None:
        """Read nothing (the device's output piles up)."""
        if self.reading:
            asyncio.get_running_loop().remove_reader(self.master)
            self.reading = False

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return
        self._bytes_read += len(data)
        self.rx += data
        while (nl := self.rx.find(b"\n")) >= 0:
            text = bytes(self.rx[:nl])
            del self.rx[: nl + 1]
            if b'"result"' not in text:
                continue
            self.answered += 1
            m = re.search(rb'"id":(\d+)', text)
            fut = self._waiters.pop(int(m.group(1)), None) if m else None
            if fut is not None and not fut.done():
                fut.set_result(None)

    @property
    def bytes_read(self) -> int:
        """Bytes read from the device so far."""
        return self._bytes_read

    async def write(self, data: bytes) -> None:
        """Write everything (waiting while the pty is full)."""
        async with self._lock:
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.master, view)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                    continue
                view = view[n:]

    async def call(self) -> None:
        """One ``RPC.Ping`` (with the current junk before it); returns when answered."""
        self._next_id += 1
        fid = self._next_id
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[fid] = fut
        junk = self.junk[self.junk_written % len(self.junk)] if self.junk else b""
        try:
            await self.write(junk + line(b'{"id":%d,"src":"host","method":"RPC.Ping"}' % fid))
            self.junk_written += bool(junk)
            await fut
        finally:
            self._waiters.pop(fid, None)

    def close(self) -> None:
        """Close both ends."""
        self.stop_reading()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def line(frame: bytes) -> bytes:
    """A frame as ``mgrpc_uart.py`` writes it: JSON, its CRC-32 in hex, newline."""
    from rpc.framing import crc32_hex

    return frame + crc32_hex(frame).encode() + b"\n"


# Line noise for the serial link: each input of JUNK as a line; the oversized one cut to 1 KiB over the
# frame size (what a UART carries between two frames of the client's, and the same decoder path).
SERIAL_JUNK = [data.replace(b"\n", b" ")[:5120] + b"\n" for _, data in JUNK]


async def abuse_serial_junk(host: SerialHost, n: dict[str, int], fig: ListenerFigures) -> None:
    """Line noise: one input of JUNK before each of the client's own frames, ``n["junk"] * len(JUNK)`` calls.

    The link has one host end, so this is the abuse the client's latency is measured under; the flood
    and the host that stops reading (:func:`abuse_serial_more`) come after, on the same link.
    """
    before = host.junk_written
    host.junk = SERIAL_JUNK
    try:
        await _until(lambda: host.junk_written - before >= n["junk"] * len(JUNK), 60)
    finally:
        host.junk = []
    fig.applied["junk inputs"] += host.junk_written - before


async def _until_quiet(host: SerialHost, quiet_s: float, within_s: float) -> bool:
    """Wait until the device has written nothing for ``quiet_s`` (its output queue is empty)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        seen = host.bytes_read
        await asyncio.sleep(quiet_s)
        if host.bytes_read == seen:
            return True
    return False


async def abuse_serial_more(host: SerialHost, n: dict[str, int], fig: ListenerFigures) -> None:
    """A flood read in full; then the host stops reading while asking for ~1 KB replies, and reads again."""
    before = host.answered
    await host.write(b"".join(line(_frame(i, src="flood")) for i in range(1, n["flood"] + 1)))
    fig.applied["flood requests"] += n["flood"]
    await _until(lambda: host.answered - before >= n["flood"], 60)
    fig.notes["serial flood answered"] += host.answered - before
    if host.answered - before < n["flood"]:
        fig.failures.append(f"serial flood: {host.answered - before} of {n['flood']} answered")
    host.stop_reading()
    await host.write(b"".join(line(_frame(i, "Config.Get")) for i in range(1, n["unread"] + 1)))
    fig.applied["requests never read"] += n["unread"]
    await asyncio.sleep(0.5)
    host.start_reading()
    # the device dropped what did not fit in max_out_buffer; once the rest is read, it answers again
    quiet = await _until_quiet(host, 0.2, 30)
    host.rx.clear()
    if not quiet:
        fig.failures.append("serial: the device was still writing 30 s after the host read again")
    t0 = time.monotonic()
    while True:
        try:
            await asyncio.wait_for(host.call(), 2)
            break
        except TimeoutError:
            if time.monotonic() - t0 > 30:
                fig.failures.append("serial: no answer 30 s after the host read again")
                return
    fig.notes["answered again after not reading"] += 1


# ================================================================================================
# the measuring side


class Pacer:
    """The well-behaved client: one call, a pause of :data:`PACE_S`, again, until stopped."""

    def __init__(self, call: Callable[[], Awaitable[Any]]) -> None:
        self.call = call
        self.lat: list[float] = []
        self.failed: list[str] = []

    async def run(self, stop: asyncio.Event | None, calls: int) -> None:
        """At least ``calls`` calls; then until ``stop`` is set (if any)."""
        done = 0
        while done < calls or (stop is not None and not stop.is_set()):
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(self.call(), CALL_TIMEOUT_S)
                self.lat.append(time.perf_counter() - t0)
            except Exception as e:
                self.failed.append(f"{type(e).__name__}: {e}"[:200])
            done += 1
            await asyncio.sleep(PACE_S)


async def _sample(pid: int, port: int | None, stop: asyncio.Event, fig: ListenerFigures) -> None:
    """The most sockets held on ``port`` in two samples in a row: a socket just accepted (before the
    listener makes room) or just aborted (closed on the device's next loop turn) is not *held*."""
    if port is None:
        return
    previous = 0
    while not stop.is_set():
        with contextlib.suppress(OSError):
            held = held_sockets(pid, port)
            steady = min(previous, held)
            fig.held_max = steady if fig.held_max is None else max(fig.held_max, steady)
            previous = held
        await asyncio.sleep(SAMPLE_S)


class Abuser:
    """The abuser process (``python -m bench.soaklib.listeners abuser``), one for the whole run: each
    line on its stdin names a listener, its address and what to apply; it answers with a JSON report."""

    def __init__(self, work: Path) -> None:
        self.errors = work / "abuser.err"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process."""
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": str(root)}
        with open(self.errors, "ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.soaklib.listeners", "abuser",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=root, env=env,
            )  # fmt: skip

    async def run(self, listener: str, spec: dict[str, Any], fig: ListenerFigures) -> None:
        """Abuse ``listener``; what the process reports goes into ``fig``."""
        if self.proc is None or self.proc.returncode is not None:
            await self.start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"listener": listener, **spec}).encode() + b"\n")
        await self.proc.stdin.drain()
        report: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(ABUSER_TIMEOUT_S):
                while report is None:
                    text = await self.proc.stdout.readline()
                    if not text:
                        break
                    with contextlib.suppress(ValueError):
                        report = json.loads(text)
        except TimeoutError:
            fig.failures.append(f"{listener} abuser did not finish within {ABUSER_TIMEOUT_S:g} s")
            await self.stop()
            return
        if report is None:
            tail = self.errors.read_text(errors="replace")[-800:]
            fig.failures.append(f"{listener} abuser ended (exit {self.proc.returncode}): {tail}")
            return
        fig.applied.update(report["applied"])
        fig.notes.update(report["notes"])
        fig.failures.extend(report["failures"])

    async def stop(self) -> None:
        """End the process."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _phase(
    fig: ListenerFigures,
    pacer: Pacer,
    abuse: Awaitable[None],
    *,
    pid: int,
    port: int | None,
    calls: int,
) -> None:
    """Abuse while the client calls (at least ``calls`` times) and the sockets are counted."""
    stop = asyncio.Event()
    n_before = len(pacer.lat)
    f_before = len(pacer.failed)
    client = asyncio.ensure_future(pacer.run(stop, calls))
    sampler = asyncio.ensure_future(_sample(pid, port, stop, fig))
    try:
        await abuse
    finally:
        stop.set()
        await asyncio.gather(client, sampler)
    fig.abused_s += pacer.lat[n_before:]
    fig.calls_failed += pacer.failed[f_before:]


async def _good_clients(
    dev: Device, air: Any, serial: SerialHost
) -> dict[str, tuple[Any, Callable[[], Awaitable[Any]]]]:
    """One well-behaved client per listener, connected once: ``name -> (closeable, call)``."""
    import transports
    from rpc.client import AsyncClient
    from transports import ble
    from transports.registry import parse_url

    out: dict[str, tuple[Any, Callable[[], Awaitable[Any]]]] = {}
    by_scheme = {u.split("://")[0]: u for u in dev.urls}
    for name in ("tcp", "udp", "ws", "http", "mqtt"):
        client = await transports.connect(by_scheme[name].split("?")[0], timeout_s=CALL_TIMEOUT_S)
        out[name] = (client, lambda c=client: c.call("RPC.Ping"))
    channel = await ble.open_client(
        parse_url(f"ble://{ble.static_address_for(DEVICE_ID)}"), bleak_backend=air.client_backend,
        bleak_scanner_backend=air.scanner_backend, timeout_s=CALL_TIMEOUT_S,
    )  # fmt: skip
    bclient = AsyncClient(channel, timeout_s=CALL_TIMEOUT_S)
    await bclient.start()
    out["ble"] = (bclient, lambda: bclient.call("RPC.Ping"))
    out["serial"] = (None, serial.call)
    return out


async def _main(scale: float) -> ListenersResult:
    from tests.mosquitto import Mosquitto
    from transports.ble import static_address_for
    from transports.ble_testing import BumbleAir

    res = ListenersResult()
    with tempfile.TemporaryDirectory(prefix="mgrpc-listeners-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(workdir=work / "mosquitto").start()
        air = BumbleAir()
        bridge = await air.hci_bridge()
        serial = SerialHost()
        web_port = _free_port()
        listen = [
            f"tcp://127.0.0.1:0?{TCP_OPTS}",
            f"udp://127.0.0.1:0?{UDP_OPTS}",
            f"ws://127.0.0.1:{web_port}/rpc?{WEB_OPTS}",
            f"http://127.0.0.1:{web_port}/rpc",
            f"serial://{serial.path}?{SERIAL_OPTS}",
            f"mqtt://127.0.0.1:{broker.port}",
            f"ble://?hci={bridge.spec}",
        ]
        dev = Device(work / "state", listen)
        abuser = Abuser(work)
        clients: dict[str, tuple[Any, Callable[[], Awaitable[Any]]]] = {}
        try:
            await asyncio.gather(dev.start(), abuser.start())
            serial.start_reading()
            clients = await _good_clients(dev, air, serial)
            urls = {u.split("://")[0]: u for u in dev.urls}
            tcp_port = int(urls["tcp"].split("?")[0].rsplit(":", 1)[1])
            web = {"host": "127.0.0.1", "port": web_port, "limit": WEB_MAX_CONNS, "header_timeout": HEADER_TIMEOUT_S}
            targets: dict[str, dict[str, Any]] = {
                "tcp": {"host": "127.0.0.1", "port": tcp_port, "limit": TCP_MAX_CONNS},
                "udp": {"host": "127.0.0.1", "port": int(urls["udp"].split("?")[0].rsplit(":", 1)[1])},
                "ws": web,
                "http": web,
                "mqtt": {"host": "127.0.0.1", "port": broker.port, "device": DEVICE_ID},
                "ble": {"hci": bridge.spec, "address": static_address_for(DEVICE_ID)},
            }
            ports: dict[str, int | None] = {"tcp": tcp_port, "ws": web_port, "http": web_port}
            limits: dict[str, int | None] = {"tcp": TCP_MAX_CONNS, "ws": WEB_MAX_CONNS, "http": WEB_MAX_CONNS}
            for name in LISTENERS:
                res.listeners[name] = ListenerFigures(name, limit=limits.get(name))
            pacers = {name: Pacer(call) for name, (_, call) in clients.items()}
            for name in LISTENERS:  # warm-up: every path once
                await pacers[name].run(None, 5)
                pacers[name].lat.clear()
                if pacers[name].failed:
                    res.failures.append(
                        f"{name}: the well-behaved client fails before any abuse: {pacers[name].failed[0]}"
                    )
            res.rss_mib.append(rss_mib(dev.pid)[0])
            for times_no, times in enumerate(ROUNDS):
                for name in LISTENERS:
                    t0 = time.monotonic()
                    fig = res.listeners[name]
                    pacer = pacers[name]
                    start = len(pacer.lat)
                    await pacer.run(None, calls(BASELINE_CALLS, scale))
                    fig.base_s += pacer.lat[start:]
                    n = counts(name, scale, times, first=times_no == 0)
                    if name == "serial":
                        abuse: Awaitable[None] = abuse_serial_junk(serial, n, fig)
                    else:
                        spec = {"target": targets[name], "n": n}
                        abuse = abuser.run(name, spec, fig)
                    await _phase(
                        fig, pacer, abuse, pid=dev.pid, port=ports.get(name), calls=calls(MIN_ABUSE_CALLS, scale)
                    )
                    if name == "serial":
                        await abuse_serial_more(serial, n, fig)
                    fig.seconds += time.monotonic() - t0
                res.rss_mib.append(rss_mib(dev.pid)[0])
            res.peak_rss_mib = rss_mib(dev.pid)[1]
            for name in LISTENERS:  # after everything, each listener still serves, and holds what it should
                try:
                    await asyncio.wait_for(clients[name][1](), CALL_TIMEOUT_S)
                except Exception as e:
                    res.failures.append(f"{name}: no answer after the abuse: {type(e).__name__}: {e}")
        finally:
            for closeable, _ in clients.values():
                if closeable is not None:
                    with contextlib.suppress(Exception):
                        await closeable.close()
            await dev.stop()
            await abuser.stop()
            serial.close()
            with contextlib.suppress(Exception):
                await bridge.close()
            with contextlib.suppress(Exception):
                broker.stop()
    return res


def run_listeners(scale: float) -> ListenersResult:
    """The whole section (see the module docstring; nothing in it is random)."""
    import logging

    logging.disable(logging.WARNING)  # what the abused code logs (and bumble's link model) is expected
    try:
        return asyncio.run(_main(scale))
    finally:
        logging.disable(logging.NOTSET)


# ================================================================================================
# the abuser process


class Report:
    """What an abuser applied, what it saw, and what was wrong."""

    def __init__(self) -> None:
        self.applied: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.failures: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        """Record ``what`` as a failure unless ``ok``."""
        if not ok:
            self.failures.append(what)

    def json(self) -> str:
        """The report line."""
        return json.dumps({"applied": self.applied, "notes": self.notes, "failures": self.failures[:20]})


async def _open(
    host: str, port: int, data: bytes = b"", *, rcvbuf: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection; ``rcvbuf``: a peer that reads (almost) nothing -- a small socket buffer, and a
    stream buffer that stops taking bytes from the socket past 2 x ``rcvbuf``."""
    if rcvbuf:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        r, w = await asyncio.open_connection(sock=sock, limit=rcvbuf)
    else:
        r, w = await asyncio.open_connection(host, port, limit=1 << 20)
    if data:
        w.write(data)
    return r, w


async def _closed_by_peer(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True if the device closes the connection (EOF or reset) within ``within_s``; reads what comes."""
    try:
        while await asyncio.wait_for(reader.read(65536), within_s):
            pass
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        pass
    return True


async def _count_closed(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], within_s: float) -> int:
    results = await asyncio.gather(*(_closed_by_peer(r, within_s) for r, _ in conns))
    return sum(results)


def _close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, w in conns:
        w.close()


async def _trickle(
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], stop: asyncio.Event, byte: bytes
) -> None:
    """Slowloris: one more byte on every connection now and then, never the end."""
    while not stop.is_set():
        await asyncio.sleep(0.3)
        for _, w in conns:
            if not w.is_closing():
                with contextlib.suppress(Exception):
                    w.write(byte)


def _frame(i: int, method: str = "RPC.Ping", src: str = "abuser") -> bytes:
    return b'{"id":%d,"src":"%s","method":"%s"}' % (i, src.encode(), method.encode())


_check_ids = iter(range(10**6, 10**9))


def _check() -> tuple[bytes, bytes]:
    """A ping with an id used once (an MQTT device drops a request it has just seen), and that id."""
    fid = b"%d" % next(_check_ids)
    return _frame(int(fid)), fid


# -- tcp ---------------------------------------------------------------------------------------


async def _stream_flood(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int, report: Report, what: str) -> None:
    w.write(b"".join(_frame(i) + b"\n" for i in range(1, n + 1)))
    seen = 0
    try:
        while seen < n:
            got = await asyncio.wait_for(r.readline(), CALL_TIMEOUT_S)
            if not got:
                break
            seen += b'"result"' in got
    except TimeoutError:
        pass
    report.notes[f"{what} answered"] += seen
    report.expect(seen == n, f"{what}: {seen} of {n} requests answered")


async def _never_read(w: asyncio.StreamWriter, request: bytes, report: Report, what: str) -> None:
    """Ask for replies at a steady pace and read none, until the device cuts the connection (a write
    then fails) or :data:`NONREADER_S` pass."""
    sent = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < NONREADER_S and not w.transport.is_closing():
            w.write(request * 20)
            sent += 20
            await asyncio.sleep(0.005)
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()
    report.applied["requests never read"] += sent
    cut = w.transport.is_closing() and time.monotonic() - t0 < NONREADER_S
    report.notes["non-readers cut"] += cut
    report.expect(cut, f"{what}: a peer that never reads was not cut after {sent} requests")


async def abuse_tcp(t: dict[str, Any], n: dict[str, int], report: Report) -> None:
    """Half-sent frames, idle connections, junk, a flood, peers that never read."""
    host, port, limit = t["host"], t["port"], t["limit"]
    stop = asyncio.Event()
    slow = [await _open(host, port, b'{"id":1,"src":"slow","method":"RPC.Pi') for _ in range(n["slow"])]
    trickle = asyncio.ensure_future(_trickle(slow, stop, b"n"))
    report.applied["half-sent frames"] += len(slow)
    idle = [await _open(host, port) for _ in range(n["idle"])]
    report.applied["idle connections"] += len(idle)
    try:
        for _ in range(n["junk"]):
            for name, data in JUNK:
                ping, fid = _check()
                r, w = await _open(host, port, data.replace(b"\n", b" ") + b"\n" + ping + b"\n")
                report.applied["junk inputs"] += 1
                try:
                    answered = False
                    while not answered:
                        got = await asyncio.wait_for(r.readline(), CALL_TIMEOUT_S)
                        if not got:
                            break
                        answered = b'"id":' + fid in got
                    report.expect(answered, f"tcp: no answer after junk ({name})")
                except TimeoutError:
                    report.expect(False, f"tcp: no answer after junk ({name})")
                finally:
                    w.close()
        r, w = await _open(host, port)
        report.applied["flood requests"] += n["flood"]
        await _stream_flood(r, w, n["flood"], report, "tcp flood")
        w.close()
        for _ in range(n["nonreader"]):
            _, w = await _open(host, port, rcvbuf=4096)
            await _never_read(w, _frame(9, "Config.Get") + b"\n", report, "tcp")
        stop.set()
        closed = await _count_closed(slow + idle, 0.5)
        report.notes["idle or half-sent closed by the device"] += closed
        kept = len(slow) + len(idle) - closed
        report.expect(kept <= limit, f"tcp: {kept} idle/half-sent connections kept (max_conns {limit})")
    finally:
        stop.set()
        trickle.cancel()
        _close_all(slow + idle)


# -- udp ---------------------------------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)


async def _udp(host: str, port: int) -> tuple[asyncio.DatagramTransport, _Datagrams]:
    loop = asyncio.get_running_loop()
    tr, proto = await loop.create_datagram_endpoint(_Datagrams, remote_addr=(host, port))
    return tr, proto


async def _until(pred: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def abuse_udp(t: dict[str, Any], n: dict[str, int], report: Report) -> None:
    """Peers beyond max_peers, junk datagrams, a flood."""
    host, port = t["host"], t["port"]
    peers = [await _udp(host, port) for _ in range(n["peers"])]
    try:
        for i, (tr, _) in enumerate(peers):
            tr.sendto(_frame(i + 1, src=f"peer{i}"))
        report.applied["peers"] += len(peers)
        ok = await _until(lambda: all(p.got for _, p in peers), CALL_TIMEOUT_S)
        report.expect(ok, f"udp: {sum(1 for _, p in peers if p.got)} of {len(peers)} peers answered")
    finally:
        for tr, _ in peers:
            tr.close()
    tr, proto = await _udp(host, port)
    try:
        for _ in range(n["junk"]):
            for _, data in JUNK:
                tr.sendto(data)
                report.applied["junk inputs"] += 1
            ping, fid = _check()
            tr.sendto(ping)
            ok = await _until(lambda fid=fid: any(b'"id":' + fid in d for d in proto.got), CALL_TIMEOUT_S)
            report.expect(ok, "udp: no answer after junk")
            proto.got.clear()
        done = 0
        while done < n["flood"]:  # 100 in flight at a time (4 x max_queue_length), all answered
            batch = min(100, n["flood"] - done)
            base = len(proto.got)
            for i in range(batch):
                tr.sendto(_frame(done + i + 1))
            ok = await _until(lambda b=base, k=batch: len(proto.got) >= b + k, CALL_TIMEOUT_S)
            done += batch
            if not ok:
                report.failures.append(f"udp flood: {len(proto.got) - base} of {batch} answered in a batch")
                break
        report.applied["flood requests"] += done
        report.notes["udp flood answered"] += len(proto.got)
    finally:
        tr.close()


# -- ws ----------------------------------------------------------------------------------------


def _ws_head(host: str, port: int) -> bytes:
    return (
        f"GET /rpc HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: clubby.cesanta.com\r\n\r\n"
    ).encode()


def ws_frame(data: bytes, opcode: int = 1) -> bytes:
    """One masked client frame."""
    mask = b"\x01\x02\x03\x04"
    n = len(data)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def ws_read(r: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame: ``(opcode, payload)``."""
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await r.readexactly(8), "big")
    return b0 & 0x0F, await r.readexactly(n)


async def _ws_open(host: str, port: int, *, rcvbuf: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await _open(host, port, _ws_head(host, port), rcvbuf=rcvbuf)
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), CALL_TIMEOUT_S)
    if b" 101 " not in head:
        raise ConnectionError(f"no upgrade: {head[:40]!r}")
    return r, w


async def _ws_answer(r: asyncio.StreamReader, fid: bytes) -> str:
    """'answered' when the reply to ``fid`` comes, 'closed' when the device closes instead."""
    try:
        while True:
            op, data = await asyncio.wait_for(ws_read(r), CALL_TIMEOUT_S)
            if op == 8:
                return "closed"
            if op in (1, 2) and b'"id":' + fid in data:
                return "answered"
    except TimeoutError:
        return "hung"
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return "closed"


async def abuse_ws(t: dict[str, Any], n: dict[str, int], report: Report) -> None:
    """Slowloris heads, idle connections, silent WebSockets, junk messages, a flood, non-readers."""
    host, port, limit = t["host"], t["port"], t["limit"]
    stop = asyncio.Event()
    slow = [await _open(host, port, b"GET /rpc HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(n["slow"])]
    trickle = asyncio.ensure_future(_trickle(slow, stop, b"a"))
    report.applied["slowloris heads"] += len(slow)
    idle = [await _open(host, port) for _ in range(n["idle"])]
    report.applied["idle connections"] += len(idle)
    silent = []
    for _ in range(n["silent"]):
        with contextlib.suppress(ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError):
            silent.append(await _ws_open(host, port))
        report.applied["silent websockets"] += 1
    try:
        for _ in range(n["junk"]):
            for name, data in JUNK:
                r, w = await _ws_open(host, port)
                ping, fid = _check()
                w.write(ws_frame(data) + ws_frame(ping))
                report.applied["junk inputs"] += 1
                outcome = await _ws_answer(r, fid)
                report.notes[f"junk: {outcome}"] += 1
                report.expect(outcome != "hung", f"ws: neither answer nor close after junk ({name})")
                w.close()
        r, w = await _ws_open(host, port)
        w.write(b"".join(ws_frame(_frame(i)) for i in range(1, n["flood"] + 1)))
        report.applied["flood requests"] += n["flood"]
        seen = 0
        try:
            while seen < n["flood"]:
                op, data = await asyncio.wait_for(ws_read(r), CALL_TIMEOUT_S)
                seen += op == 1 and b'"result"' in data
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        report.notes["ws flood answered"] += seen
        report.expect(seen == n["flood"], f"ws flood: {seen} of {n['flood']} answered")
        w.close()
        for _ in range(n["nonreader"]):
            _, w = await _ws_open(host, port, rcvbuf=4096)
            await _never_read(w, ws_frame(_frame(9, "Config.Get")), report, "ws")
        # every slowloris head is closed (header_timeout, or max_conns first); idle ones beyond the limit too
        stop.set()
        closed_slow = await _count_closed(slow, 2 * t["header_timeout"] + 2)
        report.notes["slowloris closed"] += closed_slow
        report.expect(closed_slow == len(slow), f"ws: {len(slow) - closed_slow} of {len(slow)} slowloris heads kept")
        closed = await _count_closed(idle + silent, 0.5)
        report.notes["idle or silent closed by the device"] += closed
        kept = len(idle) + len(silent) - closed
        report.expect(kept <= limit, f"ws: {kept} idle/silent connections kept (max_conns {limit})")
    finally:
        stop.set()
        trickle.cancel()
        _close_all(slow + idle + silent)


# -- http --------------------------------------------------------------------------------------


async def _post(host: str, port: int, path: str, body: bytes, *, chunked: bool = False) -> int:
    """One request on a new connection; the status (0 when the connection ended without one)."""
    r, w = await _open(host, port)
    try:
        if chunked:
            w.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            chunk = b"%x\r\n" % len(body) + body + b"\r\n"
            for _ in range(64):  # up to 64 x the body, never the last chunk: the answer must come first
                w.write(chunk)
                with contextlib.suppress(ConnectionError, OSError):
                    await w.drain()
                with contextlib.suppress(TimeoutError):
                    status = await asyncio.wait_for(r.readline(), 0.01)
                    return int(status.split()[1]) if status else 0
            return 0
        w.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body)
        status = await asyncio.wait_for(r.readline(), CALL_TIMEOUT_S)
        return int(status.split()[1]) if status.startswith(b"HTTP/") else 0
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return 0
    finally:
        w.close()


async def abuse_http(t: dict[str, Any], n: dict[str, int], report: Report) -> None:
    """Slowloris heads, idle connections, junk bodies (also chunked), a flood of concurrent requests."""
    host, port = t["host"], t["port"]
    stop = asyncio.Event()
    slow = [await _open(host, port, b"POST /rpc HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(n["slow"])]
    trickle = asyncio.ensure_future(_trickle(slow, stop, b"a"))
    report.applied["slowloris heads"] += len(slow)
    idle = [await _open(host, port) for _ in range(n["idle"])]
    report.applied["idle connections"] += len(idle)
    try:
        for _ in range(n["junk"]):
            for name, data in JUNK:
                for path in ("/rpc", "/rpc/RPC.Ping", "/jsonrpc"):
                    status = await _post(host, port, path, data)
                    report.applied["junk inputs"] += 1
                    report.notes[f"junk: HTTP {status}"] += 1
                    report.expect(status in (200, 204, 400, 413) or (status == 500 and "RPC.Ping" in path),
                                  f"http: {path} answered {status} to junk ({name})")  # fmt: skip
            status = await _post(host, port, "/rpc", b"A" * 65536, chunked=True)
            report.applied["junk inputs"] += 1
            report.expect(status == 400, f"http: a chunked 4 MiB body was answered {status}, not refused early")
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> int:
            async with sem:
                return await _post(host, port, "/rpc", _frame(i))

        statuses = await asyncio.gather(*(one(i) for i in range(1, n["flood"] + 1)))
        report.applied["flood requests"] += n["flood"]
        ok = sum(s == 200 for s in statuses)
        report.notes["http flood answered"] += ok
        report.expect(ok == n["flood"], f"http flood: {ok} of {n['flood']} answered 200")
        stop.set()
        closed = await _count_closed(slow, 2 * t["header_timeout"] + 2)
        report.notes["slowloris closed"] += closed
        report.expect(closed == len(slow), f"http: {len(slow) - closed} of {len(slow)} slowloris heads kept")
    finally:
        stop.set()
        trickle.cancel()
        _close_all(slow + idle)


# -- mqtt --------------------------------------------------------------------------------------


async def abuse_mqtt(t: dict[str, Any], n: dict[str, int], report: Report) -> None:
    """Junk payloads on the device's topics, a flood of requests."""
    import threading

    import paho.mqtt.client as mqtt

    replies: list[bytes] = []
    lock = threading.Lock()
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"abuser-{os.getpid()}")

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        with lock:
            replies.append(bytes(msg.payload))

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.max_queued_messages_set(0)
    client.connect(t["host"], t["port"])
    client.subscribe("abuser/rpc", qos=1)
    client.loop_start()
    dev = t["device"]
    try:
        if not subscribed.wait(CALL_TIMEOUT_S):
            report.failures.append("mqtt: the abuser got no SUBACK")
            return
        for _ in range(n["junk"]):
            for _, data in JUNK:
                for topic in (f"{dev}/rpc", f"{dev}/rpc/RPC.Ping"):
                    client.publish(topic, data, qos=1)
                    report.applied["junk inputs"] += 1
            ping, fid = _check()
            client.publish(f"{dev}/rpc", ping, qos=1)
            ok = await _until(lambda fid=fid: any(b'"id":' + fid in p for p in replies), CALL_TIMEOUT_S)
            report.expect(ok, "mqtt: no answer after junk")
            with lock:
                replies.clear()
        await asyncio.sleep(0.2)  # the last answers to junk come in before the flood is counted
        wanted: set[int] = set()

        def answered() -> int:
            with lock:
                return len(wanted & {int(m) for p in replies for m in re.findall(rb'"id":(\d+)', p)[:1]})

        done = 0
        while done < n["flood"]:  # 250 in flight at a time (10 x max_queue_length): all answered
            batch = min(250, n["flood"] - done)
            for _ in range(batch):
                ping, fid = _check()
                wanted.add(int(fid))
                client.publish(f"{dev}/rpc", ping, qos=1)
            done += batch
            ok = await _until(lambda d=done: answered() >= d, 30)
            if not ok:
                report.failures.append(f"mqtt flood: {answered()} of {done} answered")
                break
        report.applied["flood requests"] += done
        report.notes["mqtt flood answered"] += answered()
    finally:
        client.disconnect()
        client.loop_stop()


# -- ble ---------------------------------------------------------------------------------------


async def abuse_ble(t: dict[str, Any], n: dict[str, int], report: Report) -> None:
    """Idle connections, junk GATT writes, a client that never reads, through the HCI bridge."""
    from bleak import BleakClient
    from bleak.exc import BleakError

    from rpc.errors import MgrpcError
    from transports.ble import _hci_backends
    from transports.ble_proto import DATA_UUID, RX_CTL_UUID, TX_CTL_UUID

    backend, _ = _hci_backends(t["hci"])

    async def connect() -> BleakClient:
        c = BleakClient(t["address"], backend=backend, timeout=CALL_TIMEOUT_S)
        await c.connect()
        return c

    async def write_frame(c: BleakClient, frame: bytes) -> None:
        await c.write_gatt_char(TX_CTL_UUID, struct.pack(">I", len(frame)), response=True)
        step = c.mtu_size - 3
        for k in range(0, len(frame), step):
            await c.write_gatt_char(DATA_UUID, frame[k : k + step], response=True)

    async def read_frame(c: BleakClient) -> bytes:
        length = struct.unpack(">I", await c.read_gatt_char(RX_CTL_UUID))[0]
        buf = b""
        while len(buf) < length:
            buf += await c.read_gatt_char(DATA_UUID)
        return buf

    idle = []
    try:
        for _ in range(n["idle"]):
            idle.append(await connect())
            report.applied["idle connections"] += 1
        c = await connect()
        try:
            for _ in range(n["junk"]):
                for _, data in JUNK:
                    try:
                        await write_frame(c, data[:4196])
                        report.notes["junk: taken"] += 1
                    except (BleakError, MgrpcError):
                        report.notes["junk: refused"] += 1  # an ATT error: too long, past the announced length
                    report.applied["junk inputs"] += 1
            for value in (b"", b"\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff" + b"x" * 100):
                with contextlib.suppress(BleakError, MgrpcError):
                    await c.write_gatt_char(TX_CTL_UUID, value, response=True)
                report.applied["junk inputs"] += 1
            # what the junk got answered is read and dropped; then a good frame on the same connection
            while struct.unpack(">I", await c.read_gatt_char(RX_CTL_UUID))[0]:
                await read_frame(c)
            ping, fid = _check()
            await write_frame(c, ping)
            reply = b""
            for _ in range(100):
                if struct.unpack(">I", await c.read_gatt_char(RX_CTL_UUID))[0]:
                    reply = await read_frame(c)
                    break
                await asyncio.sleep(0.02)
            report.expect(b'"id":' + fid in reply, "ble: no answer after junk")
        finally:
            with contextlib.suppress(Exception):
                await c.disconnect()
        for _ in range(n["nonreader"]):
            c = await connect()
            sent = 0
            try:
                while sent < 2000:
                    await write_frame(c, _frame(9, "Config.Get"))
                    sent += 1
            except (BleakError, MgrpcError):
                pass
            report.applied["requests never read"] += sent
            cut = await _until(lambda c=c: not c.is_connected, CALL_TIMEOUT_S)
            report.notes["non-readers cut"] += cut
            report.expect(cut, f"ble: a client that never reads was not cut after {sent} requests")
            with contextlib.suppress(Exception):
                await c.disconnect()
    finally:
        for c in idle:
            with contextlib.suppress(Exception):
                await c.disconnect()


ABUSERS: dict[str, Callable[[dict[str, Any], dict[str, int], Report], Awaitable[None]]] = {
    "tcp": abuse_tcp,
    "udp": abuse_udp,
    "ws": abuse_ws,
    "http": abuse_http,
    "mqtt": abuse_mqtt,
    "ble": abuse_ble,
}


async def _serve_abuse() -> None:
    loop = asyncio.get_running_loop()
    while text := await loop.run_in_executor(None, sys.stdin.readline):
        spec = json.loads(text)
        listener = spec["listener"]
        report = Report()
        try:
            await ABUSERS[listener](spec["target"], spec["n"], report)
        except Exception as e:
            report.failures.append(f"{listener} abuser stopped: {type(e).__name__}: {e}"[:400])
        sys.stdout.write(report.json() + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """``abuser``: the abuser process (started by the section, fed on its stdin; not run by hand)."""
    import logging

    ap = argparse.ArgumentParser(description="the abuser process of the soak's listeners section")
    ap.add_argument("command", choices=["abuser"])
    ap.parse_args(argv)
    logging.disable(logging.CRITICAL)
    asyncio.run(_serve_abuse())
    return 0


if __name__ == "__main__":
    sys.exit(main())
