"""ws:// and wss://: a real aiohttp server and client on 127.0.0.1 (spec/transports.md §2)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import transports
from rpc.codec import codec_by_name
from rpc.errors import ChannelClosed, HandlerError, RemoteError, TransportError, UsageError
from rpc.frame import Frame
from rpc.node import Context, Node
from transports.ws import WsChannel, WsClientChannel, dial_out

DEV_ID = "esp32_0A1B2C"
T = 5.0  # bound on every wait; tests assert behaviour, not timing


def make_device() -> Node:
    node = Node(id=DEV_ID)
    node.notes = []  # type: ignore[attr-defined]

    def echo(ctx: Context, params: Any) -> Any:
        return params

    def fail(ctx: Context, params: Any) -> Any:
        raise HandlerError(418, "I'm a teapot")

    def note(ctx: Context, params: Any) -> Any:
        node.notes.append(params)  # type: ignore[attr-defined]
        return None

    async def slow(ctx: Context, params: Any) -> Any:
        await asyncio.sleep(0.01)
        return {"n": params["n"], "ch": ctx.channel.type}

    node.add_handler("Sys.Echo", echo)
    node.add_handler("Sys.Fail", fail)
    node.add_handler("Sys.Note", note)
    node.add_handler("Sys.Slow", slow)
    return node


@pytest.fixture
async def device() -> AsyncIterator[Node]:
    node = make_device()
    yield node
    await node.close()


@pytest.fixture
async def listener(device: Node) -> AsyncIterator[Any]:
    lst: Any = await transports.listen("ws://127.0.0.1:0/rpc", device)
    yield lst
    await lst.close()


async def wait_for(cond: Any, what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- calls through transports.connect ---------------------------------------------------------------


async def test_call_and_channel_facts(listener: Any, device: Node) -> None:
    client = await transports.connect(listener.url, timeout_s=T)
    try:
        assert await client.call("Sys.Echo", {"a": [1, "ü"]}) == {"a": [1, "ü"]}
        ping = await client.call("RPC.Ping")
        local_port = client.channel.ws.get_extra_info("sockname")[1]  # type: ignore[union-attr,index]
        assert ping == {"channel_info": f"127.0.0.1:{local_port}"}
        (ch,) = [c for c in device.channels if isinstance(c, WsChannel)]
        assert (ch.type, ch.persistent, ch.broadcast, ch.style) == ("WS_in", False, True, "device")
        assert ch.address == "mos"  # learned from the first frame's src
    finally:
        await client.close()
    await wait_for(lambda: not any(isinstance(c, WsChannel) for c in device.channels), "channel removal")


async def test_error_replies(listener: Any) -> None:
    async with await transports.connect(listener.url, timeout_s=T) as client:
        with pytest.raises(RemoteError) as ei:
            await client.call("Sys.Fail")
        assert (ei.value.code, ei.value.message) == (418, "I'm a teapot")
        with pytest.raises(RemoteError) as ei:
            await client.call("Foo.Bar")
        assert (ei.value.code, ei.value.message) == (404, "No handler for Foo.Bar")


async def test_concurrent_calls(listener: Any) -> None:
    async with await transports.connect(listener.url, timeout_s=T) as client:
        client.node.max_queue_length = 64  # the router's default of 25 pending calls would 429 the rest
        results = await asyncio.gather(*(client.call("Sys.Slow", {"n": i}) for i in range(50)))
    assert results == [{"n": i, "ch": "WS_in"} for i in range(50)]


async def test_device_broadcast_reaches_ws_client(listener: Any, device: Node) -> None:
    got: list[Any] = []
    async with await transports.connect(listener.url, timeout_s=T) as client:
        client.node.add_handler("Dev.Event", lambda ctx, p: got.append(p))
        await wait_for(lambda: any(isinstance(c, WsChannel) for c in device.channels), "the device channel")
        assert device.broadcast("Dev.Event", {"x": 1}) == 1
        await wait_for(lambda: got, "the broadcast")
    assert got == [{"x": 1}]


# -- the bytes on the wire, seen with a raw aiohttp client -----------------------------------------


async def raw_ws(url: str, **kw: Any) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(url, **kw)
    return session, ws


async def test_device_frames_are_text_without_newline(listener: Any, device: Node) -> None:
    session, ws = await raw_ws(listener.url, protocols=("clubby.cesanta.com",))
    try:
        # A notification first: it must produce no message at all.
        await ws.send_str('{"src":"me","method":"Sys.Note","params":{"k":1}}\n')
        await ws.send_str('{"src":"me","id":5,"method":"Sys.Echo","params":{"a":1}}\n')
        msg = await ws.receive(timeout=T)
        assert msg.type == aiohttp.WSMsgType.TEXT
        # Exactly the core's device-style encoding, nothing added (no newline).
        assert msg.data == Frame(id=5, src=DEV_ID, dst="me", result={"a": 1}).to_json("device")
        assert msg.data.startswith('{"id":5,"src":"esp32_0A1B2C","dst":"me","result":')
        assert device.notes == [{"k": 1}]  # type: ignore[attr-defined]
        # A BINARY message is a frame too.
        await ws.send_bytes(b'{"src":"me","id":6,"method":"Sys.Echo","params":2}')
        msg = await ws.receive(timeout=T)
        assert msg.data == '{"id":6,"src":"esp32_0A1B2C","dst":"me","result":2}'
    finally:
        await ws.close()
        await session.close()


def _echo_frame_of_size(size: int, fid: int = 9) -> bytes:
    head = b'{"src":"me","id":%d,"method":"Sys.Echo","params":"' % fid
    tail = b'"}\n'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_frame_size_limit(listener: Any) -> None:
    session, ws = await raw_ws(listener.url)
    try:
        frame = _echo_frame_of_size(4097)
        assert len(frame) == 4097  # 4096 bytes of JSON and mos's newline, which does not count
        await ws.send_bytes(frame)
        msg = await ws.receive(timeout=T)
        assert msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["id"] == 9
        await ws.send_bytes(_echo_frame_of_size(4098, fid=10))
        msg = await ws.receive(timeout=T)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009
    finally:
        await ws.close()
        await session.close()


async def test_oversize_request_fails_the_call(listener: Any) -> None:
    client = await transports.connect(listener.url, timeout_s=T)
    try:
        with pytest.raises(ChannelClosed):
            await client.call("Sys.Echo", "x" * 5000)
    finally:
        await client.close()


async def test_text_that_is_not_json_is_ignored(listener: Any) -> None:
    """As on the real device (real-device.md RD-W5): no reply, and the connection stays usable."""
    session, ws = await raw_ws(listener.url)
    try:
        await ws.send_str("{not json")
        await ws.send_str('{"src":"me","id":7,"method":"Sys.Echo","params":1}')
        msg = await ws.receive(timeout=T)
        assert msg.type == aiohttp.WSMsgType.TEXT and '"id":7' in msg.data, msg
    finally:
        await ws.close()
        await session.close()


async def test_wrong_dst_drops_the_connection_without_close_frame(listener: Any, device: Node) -> None:
    session, ws = await raw_ws(listener.url)
    try:
        await ws.send_str('{"src":"me","id":1,"dst":"someone_else","method":"Sys.Echo"}')
        msg = await ws.receive(timeout=T)
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg
    finally:
        await ws.close()
        await session.close()
    await wait_for(lambda: not any(isinstance(c, WsChannel) for c in device.channels), "channel removal")


async def _raw_handshake(port: int, extra: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            "GET /rpc HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + extra + "\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
    writer.close()
    return head.decode()


async def test_subprotocol_echoed_verbatim(listener: Any) -> None:
    head = await _raw_handshake(listener.port, "Sec-WebSocket-Protocol: clubby.cesanta.com\r\n")
    assert head.startswith("HTTP/1.1 101 ")
    assert "\r\nSec-WebSocket-Protocol: clubby.cesanta.com\r\n" in head
    head = await _raw_handshake(listener.port, "Sec-WebSocket-Protocol: foo, bar\r\n")
    assert "\r\nSec-WebSocket-Protocol: foo, bar\r\n" in head
    head = await _raw_handshake(listener.port, "")
    assert head.startswith("HTTP/1.1 101 ") and "Sec-WebSocket-Protocol" not in head


async def test_device_sends_pings(device: Node) -> None:
    lst: Any = await transports.listen("ws://127.0.0.1:0/rpc", device, ping_interval_s=0.02)
    session, ws = await raw_ws(lst.url, autoping=False)
    try:
        msg = await ws.receive(timeout=T)
        assert msg.type == aiohttp.WSMsgType.PING
    finally:
        await ws.close()
        await session.close()
        await lst.close()


# -- what the mos-compatible client sends, captured by a test server --------------------------------


class FakeServer:
    """A bare aiohttp WebSocket server recording what clients send."""

    def __init__(self, *, status: int = 101, protocols: tuple[str, ...] = ("clubby.cesanta.com",)) -> None:
        self.status = status
        self.protocols = protocols
        self.requests: list[web.BaseRequest] = []
        self.messages: list[aiohttp.WSMessage] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.connected = asyncio.Event()
        self.script: Any = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request)
        if self.status != 101:
            return web.Response(status=self.status, text="nope")
        ws = web.WebSocketResponse(protocols=self.protocols, autoping=False)
        await ws.prepare(request)
        self.sockets.append(ws)
        self.connected.set()
        if self.script is not None:
            await self.script(ws)
        else:
            async for msg in ws:
                self.messages.append(msg)
        return ws

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handler)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        for ws in self.sockets:
            await ws.close()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    srv = FakeServer()
    yield srv
    await srv.stop()


async def test_mos_client_exact_bytes(fake: FakeServer) -> None:
    async def script(ws: web.WebSocketResponse) -> None:
        msg = await ws.receive()
        fake.messages.append(msg)
        fid = json.loads(msg.data)["id"]
        # Reply as BINARY: mos accepts either message type.
        await ws.send_bytes(b'{"id":%d,"src":"dev","dst":"mos","result":{"ok":true}}' % fid)
        # And answer pings: the client must send a PONG with the same payload.
        await ws.ping(b"hi")
        fake.messages.append(await ws.receive())
        await ws.receive()

    fake.script = script
    await fake.start()
    client = await transports.connect(f"ws://user:p%40ss@127.0.0.1:{fake.port}/rpc", timeout_s=T)
    try:
        assert await client.call("Sys.GetInfo") == {"ok": True}
        await wait_for(lambda: len(fake.messages) == 2, "the pong")
    finally:
        await client.close()
    req = fake.requests[0]
    assert req.path == "/rpc" and req.query_string == ""
    assert req.headers["Origin"] == "https://api.cesanta.com/"
    assert req.headers["Sec-WebSocket-Protocol"] == "clubby.cesanta.com"
    assert req.headers["Authorization"] == "Bearer user:p%40ss"
    assert "Sec-WebSocket-Extensions" not in req.headers  # no compression, as mos
    text = fake.messages[0]
    assert text.type == aiohttp.WSMsgType.TEXT
    assert re.fullmatch(r'\{"src":"mos","id":\d+,"method":"Sys\.GetInfo"\}\n', text.data), text.data
    pong = fake.messages[1]
    assert pong.type == aiohttp.WSMsgType.PONG and pong.data == b"hi"


async def test_no_authorization_without_userinfo(fake: FakeServer) -> None:
    await fake.start()
    async with await transports.connect(f"ws://127.0.0.1:{fake.port}/rpc", timeout_s=T):
        await asyncio.wait_for(fake.connected.wait(), T)
    assert "Authorization" not in fake.requests[0].headers


async def test_non_101_answer() -> None:
    srv = FakeServer(status=404)
    await srv.start()
    try:
        with pytest.raises(TransportError, match=r"^Invalid HTTP response code returned\. Missing rpc-ws library\?$"):
            await transports.connect(f"ws://127.0.0.1:{srv.port}/rpc", timeout_s=T)
    finally:
        await srv.stop()


async def test_ws_disabled_when_only_http_listens(device: Node) -> None:
    lst: Any = await transports.listen("http://127.0.0.1:0/rpc", device)
    try:
        with pytest.raises(TransportError, match="Invalid HTTP response code"):
            await transports.connect(f"ws://127.0.0.1:{lst.port}/rpc", timeout_s=T)
        head = await _raw_handshake(lst.port, "")
        assert head.startswith("HTTP/1.1 503 ")
    finally:
        await lst.close()


async def test_connection_refused_is_a_transport_error() -> None:
    srv = FakeServer()
    await srv.start()
    port = srv.port
    await srv.stop()
    with pytest.raises(TransportError, match="cannot connect"):
        await transports.connect(f"ws://127.0.0.1:{port}/rpc", timeout_s=T)


async def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(UsageError, match="reconnect"):
        await transports.connect("ws://127.0.0.1:1/rpc?bogus=1")


# -- peer going away and coming back ------------------------------------------------------------------


async def test_server_restart_reconnecting_client(device: Node) -> None:
    lst: Any = await transports.listen("ws://127.0.0.1:0/rpc", device)
    port = lst.port
    client = await transports.connect(
        f"ws://127.0.0.1:{port}/rpc?reconnect=1", timeout_s=T, reconnect_min_s=0.02, reconnect_max_s=0.1
    )
    try:
        assert await client.call("Sys.Echo", 1) == 1
        await lst.close()
        assert isinstance(client.channel, WsClientChannel)
        await wait_for(lambda: not client.channel.connected, "the disconnection")
        lst = await transports.listen(f"ws://127.0.0.1:{port}/rpc", device)
        assert await client.call("Sys.Echo", 2) == 2
        assert client.channel.connections == 2
        assert not client.channel.closed
    finally:
        await client.close()
        await lst.close()


async def test_server_gone_non_reconnecting_client(device: Node) -> None:
    lst: Any = await transports.listen("ws://127.0.0.1:0/rpc", device)
    client = await transports.connect(lst.url, timeout_s=T)
    try:
        assert await client.call("Sys.Echo", 1) == 1
        await lst.close()
        await wait_for(lambda: client.channel.closed, "the channel to close")
        with pytest.raises(TransportError):
            await client.call("Sys.Echo", 2)
    finally:
        await client.close()


# -- device outbound ---------------------------------------------------------------------------------


async def test_device_outbound(device: Node, fake: FakeServer) -> None:
    replies: list[Any] = []
    closed_once = asyncio.Event()

    async def script(ws: web.WebSocketResponse) -> None:
        if len(fake.sockets) == 1:
            # First connection: call the device, answer the device's call, then drop the link.
            await ws.send_str('{"id":7,"src":"cloud","method":"Sys.Echo","params":{"x":1}}')
            replies.append((await ws.receive()).data)
            req = json.loads((await ws.receive()).data)
            replies.append(req)
            await ws.send_str(json.dumps({"id": req["id"], "src": "cloud", "dst": DEV_ID, "result": "hi"}))
            await ws.receive()  # until the test is done with this connection
            closed_once.set()
        else:
            await ws.send_str('{"id":8,"src":"cloud","method":"Sys.Echo","params":2}')
            replies.append((await ws.receive()).data)
            async for _ in ws:
                pass

    fake.protocols = ("json-rpc",)
    fake.script = script
    await fake.start()
    out = await dial_out(f"ws://127.0.0.1:{fake.port}/api", device, reconnect_min_s=0.02)
    try:
        assert await device.call("Cloud.Hello", {"v": 1}, timeout_s=T) == "hi"
        req = fake.requests[0]
        assert req.path == "/api"
        assert req.headers["Sec-WebSocket-Protocol"] == "json-rpc"
        assert req.headers["Origin"] == "https://mongoose-os.com"
        assert replies[0] == Frame(id=7, src=DEV_ID, dst="cloud", result={"x": 1}).to_json("device")
        assert replies[1]["method"] == "Cloud.Hello" and replies[1]["src"] == DEV_ID
        ch = out.channel
        assert (ch.type, ch.persistent, ch.broadcast) == ("WS_out", True, True)
        assert device.route("") is ch
        await fake.sockets[0].close()
        await wait_for(lambda: len(replies) == 3, "the second connection")
        assert replies[2] == '{"id":8,"src":"esp32_0A1B2C","dst":"cloud","result":2}'
        assert ch.connections == 2 and device.route("") is ch
    finally:
        await out.close()
    assert out.channel not in device.channels


async def test_listen_outbound_option(device: Node, fake: FakeServer) -> None:
    fake.protocols = ("json-rpc",)
    await fake.start()
    out: Any = await transports.listen(f"ws://127.0.0.1:{fake.port}/rpc?outbound=1", device)
    try:
        await asyncio.wait_for(fake.connected.wait(), T)
        assert out.channel.type == "WS_out"
    finally:
        await out.close()


# -- pluggable codec ---------------------------------------------------------------------------------


async def test_msgpack_codec_between_mgrpc_ends(device: Node) -> None:
    codec = codec_by_name("msgpack")
    lst: Any = await transports.listen("ws://127.0.0.1:0/rpc?codec=msgpack", device)
    try:
        async with await transports.connect(f"ws://127.0.0.1:{lst.port}/rpc?codec=msgpack", timeout_s=T) as c:
            assert await c.call("Sys.Echo", {"b": b"\x00\xff", "n": 1}) == {"b": b"\x00\xff", "n": 1}
        session, ws = await raw_ws(lst.url)
        try:
            await ws.send_bytes(codec.encode(Frame.request("Sys.Echo", [b"\x01"], id=3, src="me"), "mos"))
            msg = await ws.receive(timeout=T)
            assert msg.type == aiohttp.WSMsgType.BINARY
            reply = codec.decode(msg.data)
            assert (reply.id, reply.dst, reply.result) == (3, "me", [b"\x01"])
        finally:
            await ws.close()
            await session.close()
    finally:
        await lst.close()


# -- TLS ----------------------------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_wss(device: Node, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    lst: Any = await transports.listen(f"wss://127.0.0.1:0/rpc?cert={cert}&key={key}", device)
    try:
        # No CA: verified against the system CAs, which do not know this self-signed certificate.
        with pytest.raises(TransportError, match=r"not trusted: pass \?ca=FILE .* or \?insecure=1"):
            async with await transports.connect(f"wss://127.0.0.1:{lst.port}/rpc", timeout_s=T) as c:
                await c.call("Sys.Echo", 2)
        # ?insecure=1: nothing is verified (as mos without --ca-cert-file).
        async with await transports.connect(f"wss://127.0.0.1:{lst.port}/rpc?insecure=1", timeout_s=T) as c:
            assert await c.call("Sys.Echo", 3) == 3
        async with await transports.connect(f"wss://127.0.0.1:{lst.port}/rpc?ca={cert}", timeout_s=T) as c:
            assert await c.call("Sys.Echo", 4) == 4
        with pytest.raises(UsageError, match="not both"):
            await transports.connect(f"wss://127.0.0.1:{lst.port}/rpc?ca={cert}&insecure=1", timeout_s=T)
        with pytest.raises(UsageError, match="must be 0 or 1"):
            await transports.connect(f"wss://127.0.0.1:{lst.port}/rpc?insecure=yes", timeout_s=T)
    finally:
        await lst.close()


async def test_connect_timeout_bounds_a_silent_server() -> None:
    # A server that accepts the TCP connection but never answers the upgrade (a wedged device).
    conns: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TransportError, match="timed out"):
            await asyncio.wait_for(transports.open_client(f"ws://127.0.0.1:{port}/rpc", connect_timeout_s=0.2), T)
    finally:
        for w in conns:
            w.close()
        server.close()
        await server.wait_closed()
