"""tcp:// and udp:// transports, both roles, on 127.0.0.1 (spec/transports.md §7)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest

import transports
from rpc.errors import ChannelClosed, RemoteError, TransportError, UsageError
from rpc.node import Node
from transports.udp import UdpListener

pytestmark = pytest.mark.timeout(30)

DEVICE_ID = "esp32_0A1B2C"


def device_node() -> Node:
    node = Node(id=DEVICE_ID)
    node.add_handler("Test.Echo", lambda ctx, params: params)
    return node


async def read_until(reader: asyncio.StreamReader, marker: bytes, *, timeout_s: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.readuntil(marker), timeout_s)


# --------------------------------------------------------------------------------------------
# TCP


async def test_tcp_client_and_device_roundtrip() -> None:
    node = device_node()
    lst = await transports.listen("tcp://127.0.0.1:0", node)
    try:
        assert lst.url.startswith("tcp://127.0.0.1:") and not lst.url.endswith(":0")
        client = await transports.connect(lst.url, timeout_s=5)
        try:
            assert await client.call("Test.Echo", {"a": [1, "é<>"]}) == {"a": [1, "é<>"]}
            ping = await client.call("RPC.Ping")
            assert ping["channel_info"].startswith("127.0.0.1:")
            with pytest.raises(RemoteError) as ei:
                await client.call("No.Such")
            assert ei.value.code == 404
        finally:
            await client.close()
    finally:
        await lst.close()
        await node.close()


async def test_tcp_device_raw_bytes_both_styles() -> None:
    node = device_node()
    lst = await transports.listen("tcp://127.0.0.1:0", node)
    port = int(lst.url.rsplit(":", 1)[1])
    try:
        # mos style without CRC: the device answers with """ and without CRC.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b'\n"""{"src":"mos","id":7,"method":"Test.Echo","params":1}"""\n')
        out = await read_until(reader, b'"""\n')
        assert out.lstrip(b"\n") == b'"""{"id":7,"src":"esp32_0A1B2C","dst":"mos","result":1}"""\n'
        writer.close()
        # Line style with a CRC (like mgrpc_uart.py): answered as a line with a CRC.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"src":"me","id":8,"method":"Test.Echo","params":2}'
        from rpc.framing import crc32_hex

        writer.write(body + crc32_hex(body).encode() + b"\n")
        out = await read_until(reader, b"}")
        out += await read_until(reader, b"\n")
        reply = b'{"id":8,"src":"esp32_0A1B2C","dst":"me","result":2}'
        assert out == b"\n" + reply + crc32_hex(reply).encode() + b"\n"
        writer.close()
    finally:
        await lst.close()
        await node.close()


