"""Client checks: run a host tool against a recording reference device and check what it sent.

``run_client("mgrpc --port {url} call RPC.List", schemes=["tcp", "ws"])`` starts, per transport, the
reference device (:mod:`conformance.refdevice`), substitutes ``{url}`` (and ``{bundle}``: a fw.zip
the reference device accepts) into the command, runs it, and checks the recorded traffic against
docs/protocol/frames.md §1.3 and §2 (member order, compact JSON, id range, src), transports.md (stream framing,
CRC and handshake on serial, MQTT topics, the BLE GATT length protocol) and, when the tool did an
update, ota.md §2 (OTA sequence and chunking). Serial uses a pty (POSIX); MQTT needs a ``mosquitto``
binary (started on 127.0.0.1).

BLE needs no radio: the reference device is a bumble GATT server on an in-process link
(:class:`transports.ble_testing.BumbleAir`), which is exposed as an HCI controller over TCP on
127.0.0.1. ``{url}`` is ``ble://esp32_C0FFEE?hci=tcp-client:127.0.0.1:PORT``, which a client running
bumble's host stack on that controller understands (mgrpc's ``ble://`` client does, see
:mod:`transports.ble_bumble`); ``{hci}`` alone is the controller's bumble transport spec
(``tcp-client:127.0.0.1:PORT``) for tools that take it separately.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.golden import MOS_MEMBER_ORDER
from conformance.model import CheckFailed, CheckResult, CheckSkipped, Outcome, expect
from conformance.probe import id_key
from conformance.rawjson import member_order, show
from conformance.refdevice import DEVICE_ID, Recorder, make_node
from conformance.runner import Report
from rpc.auth import Acl, AclEntry, Authenticator, Credentials
from rpc.frame import Frame
from rpc.framing import BadCrc, DeviceStreamDecoder, FrameBytes, Handshake
from rpc.node import Node

__all__ = ["CLIENT_CHECKS", "CLIENT_SCHEMES", "ClientRun", "record", "run_client"]

log = logging.getLogger("mgrpc.conformance.client")

GO_ORDER = MOS_MEMBER_ORDER
CLIENT_SCHEMES = ("tcp", "serial", "ws", "http", "mqtt", "ble")  # transports a reference device is served on
MOS_ID_MIN = 1 << 40
MOS_ID_MAX = (1 << 41) - 1


@dataclass
class ClientRun:
    """What one run of the client command did, as the reference device saw it."""

    scheme: str
    url: str
    command: str
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    frames: list[Frame] = field(default_factory=list)
    stream: bytes | None = None  # raw bytes received (serial, tcp)
    topics: list[tuple[str, bytes]] = field(default_factory=list)  # MQTT (topic, payload) seen on the broker
    auth: Credentials | None = None  # the device required digest auth with these credentials
    gatt: list[tuple[int, str, bytes]] = field(default_factory=list)  # BLE writes: (conn, "tx_ctl"|"data", value)
    hci: str = ""  # BLE: the bumble transport spec of the controller the client was given

    @property
    def requests(self) -> list[Frame]:
        """The requests the client sent, in arrival order."""
        return [f for f in self.frames if f.is_request]


# -- reference device per transport --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Broker:
    """A throw-away mosquitto on 127.0.0.1 for the MQTT client checks."""

    def __init__(self) -> None:
        exe = os.environ.get("MOSQUITTO") or shutil.which("mosquitto")
        for cand in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
            if exe is None and os.access(cand, os.X_OK):
                exe = cand
        if exe is None:
            raise CheckSkipped("MQTT client checks need the mosquitto broker")
        self.exe = exe
        self.port = _free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="mgrpc-conf-mqtt-")
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> _Broker:
        conf = Path(self.dir.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            await asyncio.sleep(0.05)
        await self.stop()
        raise CheckSkipped("mosquitto did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.dir.cleanup()


async def _serve_ble(node: Node, stack: AsyncExitStack, gatt: list[tuple[int, str, bytes]]) -> tuple[str, str]:
    """The reference device as a BLE peripheral on an in-process air, reachable as HCI over TCP."""
    try:
        from transports import ble
        from transports.ble_testing import BumbleAir
        from transports.registry import parse_url
    except ImportError:
        raise CheckSkipped("BLE client checks need bleak and bumble: pip install 'mgrpc[ble]'") from None
    air = BumbleAir()
    lst = await ble.listen(parse_url("ble://"), node, link=air.link, advertising_interval_ms=20)
    stack.push_async_callback(lst.close)
    lst.write_observer = lambda conn, char, value: gatt.append((conn, char, value))
    bridge = await air.hci_bridge()
    stack.push_async_callback(bridge.close)
    return f"ble://{node.id}?hci={bridge.spec}", bridge.spec


async def _serve(
    scheme: str, stack: AsyncExitStack, creds: Credentials | None = None
) -> tuple[str, Callable[[], ClientRun]]:
    """Start the recording reference device on ``scheme``; returns its URL and a snapshot function.

    With ``creds`` every method needs that user (digest auth, frames.md §6 / transports.md §3.3).
    """
    import transports

    node = make_node()
    if creds is not None:
        node.auth = Authenticator(users={creds.user: creds.password}, acl=Acl([AclEntry("*", f"+{creds.user}")]))
    rec = Recorder(node)
    stack.push_async_callback(node.close)
    topics: list[tuple[str, bytes]] = []
    gatt: list[tuple[int, str, bytes]] = []
    hci = ""
    stream: Callable[[], bytes | None] = lambda: None  # noqa: E731
    if scheme == "tcp":
        from conformance.serialdev import TcpStreamDevice

        tcp = await TcpStreamDevice(node).start()
        stack.push_async_callback(tcp.close)
        url = tcp.url
        stream = lambda: b"".join(bytes(d.rx) for d in tcp.devices)  # noqa: E731
    elif scheme == "serial":
        if not hasattr(os, "openpty"):
            raise CheckSkipped("serial client checks need ptys (POSIX)")
        from conformance.serialdev import PtySerialDevice

        pty = await PtySerialDevice(node).start()
        stack.push_async_callback(pty.close)
        url = f"serial://{pty.path}"
        stream = lambda: bytes(pty.rx)  # noqa: E731
    elif scheme in ("ws", "http"):
        url = f"{scheme}://127.0.0.1:{_free_port()}/rpc"
        lst = await transports.listen(url, node)
        stack.push_async_callback(lst.close)
    elif scheme == "mqtt":
        from transports.mqttconn import open_connection

        broker = await _Broker().start()
        stack.push_async_callback(broker.stop)
        url = f"mqtt://127.0.0.1:{broker.port}/{DEVICE_ID}"
        lst = await transports.listen(url, node)
        stack.push_async_callback(lst.close)
        spy = await open_connection(f"mqtt://127.0.0.1:{broker.port}/spy", client_id="conformance-spy")
        stack.push_async_callback(spy.close)
        await spy.subscribe("#", lambda m: topics.append((m.topic, bytes(m.payload))), qos=1)
    elif scheme == "ble":
        url, hci = await _serve_ble(node, stack, gatt)
    else:
        raise CheckSkipped(f"no client checks over {scheme}://")

    def snapshot() -> ClientRun:
        return ClientRun(
            scheme,
            url,
            "",
            frames=[f for _, f in rec.frames],
            stream=stream(),
            topics=list(topics),
            auth=creds,
            gatt=list(gatt),
            hci=hci,
        )

    return url, snapshot


async def _run_command(cmd: str, timeout_s: float) -> tuple[int | None, str, str]:
    proc = await asyncio.create_subprocess_shell(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace") + "\n(timed out)"
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# -- the checks ------------------------------------------------------------------------------------

ClientCheck = Callable[[ClientRun], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    section: str
    title: str
    func: ClientCheck
    only: tuple[str, ...] = ()


CLIENT_CHECKS: list[_Spec] = []


def _client_check(
    name: str, *, section: str, title: str, only: tuple[str, ...] = ()
) -> Callable[[ClientCheck], ClientCheck]:
    def deco(func: ClientCheck) -> ClientCheck:
        CLIENT_CHECKS.append(_Spec(name, section, title, func, only))
        return func

    return deco


def _raw(f: Frame) -> bytes:
    return (f.raw or f.encode("mos")).rstrip(b"\r\n")


@_client_check("exit_status", section="tool.md §1, §3", title="the command succeeds against a correct device")
async def _c_exit(run: ClientRun) -> str | None:
    expect(
        run.returncode == 0,
        "the client command failed",
        seen=f"exit {run.returncode}: {run.stderr.strip()[-300:]}",
        expected="exit 0",
    )
    return None


@_client_check("requests_seen", section="frames.md §1", title="the device received requests")
async def _c_seen(run: ClientRun) -> str | None:
    expect(bool(run.requests), "no request reached the device", seen="nothing", expected="at least one request")
    return f"{len(run.requests)} requests: {', '.join(dict.fromkeys(f.method for f in run.requests))}"


@_client_check("member_order", section="frames.md §1.3", title="members in mos's Go struct order")
async def _c_order(run: ClientRun) -> str | None:
    for f in run.requests:
        order = [m for m in member_order(_raw(f)) if m in GO_ORDER]
        want = sorted(order, key=GO_ORDER.index)
        expect(order == want, "request members out of mos order", seen=show(_raw(f)), expected=", ".join(want))
    return None


def _has_insignificant_ws(text: bytes) -> bool:
    in_str = esc = False
    for b in text:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in b" \t\r\n":
            return True
    return False


@_client_check("compact", section="frames.md §1.3", title="compact JSON (params compacted)")
async def _c_compact(run: ClientRun) -> str | None:
    for f in run.requests:
        expect(
            not _has_insignificant_ws(_raw(f)),
            "whitespace outside strings",
            seen=show(_raw(f)),
            expected="compact JSON",
        )
    return None


@_client_check("id_range", section="frames.md §2", title="ids are integers in [2^40, 2^41)")
async def _c_id_range(run: ClientRun) -> str | None:
    for f in run.requests:
        ok = isinstance(f.id, int) and MOS_ID_MIN <= f.id <= MOS_ID_MAX
        expect(
            ok, "request id outside mos's range", seen=show(f.id), expected=f"integer in [{MOS_ID_MIN}, {MOS_ID_MAX}]"
        )
    return None


@_client_check("unique_ids", section="frames.md §2", title="a new id per call (same id only for the 401 retry)")
async def _c_unique(run: ClientRun) -> str | None:
    seen: dict[Any, Frame] = {}
    for f in run.requests:
        key = id_key(f.id)
        prev = seen.get(key)
        if prev is not None and run.scheme in ("http", "https") and _raw(prev) == _raw(f):
            continue  # the HTTP codec re-POSTs the same frame with an Authorization header after a 401
        if prev is not None:
            expect(
                prev.auth is None and f.auth is not None and prev.method == f.method,
                "an id was reused (only the retry after a 401 may reuse it)",
                seen=show(_raw(f)),
                expected="a fresh id",
            )
        seen[key] = f
    return None


@_client_check("src", section="frames.md §1; transports.md §4", title='src is "mos" (MQTT: <dst>/rpc-resp/<client id>)')
async def _c_src(run: ClientRun) -> str | None:
    for f in run.requests:
        if run.scheme == "mqtt":
            dst = f.dst or DEVICE_ID
            expect(
                f.src.startswith(f"{dst}/rpc-resp/") and len(f.src) > len(dst) + 10,
                "MQTT requests must carry src <dst>/rpc-resp/<client id>",
                seen=f.src,
                expected=f"{dst}/rpc-resp/<client id>",
            )
        else:
            expect(f.src == "mos", 'requests must carry src "mos"', seen=f.src, expected="mos")
    return None


AUTH_ORDER = ("realm", "username", "nonce", "cnonce", "algorithm", "response", "opaque")


@_client_check(
    "auth_retry", section="frames.md §6", title="after a 401: same id re-sent once with a digest auth object"
)
async def _c_auth(run: ClientRun) -> str | None:
    if run.auth is None:
        raise CheckSkipped("the reference device did not require auth (--client-creds)")
    if run.scheme in ("http", "https"):
        raise CheckSkipped("HTTP authenticates with headers (transports.md §3.3)")
    with_auth = [f for f in run.requests if f.auth is not None]
    expect(
        bool(with_auth),
        "no request carried an auth object after the 401",
        seen="no auth",
        expected='"auth":{"realm":..,"username":..,"nonce":..,"cnonce":..,"algorithm":..,"response":..}',
    )
    plain = {id_key(f.id) for f in run.requests if f.auth is None}
    for f in with_auth:
        expect(
            id_key(f.id) in plain,
            "the authenticated retry must reuse the id of the refused request",
            seen=show(f.id),
            expected="the id of the request answered 401",
        )
        assert f.auth is not None
        keys = list(f.auth)
        required = {"realm", "username", "nonce", "cnonce", "response"}
        expect(
            keys == [k for k in AUTH_ORDER if k in keys] and required <= set(keys),
            "auth members (mos order: realm, username, nonce, cnonce, algorithm, response)",
            seen=show(keys),
            expected=", ".join(AUTH_ORDER[:6]),
        )
        ok = (
            f.auth.get("username") == run.auth.user
            and isinstance(f.auth.get("nonce"), int)
            and isinstance(f.auth.get("cnonce"), int)
        )
        expect(
            ok,
            "auth username and integer nonce/cnonce",
            seen=show(dict(f.auth)),
            expected=f'username "{run.auth.user}", integer nonce and cnonce',
        )
    return f"{len(with_auth)} authenticated retries"


@_client_check(
    "stream_framing",
    section="transports.md §1.1, §1.4, §7",
    title='\\n"""{json}[crc]"""\\n frames; serial: handshake and CRC',
    only=("serial", "tcp"),
)
async def _c_stream(run: ClientRun) -> str | None:
    data = run.stream or b""
    dec = DeviceStreamDecoder(max_frame_size=1 << 20)
    dec.feed(data)
    events = list(dec.events())
    frames = [e for e in events if isinstance(e, FrameBytes)]
    expect(bool(frames), "no frame found in the byte stream", seen=show(data[:200]), expected="framed requests")
    bad = [e for e in events if isinstance(e, BadCrc)]
    expect(not bad, "a frame with a bad CRC", seen=show(bad[0].data) if bad else "", expected="valid CRC-32")
    expect(
        b'"""' in data,
        'frames must be delimited with """ as mos does',
        seen=show(data[:200]),
        expected='\\n"""{json}..."""\\n',
    )
    if run.scheme == "serial":
        first = next(i for i, e in enumerate(events) if isinstance(e, FrameBytes))
        expect(
            any(isinstance(e, Handshake) for e in events[:first]),
            "no 0x04 handshake before the first frame",
            seen=show(data[:120]),
            expected='"""\\x04"""\\n\\n before frames',
        )
        no_crc = [e for e in frames if e.crc_ok is not True]
        expect(
            not no_crc,
            "serial frames must carry a CRC-32",
            seen=show(no_crc[0].data) if no_crc else "",
            expected="{json}<8 hex>",
        )
        return None
    return None


