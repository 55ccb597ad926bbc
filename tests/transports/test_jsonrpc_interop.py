"""JSON-RPC 2.0 interop on HTTP, WebSocket and TCP (docs/protocol/jsonrpc.md).

Both directions use an independent implementation from PyPI on the other end:

* ``jsonrpcclient`` (requests built and responses parsed by it) against our device;
* our client (``?dialect=jsonrpc``, and the ``mgrpc call`` CLI) against a plain ``jsonrpcserver``
  server written here on aiohttp (HTTP, WebSocket) and asyncio (newline-delimited TCP);
* the bridge between the dialects, both ways.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonrpcclient
import pytest
from aiohttp import web
from jsonrpcserver import Error, Result, Success, async_dispatch

import transports
from mgrpc.wiring import run_bridge
from rpc.errors import HandlerError, RemoteError
from rpc.node import Context, Node
from tests.device_helpers import start_device
from tests.mosquitto import mosquitto_broker  # noqa: F401  (fixture)

T = 10.0
REPO = Path(__file__).resolve().parents[2]


# -- our device ---------------------------------------------------------------------------------------


def make_node() -> Node:
    node = Node(id="jr-dev")
    node.notes = asyncio.Queue()  # type: ignore[attr-defined]

    def fail(ctx: Context, p: Any) -> Any:
        raise HandlerError(418, "I'm a teapot")

    def note(ctx: Context, p: Any) -> None:
        node.notes.put_nowait((p, ctx.channel.type))  # type: ignore[attr-defined]

    node.add_handler("Sys.Echo", lambda ctx, p: p)
    node.add_handler("Sys.Fail", fail)
    node.add_handler("Sys.Note", note)
    node.add_handler("Math.Add", lambda ctx, p: p["a"] + p["b"], params=("a", "b"))
    return node


@pytest.fixture
async def served() -> AsyncIterator[tuple[Node, dict[str, str]]]:
    node = make_node()
    listeners = [
        await transports.listen("http://127.0.0.1:0/rpc", node),
        await transports.listen("ws://127.0.0.1:0/rpc", node),
        await transports.listen("tcp://127.0.0.1:0", node),
    ]
    urls = {"http": listeners[0].url, "ws": listeners[1].url, "tcp": listeners[2].url}
    try:
        yield node, urls
    finally:
        for lst in listeners:
            await lst.close()
        await node.close()


def host_port(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


class Line:
    """jsonrpcclient's messages over a newline-delimited TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, text: str) -> None:
        self.writer.write(text.encode() + b"\n")
        await self.writer.drain()

    async def recv(self) -> str:
        while True:  # the device precedes each message with a newline (rpc-uart framing)
            line = await asyncio.wait_for(self.reader.readline(), T)
            if not line:
                raise ConnectionError("closed")
            if line.strip():
                return line.decode()


# -- jsonrpcclient -> our device -------------------------------------------------------------------------


