"""ble:// end to end: a bumble GATT server (device) and our bleak client, over bumble's in-process link.

The client side runs bleak's real ``BleakClient`` with the bumble backend of
:mod:`transports.ble_testing`, so every GATT operation crosses bumble's ATT/L2CAP/HCI stack.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from bleak import BleakClient
from bleak.exc import BleakError, BleakGATTProtocolError
from bumble.device import Peer
from bumble.gatt import ClientCharacteristicConfigurationBits
from bumble.hci import Address

from rpc.client import AsyncClient
from rpc.errors import ChannelClosed, HandlerError, RemoteError, TransportError, UsageError
from rpc.frame import Frame
from rpc.node import Context, Node
from transports import ble
from transports.ble_proto import DATA_UUID, RX_CTL_UUID, SERVICE_UUID, TX_CTL_UUID, AttError
from transports.ble_testing import BumbleAir
from transports.registry import open_client as registry_open_client
from transports.registry import parse_url

pytestmark = pytest.mark.timeout(60)

DEV_ADDR = "C0:11:22:33:44:55"


class Device:
    """The device under test: Node("dev1") served over BLE, with a few handlers."""

    def __init__(self, air: BumbleAir) -> None:
        self.air = air
        self.node = Node(id="dev1")
        self.notes: list[Any] = []
        self.noted = asyncio.Event()
        self.release = asyncio.Event()
        self.node.add_handler("Test.Echo", self.echo)
        self.node.add_handler("Test.Fail", self.fail)
        self.node.add_handler("Test.Note", self.note)
        self.node.add_handler("Test.Slow", self.slow)
        self.node.add_handler("Test.Hang", self.hang)
        self.listener: ble.BleListener | None = None

    @staticmethod
    def echo(ctx: Context, params: Any) -> Any:
        return {"params": params, "type": ctx.channel.type, "info": ctx.channel.info()}

    @staticmethod
    def fail(ctx: Context, params: Any) -> Any:
        raise HandlerError(418, "teapot")

    def note(self, ctx: Context, params: Any) -> Any:
        self.notes.append(params)
        self.noted.set()
        return {"should": "not be sent"}

    @staticmethod
    async def slow(ctx: Context, params: Any) -> Any:
        # finish in reverse order of arrival, so replies cross requests on the link
        await asyncio.sleep(0.001 * (20 - params["i"]))
        return params["i"] * 2

    async def hang(self, ctx: Context, params: Any) -> Any:
        await self.release.wait()
        return True

    async def start(self, **opts: Any) -> ble.BleListener:
        self.listener = await ble.listen(
            parse_url("ble://"), self.node, link=self.air.link, address=DEV_ADDR, advertising_interval_ms=20, **opts
        )
        return self.listener

    def channel(self) -> ble.GattsChannel:
        assert self.listener is not None
        (ch,) = self.listener.channels.values()
        return ch


@pytest.fixture
def air() -> BumbleAir:
    return BumbleAir()


@pytest.fixture
async def device(air: BumbleAir) -> AsyncIterator[Device]:
    dev = Device(air)
    await dev.start()
    yield dev
    dev.release.set()
    assert dev.listener is not None
    await dev.listener.close()
    await dev.node.close()


Connect = Callable[..., Awaitable[AsyncClient]]


@pytest.fixture
async def connect(air: BumbleAir) -> AsyncIterator[Connect]:
    clients: list[AsyncClient] = []

    async def _connect(target: str = "dev1", **opts: Any) -> AsyncClient:
        opts.setdefault("bleak_backend", air.client_backend)
        opts.setdefault("bleak_scanner_backend", air.scanner_backend)
        opts.setdefault("timeout_s", 5.0)
        channel = await ble.open_client(parse_url(f"ble://{target}"), **opts)
        client = AsyncClient(channel, timeout_s=10.0)
        await client.start()
        clients.append(client)
        return client

    yield _connect
    for c in clients:
        await c.close()


def count_deliveries(client: AsyncClient) -> list[Frame]:
    """Record every frame the client channel receives."""
    got: list[Frame] = []
    ch = client.channel
    original = ch.deliver

    def deliver(frame: Frame) -> None:
        got.append(frame)
        original(frame)

    ch.deliver = deliver  # type: ignore[method-assign]
    return got


# -- calls ---------------------------------------------------------------------------------------------


async def test_call_by_name(device: Device, connect: Connect) -> None:
    client = await connect("dev1")
    assert client.channel.type == "GATT"
    assert isinstance(client.channel, ble.GattChannel) and client.channel.notifying
    result = await client.call("Test.Echo", {"a": 1})
    assert result["params"] == {"a": 1}
    assert result["type"] == "GATTS"
    gatts = device.channel()
    assert result["info"] == f"conn {gatts.connection.handle} peer {gatts.connection.peer_address.to_string(False)}"
    assert gatts.persistent is False and gatts.broadcast is True


async def test_call_by_address_through_registry(device: Device, air: BumbleAir) -> None:
    # "ble:///ADDR": the registry's URL parser reads "host:port" from an authority, so a MAC goes in the path
    channel = await registry_open_client(f"ble:///{DEV_ADDR}", bleak_backend=air.client_backend, timeout_s=5.0)
    client = AsyncClient(channel, timeout_s=10.0)
    await client.start()
    try:
        assert (await client.call("Test.Echo", [1, 2]))["params"] == [1, 2]
    finally:
        await client.close()


async def test_request_frame_is_mos_style(device: Device, connect: Connect) -> None:
    client = await connect()
    seen: list[bytes] = []
    gatts = device.channel()
    original = gatts.deliver_bytes

    def spy(data: bytes) -> Frame | None:
        seen.append(data)
        return original(data)

    gatts.deliver_bytes = spy  # type: ignore[method-assign]
    await client.call("Test.Echo", {"x": 1})
    req = json.loads(seen[0])
    assert req["src"] == "mos" and req["method"] == "Test.Echo" and req["params"] == {"x": 1}
    assert isinstance(req["id"], int)


async def test_error_reply(device: Device, connect: Connect) -> None:
    client = await connect()
    with pytest.raises(RemoteError) as ei:
        await client.call("Test.Fail")
    assert (ei.value.code, ei.value.message) == (418, "teapot")
    with pytest.raises(RemoteError) as ei:
        await client.call("No.Such")
    assert ei.value.code == 404


async def test_notification_gets_no_reply(device: Device, connect: Connect) -> None:
    client = await connect()
    got = count_deliveries(client)
    client.notify("Test.Note", {"n": 1})
    await asyncio.wait_for(device.noted.wait(), 5)
    assert device.notes == [{"n": 1}]
    assert await client.call("Test.Echo", 7) is not None
    # exactly one frame came back: the Echo reply; the notification was answered by nothing
    assert len(got) == 1 and got[0].result is not None
    assert device.channel().sender.pending_length == 0


async def test_large_frames_in_many_chunks(connect: Connect) -> None:
    air = BumbleAir(mtu=23)  # the minimum MTU: 20-byte writes, 21-byte reads
    dev = Device(air)
    await dev.start()
    try:
        writes: list[int] = []
        client = await connect(bleak_backend=air.client_backend, bleak_scanner_backend=air.scanner_backend)
        gatts = dev.channel()
        original = gatts.on_data_write

        def spy(value: bytes) -> None:
            writes.append(len(value))
            original(value)

        gatts.on_data_write = spy  # type: ignore[method-assign]
        text = "x" * 3900
        result = await client.call("Test.Echo", {"text": text})
        assert result["params"]["text"] == text
        assert len(writes) > 190 and max(writes) == 20
        assert 3900 < sum(writes) <= 4096
    finally:
        assert dev.listener is not None
        await dev.listener.close()
        await dev.node.close()


async def test_frame_over_max_frame_size_is_refused(device: Device, connect: Connect) -> None:
    client = await connect()
    with pytest.raises(TransportError, match="ATT error 0x11"):
        await client.call("Test.Echo", {"text": "y" * 4200})
    # the link is still usable
    assert (await client.call("Test.Echo", 1))["params"] == 1


async def test_concurrent_calls(device: Device, connect: Connect) -> None:
    client = await connect()
    results = await asyncio.gather(*(client.call("Test.Slow", {"i": i}) for i in range(12)))
    assert results == [i * 2 for i in range(12)]


async def test_device_broadcast_reaches_client(device: Device, connect: Connect) -> None:
    client = await connect()
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def on_event(ctx: Context, params: Any) -> None:
        if not got.done():
            got.set_result(params)

    client.node.add_handler("Dev.Event", on_event)
    await client.call("Test.Echo")  # the device learns the channel
    assert device.node.broadcast("Dev.Event", {"up": True}) == 1
    assert await asyncio.wait_for(got, 5) == {"up": True}


# -- connection lifecycle ----------------------------------------------------------------------------------


async def test_device_disconnect_closes_client_and_reconnect_works(device: Device, connect: Connect) -> None:
    client = await connect()
    pending = asyncio.ensure_future(client.call("Test.Hang"))
    await asyncio.sleep(0)  # let the request go out
    while not device.listener or not device.listener.channels:
        await asyncio.sleep(0.01)
    gatts = device.channel()
    await gatts.close()  # the device drops the connection
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pending, 5)
    assert client.channel.closed
    assert gatts.closed and gatts not in device.node.channels
    with pytest.raises(TransportError):  # the closed channel is gone from the client's routes
        await client.call("Test.Echo")
    # the device advertises again and a new connection works
    again = await connect()
    assert (await again.call("Test.Echo", "back"))["params"] == "back"


async def test_listener_close_closes_clients(air: BumbleAir, connect: Connect) -> None:
    dev = Device(air)
    await dev.start()
    client = await connect()
    assert await client.call("Test.Echo", 1)
    assert dev.listener is not None
    await dev.listener.close()
    for _ in range(100):
        if client.channel.closed:
            break
        await asyncio.sleep(0.01)
    assert client.channel.closed
    await dev.node.close()


async def test_client_close_removes_device_channel(device: Device, connect: Connect) -> None:
    client = await connect()
    await client.call("Test.Echo")
    gatts = device.channel()
    await client.close()
    for _ in range(100):
        if gatts.closed:
            break
        await asyncio.sleep(0.01)
    assert gatts.closed and gatts not in device.node.channels


async def test_unknown_name_is_an_error(device: Device, connect: Connect) -> None:
    with pytest.raises(TransportError, match="no BLE device named 'nobody'"):
        await connect("nobody", timeout_s=0.3)


def test_url_option_errors() -> None:
    with pytest.raises(UsageError):
        asyncio.run(ble.open_client(parse_url("ble://"), bleak_backend=None))
    with pytest.raises(UsageError):
        asyncio.run(ble.open_client(parse_url("ble://dev1?timeout_s=soon")))


async def test_polling_when_notifications_are_unavailable(device: Device, air: BumbleAir, connect: Connect) -> None:
    class NoNotify(air.client_backend):  # type: ignore[name-defined]
        async def start_notify(self, *args: Any, **kwargs: Any) -> None:
            raise BleakError("notifications disabled in this test")

    client = await connect(bleak_backend=NoNotify, poll_s=0.01)
    assert isinstance(client.channel, ble.GattChannel) and not client.channel.notifying
    assert (await client.call("Test.Echo", "polled"))["params"] == "polled"


# -- the protocol on the wire, through bleak directly ------------------------------------------------------


@pytest.fixture
async def raw(device: Device, air: BumbleAir) -> AsyncIterator[BleakClient]:
    client = BleakClient(DEV_ADDR, backend=air.client_backend, timeout=5.0)
    await client.connect()
    yield client
    await client.disconnect()


async def read_frame(client: BleakClient) -> bytes:
    length = struct.unpack(">I", await client.read_gatt_char(RX_CTL_UUID))[0]
    buf = b""
    while len(buf) < length:
        chunk = await client.read_gatt_char(DATA_UUID)
        assert 0 < len(chunk) <= client.mtu_size - 2
        buf += chunk
    return buf


async def test_service_layout(raw: BleakClient) -> None:
    svc = raw.services.get_service(SERVICE_UUID)
    assert svc is not None
    props = {c.uuid: sorted(c.properties) for c in svc.characteristics}
    assert props == {
        DATA_UUID: ["read", "write"],
        RX_CTL_UUID: ["indicate", "notify", "read"],
        TX_CTL_UUID: ["write"],
    }


async def test_protocol_errors(raw: BleakClient, device: Device) -> None:
    async def att_error(char: str, data: bytes) -> int:
        with pytest.raises(BleakGATTProtocolError) as ei:
            await raw.write_gatt_char(char, data, response=True)
        return int(ei.value.code)

    assert await att_error(TX_CTL_UUID, b"\x00\x01") == AttError.REQUEST_NOT_SUPPORTED
    assert await att_error(TX_CTL_UUID, struct.pack(">I", 4097)) == AttError.INSUFFICIENT_RESOURCES
    assert await att_error(DATA_UUID, b"{}") == AttError.INVALID_OFFSET  # nothing announced
    frame = json.dumps({"id": 5, "src": "raw", "method": "Test.Echo", "params": 3}).encode()
    await raw.write_gatt_char(TX_CTL_UUID, struct.pack(">I", len(frame)), response=True)
    await raw.write_gatt_char(DATA_UUID, frame[:10], response=True)
    assert await att_error(DATA_UUID, frame[10:] + b" ") == AttError.INVALID_OFFSET
    # the rejected write lost nothing: the rest completes the frame
    await raw.write_gatt_char(DATA_UUID, frame[10:], response=True)
    reply = json.loads(await read_frame(raw))
    assert reply["id"] == 5 and reply["dst"] == "raw" and reply["result"]["params"] == 3
    assert struct.unpack(">I", await raw.read_gatt_char(RX_CTL_UUID))[0] == 0
    assert await raw.read_gatt_char(DATA_UUID) == b""


async def test_tx_ctl_discards_partial_frame(raw: BleakClient) -> None:
    await raw.write_gatt_char(TX_CTL_UUID, struct.pack(">I", 100), response=True)
    await raw.write_gatt_char(DATA_UUID, b'{"garbage', response=True)
    frame = b'{"id":9,"src":"raw","method":"Test.Echo"}'
    await raw.write_gatt_char(TX_CTL_UUID, struct.pack(">I", len(frame)), response=True)
    await raw.write_gatt_char(DATA_UUID, frame, response=True)
    assert json.loads(await read_frame(raw))["id"] == 9


async def test_rx_ctl_read_rewinds_and_frames_queue(raw: BleakClient, device: Device) -> None:
    for i in (1, 2):
        frame = json.dumps({"id": i, "src": "raw", "method": "Test.Echo", "params": "p" * 300}).encode()
        await raw.write_gatt_char(TX_CTL_UUID, struct.pack(">I", len(frame)), response=True)
        for k in range(0, len(frame), raw.mtu_size - 3):
            await raw.write_gatt_char(DATA_UUID, frame[k : k + raw.mtu_size - 3], response=True)
    first_length = struct.unpack(">I", await raw.read_gatt_char(RX_CTL_UUID))[0]
    part = await raw.read_gatt_char(DATA_UUID)
    assert 0 < len(part) < first_length
    # reading rx_ctl starts the pending frame over
    assert json.loads(await read_frame(raw))["id"] == 1
    assert json.loads(await read_frame(raw))["id"] == 2


async def test_indications_with_a_bumble_gatt_client(device: Device, air: BumbleAir) -> None:
    """A plain bumble GATT client that asks for indications instead of notifications."""
    central = air.make_device("raw-central")
    await central.power_on()
    try:
        conn = await central.connect(Address(DEV_ADDR))
        peer = Peer(conn)
        await peer.discover_services()
        (svc,) = [s for s in peer.services if str(s.uuid).lower() == SERVICE_UUID]
        chars = {str(c.uuid).lower(): c for c in await peer.discover_characteristics(service=svc)}
        announced: asyncio.Queue[bytes] = asyncio.Queue()
        await peer.subscribe(chars[RX_CTL_UUID], announced.put_nowait, prefer_notify=False)
        gatts = device.channel()
        cccd = device.listener.device.gatt_server.subscribers  # type: ignore[union-attr]
        assert any(
            v and v[0] & ClientCharacteristicConfigurationBits.INDICATION for s in cccd.values() for v in s.values()
        )
        device.node.broadcast("Dev.Hello", {"n": 1})
        length = struct.unpack(">I", await asyncio.wait_for(announced.get(), 5))[0]
        buf = b""
        while len(buf) < length:
            buf += await peer.read_value(chars[DATA_UUID])
        assert json.loads(buf) == {"src": "dev1", "method": "Dev.Hello", "params": {"n": 1}}
        assert gatts.sender.pending_length == 0
    finally:
        await air.release(central)


async def test_client_recovers_from_an_interrupted_read(device: Device, connect: Connect) -> None:
    client = await connect(poll_s=0.01)
    gatts = device.channel()
    original = gatts.on_data_read
    calls = 0

    def flaky() -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            return b""  # as if the frame were lost mid-way; the client re-reads rx_ctl, which rewinds
        return original()

    gatts.on_data_read = flaky  # type: ignore[method-assign]
    result = await client.call("Test.Echo", "z" * 600)
    assert result["params"] == "z" * 600
    assert calls > 4


async def test_listen_url_options(air: BumbleAir, connect: Connect) -> None:
    node = Node(id="dev9")
    node.add_handler("Who", lambda ctx, p: ctx.node.id)
    lst = await ble.listen(parse_url("ble://?name=lamp&address=C0:AA:BB:CC:DD:EE"), node, link=air.link)
    try:
        assert lst.name == "lamp"
        client = await connect("lamp")
        assert await client.call("Who") == "dev9"
        client2 = await connect("/C0:AA:BB:CC:DD:EE")  # see test_call_by_address_through_registry
        assert await client2.call("Who") == "dev9"
        # two connections at once, one channel each
        assert len(lst.channels) == 2
        assert len({ch.info() for ch in lst.channels.values()}) == 2
    finally:
        await lst.close()
        await node.close()
    with pytest.raises(UsageError):
        await ble.listen(parse_url("ble://?address=nope"), node, link=air.link)


async def test_connect_to_absent_address_fails(device: Device, connect: Connect) -> None:
    with pytest.raises(TransportError, match="connecting to C0:99:99:99:99:99"):
        await connect("/C0:99:99:99:99:99", timeout_s=0.5)
    # the failed attempt left the link usable
    assert (await (await connect()).call("Test.Echo", 1))["params"] == 1


async def test_listen_through_registry_and_bad_hci(air: BumbleAir, connect: Connect) -> None:
    from transports.registry import listen as registry_listen

    node = Node(id="dev7")
    lst = await registry_listen("ble://", node, link=air.link)
    try:
        assert isinstance(lst, ble.BleListener) and lst.name == "dev7"
        assert lst.address == ble.static_address_for("dev7")
        assert int(lst.address[:2], 16) & 0xC0 == 0xC0
        client = await connect("dev7")
        assert (await client.call("RPC.Ping"))["channel_info"].startswith("conn ")
    finally:
        await lst.close()
    with pytest.raises(TransportError, match="cannot open HCI transport"):
        await registry_listen("ble://?hci=serial:/nonexistent/tty", node)
    with pytest.raises(UsageError, match="unknown option"):
        await registry_listen("ble://?color=red", node, link=air.link)
    await node.close()


async def test_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bleak", None)
    with pytest.raises(TransportError, match=r"mgrpc\[ble\]"):
        await ble.open_client(parse_url("ble://dev1"))
    monkeypatch.setitem(sys.modules, "bumble", None)
    with pytest.raises(TransportError, match=r"mgrpc\[ble\]"):
        await ble.listen(parse_url("ble://"), Node(id="x"))