@_client_check("mqtt_topics", section="transports.md §4", title="requests published to <dst>/rpc", only=("mqtt",))
async def _c_mqtt(run: ClientRun) -> str | None:
    reqs = [(t, p) for t, p in run.topics if b'"method"' in p and "/rpc-resp/" not in t]
    expect(bool(reqs), "no request seen on the broker", seen="nothing", expected=f"{DEVICE_ID}/rpc")
    for topic, payload in reqs:
        expect(
            topic == f"{DEVICE_ID}/rpc",
            "requests must be published to <dst>/rpc",
            seen=topic,
            expected=f"{DEVICE_ID}/rpc",
        )
        expect(
            not payload.endswith(b"\n"),
            "MQTT payload is the JSON without newline",
            seen=show(payload[-20:]),
            expected="...}",
        )
    return None


@_client_check(
    "ble_framing",
    section="transports.md §5",
    title="tx_ctl gets the 4-byte big-endian length, then data gets exactly that many bytes",
    only=("ble",),
)
async def _c_ble(run: ClientRun) -> str | None:
    writes = run.gatt
    expect(bool(writes), "no GATT write reached the device", seen="nothing", expected="tx_ctl, then data writes")
    pending: dict[int, tuple[int, bytearray]] = {}  # connection -> (announced length, data so far)
    frames: list[bytes] = []
    for conn, char, value in writes:
        if char == "tx_ctl":
            expect(
                len(value) == 4,
                "tx_ctl takes the frame length as exactly 4 bytes",
                seen=show(value),
                expected="4 bytes, big-endian uint32",
            )
            if conn in pending:
                length, got = pending[conn]
                raise CheckFailed(
                    "a new length was written before the previous frame was complete (the device drops it)",
                    seen=f"{len(got)} of {length} bytes, then tx_ctl {value.hex()}",
                    expected=f"{length - len(got)} more data bytes first",
                )
            pending[conn] = (int.from_bytes(value, "big"), bytearray())
            continue
        expect(
            conn in pending,
            "data written without a length on tx_ctl first",
            seen=show(value[:60]),
            expected="tx_ctl first",
        )
        length, got = pending[conn]
        got += value
        expect(
            len(got) <= length,
            "more data written than announced on tx_ctl (a little-endian length?)",
            seen=f"{len(got)} bytes after announcing {length} ({length.to_bytes(4, 'big').hex()})",
            expected=f"{length} bytes",
        )
        if len(got) == length:
            frames.append(bytes(got))
            del pending[conn]
    for length, got in pending.values():
        little = int.from_bytes(length.to_bytes(4, "big"), "little") == len(got)
        raise CheckFailed(
            "a frame was left incomplete" + (" (the length was written little-endian)" if little else ""),
            seen=f"{len(got)} bytes after tx_ctl {length.to_bytes(4, 'big').hex()}",
            expected=f"tx_ctl {len(got).to_bytes(4, 'big').hex()} for {len(got)} bytes"
            if little
            else f"{length} bytes",
        )
    expect(
        len(frames) == len(run.frames),
        "every complete transfer must be one frame the device accepted",
        seen=f"{len(frames)} transfers, {len(run.frames)} frames",
        expected="one frame per transfer",
    )
    return f"{len(frames)} frames, {len(writes) - len(frames)} data writes"


