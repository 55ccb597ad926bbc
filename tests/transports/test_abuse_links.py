"""Listeners under abuse (issue #14 §4), the device listeners other than tcp/ws/http: udp, serial (a
pty), mqtt (a mosquitto on 127.0.0.1) and ble (bumble's in-process link). Oversized frames, invalid
UTF-8, garbage, floods far beyond ``max_queue_length`` and a peer that never reads: the device drops
what is bad, answers what is good, keeps what it holds bounded, and a well-behaved client is served
throughout. Bounded loops and waits only; nothing here depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import transports
from rpc.errors import UsageError
from rpc.framing import crc32_hex
from rpc.node import Node
from tests.mosquitto import mosquitto_broker  # noqa: F401 - a pytest fixture
from tests.transports.test_serial import Pty

pytestmark = pytest.mark.timeout(120)

T = 10.0
MAX_FRAME = 4096

# What every abuser sends, one message each (a datagram, a line, an MQTT payload, a GATT frame).
JUNK = [
    b'{"id":1,"src":"x","method":"RPC.Ping","params":"' + b"A" * 60_000 + b'"}',  # far over max_frame_size
    b'{"id":2,"src":"x","method":"RPC.Ping","params":"\xff\xfe\xc3\x28"}',  # invalid UTF-8
    b'{"id":3,"src":"x","method":"RPC.Ping","params":"\\ud800"}',  # a lone surrogate escape
    b"\xff" * 3000,
    b'"""' * 300 + b"\x04" * 50,
    b"[" * 5000,  # deep nesting
    b'{"id":4,"src":"x","method":"RPC.Ping","params":' + b"1" * 400 + b"}",  # a huge integer: valid JSON
    b"null",
    b"",
]
JUNK_ANSWERED = {4}  # the one hostile but valid frame among them: it gets its answer


def _node() -> Node:
    node = Node(id="esp32_ABUSE", max_frame_size=MAX_FRAME)
    node.add_handler("Test.Big", lambda ctx, p: "x" * 3000)
    return node


async def _eventually(predicate: Callable[[], bool], within_s: float = T) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _ping(url: str, **opts: Any) -> None:
    async with await transports.connect(url, timeout_s=T, **opts) as c:
        assert await asyncio.wait_for(c.call("RPC.Ping"), T)


# -- udp ------------------------------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.event = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)
        self.event.set()


async def _udp_socket(target: tuple[str, int]) -> tuple[asyncio.DatagramTransport, _Udp]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Udp, remote_addr=target)
    return transport, proto