async def test_jsonrpcclient_over_http(served: tuple[Node, dict[str, str]]) -> None:
    node, urls = served
    base = urls["http"].rsplit("/rpc", 1)[0]
    async with aiohttp.ClientSession() as s:
        for path in ("/jsonrpc", "/rpc"):  # the dedicated endpoint, and the mgRPC one detecting the dialect
            async with s.post(base + path, json=jsonrpcclient.request("Sys.Echo", params={"x": [1, "é"]})) as r:
                assert r.status == 200 and r.content_type == "application/json"
                ok = jsonrpcclient.parse(await r.json())
            assert isinstance(ok, jsonrpcclient.Ok) and ok.result == {"x": [1, "é"]}
        async with s.post(base + "/jsonrpc", json=jsonrpcclient.request("Math.Add", params=(2, 3))) as r:
            assert jsonrpcclient.parse(await r.json()).result == 5  # type: ignore[union-attr]
        async with s.post(base + "/jsonrpc", json=jsonrpcclient.request("Sys.Fail")) as r:
            e = jsonrpcclient.parse(await r.json())
        assert isinstance(e, jsonrpcclient.Error) and (e.code, e.message, e.data) == (-32000, "I'm a teapot", {"mgrpc_code": 418})
        # a notification: run, nothing owed
        async with s.post(base + "/jsonrpc", json=jsonrpcclient.notification("Sys.Note", params=[1])) as r:
            assert r.status == 204 and await r.read() == b""
        assert await asyncio.wait_for(node.notes.get(), T) == ([1], "HTTP")  # type: ignore[attr-defined]
        # a batch, with a notification, an unknown method and invalid params in it
        batch = [
            jsonrpcclient.request("Sys.Echo", params=[1], id=1),
            jsonrpcclient.notification("Sys.Note", params=[2]),
            jsonrpcclient.request("No.Such", id=2),
            jsonrpcclient.request("Math.Add", params={"a": 1}, id=3),
        ]
        for path in ("/jsonrpc", "/rpc"):
            async with s.post(base + path, json=batch) as r:
                answers = {a.id: a for a in jsonrpcclient.parse(await r.json())}
            assert answers[1] == jsonrpcclient.Ok([1], 1)
            assert isinstance(answers[2], jsonrpcclient.Error) and answers[2].code == -32601
            assert isinstance(answers[3], jsonrpcclient.Error) and answers[3].code == -32602
            assert len(answers) == 3
        # not JSON: a -32700 object (with a null id), not the mgRPC text "400 Invalid request"
        for path in ("/jsonrpc", "/rpc"):
            body = b'{"jsonrpc":"2.0","method":"Sys.Echo",' if path == "/rpc" else b"{nope"
            async with s.post(base + path, data=body) as r:
                assert r.status == 200
                e = jsonrpcclient.parse(await r.json())
            assert isinstance(e, jsonrpcclient.Error) and e.code == -32700 and e.id is None
        async with s.get(base + "/jsonrpc") as r:
            assert r.status == 405
        # mgRPC on /rpc is untouched
        async with s.post(base + "/rpc", data=b'{"id":1,"src":"x","method":"Sys.Echo","params":7}') as r:
            assert json.loads(await r.read()) == {"id": 1, "src": "jr-dev", "dst": "x", "result": 7}


async def test_jsonrpcclient_over_websocket(served: tuple[Node, dict[str, str]]) -> None:
    _, urls = served
    async with aiohttp.ClientSession() as s, s.ws_connect(urls["ws"]) as ws:
        await ws.send_str(jsonrpcclient.request_json("Sys.Echo", params=[True], id=7))
        assert jsonrpcclient.parse_json((await ws.receive(timeout=T)).data) == jsonrpcclient.Ok([True], 7)
        await ws.send_str(json.dumps([jsonrpcclient.request("Math.Add", params=[1, 1], id=1)]))
        assert list(jsonrpcclient.parse_json((await ws.receive(timeout=T)).data)) == [jsonrpcclient.Ok(2, 1)]
        await ws.send_str("[]")
        e = jsonrpcclient.parse_json((await ws.receive(timeout=T)).data)
        assert isinstance(e, jsonrpcclient.Error) and e.code == -32600
    # the upgrade is served at /jsonrpc too
    async with aiohttp.ClientSession() as s, s.ws_connect(urls["ws"].replace("/rpc", "/jsonrpc")) as ws:
        await ws.send_str(jsonrpcclient.request_json("Sys.Echo", params=[2], id=8))
        assert jsonrpcclient.parse_json((await ws.receive(timeout=T)).data) == jsonrpcclient.Ok([2], 8)