@_client_check(
    "ota_sequence",
    section="ota.md §1.2-§1.4, §2; tool.md §4",
    title="Status, Begin{timeout,commit_timeout,size}, contiguous Writes, End",
)
async def _c_ota(run: ClientRun) -> str | None:
    ota = [f for f in run.requests if f.method.startswith("OTA.")]
    if not any(f.method == "OTA.Write" for f in ota):
        raise CheckSkipped("the command did no OTA update")
    methods = [f.method for f in ota]
    expect(methods[0] == "OTA.Status", "mos ota starts with OTA.Status", seen=methods[:3], expected="OTA.Status first")
    begin = next((f for f in ota if f.method == "OTA.Begin"), None)
    expect(begin is not None, "no OTA.Begin", seen=methods[:5], expected="OTA.Begin before the writes")
    assert begin is not None
    args = begin.arguments
    expect(
        isinstance(args, dict) and all(isinstance(args.get(k), int) for k in ("timeout", "commit_timeout", "size")),
        "OTA.Begin args must be {timeout, commit_timeout, size} integers",
        seen=show(args),
        expected='{"timeout":600,"commit_timeout":300,"size":N}',
    )
    size = args["size"]
    writes = [f for f in ota if f.method == "OTA.Write"]
    expect(
        ota.index(begin) < ota.index(writes[0]),
        "OTA.Begin must come before the writes",
        seen=methods[:5],
        expected="Begin, Write...",
    )
    chunks: dict[int, int] = {}
    for f in writes:
        a = f.arguments
        expect(
            isinstance(a, dict) and isinstance(a.get("offset"), int) and isinstance(a.get("data"), str),
            "OTA.Write args must be {offset:int, data:base64}",
            seen=show(_raw(f))[:200],
            expected='{"offset":N,"data":"..."}',
        )
        try:
            n = len(base64.b64decode(a["data"], validate=True))
        except (binascii.Error, ValueError):
            raise CheckFailed(
                "OTA.Write data is not standard padded base64", seen=a["data"][:60], expected="base64"
            ) from None
        chunks.setdefault(a["offset"], n)
    pos = 0
    sizes = []
    for off in sorted(chunks):
        expect(
            off == pos, "OTA.Write offsets must be contiguous from 0", seen=f"offset {off}", expected=f"offset {pos}"
        )
        pos += chunks[off]
        sizes.append(chunks[off])
    expect(pos == size, "the writes must cover exactly the announced size", seen=pos, expected=size)
    expect(
        len(set(sizes[:-1])) <= 1 and (not sizes[:-1] or sizes[-1] <= sizes[0]),
        "every chunk but the last has the same size",
        seen=show(sorted(set(sizes))),
        expected="fixed chunk size",
    )
    last_write = max(i for i, f in enumerate(ota) if f.method == "OTA.Write")
    expect(
        "OTA.End" in methods[last_write:],
        "OTA.End must follow the last write",
        seen=methods[-3:],
        expected="..., OTA.Write, OTA.End",
    )
    return f"{len(writes)} writes of {sizes[0] if sizes else 0} bytes, size {size}"