def _udp_target(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("udp://").split("?")[0].rsplit(":", 1)
    return host, int(port)


@pytest.fixture
async def udp() -> AsyncIterator[Any]:
    node = _node()
    lst = await transports.listen("udp://127.0.0.1:0?max_peers=8", node)
    yield lst
    await lst.close()
    await node.close()


async def test_udp_junk_is_dropped_and_the_peer_still_answered(udp: Any) -> None:
    target = _udp_target(udp.url)
    tr, proto = await _udp_socket(target)
    try:
        for junk in JUNK:
            tr.sendto(junk)
        tr.sendto(b'{"id":77,"src":"x","method":"RPC.Ping"}')
        assert await _eventually(lambda: any(b'"id":77' in d for d in proto.got))
        replied = [json.loads(d) for d in proto.got]
        assert {r["id"] for r in replied if "result" in r} == JUNK_ANSWERED | {77}, replied
        await _ping(udp.url)
    finally:
        tr.close()


async def test_udp_floods_are_answered_in_full(udp: Any) -> None:
    target = _udp_target(udp.url)
    tr, proto = await _udp_socket(target)
    try:
        for batch in range(10):  # 100 in flight at a time, 4 x max_queue_length; 1000 in all
            for i in range(100):
                tr.sendto(b'{"id":%d,"src":"x","method":"RPC.Ping"}' % (batch * 100 + i + 1))
            assert await _eventually(lambda b=batch: len(proto.got) >= (b + 1) * 100), len(proto.got)
        ids = {json.loads(d)["id"] for d in proto.got}
        assert ids == set(range(1, 1001))
        await _ping(udp.url)
    finally:
        tr.close()


async def test_udp_peers_beyond_max_peers_are_forgotten_and_still_answered(udp: Any) -> None:
    target = _udp_target(udp.url)
    socks = [await _udp_socket(target) for _ in range(30)]  # 30 peers, max_peers 8
    try:
        for i, (tr, _) in enumerate(socks):
            tr.sendto(b'{"id":%d,"src":"p%d","method":"RPC.Ping"}' % (i + 1, i))
        assert await _eventually(lambda: all(p.got for _, p in socks))
        assert len(udp.peers) <= 8
        assert len([c for c in udp.node.channels if c.type == "UDP"]) <= 8
        tr, proto = socks[0]  # the first peer was forgotten long ago: it gets a new channel
        tr.sendto(b'{"id":99,"src":"p0","method":"RPC.Ping"}')
        assert await _eventually(lambda: any(b'"id":99' in d for d in proto.got))
        assert len(udp.peers) <= 8
    finally:
        for tr, _ in socks:
            tr.close()


@pytest.mark.parametrize("value", ["0", "-1", "x"])
async def test_udp_bad_max_peers_is_a_usage_error(value: str) -> None:
    # max_peers=0 answered nobody, and -1 raised KeyError out of every datagram_received.
    node = _node()
    with pytest.raises(UsageError, match="max_peers"):
        await transports.listen(f"udp://127.0.0.1:0?max_peers={value}", node)
    await node.close()


# -- serial (a pty: the test holds the host end) ---------------------------------------------------


def _line(frame: bytes) -> bytes:
    """A frame as mgrpc_uart.py writes it: JSON, its CRC, newline."""
    return frame + crc32_hex(frame).encode() + b"\n"


@pytest.fixture
async def pty() -> AsyncIterator[Pty]:
    if sys.platform == "win32":
        pytest.skip("ptys are POSIX only")
    p = Pty()
    yield p
    p.close()


async def test_serial_junk_is_dropped_and_the_link_lives(pty: Pty) -> None:
    node = _node()
    lst = await transports.listen(pty.path, node)
    pty.start_reading()
    try:
        for junk in JUNK:
            await pty.write_all(junk + b"\n")
        await pty.write_all(_line(b'{"id":77,"src":"x","method":"RPC.Ping"}'))
        assert await _eventually(lambda: b'"id":77' in pty.rx)
        answered = {int(m) for m in re.findall(rb'"id":(\d+)[^\n]*"result"', bytes(pty.rx))}
        assert answered == JUNK_ANSWERED | {77}, pty.rx[-500:]
    finally:
        await lst.close()
        await node.close()


async def test_serial_flood_is_answered_in_full(pty: Pty) -> None:
    node = _node()
    lst = await transports.listen(pty.path, node)
    pty.start_reading()
    n = 3000  # far beyond max_queue_length (25): nothing is lost on a link that is read
    try:
        await pty.write_all(b"".join(_line(b'{"id":%d,"src":"x","method":"RPC.Ping"}' % i) for i in range(1, n + 1)))
        assert await _eventually(lambda: pty.rx.count(b'"result"') >= n, 30), pty.rx.count(b'"result"')
    finally:
        await lst.close()
        await node.close()


async def test_serial_host_that_never_reads_costs_at_most_max_out_buffer(pty: Pty) -> None:
    # Before max_out_buffer, the device queued every reply for a host that reads nothing: 9 MB for
    # 3000 requests of 3 KB replies, without bound.
    node = _node()
    lst = await transports.listen(f"serial://{pty.path}?max_out_buffer=65536", node)
    ch = lst.channel
    try:
        req = _line(b'{"id":1,"src":"x","method":"Test.Big"}')
        for i in range(600):  # ~1.8 MB of replies asked for, none read
            await pty.write_all(req)
            if i % 20 == 0:
                await asyncio.sleep(0.005)
                assert ch._io.unsent <= 65536 + 4096  # the limit plus one reply
        assert await _eventually(lambda: ch.dropped_bytes > 0)
        assert ch._io.unsent <= 65536 + 4096
        pty.start_reading()  # the host comes back: the queue drains and the device answers again
        assert await _eventually(lambda: ch._io.unsent == 0)
        await pty.write_all(_line(b'{"id":77,"src":"x","method":"RPC.Ping"}'))
        assert await _eventually(lambda: b'"id":77' in pty.rx)
        assert not ch.closed
    finally:
        await lst.close()
        await node.close()


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
async def test_serial_bad_max_out_buffer_is_a_usage_error(pty: Pty, value: str) -> None:
    node = _node()
    with pytest.raises(UsageError, match="max_out_buffer"):
        await transports.listen(f"serial://{pty.path}?max_out_buffer={value}", node)
    await node.close()


# -- mqtt (a mosquitto on 127.0.0.1) ---------------------------------------------------------------


@pytest.fixture
async def mqtt_device(mosquitto_broker: Callable[..., Any]) -> AsyncIterator[tuple[Any, Any]]:  # noqa: F811
    from tests.transports.test_mqtt import Sniffer

    broker = mosquitto_broker()
    node = _node()
    lst = await transports.listen(f"mqtt://127.0.0.1:{broker.port}/{node.id}", node)
    sniffer = Sniffer(broker, "flood/#")
    yield broker, sniffer
    sniffer.close()
    await lst.close()
    await node.close()


async def test_mqtt_junk_is_dropped_and_the_device_still_answers(mqtt_device: tuple[Any, Any]) -> None:
    broker, sniffer = mqtt_device
    async with await transports.connect(broker.url("esp32_ABUSE"), timeout_s=T) as good:
        assert await good.call("RPC.Ping")
        for junk in JUNK:
            for topic in ("esp32_ABUSE/rpc", "esp32_ABUSE/rpc/RPC.Ping", "esp32_ABUSE/rpc/\xff"):
                sniffer.publish(topic, junk.replace(b'"src":"x"', b'"src":"flood"'), qos=1)
        sniffer.publish("esp32_ABUSE/rpc", b'{"id":77,"src":"flood","method":"RPC.Ping"}')
        await sniffer.wait_topic("flood/rpc")
        replies = [json.loads(p) for p in sniffer.on("flood/rpc")]
        assert {r["id"] for r in replies if "result" in r} <= JUNK_ANSWERED | {77}, replies
        assert 77 in {r["id"] for r in replies}
        assert await asyncio.wait_for(good.call("RPC.Ping"), T)


async def test_mqtt_flood_is_answered_in_full(mqtt_device: tuple[Any, Any]) -> None:
    broker, sniffer = mqtt_device
    n = 500  # 20 x max_queue_length, within mosquitto's per-client queue (1000)
    async with await transports.connect(broker.url("esp32_ABUSE"), timeout_s=T) as good:
        for i in range(1, n + 1):
            sniffer.client.publish("esp32_ABUSE/rpc", b'{"id":%d,"src":"flood","method":"RPC.Ping"}' % i, qos=1)
        assert await asyncio.wait_for(good.call("RPC.Ping"), T)  # served while the flood is handled
        await sniffer.wait_for(lambda msgs: len(msgs) >= n)
        assert {json.loads(p)["id"] for p in sniffer.on("flood/rpc")} == set(range(1, n + 1))
        assert await asyncio.wait_for(good.call("RPC.Ping"), T)


# -- ble (bumble's in-process link) ---------------------------------------------------------------

DEV_ADDR = "C0:11:22:33:44:55"


@pytest.fixture
async def ble_device() -> AsyncIterator[tuple[Any, Any]]:
    pytest.importorskip("bumble")
    from transports import ble
    from transports.ble_testing import BumbleAir
    from transports.registry import parse_url

    air = BumbleAir()
    node = _node()
    lst = await ble.listen(parse_url("ble://"), node, link=air.link, address=DEV_ADDR, advertising_interval_ms=20)
    yield air, lst
    await lst.close()
    await node.close()


async def _ble_raw(air: Any) -> Any:
    from bleak import BleakClient

    client = BleakClient(DEV_ADDR, backend=air.client_backend, timeout=5.0)
    await client.connect()
    return client


async def _ble_write_frame(client: Any, frame: bytes) -> None:
    from transports.ble_proto import DATA_UUID, TX_CTL_UUID

    await client.write_gatt_char(TX_CTL_UUID, struct.pack(">I", len(frame)), response=True)
    step = client.mtu_size - 3
    for k in range(0, len(frame), step):
        await client.write_gatt_char(DATA_UUID, frame[k : k + step], response=True)


async def _ble_good(air: Any) -> Any:
    from transports import ble
    from transports.registry import parse_url

    channel = await ble.open_client(
        parse_url(f"ble://{DEV_ADDR}"), bleak_backend=air.client_backend,
        bleak_scanner_backend=air.scanner_backend, timeout_s=5.0,
    )  # fmt: skip
    from rpc.client import AsyncClient

    client = AsyncClient(channel, timeout_s=T)
    await client.start()
    return client


async def test_ble_junk_is_refused_and_another_client_still_served(ble_device: tuple[Any, Any]) -> None:
    from bleak.exc import BleakError

    from transports.ble_proto import DATA_UUID, TX_CTL_UUID

    air, lst = ble_device
    good = await _ble_good(air)
    abuser = await _ble_raw(air)
    try:
        assert await good.call("RPC.Ping")
        refused = 0
        for junk in JUNK:
            try:
                await _ble_write_frame(abuser, junk[: MAX_FRAME + 100])
            except BleakError:
                refused += 1  # an ATT error (too long, or data past the announced length)
            assert await asyncio.wait_for(good.call("RPC.Ping"), T)
        for value in (b"", b"\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff" + b"x" * 100):
            with pytest.raises(BleakError):
                await abuser.write_gatt_char(TX_CTL_UUID, value, response=True)
        with pytest.raises(BleakError):
            await abuser.write_gatt_char(DATA_UUID, b"{" * 200, response=True)  # nothing announced
        assert refused >= 1
        assert await asyncio.wait_for(good.call("RPC.Ping"), T)
        # the abuser's own connection is still usable for a good frame
        await _ble_write_frame(abuser, b'{"id":7,"src":"raw","method":"RPC.Ping"}')
        assert await _eventually(lambda: any(b'"id":7,' in f for c in lst.channels.values() for f in c.sender._queue))
    finally:
        await abuser.disconnect()
        await good.close()


async def test_ble_client_that_never_reads_is_disconnected(ble_device: tuple[Any, Any]) -> None:
    from bleak.exc import BleakError

    from transports import ble

    air, lst = ble_device
    good = await _ble_good(air)
    abuser = await _ble_raw(air)
    try:
        assert await good.call("RPC.Ping")
        frame = b'{"id":1,"src":"raw","method":"Test.Big"}'  # 3 KB replies, never read
        sent = 0
        for _ in range(ble.MAX_QUEUED_FRAMES + 50):
            try:
                await _ble_write_frame(abuser, frame)
            except BleakError:
                break  # disconnected
            sent += 1
            for ch in lst.channels.values():
                assert len(ch.sender) <= ble.MAX_QUEUED_FRAMES
                assert ch.sender.queued_bytes <= ble.MAX_OUT_BUFFER + 4096
        assert sent <= ble.MAX_QUEUED_FRAMES + 1
        assert await _eventually(lambda: len(lst.channels) == 1), "only the good client's connection is left"
        assert await asyncio.wait_for(good.call("RPC.Ping"), T)
    finally:
        if abuser.is_connected:
            await abuser.disconnect()
        await good.close()


async def test_ble_flood_is_answered_in_full(ble_device: tuple[Any, Any]) -> None:
    air, _ = ble_device
    good = await _ble_good(air)
    try:
        n = 200  # 8 x max_queue_length: the client queues what it cannot send yet, the device answers all
        good.node.max_queue_length = n
        results = await asyncio.wait_for(asyncio.gather(*(good.call("RPC.Ping") for _ in range(n))), 60)
        assert len(results) == n and all(results)
    finally:
        await good.close()


async def test_ble_idle_connections_do_not_lock_a_client_out(ble_device: tuple[Any, Any]) -> None:
    # BLE connections are bounded by the controller (a few on real ones); idle ones cost a channel each
    # and never stop the device from advertising and serving one more client.
    air, lst = ble_device
    idle = [await _ble_raw(air) for _ in range(8)]
    try:
        good = await _ble_good(air)
        try:
            assert await asyncio.wait_for(good.call("RPC.Ping"), T)
            assert len(lst.channels) == 9
        finally:
            await good.close()
    finally:
        for c in idle:
            await c.disconnect()
    assert await _eventually(lambda: not lst.channels)


async def test_a_gatt_request_cut_by_a_disconnection_is_an_error_not_a_cancellation() -> None:
    # Found by the soak: when the device drops a client (e.g. one that never reads) while a write is
    # pending, bumble cancels the pending ATT request; that came out of write_gatt_char as a
    # CancelledError, which passes for a cancellation of the caller's task.
    pytest.importorskip("bumble")
    from types import SimpleNamespace

    from bleak.exc import BleakError

    from transports.ble_bumble import BumbleBleakClient

    class Peer:
        async def write_value(self, handle: int, data: bytes, with_response: bool = False) -> None:
            pending = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(pending.cancel)  # what bumble does on a disconnection
            await pending

        async def read_value(self, handle: int) -> bytes:
            await self.write_value(handle, b"")
            return b""

        async def hang(self, handle: int, data: bytes, with_response: bool = False) -> None:
            await asyncio.Event().wait()

    peer = Peer()
    client = object.__new__(BumbleBleakClient)
    client._peer = peer  # type: ignore[assignment]
    char: Any = SimpleNamespace(handle=3)
    with pytest.raises(BleakError, match="went away"):
        await client.write_gatt_char(char, b"x", True)
    with pytest.raises(BleakError, match="went away"):
        await client.read_gatt_char(char)
    peer.write_value = peer.hang  # type: ignore[method-assign]
    task = asyncio.ensure_future(client.write_gatt_char(char, b"x", True))
    await asyncio.sleep(0.01)
    task.cancel()  # a real cancellation of the caller stays one
    with pytest.raises(asyncio.CancelledError):
        await task
