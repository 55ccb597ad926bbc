"""HTTP (docs/protocol/transports.md §3) and WebSocket (§2) checks, on raw HTTP requests and WS messages."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from conformance.golden import load
from conformance.model import CheckSkipped, check, expect
from conformance.probe import Probe
from conformance.rawjson import show
from conformance.session import Session
from rpc.auth import http_digest_authorization, parse_digest_header

HTTP = ("http", "https")
WS = ("ws", "wss")
CORS: dict[str, str] = load("http")["cors_headers"]


def _base(s: Session) -> str:
    """The URL without query/fragment, as mos uses it (``http://host/rpc``)."""
    return s.url.split("?", 1)[0].split("#", 1)[0].rstrip("/")


def _aiohttp() -> Any:
    try:
        import aiohttp
    except ImportError:
        raise CheckSkipped("needs aiohttp (pip install 'mgrpc[http]')") from None
    return aiohttp


async def _http(
    s: Session,
    method: str,
    url: str,
    body: bytes | None = None,
    *,
    auth: bool = True,
    authorization: str = "",
    content_type: str = "application/json",
    timeout_s: float | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request; with credentials a digest 401 is answered once (``auth=False``: not)."""
    status, headers, data = await _http_once(
        s, method, url, body, authorization, content_type=content_type, timeout_s=timeout_s
    )
    creds = s.options.creds
    if status == 401 and auth and creds is not None and not authorization:
        challenge = parse_digest_header(headers.get("WWW-Authenticate", ""))
        if challenge is not None:
            path = urlsplit(url).path or "/"
            authz = http_digest_authorization(challenge, creds, method=method, uri=path)
            return await _http_once(s, method, url, body, authz, content_type=content_type, timeout_s=timeout_s)
    return status, headers, data


async def _http_once(
    s: Session,
    method: str,
    url: str,
    body: bytes | None,
    authorization: str,
    *,
    content_type: str = "application/json",
    timeout_s: float | None = None,
) -> tuple[int, dict[str, str], bytes]:
    aiohttp = _aiohttp()
    shown = body.decode("utf-8", "replace") if body and len(body) < 4096 else f"<{len(body)} bytes>" if body else ""
    s.note_sent(f"{method} {urlsplit(url).path or '/'}" + (f" {shown}" if shown else ""))
    timeout = aiohttp.ClientTimeout(total=timeout_s if timeout_s is not None else s.options.timeout_s)
    headers = {"Content-Type": content_type} if body is not None else {}
    if authorization:
        headers["Authorization"] = authorization
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.request(method, url, data=body, headers=headers, ssl=False) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def _frame(fid: int, method: str, **kw: Any) -> bytes:
    return json.dumps({"src": "mos", "id": fid, "method": method, **kw}, separators=(",", ":")).encode() + b"\n"


def _cors_ok(headers: dict[str, str]) -> bool:
    return all(headers.get(k) == v for k, v in CORS.items())


@check(
    "http.full_frame",
    section="transports.md §3.1",
    title="POST /rpc: 200, JSON frame + \\r\\n, CORS headers",
    only=HTTP,
)
async def _http_full_frame(s: Session) -> str | None:
    fid = Probe.new_id()
    status, headers, body = await _http(s, "POST", _base(s), _frame(fid, "RPC.Ping"))
    expect(status == 200, "full-frame mode always answers 200", seen=status, expected=200)
    expect(
        headers.get("Content-Type", "").startswith("application/json"),
        "Content-Type must be application/json",
        seen=headers.get("Content-Type"),
        expected="application/json",
    )
    expect(_cors_ok(headers), "CORS headers missing", seen=show(headers), expected=show(CORS))
    expect(body.endswith(b"\r\n"), "the reply body ends with \\r\\n", seen=show(body[-10:]), expected="...}\\r\\n")
    doc = json.loads(body)
    expect(
        doc.get("id") == fid and "result" in doc,
        "the body is the reply frame",
        seen=show(body),
        expected=f'{{"id":{fid},...,"result":...}}',
    )
    return None


@check(
    "http.full_frame_error",
    section="transports.md §3.1; frames.md §5",
    title="POST /rpc error: still 200, error in frame",
    only=HTTP,
)
async def _http_full_frame_error(s: Session) -> str | None:
    fid = Probe.new_id()
    status, _, body = await _http(s, "POST", _base(s), _frame(fid, "Conformance.NoSuch"))
    expect(status == 200, "full-frame mode answers 200 even for errors", seen=status, expected=200)
    doc = json.loads(body)
    expect(
        isinstance(doc.get("error"), dict) and doc["error"].get("code") == 404,
        "404 error frame expected",
        seen=show(body),
        expected='{"id":..,"error":{"code":404,...}}',
    )
    return None


@check(
    "http.rest_result",
    section="transports.md §3.2",
    title="POST /rpc/<Method>: body is the result",
    only=HTTP,
    needs=["RPC.Describe", "Sys.GetInfo"],
)
async def _http_rest_result(s: Session) -> str | None:
    status, headers, body = await _http(s, "POST", _base(s) + "/RPC.Describe", b'{"name":"RPC.Ping"}')
    expect(status == 200, "REST success is 200", seen=status, expected=200)
    expect(_cors_ok(headers), "CORS headers missing", seen=show(headers), expected=show(CORS))
    doc = json.loads(body)
    expect(
        isinstance(doc, dict) and doc.get("name") == "RPC.Ping" and "id" not in doc,
        "REST reply body must be the bare result",
        seen=show(body),
        expected='{"name": "RPC.Ping", "args_fmt": ...}',
    )
    status, _, body = await _http(s, "GET", _base(s) + "/Sys.GetInfo")
    expect(
        status == 200 and b'"fw_version"' in body,
        "GET /rpc/Sys.GetInfo must return the info object",
        seen=f"{status} {show(body)}",
        expected="200 {...fw_version...}",
    )
    return None


@check(
    "http.rest_status",
    section="transports.md §3.2; frames.md §5",
    title="REST errors: 404 -> 404, others -> 500, error object body",
    only=HTTP,
    needs=["RPC.Describe"],
)
async def _http_rest_status(s: Session) -> str | None:
    status, _, body = await _http(s, "POST", _base(s) + "/Conformance.NoSuch", b"{}")
    doc = json.loads(body) if body.strip() else None
    expect(
        status == 404 and isinstance(doc, dict) and doc.get("code") == 404,
        "an unknown method over REST is HTTP 404 with the error object",
        seen=f"{status} {show(body)}",
        expected='404 {"code":404,"message":"No handler for Conformance.NoSuch"}',
    )
    status, _, body = await _http(s, "POST", _base(s) + "/RPC.Describe", b"{}")
    doc = json.loads(body) if body.strip() else None
    expect(
        status == 500 and isinstance(doc, dict) and doc.get("code") == 400,
        "another error (400) over REST is HTTP 500 with the error object",
        seen=f"{status} {show(body)}",
        expected='500 {"code":400,"message":"name is required"}',
    )
    return None


@check("http.options_cors", section="transports.md §3.2", title="OPTIONS /rpc/<Method>: 200 CORS preflight", only=HTTP)
async def _http_options_cors(s: Session) -> str | None:
    status, headers, _ = await _http(s, "OPTIONS", _base(s) + "/RPC.Ping")
    expect(
        status == 200 and _cors_ok(headers),
        "CORS preflight must be 200 with the CORS headers",
        seen=f"{status} {show(headers)}",
        expected=f"200 {show(CORS)}",
    )
    return None


@check(
    "http.wrong_dst",
    section="transports.md §3.5; frames.md §3",
    title="wrong dst: 400 Invalid request, no frame",
    only=HTTP,
)
async def _http_wrong_dst(s: Session) -> str | None:
    fid = Probe.new_id()
    status, _, body = await _http(s, "POST", _base(s), _frame(fid, "RPC.Ping", dst="conformance-not-this-device"))
    expect(
        status == 400 and b'"result"' not in body,
        "a frame for another dst must not be answered",
        seen=f"{status} {show(body)}",
        expected="400 Invalid request",
    )
    return None


@check(
    "http.auth_challenge",
    section="transports.md §3.3; frames.md §6",
    title="HTTP 401 with a Digest challenge; digest accepted",
    only=HTTP,
)
async def _http_auth_challenge(s: Session) -> str | None:
    if s.options.creds is None:
        raise CheckSkipped("no credentials given (--rpc-creds)")
    fid = Probe.new_id()
    body = _frame(fid, s.options.auth_method)
    status, headers, _ = await _http(s, "POST", _base(s), body, auth=False)
    www = headers.get("WWW-Authenticate", "")
    expect(
        status == 401 and www.startswith("Digest "),
        f"{s.options.auth_method} without credentials must be HTTP 401",
        seen=f"{status} WWW-Authenticate: {www}",
        expected='401 WWW-Authenticate: Digest qop="auth", ...',
    )
    ch = parse_digest_header(www) or {}
    ok = (
        ch.get("qop") == "auth"
        and bool(ch.get("realm"))
        and bool(re.fullmatch(r"[0-9a-f]+", ch.get("nonce", "")))
        and ch.get("algorithm") in ("MD5", "SHA-256")
    )
    expect(
        ok,
        "challenge parameters",
        seen=www,
        expected='qop="auth", realm="...", nonce="<lowercase hex>", algorithm=MD5|SHA-256',
    )
    status, _, data = await _http(s, "POST", _base(s), body)
    expect(
        status == 200 and b'"result"' in data,
        "the digest retry must succeed",
        seen=f"{status} {show(data)}",
        expected="200 with the reply frame",
    )
    return f"realm={ch.get('realm')} algorithm={ch.get('algorithm')}"


@check(
    "http.auth_notification",
    section="frames.md §6-g; transports.md §3.3; real-device.md RD-A2",
    title="a notification that needs auth still gets the HTTP 401 Digest challenge",
    only=HTTP,
)
async def _http_auth_notification(s: Session) -> str | None:
    if s.options.creds is None:
        raise CheckSkipped("no credentials given (--rpc-creds)")
    s.require(s.options.auth_method)
    body = json.dumps({"src": "mos", "method": s.options.auth_method}, separators=(",", ":")).encode() + b"\n"
    try:
        status, headers, data = await _http(s, "POST", _base(s), body, auth=False)
    except TimeoutError:
        status, headers, data = 0, {}, b""
    www = headers.get("WWW-Authenticate", "")
    expect(
        status == 401 and www.startswith("Digest "),
        f"a notification of {s.options.auth_method} without credentials must get HTTP 401 all the same",
        seen=f"{status} WWW-Authenticate: {www}" if status else f"no answer within {s.options.timeout_s:g} s",
        expected='401 WWW-Authenticate: Digest qop="auth", ...',
    )
    expect(b'"id"' not in data, "the 401 carries no reply frame", seen=show(data), expected="an empty body")
    return None


# -- WebSocket ------------------------------------------------------------------------------------


async def _ws(s: Session, protocols: tuple[str, ...] = ("clubby.cesanta.com",)) -> tuple[Any, Any]:
    aiohttp = _aiohttp()
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.options.timeout_s))
    try:
        ws = await http.ws_connect(
            _base(s), protocols=protocols, headers={"Origin": "https://api.cesanta.com/"}, ssl=False, autoping=True
        )
    except BaseException:
        await http.close()
        raise
    return http, ws


async def _ws_reply(s: Session, ws: Any, fid: int) -> Any:
    aiohttp = _aiohttp()
    while True:
        msg = await ws.receive(timeout=s.options.timeout_s)
        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            expect(False, "connection closed before the reply", seen=str(msg.type), expected="a TEXT message")
        data = msg.data.encode() if isinstance(msg.data, str) else msg.data
        if b'"id":%d' % fid in data:
            return msg


@check("ws.text_frames", section="transports.md §2", title="one frame per TEXT message, no trailing newline", only=WS)
async def _ws_text_frames(s: Session) -> str | None:
    aiohttp = _aiohttp()
    http, ws = await _ws(s)
    try:
        fid = Probe.new_id()
        s.note_sent(_frame(fid, "RPC.Ping"))
        await ws.send_str(_frame(fid, "RPC.Ping").decode())  # mos appends the encoder's \n
        msg = await _ws_reply(s, ws, fid)
        expect(
            msg.type == aiohttp.WSMsgType.TEXT, "device frames are TEXT messages", seen=str(msg.type), expected="TEXT"
        )
        expect(
            msg.data.startswith("{") and msg.data.endswith("}"),
            "the message is exactly one JSON frame",
            seen=show(msg.data),
            expected='{"id":...}',
        )
        json.loads(msg.data)
    finally:
        await ws.close()
        await http.close()
    return None


@check("ws.subprotocol", section="transports.md §2", title="Sec-WebSocket-Protocol echoed (or absent)", only=WS)
async def _ws_subprotocol(s: Session) -> str | None:
    http, ws = await _ws(s)
    try:
        proto = ws.protocol
        expect(
            proto in (None, "clubby.cesanta.com"),
            "the requested subprotocol must be echoed verbatim",
            seen=proto,
            expected="clubby.cesanta.com",
        )
    finally:
        await ws.close()
        await http.close()
    return None if proto else "no subprotocol header (older mongoose)"


@check("ws.binary_accepted", section="transports.md §2", title="BINARY request messages accepted", only=WS)
async def _ws_binary_accepted(s: Session) -> str | None:
    http, ws = await _ws(s, ("json-rpc",))
    try:
        fid = Probe.new_id()
        s.note_sent(_frame(fid, "RPC.Ping").rstrip(b"\n"))
        await ws.send_bytes(_frame(fid, "RPC.Ping").rstrip(b"\n"))
        await _ws_reply(s, ws, fid)
    finally:
        await ws.close()
        await http.close()
    return None