async def test_jsonrpcclient_over_tcp(served: tuple[Node, dict[str, str]]) -> None:
    node, urls = served
    conn = Line(*await asyncio.open_connection(*host_port(urls["tcp"])))
    try:
        await conn.send(jsonrpcclient.request_json("Sys.Echo", params={"k": "v"}, id="a"))
        assert jsonrpcclient.parse_json(await conn.recv()) == jsonrpcclient.Ok({"k": "v"}, "a")
        await conn.send(json.dumps([jsonrpcclient.request("Sys.Echo", params=[1], id=1), jsonrpcclient.request("Sys.Fail", id=2)]))
        answers = {a.id: a for a in jsonrpcclient.parse_json(await conn.recv())}
        assert answers[1] == jsonrpcclient.Ok([1], 1) and answers[2].code == -32000  # type: ignore[union-attr]
        await conn.send(jsonrpcclient.notification_json("Sys.Note", params=[3]))
        assert await asyncio.wait_for(node.notes.get(), T) == ([3], "TCP_in")  # type: ignore[attr-defined]
        await conn.send('{"jsonrpc": "2.0", "method": "Sys.Echo", "id": 4')  # cut short
        e = jsonrpcclient.parse_json(await conn.recv())
        assert isinstance(e, jsonrpcclient.Error) and e.code == -32700 and e.id is None
        # the connection still works after the parse error (no CRC mode learned from it)
        await conn.send(jsonrpcclient.request_json("Sys.Echo", params=[5], id=5))
        assert jsonrpcclient.parse_json(await conn.recv()) == jsonrpcclient.Ok([5], 5)
    finally:
        conn.writer.close()


async def test_jsonrpcclient_against_the_virtual_device(tmp_path: Path) -> None:
    dev = await start_device(tmp_path, "jr-virtual", ["http://127.0.0.1:0/rpc", "tcp://127.0.0.1:0"])
    try:
        http_url = next(u for u in dev.urls if u.startswith("http"))
        tcp_url = next(u for u in dev.urls if u.startswith("tcp"))
        async with aiohttp.ClientSession() as s:
            batch = [jsonrpcclient.request("Sys.GetInfo", id=1), jsonrpcclient.request("Config.Get", params={"key": "device.id"}, id=2)]
            async with s.post(http_url.rsplit("/rpc", 1)[0] + "/jsonrpc", json=batch) as r:
                answers = {a.id: a for a in jsonrpcclient.parse(await r.json())}
        assert answers[1].result["id"] == "jr-virtual" and answers[2].result == "jr-virtual"  # type: ignore[union-attr]
        conn = Line(*await asyncio.open_connection(*host_port(tcp_url)))
        try:
            await conn.send(jsonrpcclient.request_json("FS.Get", params={"filename": "no-such-file"}, id=1))
            e = jsonrpcclient.parse_json(await conn.recv())
            assert isinstance(e, jsonrpcclient.Error) and e.code == -32000 and isinstance(e.data["mgrpc_code"], int)
        finally:
            conn.writer.close()
    finally:
        await dev.stop()


# -- our client -> a plain jsonrpcserver server ----------------------------------------------------------


class PlainServer:
    """A JSON-RPC 2.0 server that is nothing but jsonrpcserver, on HTTP, WebSocket and TCP."""

    def __init__(self) -> None:
        self.notes: asyncio.Queue[Any] = asyncio.Queue()
        self.urls: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._tcp: asyncio.Server | None = None

        async def add(a: int, b: int) -> Result:
            return Success(a + b)

        async def echo(*args: Any, **kwargs: Any) -> Result:
            return Success(kwargs if kwargs else list(args))

        async def fail() -> Result:
            return Error(7, "custom failure", {"why": "test"})

        async def note(*args: Any) -> Result:
            self.notes.put_nowait(list(args))
            return Success(None)

        self.methods = {"add": add, "echo": echo, "fail": fail, "note": note}

    async def dispatch(self, text: str) -> str:
        return await async_dispatch(text, methods=self.methods)

    async def start(self) -> PlainServer:
        async def http(request: web.Request) -> web.StreamResponse:
            out = await self.dispatch(await request.text())
            return web.Response(text=out, content_type="application/json") if out else web.Response(status=204)

        async def ws(request: web.Request) -> web.StreamResponse:
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            async for msg in sock:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    out = await self.dispatch(msg.data)
                    if out:
                        await sock.send_str(out)
            return sock

        app = web.Application()
        app.router.add_post("/", http)
        app.router.add_get("/ws", ws)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.urls["http"] = f"http://127.0.0.1:{port}/"
        self.urls["ws"] = f"ws://127.0.0.1:{port}/ws"

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while line := await reader.readline():
                    if line.strip():
                        out = await self.dispatch(line.decode())
                        if out:
                            writer.write(out.encode() + b"\n")
                            await writer.drain()
            finally:
                writer.close()

        self._tcp = await asyncio.start_server(tcp, "127.0.0.1", 0)
        self.urls["tcp"] = f"tcp://127.0.0.1:{self._tcp.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def plain() -> AsyncIterator[PlainServer]:
    server = await PlainServer().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.mark.parametrize("scheme", ["http", "ws", "tcp"])
