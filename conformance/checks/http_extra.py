"""More HTTP rules (docs/protocol/transports.md §3.2, §3.5): string results in REST mode and
``OPTIONS /rpc``."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

from conformance.checks.web import HTTP, _base, _http
from conformance.model import CheckSkipped, check, expect
from conformance.probe import Probe
from conformance.rawjson import show
from conformance.session import Session

__all__: list[str] = []


@check(
    "http.rest_string_result",
    section="transports.md §3.2, §3.5",
    title="REST string result sent without its quotes",
    only=HTTP,
    needs=["Config.Get"],
)
async def _http_rest_string_result(s: Session) -> str | None:
    dev = await s.device_id()
    status, _, body = await _http(s, "POST", _base(s) + "/Config.Get", b'{"key":"device.id"}')
    expect(
        status == 200 and body == dev.encode() + b"\r\n",
        "a string result is the bare text in REST mode",
        seen=f"{status} {show(body)}",
        expected=f"200 {dev}\\r\\n",
    )
    return None


@check(
    "http.options_rpc", section="transports.md §3.5", title="OPTIONS /rpc (no method) is an empty frame: 400", only=HTTP
)
async def _http_options_rpc(s: Session) -> str | None:
    status, _, body = await _http(s, "OPTIONS", _base(s))
    expect(status == 400, "OPTIONS /rpc is handled as an empty frame", seen=f"{status} {show(body)}", expected="400")
    return None


@check(
    "http.rest_get_query",
    section="transports.md §3.2; real-device.md RD-A12",
    title="GET /rpc/<Method>?k=v: the query is the arguments",
    only=HTTP,
    needs=["Config.Get"],
)
async def _http_rest_get_query(s: Session) -> str | None:
    dev = await s.device_id()
    status, _, body = await _http(s, "GET", _base(s) + "/Config.Get?key=%22device.id%22")
    if status == 401:
        # Mongoose OS refuses HTTP digest on a request with a query string, however it is signed.
        raise CheckSkipped("the device requires authentication here, and it refuses digest on a URL with a query")
    expect(
        status == 200 and body == dev.encode() + b"\r\n",
        'GET with ?key="device.id" must call Config.Get {"key":"device.id"}',
        seen=f"{status} {show(body)}",
        expected=f"200 {dev}\\r\\n",
    )
    return None


async def _raw_post(s: Session, keep_alive: bool) -> tuple[bytes, bool]:
    """One raw POST /rpc; the response head and whether the connection then stays open."""
    parts = urlsplit(_base(s))
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    ctx = None
    if parts.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), s.options.timeout_s)
    try:
        body = b'{"src":"mos","id":%d,"method":"RPC.Ping"}\n' % Probe.new_id()
        head = (
            f"POST {parts.path or '/rpc'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + ("Connection: keep-alive\r\n" if keep_alive else "") + "\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        resp = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), s.options.timeout_s)
        n = 0
        for line in resp.decode("latin-1").split("\r\n"):
            if line.lower().startswith("content-length:"):
                n = int(line.split(":", 1)[1])
        await asyncio.wait_for(reader.readexactly(n), s.options.timeout_s)
        try:
            more = await asyncio.wait_for(reader.read(1), min(1.0, s.options.timeout_s))
            open_after = more != b""
        except TimeoutError:
            open_after = True
        return resp, open_after
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@check(
    "http.keep_alive",
    section="transports.md §3.1; real-device.md RD-H1, RD-H2",
    title="Connection: keep-alive only when asked; otherwise the connection is closed",
    only=HTTP,
)
async def _http_keep_alive(s: Session) -> str | None:
    if s.options.creds is not None:
        raise CheckSkipped("raw requests carry no credentials")
    head, still_open = await _raw_post(s, keep_alive=True)
    expect(
        b"connection: keep-alive" in head.lower() and still_open,
        "a request with Connection: keep-alive keeps its connection",
        seen=f"{show(head)} (connection {'open' if still_open else 'closed'})",
        expected="Connection: keep-alive, connection left open",
    )
    head, still_open = await _raw_post(s, keep_alive=False)
    expect(
        b"connection: close" in head.lower() and not still_open,
        "without Connection: keep-alive the device answers Connection: close and closes",
        seen=f"{show(head)} (connection {'open' if still_open else 'closed'})",
        expected="Connection: close, then the connection closed",
    )
    return None


@check(
    "ota.http_commit",
    section="ota.md §3",
    title="GET /update/commit on committed firmware: 400 Error",
    only=("http", "https", "ws", "wss"),
    needs=["OTA.GetBootState"],
)
async def _ota_http_commit(s: Session) -> str | None:
    resp = await s.request("OTA.GetBootState")
    if not (isinstance(resp.result, dict) and resp.result.get("is_committed") is True):
        raise CheckSkipped("the running firmware is not committed")
    parts = urlsplit(_base(s))
    scheme = "https" if parts.scheme in ("https", "wss") else "http"
    url = f"{scheme}://{parts.netloc}/update/commit"
    status, _, body = await _http(s, "GET", url)
    if status == 404:
        raise CheckSkipped("the device serves no /update endpoints (ota-http-server)")
    expect(
        status == 400 and body == b"Error\r\n",
        "committing firmware that is already committed fails",
        seen=f"{status} {show(body)}",
        expected="400 Error\\r\\n",
    )
    return None