# -- running ---------------------------------------------------------------------------------------


async def record(
    cmd: str, scheme: str, *, timeout_s: float = 60.0, bundle_path: str = "", creds: Credentials | None = None
) -> ClientRun:
    """Serve the reference device on ``scheme``, run ``cmd`` against it, return what it recorded."""
    async with AsyncExitStack() as stack:
        url, snapshot = await _serve(scheme, stack, creds)
        command = cmd.replace("{url}", shlex.quote(url)).replace("{bundle}", shlex.quote(bundle_path))
        command = command.replace("{hci}", shlex.quote(snapshot().hci))
        rc, out, err = await _run_command(command, timeout_s)
        await asyncio.sleep(0.2)  # let the last frames arrive
        run = snapshot()
    run.command, run.returncode, run.stdout, run.stderr = command, rc, out, err
    return run


async def run_client(
    cmd: str, *, schemes: list[str], timeout_s: float = 60.0, creds: Credentials | None = None
) -> Report:
    """Run the client checks for ``cmd`` over each of ``schemes``; returns a :class:`Report` (kind client).

    With ``creds`` the reference device demands digest auth for every method (give the tool the same
    credentials, e.g. ``--rpc-creds``; ``{creds}`` in ``cmd`` is replaced by ``user:pass``).
    """
    from conformance.checks.ota import generate_bundle
    from conformance.refdevice import ARCH

    t0 = time.monotonic()
    results: list[CheckResult] = []
    with tempfile.TemporaryDirectory(prefix="mgrpc-conf-") as tmp:
        bundle_path = ""
        if "{bundle}" in cmd:
            bundle_path = str(Path(tmp) / "fw.zip")
            Path(bundle_path).write_bytes(generate_bundle(ARCH, "2.0-conformance"))
        for scheme in schemes:
            try:
                command = cmd.replace("{creds}", shlex.quote(f"{creds.user}:{creds.password}")) if creds else cmd
                run: ClientRun | None = await record(
                    command, scheme, timeout_s=timeout_s, bundle_path=bundle_path, creds=creds
                )
                skip_reason = ""
            except CheckSkipped as e:
                run, skip_reason = None, str(e)
            for spec in CLIENT_CHECKS:
                name = f"client.{spec.name}[{scheme}]"
                t1 = time.monotonic()
                if run is None or (spec.only and scheme not in spec.only):
                    msg = skip_reason or f"not applicable over {scheme}://"
                    results.append(CheckResult(name, "client", spec.section, spec.title, Outcome.SKIP, msg))
                    continue
                try:
                    note = await spec.func(run)
                    outcome, msg, seen, expected = Outcome.PASS, note or "", "", ""
                except CheckFailed as e:
                    outcome, msg, seen, expected = Outcome.FAIL, e.message, e.seen, e.expected
                except CheckSkipped as e:
                    outcome, msg, seen, expected = Outcome.SKIP, str(e), "", ""
                except Exception as e:
                    outcome, msg, seen, expected = Outcome.ERROR, f"{type(e).__name__}: {e}", "", ""
                results.append(
                    CheckResult(
                        name, "client", spec.section, spec.title, outcome, msg, seen, expected, time.monotonic() - t1
                    )
                )
    return Report(cmd, tuple(results), time.monotonic() - t0, kind="client")