async def test_our_client_against_plain_jsonrpcserver(plain: PlainServer, scheme: str) -> None:
    async with await transports.connect(plain.urls[scheme] + "?dialect=jsonrpc", timeout_s=T) as client:
        assert await client.call("add", {"a": 2, "b": 3}) == 5
        assert await client.call("add", [4, 5]) == 9
        assert await client.call("echo", ["é", None]) == ["é", None]
        assert await client.call("echo") == []
        with pytest.raises(RemoteError) as ei:
            await client.call("fail")
        assert (ei.value.code, ei.value.message) == (7, "custom failure")
        with pytest.raises(RemoteError) as ei:
            await client.call("missing")
        assert ei.value.code == -32601
        with pytest.raises(RemoteError) as ei:
            await client.call("add", {"a": 1})
        assert ei.value.code == -32602
        client.notify("note", [scheme])
        assert await asyncio.wait_for(plain.notes.get(), T) == [scheme]
        # concurrent calls are matched to their answers
        results = await asyncio.gather(*(client.call("add", [i, i]) for i in range(10)))
        assert results == [2 * i for i in range(10)]


async def test_mgrpc_call_cli_against_plain_jsonrpcserver(plain: PlainServer) -> None:
    for scheme in ("http", "tcp"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mgrpc", "--port", plain.urls[scheme] + "?dialect=jsonrpc", "call", "add", '{"a":20,"b":22}',
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, errout = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, errout
        assert out.decode().strip() == "42"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mgrpc", "--port", plain.urls[scheme] + "?dialect=jsonrpc", "call", "fail",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, errout = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1 and b"custom failure" in errout


# -- the bridge between dialects -------------------------------------------------------------------------


async def test_bridge_mgrpc_clients_to_a_plain_jsonrpc_server(plain: PlainServer) -> None:
    bridge, listeners = await run_bridge(plain.urls["tcp"] + "?dialect=jsonrpc", ["ws://127.0.0.1:0/rpc"], device_id="plain")
    try:
        async with (
            await transports.connect(listeners[0].url, timeout_s=T) as one,
            await transports.connect(listeners[0].url, timeout_s=T, src="other") as two,
        ):
            assert await one.call("add", {"a": 1, "b": 2}) == 3
            # two mgRPC requesters, same ids on their side, answered each their own
            frames = await asyncio.gather(
                one.call_frame("echo", [1]), two.call_frame("echo", [2]), one.call_frame("fail"),
            )  # fmt: skip
            assert frames[0].result == [1] and frames[0].dst == "mos"
            assert frames[1].result == [2] and frames[1].dst == "other"
            assert frames[2].error is not None and frames[2].error.code == 7
    finally:
        for lst in listeners:
            await lst.close()
        await bridge.close()


async def test_bridge_jsonrpc_clients_to_an_mgrpc_device() -> None:
    node = make_node()
    dev_lst = await transports.listen("loop://jr-bridge-dev", node)
    bridge, listeners = await run_bridge(
        "loop://jr-bridge-dev", ["http://127.0.0.1:0/rpc", "tcp://127.0.0.1:0"], device_id="jr-dev"
    )
    try:
        assert bridge.id == "jr-dev"
        base = listeners[0].url.rsplit("/rpc", 1)[0]
        batch = [
            jsonrpcclient.request("Sys.Echo", params={"v": 1}, id=1),
            jsonrpcclient.request("Sys.Fail", id=2),
            jsonrpcclient.request("No.Such", id=3),
            jsonrpcclient.notification("Sys.Note", params=["via bridge"]),
        ]
        async with aiohttp.ClientSession() as s, s.post(base + "/jsonrpc", json=batch) as r:
            answers = {a.id: a for a in jsonrpcclient.parse(await r.json())}
        assert answers[1] == jsonrpcclient.Ok({"v": 1}, 1)
        assert isinstance(answers[2], jsonrpcclient.Error)
        assert (answers[2].code, answers[2].message, answers[2].data) == (-32000, "I'm a teapot", {"mgrpc_code": 418})
        assert isinstance(answers[3], jsonrpcclient.Error) and answers[3].code == -32601
        assert len(answers) == 3
        assert (await asyncio.wait_for(node.notes.get(), T))[0] == ["via bridge"]  # type: ignore[attr-defined]
        # and the dialect on a stream downstream, with our own client speaking it
        async with await transports.connect(listeners[1].url + "?dialect=jsonrpc", timeout_s=T) as client:
            assert await client.call("Math.Add", {"a": 1, "b": 1}) == 2
            with pytest.raises(RemoteError) as ei:
                await client.call("Sys.Fail")
            assert ei.value.code == 418
        # mgRPC still passes through the bridge as it did
        async with await transports.connect(listeners[1].url, timeout_s=T) as client:
            assert await client.call("Sys.Echo", [1]) == [1]
    finally:
        for lst in listeners:
            await lst.close()
        await bridge.close()
        await dev_lst.close()
        await node.close()


# -- the mgRPC envelope: MQTT and digest auth ------------------------------------------------------------


async def test_jsonrpc_over_mqtt(mosquitto_broker: Any) -> None:  # noqa: F811
    broker = mosquitto_broker()
    node = make_node()
    lst = await transports.listen(broker.url(), node)
    try:
        async with await transports.connect(broker.url("jr-dev", dialect="jsonrpc"), timeout_s=T) as client:
            assert await client.call("Math.Add", [20, 22]) == 42
            with pytest.raises(RemoteError) as ei:
                await client.call("Sys.Fail")
            assert ei.value.code == 418
            with pytest.raises(RemoteError) as ei:
                await client.call("No.Such")
            assert ei.value.code == -32601
            client.notify("Sys.Note", ["mqtt"])
            assert await asyncio.wait_for(node.notes.get(), T) == (["mqtt"], "MQTT")  # type: ignore[attr-defined]
    finally:
        await lst.close()
        await node.close()


async def test_jsonrpc_digest_auth_over_tcp(tmp_path: Path) -> None:
    from rpc.auth import Acl, Authenticator, htdigest_line, parse_creds

    pw = tmp_path / "rpc_auth.txt"
    pw.write_text(htdigest_line("admin", "RPC", "secret") + "\n")
    node = make_node()
    node.auth = Authenticator(password_file=pw, acl=Acl.parse('[{"method":"Sys.*","acl":"+admin"},{"method":"*","acl":"*"}]'))
    lst = await transports.listen("tcp://127.0.0.1:0", node)
    try:
        url = lst.url + "?dialect=jsonrpc"
        async with await transports.connect(url, timeout_s=T) as anonymous:
            assert await anonymous.call("Math.Add", [1, 2]) == 3
            with pytest.raises(RemoteError) as ei:
                await anonymous.call("Sys.Echo", [1])
            assert ei.value.code == 401
        # the client answers the challenge in a retry that carries mgRPC's auth member
        async with await transports.connect(url, timeout_s=T, creds=parse_creds("admin:secret")) as client:
            assert await client.call("Sys.Echo", [1]) == [1]
    finally:
        await lst.close()
        await node.close()