async def test_tcp_client_raw_bytes_and_junk() -> None:
    got: list[bytes] = []
    junk: list[bytes] = []

    async def fake_device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await read_until(reader, b'"""\n')
        got.append(data)
        req = json.loads(data[4:-4])
        reply = json.dumps({"id": req["id"], "src": DEVICE_ID, "dst": "mos", "result": "ok"}, separators=(",", ":"))
        writer.write(b"boot log line\r\n" + b'\n"""' + reply.encode() + b'"""\n' + b"more log\n")
        await writer.drain()

    server = await asyncio.start_server(fake_device, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await transports.connect(f"tcp://127.0.0.1:{port}", timeout_s=5, on_junk=junk.append)
        try:
            assert await client.call("Sys.GetInfo") == "ok"
        finally:
            await client.close()
    finally:
        server.close()
        await server.wait_closed()
    (data,) = got
    assert data.startswith(b'\n"""{"src":"mos","id":') and data.endswith(b',"method":"Sys.GetInfo"}"""\n')
    assert b"boot log line\r\n" in b"".join(junk)


async def test_tcp_peer_close_fails_pending_call() -> None:
    async def silent_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_until(reader, b'"""\n')
        writer.close()

    server = await asyncio.start_server(silent_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await transports.connect(f"tcp://127.0.0.1:{port}", timeout_s=5)
        try:
            with pytest.raises(ChannelClosed):
                await client.call("Sys.GetInfo")
        finally:
            await client.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_bad_crc_is_fatal_for_client() -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await read_until(reader, b'"""\n')
        req = json.loads(data[4:-4])
        writer.write(b'\n"""{"id":%d,"result":1}00000000"""\n' % req["id"])
        await writer.drain()
        await asyncio.sleep(1)

    server = await asyncio.start_server(bad, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await transports.connect(f"tcp://127.0.0.1:{port}", timeout_s=5)
        try:
            with pytest.raises(ChannelClosed):
                await client.call("Sys.GetInfo")
            assert client.channel.closed
        finally:
            await client.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_errors() -> None:
    with pytest.raises(UsageError):
        await transports.open_client("tcp://127.0.0.1")
    with pytest.raises(UsageError, match="valid options"):
        await transports.open_client("tcp://127.0.0.1:1?bogus=1")
    with pytest.raises(UsageError):
        await transports.open_client("tcp://127.0.0.1:1?codec=cbor")
    with pytest.raises(UsageError, match="connect_timeout"):
        await transports.open_client("tcp://127.0.0.1:1?connect_timeout=soon")
    with pytest.raises(UsageError, match="max_peers"):
        await transports.listen("udp://127.0.0.1:0?max_peers=many", Node(id="x"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(TransportError) as ei:
        await transports.open_client(f"tcp://127.0.0.1:{port}")
    assert isinstance(ei.value, OSError)


async def test_tcp_listener_close_closes_connections() -> None:
    node = device_node()
    lst = await transports.listen("tcp://127.0.0.1:0", node)
    client = await transports.connect(lst.url, timeout_s=5)
    try:
        assert await client.call("Test.Echo", 5) == 5
        assert len(node.channels) == 1
        await lst.close()
        for _ in range(100):
            if client.channel.closed:
                break
            await asyncio.sleep(0.01)
        assert client.channel.closed
        assert node.channels == []
    finally:
        await client.close()
        await node.close()


# --------------------------------------------------------------------------------------------
# UDP


async def test_udp_client_and_device_roundtrip() -> None:
    node = device_node()
    lst = await transports.listen("udp://127.0.0.1:0", node)
    try:
        client = await transports.connect(lst.url, timeout_s=5)
        try:
            assert await client.call("Test.Echo", {"x": "<&>"}) == {"x": "<&>"}
            ping = await client.call("RPC.Ping")
            assert ping["channel_info"].startswith("127.0.0.1:")
        finally:
            await client.close()
    finally:
        await lst.close()
        await node.close()


def _factory(proto: _Collector) -> Callable[[], _Collector]:
    return lambda: proto


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))


async def test_udp_raw_datagrams_both_roles() -> None:
    loop = asyncio.get_running_loop()
    # Client side: one json.Marshal frame per datagram (HTML escaped, no newline).
    proto = _Collector()
    fake_dev, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
    port = fake_dev.get_extra_info("sockname")[1]
    client = await transports.connect(f"udp://127.0.0.1:{port}", timeout_s=5)
    try:
        task = asyncio.ensure_future(client.call("Test.Echo", {"s": "<b>"}))
        data, addr = await asyncio.wait_for(proto.queue.get(), 5)
        assert data.startswith(b'{"src":"mos","id":')
        assert data.endswith(b',"method":"Test.Echo","params":{"s":"\\u003cb\\u003e"}}')
        req = json.loads(data)
        fake_dev.sendto(b'{"id":%d,"src":"dev","dst":"mos","result":"fine"}' % req["id"], addr)
        assert await asyncio.wait_for(task, 5) == "fine"
    finally:
        await client.close()
        fake_dev.close()
    # Device side: one channel per peer; device-style replies.
    node = device_node()
    lst = await transports.listen("udp://127.0.0.1:0", node)
    assert isinstance(lst, UdpListener)
    dport = int(lst.url.rsplit(":", 1)[1])
    peers = []
    try:
        for n in (1, 2):
            proto = _Collector()
            tr, _ = await loop.create_datagram_endpoint(_factory(proto), remote_addr=("127.0.0.1", dport))
            peers.append(tr)
            tr.sendto(b'{"src":"p%d","id":%d,"method":"Test.Echo","params":%d}' % (n, n, n))
            data, _ = await asyncio.wait_for(proto.queue.get(), 5)
            assert data == b'{"id":%d,"src":"esp32_0A1B2C","dst":"p%d","result":%d}' % (n, n, n)
        assert len(lst.peers) == 2 and len(node.channels) == 2
    finally:
        for tr in peers:
            tr.close()
        await lst.close()
        await node.close()


async def test_udp_bad_datagram_is_dropped_and_peers_bounded() -> None:
    node = device_node()
    lst = await transports.listen("udp://127.0.0.1:0?max_peers=1", node)
    assert isinstance(lst, UdpListener)
    dport = transports.parse_url(lst.url).port
    assert dport is not None
    loop = asyncio.get_running_loop()
    trs = []
    try:
        protos = [_Collector(), _Collector()]
        for proto in protos:
            tr, _ = await loop.create_datagram_endpoint(_factory(proto), remote_addr=("127.0.0.1", dport))
            trs.append(tr)
        trs[0].sendto(b"not json")
        trs[0].sendto(b'{"src":"a","id":1,"method":"Test.Echo","params":1}')
        data, _ = await asyncio.wait_for(protos[0].queue.get(), 5)
        assert data.endswith(b'"result":1}')
        trs[1].sendto(b'{"src":"b","id":2,"method":"Test.Echo","params":2}')
        data, _ = await asyncio.wait_for(protos[1].queue.get(), 5)
        assert data.endswith(b'"result":2}')
        assert len(lst.peers) == 1
        assert len(node.channels) == 1
    finally:
        for tr in trs:
            tr.close()
        await lst.close()
        await node.close()


async def test_udp_listen_refuses_a_codec_it_cannot_use() -> None:
    # ?codec= is accepted by every scheme; the device side must not silently speak JSON instead
    node = Node(id="dev")
    with pytest.raises(UsageError, match="codec"):
        lst = await transports.listen("udp://127.0.0.1:0?codec=msgpack", node)
        await lst.close()
