"""http:// : a real aiohttp server and client on 127.0.0.1 (spec/transports.md §3, ota.md §3 dispatch)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import transports
from rpc.auth import Acl, AclEntry, Authenticator, Credentials, http_digest_authorization, parse_digest_header
from rpc.errors import AuthError, HandlerError, RemoteError, TransportError
from rpc.frame import Frame, RawJSON
from rpc.node import Context, Node

DEV_ID = "esp32_0A1B2C"
T = 5.0
JSON_HEADERS = {"Content-Type": "application/json"}


def make_device() -> Node:
    node = Node(id=DEV_ID)
    node.notes = []  # type: ignore[attr-defined]
    node.users = []  # type: ignore[attr-defined]

    def echo(ctx: Context, params: Any) -> Any:
        node.users.append(ctx.user)  # type: ignore[attr-defined]
        return params

    def note(ctx: Context, params: Any) -> Any:
        node.notes.append((params, ctx.channel.type, ctx.channel.persistent, ctx.channel.broadcast))  # type: ignore[attr-defined]
        return None

    def fail(ctx: Context, params: Any) -> Any:
        code = params.get("code", 500) if isinstance(params, dict) else 500
        raise HandlerError(code, f"failed with {code}")

    async def slow(ctx: Context, params: Any) -> Any:
        await asyncio.sleep(0.01)
        return params["n"]

    node.add_handler("Sys.Echo", echo)
    node.add_handler("Sys.Note", note)
    node.add_handler("Sys.Fail", fail)
    node.add_handler("Sys.Slow", slow)
    node.add_handler("Sys.Id", lambda ctx, p: DEV_ID)
    node.add_handler("Sys.Raw", lambda ctx, p: RawJSON('{"a": 1}'))
    node.add_handler("Sys.Info", lambda ctx, p: {"info": ctx.channel.info(), "type": ctx.channel.type})
    return node


@pytest.fixture
async def device() -> AsyncIterator[Node]:
    node = make_device()
    yield node
    await node.close()


@pytest.fixture
async def listener(device: Node) -> AsyncIterator[Any]:
    lst = await transports.listen("http://127.0.0.1:0/rpc", device)
    yield lst
    await lst.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def base(lst: Any) -> str:
    return f"http://127.0.0.1:{lst.port}"


# -- through transports.connect ----------------------------------------------------------------------


async def test_call_error_and_unknown_method(listener: Any) -> None:
    async with await transports.connect(listener.url, timeout_s=T) as client:
        assert await client.call("Sys.Echo", {"a": "ü"}) == {"a": "ü"}
        info = await client.call("Sys.Info")
        assert info["type"] == "HTTP" and re.fullmatch(r"127\.0\.0\.1:\d+", info["info"])
        with pytest.raises(RemoteError) as ei:
            await client.call("Sys.Fail", {"code": 418})
        assert (ei.value.code, ei.value.message) == (418, "failed with 418")
        with pytest.raises(RemoteError) as ei:
            await client.call("Foo.Bar")
        assert (ei.value.code, ei.value.message) == (404, "No handler for Foo.Bar")


async def test_notification_via_client(listener: Any, device: Node) -> None:
    async with await transports.connect(listener.url, timeout_s=T) as client:
        client.notify("Sys.Note", {"k": 1})
        for _ in range(500):
            if device.notes:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
    assert device.notes == [({"k": 1}, "HTTP", False, False)]  # type: ignore[attr-defined]


async def test_concurrent_calls(listener: Any) -> None:
    async with await transports.connect(listener.url, timeout_s=T) as client:
        client.node.max_queue_length = 64  # the router's default of 25 pending calls would 429 the rest
        results = await asyncio.gather(*(client.call("Sys.Slow", {"n": i}) for i in range(50)))
    assert results == list(range(50))


async def test_server_going_away_and_back(device: Node) -> None:
    lst: Any = await transports.listen("http://127.0.0.1:0/rpc", device)
    port = lst.port
    client = await transports.connect(lst.url, timeout_s=T)
    try:
        assert await client.call("Sys.Echo", 1) == 1
        await lst.close()
        with pytest.raises(TransportError):
            await client.call("Sys.Echo", 2)
        lst = await transports.listen(f"http://127.0.0.1:{port}/rpc", device)
        assert await client.call("Sys.Echo", 3) == 3
    finally:
        await client.close()
        await lst.close()


# -- full-frame mode on the wire ---------------------------------------------------------------------


async def test_full_frame_reply_and_headers(listener: Any, session: aiohttp.ClientSession) -> None:
    body = b'{"src":"me","id":12,"method":"Sys.Echo","params":{"a":1}}\n'
    for path in ("/rpc", "/rpc/"):
        async with session.post(base(listener) + path, data=body, headers=JSON_HEADERS) as r:
            data = await r.read()
            assert r.status == 200
            expected = Frame(id=12, src=DEV_ID, dst="me", result={"a": 1}).encode("device") + b"\r\n"
            assert data == expected
            assert r.headers["Content-Type"] == "application/json"
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert r.headers["Access-Control-Allow-Headers"] == "*"
            assert r.headers["Content-Length"] == str(len(expected))
            assert r.headers["Connection"] == "close"


async def test_keep_alive_only_when_asked(listener: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)

    async def exchange(extra: str, fid: int) -> tuple[str, bytes]:
        body = b'{"id":%d,"method":"Sys.Echo","params":5}' % fid
        writer.write(f"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)).decode()
        n = int(re.search(r"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        return head, await reader.readexactly(n)

    try:
        head, body = await exchange("Connection: keep-alive\r\n", 1)
        assert "\r\nConnection: keep-alive\r\n" in head and Frame.parse(body).id == 1
        # The same connection serves the next request; without keep-alive it is closed after the reply.
        head, body = await exchange("", 2)
        assert "\r\nConnection: close\r\n" in head and Frame.parse(body).id == 2
        assert await asyncio.wait_for(reader.read(1), T) == b""
    finally:
        writer.close()


async def test_errors_are_inside_the_frame(listener: Any, session: aiohttp.ClientSession) -> None:
    async with session.post(base(listener) + "/rpc", data=b'{"id":3,"method":"Foo.Bar"}') as r:
        assert r.status == 200
        frame = Frame.parse(await r.read())
        assert frame.error is not None and (frame.error.code, frame.error.message) == (404, "No handler for Foo.Bar")


async def test_notification_gets_no_body(listener: Any, device: Node, session: aiohttp.ClientSession) -> None:
    async with session.post(base(listener) + "/rpc", data=b'{"method":"Sys.Note","params":[1]}') as r:
        assert r.status == 200 and await r.read() == b""
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert device.notes == [([1], "HTTP", False, False)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "method,body",
    [
        ("POST", b'{"id":1,"dst":"someone_else","method":"Sys.Echo"}'),  # errata: wrong dst -> 400
        ("POST", b"{bad json"),
        ("POST", b""),
        ("OPTIONS", b""),  # errata: OPTIONS /rpc is an empty frame
        ("GET", b""),
    ],
)
async def test_invalid_full_frame_is_400(
    listener: Any, session: aiohttp.ClientSession, method: str, body: bytes
) -> None:
    async with session.request(method, base(listener) + "/rpc", data=body) as r:
        assert r.status == 400
        assert await r.read() == b"Invalid request"


async def test_frame_size_limit(listener: Any, session: aiohttp.ClientSession) -> None:
    def frame_of(size: int) -> bytes:
        head, tail = b'{"id":1,"method":"Sys.Echo","params":"', b'"}'
        return head + b"x" * (size - len(head) - len(tail)) + tail

    big = frame_of(4096)
    assert len(big) == 4096
    async with session.post(base(listener) + "/rpc", data=big) as r:
        assert r.status == 200 and Frame.parse(await r.read(), max_size=0).result == json.loads(big)["params"]
    async with session.post(base(listener) + "/rpc", data=big + b"\n") as r:  # mos's newline does not count
        assert r.status == 200
    async with session.post(base(listener) + "/rpc", data=frame_of(4097)) as r:
        assert (r.status, await r.read()) == (400, b"Invalid request")
    async with session.post(base(listener) + "/rpc", data=frame_of(100_000)) as r:
        assert r.status == 400


async def test_frame_with_correct_dst_is_served(listener: Any, session: aiohttp.ClientSession) -> None:
    async with session.post(base(listener) + "/rpc", data=f'{{"id":1,"dst":"{DEV_ID}","method":"Sys.Id"}}') as r:
        assert r.status == 200 and Frame.parse(await r.read()).result == DEV_ID


# -- REST mode ---------------------------------------------------------------------------------------


async def test_rest_mode(listener: Any, session: aiohttp.ClientSession) -> None:
    url = base(listener) + "/rpc/"

    async def req(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, Any]:
        async with session.request(method, url + path, data=body) as r:
            return r.status, await r.read(), r.headers

    status, body, headers = await req("POST", "Sys.Echo", b'{"a": [1, 2]}')
    assert (status, body) == (200, b'{"a": [1, 2]}\r\n')  # the handler's text, device spacing
    assert headers["Content-Type"] == "application/json" and headers["Access-Control-Allow-Origin"] == "*"
    status, body, _ = await req("GET", "Sys.Id")
    assert (status, body) == (200, b"esp32_0A1B2C\r\n")  # errata: a string result is bare
    status, body, _ = await req("GET", "Sys.Raw")
    assert (status, body) == (200, b'{"a": 1}\r\n')
    status, body, _ = await req("GET", "Sys.Echo")
    assert (status, body) == (200, b"null\r\n")
    status, body, _ = await req("POST", "Foo.Bar", b"{}")
    assert status == 404 and json.loads(body) == {"code": 404, "message": "No handler for Foo.Bar"}
    status, body, _ = await req("POST", "Sys.Fail", b'{"code": 403}')
    assert status == 403 and json.loads(body) == {"code": 403, "message": "failed with 403"}
    status, body, _ = await req("POST", "Sys.Fail", b'{"code": 418}')
    assert status == 500 and json.loads(body) == {"code": 418, "message": "failed with 418"}
    status, body, headers = await req("OPTIONS", "Sys.Echo")
    assert (status, body) == (200, b"")
    assert headers["Access-Control-Allow-Origin"] == "*" and headers["Access-Control-Allow-Headers"] == "*"


async def test_rest_get_query_args_are_raw(listener: Any, session: aiohttp.ClientSession) -> None:
    url = base(listener) + "/rpc/Sys.Echo"
    async with session.get(url + '?a=1&b="x%20y"&c=[true]') as r:
        assert r.status == 200 and json.loads(await r.read()) == {"a": 1, "b": "x y", "c": [True]}
    async with session.get(url + "?key=device.id") as r:  # unquoted string: not JSON, as on a device
        assert r.status == 500 and json.loads(await r.read())["code"] == 400


async def test_http_handlers_dispatch(listener: Any, device: Node, session: aiohttp.ClientSession) -> None:
    async def update(request: web.Request) -> web.StreamResponse:
        sizes = {}
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                sizes[part.name] = len(await part.read())  # type: ignore[union-attr]
        return web.Response(text=f"update {request.method} {request.path} {json.dumps(sizes)}\r\n")

    async def commit(request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ok\r\n", content_type="text/html")

    device.http_handlers["/update"] = update
    device.http_handlers["/update/commit"] = commit
    form = aiohttp.FormData()
    form.add_field("file", b"\x00" * 100_000, filename="fw.zip", content_type="application/zip")
    form.add_field("commit_timeout", "60")
    async with session.post(base(listener) + "/update", data=form) as r:
        assert r.status == 200
        assert await r.text() == 'update POST /update {"file": 100000, "commit_timeout": 2}\r\n'
    async with session.get(base(listener) + "/update/commit") as r:  # the longest prefix wins
        assert (r.status, await r.text()) == (200, "Ok\r\n")
    async with session.get(base(listener) + "/update/revert") as r:
        assert (await r.text()).startswith("update GET /update/revert")
    async with session.get(base(listener) + "/nothing") as r:
        assert r.status == 404


async def test_ws_and_http_share_one_port(device: Node) -> None:
    http: Any = await transports.listen("http://127.0.0.1:0/rpc", device)
    ws: Any = await transports.listen(f"ws://127.0.0.1:{http.port}/rpc", device)
    try:
        assert ws.server is http.server
        async with await transports.connect(ws.url, timeout_s=T) as c:
            assert await c.call("Sys.Echo", "w") == "w"
        async with await transports.connect(http.url, timeout_s=T) as c:
            assert await c.call("Sys.Echo", "h") == "h"
        with pytest.raises(TransportError, match="already attached"):
            await transports.listen(f"http://127.0.0.1:{http.port}/rpc", device)
        await http.close()
        async with await transports.connect(ws.url, timeout_s=T) as c:  # still served
            assert await c.call("Sys.Echo", "w2") == "w2"
    finally:
        await ws.close()


# -- digest auth -------------------------------------------------------------------------------------


def secured(device: Node, *, algorithm: str = "MD5") -> None:
    device.auth = Authenticator(
        users={"admin": "secret"},
        algorithm=algorithm,
        acl=Acl([AclEntry("Sys.Id", "*"), AclEntry("*", "admin")]),
    )


async def test_unauthenticated_gets_401_challenge(listener: Any, device: Node, session: aiohttp.ClientSession) -> None:
    secured(device)
    for path, body in (("/rpc", b'{"id":1,"method":"Sys.Echo"}'), ("/rpc/Sys.Echo", b"")):
        before = int(time.time())
        async with session.post(base(listener) + path, data=body) as r:
            assert r.status == 401 and await r.read() == b""
            assert r.headers["Content-Type"] == "application/json"
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert r.headers["Connection"] == "close"
            m = re.fullmatch(
                r'Digest qop="auth", realm="RPC", nonce="([0-9a-f]+)", algorithm=MD5', r.headers["WWW-Authenticate"]
            )
            assert m, r.headers["WWW-Authenticate"]
            # the unix time; a second challenge within the same second gets the next number (unique
            # nonces let a replayed digest answer be refused)
            assert before <= int(m.group(1), 16) <= int(time.time()) + 1
    async with session.get(base(listener) + "/rpc/Sys.Id") as r:  # the ACL lets anyone call this one
        assert (r.status, await r.read()) == (200, b"esp32_0A1B2C\r\n")


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
async def test_digest_auth_success(listener: Any, device: Node, algorithm: str) -> None:
    secured(device, algorithm=algorithm)
    async with await transports.connect(listener.url, timeout_s=T, creds=Credentials("admin", "secret")) as c:
        assert await c.call("Sys.Echo", {"x": 1}) == {"x": 1}
    assert device.users == ["admin"]  # type: ignore[attr-defined]


async def test_digest_auth_failure(listener: Any, device: Node) -> None:
    secured(device)
    async with await transports.connect(listener.url, timeout_s=T, creds=Credentials("admin", "wrong")) as c:
        with pytest.raises(AuthError, match=r"^authentication failed$"):
            await c.call("Sys.Echo", 1)
    async with await transports.connect(listener.url, timeout_s=T) as c:
        with pytest.raises(AuthError, match="authentication required"):
            await c.call("Sys.Echo", 1)
    assert device.users == []  # type: ignore[attr-defined]


async def test_digest_rest_with_curl_style_header(listener: Any, device: Node, session: aiohttp.ClientSession) -> None:
    secured(device)
    url = base(listener) + "/rpc/Sys.Echo"
    async with session.post(url, data=b"[7]") as r:
        challenge = parse_digest_header(r.headers["WWW-Authenticate"])
    assert challenge is not None
    authz = http_digest_authorization(challenge, Credentials("admin", "secret"), method="POST", uri="/rpc/Sys.Echo")
    async with session.post(url, data=b"[7]", headers={"Authorization": authz}) as r:
        assert (r.status, await r.read()) == (200, b"[7]\r\n")
    # The same header does not authenticate another method (HA2 covers method and uri).
    async with session.get(url, headers={"Authorization": authz}) as r:
        assert r.status == 401
    stale = authz.replace(f'nonce="{challenge["nonce"]}"', 'nonce="1"')
    async with session.post(url, data=b"[7]", headers={"Authorization": stale}) as r:
        assert r.status == 401
    assert device.users == ["admin"]  # type: ignore[attr-defined]


async def test_digest_on_ws_upgrade_names_the_user(device: Node) -> None:
    secured(device)
    ws: Any = await transports.listen("ws://127.0.0.1:0/rpc", device)
    try:
        nonce = f"{int(time.time()):x}"
        authz = http_digest_authorization(
            {"realm": "RPC", "nonce": nonce}, Credentials("admin", "secret"), method="GET", uri="/rpc"
        )
        async with aiohttp.ClientSession() as s, s.ws_connect(ws.url, headers={"Authorization": authz}) as conn:
            await conn.send_str('{"id":1,"method":"Sys.Echo","params":1}')
            assert json.loads((await conn.receive(timeout=T)).data)["result"] == 1
        async with aiohttp.ClientSession() as s, s.ws_connect(ws.url) as conn:
            await conn.send_str('{"id":2,"method":"Sys.Echo","params":1}')
            assert json.loads((await conn.receive(timeout=T)).data)["error"]["code"] == 401
    finally:
        await ws.close()
    assert device.users == ["admin"]  # type: ignore[attr-defined]


# -- what the mos-compatible client sends, captured by a test server --------------------------------


class Capture:
    """A bare aiohttp server answering /rpc from a script of (status, headers, body)."""

    def __init__(self, answers: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handler(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, request.path_qs, dict(request.headers), body))
        status, headers, data = self.answers.pop(0)
        if b"%ID%" in data:
            data = data.replace(b"%ID%", str(json.loads(body)["id"]).encode())
        return web.Response(status=status, headers=headers, body=data)

    async def __aenter__(self) -> Capture:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_mos_client_exact_request() -> None:
    async with (
        Capture([(200, {}, b'{"id":%ID%,"src":"dev","result":true}\r\n')]) as srv,
        await transports.connect(f"http://127.0.0.1:{srv.port}/rpc?codec=json", timeout_s=T) as c,
    ):
        assert await c.call("Sys.GetInfo") is True
    method, path, headers, body = srv.requests[0]
    assert (method, path) == ("POST", "/rpc")  # the URL minus its query
    assert headers["Content-Type"] == "application/json"
    assert re.fullmatch(rb'\{"src":"mos","id":\d+,"method":"Sys\.GetInfo"\}\n', body), body


async def test_mos_client_digest_retry_header() -> None:
    challenge = 'Digest qop="auth", realm="RPC", nonce="5f5e1000", algorithm=MD5'
    answers = [(401, {"WWW-Authenticate": challenge}, b""), (200, {}, b'{"id":%ID%,"result":1}')]
    async with (
        Capture(answers) as srv,
        await transports.connect(f"http://127.0.0.1:{srv.port}/rpc", timeout_s=T, creds=Credentials("u", "p")) as c,
    ):
        assert await c.call("Sys.GetInfo") == 1
    (_, _, h1, b1), (_, _, h2, b2) = srv.requests
    assert "Authorization" not in h1 and b1 == b2

    def md5(s: str) -> str:
        return hashlib.md5(s.encode()).hexdigest()

    response = md5(f"{md5('u:RPC:p')}:5f5e1000:00000001:12345:auth:{md5('POST:/rpc')}")
    assert h2["Authorization"] == (
        'Digest username="u", realm="RPC", uri="/rpc", algorithm=MD5, nonce="5f5e1000", nc=00000001, '
        f'cnonce="12345", qop=auth, response="{response}"'
    )


async def test_mos_client_second_401_and_server_errors() -> None:
    challenge = 'Digest qop="auth", realm="RPC", nonce="1", algorithm=MD5'
    answers = [(401, {"WWW-Authenticate": challenge}, b""), (401, {"WWW-Authenticate": challenge}, b"")]
    async with (
        Capture(answers) as srv,
        await transports.connect(f"http://127.0.0.1:{srv.port}/rpc", timeout_s=T, creds=Credentials("u", "p")) as c,
    ):
        with pytest.raises(AuthError, match=r"^authentication failed$"):
            await c.call("Sys.GetInfo")
    assert len(srv.requests) == 2
    async with (
        Capture([(500, {}, b"boom"), (200, {}, b"not json")]) as srv,
        await transports.connect(f"http://127.0.0.1:{srv.port}/rpc", timeout_s=T) as c,
    ):
        with pytest.raises(TransportError, match="server returned an error: HTTP 500 boom"):
            await c.call("Sys.GetInfo")
        with pytest.raises(TransportError, match="invalid reply"):
            await c.call("Sys.GetInfo")


async def test_msgpack_codec_over_http(device: Node) -> None:
    lst: Any = await transports.listen("http://127.0.0.1:0/rpc?codec=msgpack", device)
    try:
        async with await transports.connect(f"http://127.0.0.1:{lst.port}/rpc?codec=msgpack", timeout_s=T) as c:
            assert await c.call("Sys.Echo", {"b": b"\x00\xff"}) == {"b": b"\x00\xff"}
    finally:
        await lst.close()


async def test_ws_and_http_started_together_share_one_port(device: Node) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    # a device starting both listeners at once must get one server, not a bind error for the second
    res = await asyncio.gather(
        transports.listen(f"ws://127.0.0.1:{port}/rpc", device),
        transports.listen(f"http://127.0.0.1:{port}/rpc", device),
        return_exceptions=True,
    )
    try:
        assert not [r for r in res if isinstance(r, BaseException)]
        assert res[0].server is res[1].server  # type: ignore[union-attr]
    finally:
        for r in res:
            if not isinstance(r, BaseException):
                await r.close()


async def test_https_verifies_the_device_certificate(device: Node, tmp_path: Any) -> None:
    from tests.transports.test_ws import _self_signed

    cert, key = _self_signed(tmp_path)
    lst: Any = await transports.listen(f"https://127.0.0.1:0/rpc?cert={cert}&key={key}", device)
    url = f"https://127.0.0.1:{lst.port}/rpc"
    try:
        # No CA: the system CAs do not know a self-signed certificate; the error says what to do.
        async with await transports.connect(url, timeout_s=10) as c:
            with pytest.raises(TransportError, match=r"not trusted: pass \?ca=FILE .* or \?insecure=1"):
                await c.call("Sys.Echo", 1)
        async with await transports.connect(f"{url}?ca={cert}", timeout_s=10) as c:
            assert await c.call("Sys.Echo", 2) == 2
        async with await transports.connect(f"{url}?insecure=1", timeout_s=10) as c:
            assert await c.call("Sys.Echo", 3) == 3
    finally:
        await lst.close()
