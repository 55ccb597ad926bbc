"""The JSON-RPC 2.0 dialect (docs/protocol/jsonrpc.md): requests, notifications, batches, error codes.

The checks speak JSON-RPC on their own link so they see every message whole (a batch answer is an
array, which the frame probe would not deliver): ``POST /jsonrpc`` over HTTP, TEXT messages on a
WebSocket of their own, one line per message on TCP or the serial port. A device that answers the
first check in mgRPC (as every Mongoose OS device does) does not offer the dialect: the group is
then skipped with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from conformance.model import CheckSkipped, check, expect
from conformance.rawio import RawStream, open_raw_serial, open_raw_tcp
from conformance.rawjson import show
from conformance.session import Session

SCHEMES = ("http", "https", "ws", "wss", "tcp", "serial")
HTTP = ("http", "https")
NOT_OFFERED = "the device speaks mgRPC only (no JSON-RPC 2.0 dialect)"
_FACT = "jsonrpc_offered"
_NOTHING: Any = object()  # what a link reports when no answer came


def _req(method: str, id_: Any = _NOTHING, params: Any = _NOTHING) -> dict[str, Any]:
    obj: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not _NOTHING:
        obj["params"] = params
    if id_ is not _NOTHING:
        obj["id"] = id_
    return obj


def _text(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _new_id() -> str:
    return f"jr-{random.getrandbits(32):08x}"


# ---------------------------------------------------------------------------------------------
# links


class _Link:
    """One JSON-RPC connection to the device: send a message, read the next JSON answer (or nothing)."""

    def __init__(self, s: Session) -> None:
        self.s = s

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def answer(self, timeout_s: float) -> Any:
        """The next JSON answer, or ``_NOTHING`` when none came within ``timeout_s``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the link."""

    async def call(self, obj: Any) -> Any:
        """Send ``obj`` (or raw bytes) and return the answer; silence fails the check."""
        await self.send(obj if isinstance(obj, bytes) else _text(obj))
        ans = await self.answer(self.s.options.timeout_s)
        expect(ans is not _NOTHING, "the device must answer", seen="no answer", expected="a JSON-RPC response")
        return ans

    async def silent(self, obj: Any) -> None:
        """Send ``obj``; nothing may come back for it (a later request's answer must come first)."""
        await self.send(_text(obj))
        if isinstance(self, _HttpLink):
            ans = await self.answer(self.s.options.timeout_s)
            expect(ans is _NOTHING, "nothing is owed: HTTP 204 with an empty body", seen=show(ans),
                   expected="204, empty body")  # fmt: skip
            return
        await asyncio.sleep(self.s.options.quiet_s)
        barrier = _new_id()
        await self.send(_text(_req("RPC.List", barrier)))
        ans = await self.answer(self.s.options.timeout_s)
        expect(
            isinstance(ans, dict) and ans.get("id") == barrier,
            "nothing may be sent for a notification (the next answer must be the next request's)",
            seen=show(ans if ans is not _NOTHING else "no answer"),
            expected=f'{{"jsonrpc":"2.0","result":[...],"id":"{barrier}"}}',
        )


class _HttpLink(_Link):
    """``POST /jsonrpc`` on the device's HTTP listener; 204 means nothing was owed."""

    def __init__(self, s: Session) -> None:
        super().__init__(s)
        parts = urlsplit(s.url)
        self.url = urlunsplit((parts.scheme, parts.netloc, "/jsonrpc", "", ""))
        self._answers: list[tuple[int, bytes]] = []

    async def send(self, data: bytes) -> None:
        from conformance.checks.web import _http

        status, _headers, body = await _http(self.s, "POST", self.url, data)
        self._answers.append((status, body))

    async def answer(self, timeout_s: float) -> Any:
        status, body = self._answers.pop(0)
        if status == 404:
            raise CheckSkipped(NOT_OFFERED + ": POST /jsonrpc is 404")
        if status == 204:
            expect(body == b"", "a 204 has an empty body", seen=show(body), expected="")
            return _NOTHING
        expect(status == 200, "a JSON-RPC answer is HTTP 200", seen=f"HTTP {status} {show(body)}", expected="200")
        return json.loads(body)


class _WsLink(_Link):
    def __init__(self, s: Session, http: Any, ws: Any) -> None:
        super().__init__(s)
        self.http, self.ws = http, ws

    @classmethod
    async def open(cls, s: Session) -> _WsLink:
        from conformance.checks.web import _ws

        http, ws = await _ws(s)
        return cls(s, http, ws)

    async def send(self, data: bytes) -> None:
        self.s.note_sent(data)
        await self.ws.send_str(data.decode())

    async def answer(self, timeout_s: float) -> Any:
        import aiohttp

        try:
            msg = await self.ws.receive(timeout=timeout_s)
        except TimeoutError:
            return _NOTHING
        expect(msg.type == aiohttp.WSMsgType.TEXT, "answers are TEXT messages", seen=str(msg.type), expected="TEXT")
        return json.loads(msg.data)

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


def _json_in(line: bytes) -> bytes | None:
    """The JSON message in a line the device wrote (mos's quotes and a CRC suffix taken off)."""
    starts = [i for i in (line.find(b"{"), line.find(b"[")) if i >= 0]
    if not starts:
        return None
    start = min(starts)
    end = max(line.rfind(b"}"), line.rfind(b"]"))
    return line[start : end + 1] if end > start else None


class _StreamLink(_Link):
    """One JSON message per line out; the device's answers read line by line."""

    def __init__(self, s: Session, raw: RawStream) -> None:
        super().__init__(s)
        self.raw = raw
        self._seen = 0

    @classmethod
    async def open(cls, s: Session) -> _StreamLink:
        if s.scheme == "serial":
            await s.close()  # the raw link owns the port while it runs
            baud = int(s.parsed.option("baud") or s.parsed.option("baud_rate") or 115200)
            raw = await open_raw_serial(s.parsed.path, baud=baud)
        else:
            if s.parsed.port is None:
                raise CheckSkipped("tcp:// URL without a port")
            raw = await open_raw_tcp(s.parsed.host or "127.0.0.1", s.parsed.port)
        raw.on_write = s.note_sent
        return cls(s, raw)

    async def send(self, data: bytes) -> None:
        await self.raw.write(data + b"\n")

    def _next(self) -> Any:
        buf = bytes(self.raw.buffer)
        while True:
            nl = buf.find(b"\n", self._seen)
            if nl < 0:
                return _NOTHING
            line = buf[self._seen : nl]
            self._seen = nl + 1
            text = _json_in(line)
            if text is not None:
                with contextlib.suppress(ValueError):  # a console line with braces in it
                    return json.loads(text)

    async def answer(self, timeout_s: float) -> Any:
        found: list[Any] = []

        def ready(_: bytes) -> bool:
            ans = self._next()
            if ans is not _NOTHING:
                found.append(ans)
            return bool(found)

        await self.raw.wait_for(ready, timeout_s=timeout_s)
        return found[0] if found else _NOTHING

    async def close(self) -> None:
        await self.raw.close()


async def _open(s: Session) -> _Link:
    if s.scheme in HTTP:
        return _HttpLink(s)
    if s.scheme in ("ws", "wss"):
        return await _WsLink.open(s)
    return await _StreamLink.open(s)


@contextlib.asynccontextmanager
async def _link(s: Session, *, detect: bool = True) -> Any:
    if detect and s.facts.get(_FACT) is False:
        raise CheckSkipped(NOT_OFFERED)
    link = await _open(s)
    try:
        if detect and _FACT not in s.facts:
            await _detect(s, link)
        yield link
    finally:
        await link.close()


async def _detect(s: Session, link: _Link) -> dict[str, Any]:
    rid = _new_id()
    try:
        ans = await link.call(_req("RPC.List", rid))
    except CheckSkipped:
        s.facts[_FACT] = False
        raise
    if not (isinstance(ans, dict) and "jsonrpc" in ans):
        s.facts[_FACT] = False
        raise CheckSkipped(NOT_OFFERED + f"; it answered {show(ans)[:80]}")
    s.facts[_FACT] = True
    return ans


def _error_of(ans: Any, code: int, *, id_: Any) -> dict[str, Any]:
    expect(isinstance(ans, dict), "an error response is one object", seen=show(ans), expected='{"jsonrpc":"2.0",...}')
    err = ans.get("error")
    expect(
        ans.get("jsonrpc") == "2.0" and isinstance(err, dict) and err.get("code") == code and "result" not in ans,
        f"the response must carry error code {code}",
        seen=show(ans),
        expected=f'{{"jsonrpc":"2.0","error":{{"code":{code},"message":...}},"id":{json.dumps(id_)}}}',
    )
    expect(
        "id" in ans and ans["id"] == id_ and type(ans["id"]) is type(id_),
        f"the error response's id must be {json.dumps(id_)}",
        seen=show(ans),
        expected=f'"id": {json.dumps(id_)}',
    )
    expect(isinstance(err.get("message"), str), "error.message is a string", seen=show(err),
           expected='"message": "..."')  # fmt: skip
    expect(set(ans) == {"jsonrpc", "error", "id"}, "an error response has exactly jsonrpc, error, id",
           seen=show(ans), expected="jsonrpc, error, id")  # fmt: skip
    return err


# ---------------------------------------------------------------------------------------------
# checks


@check("jsonrpc.request", section="jsonrpc.md §1", title="a JSON-RPC request is answered in JSON-RPC", only=SCHEMES)
async def _request(s: Session) -> str | None:
    async with _link(s, detect=False) as link:
        ans = await _detect(s, link)
        expect(
            ans.get("jsonrpc") == "2.0" and isinstance(ans.get("result"), list),
            "RPC.List must be answered with a JSON-RPC result (the same handler as over mgRPC)",
            seen=show(ans),
            expected='{"jsonrpc":"2.0","result":["RPC.List",...],"id":...}',
        )
    return f"{len(ans['result'])} methods"


@check("jsonrpc.response", section="jsonrpc.md §3", title="exactly jsonrpc/result/id; id echoed with its type",
       only=SCHEMES)  # fmt: skip
async def _response(s: Session) -> str | None:
    async with _link(s) as link:
        for rid in (_new_id(), random.getrandbits(31), None):
            ans = await link.call(_req("RPC.List", rid))
            expect(
                isinstance(ans, dict) and set(ans) == {"jsonrpc", "result", "id"} and ans["jsonrpc"] == "2.0",
                "a success response has exactly the members jsonrpc, result, id",
                seen=show(ans),
                expected='{"jsonrpc":"2.0","result":...,"id":...}',
            )
            expect(
                ans["id"] == rid and type(ans["id"]) is type(rid),
                "the response id must equal the request id, same JSON type",
                seen=show(ans),
                expected=f'"id": {json.dumps(rid)}',
            )
    return None


@check("jsonrpc.notification", section="jsonrpc.md §4", title="a notification runs and is not answered",
       only=SCHEMES)  # fmt: skip
async def _notification(s: Session) -> str | None:
    async with _link(s) as link:
        await link.silent(_req("RPC.List"))
        await link.silent(_req("No.Such.Method.Notified"))  # not even an error
    return None


@check("jsonrpc.batch", section="jsonrpc.md §5", title="batches: an array back, notifications left out",
       only=SCHEMES)  # fmt: skip
async def _batch(s: Session) -> str | None:
    async with _link(s) as link:
        a, b = _new_id(), _new_id()
        ans = await link.call([_req("RPC.List", a), _req("RPC.List"), _req("No.Such.Method", b)])
        expect(isinstance(ans, list), "a batch is answered with an array", seen=show(ans), expected="[...]")
        ids = sorted(str(x.get("id")) for x in ans if isinstance(x, dict))
        expect(
            len(ans) == 2 and ids == sorted([a, b]),
            "one response per request, none for the notification",
            seen=show(ans),
            expected=f"two responses, ids {a} and {b}",
        )
        by_id = {x["id"]: x for x in ans}
        expect(isinstance(by_id[a].get("result"), list), "each element answered on its own", seen=show(by_id[a]),
               expected='"result": [...]')  # fmt: skip
        _error_of(by_id[b], -32601, id_=b)
        one = _new_id()
        ans = await link.call([_req("RPC.List", one)])
        expect(
            isinstance(ans, list) and len(ans) == 1 and isinstance(ans[0], dict) and ans[0].get("id") == one,
            "a batch of one is answered with an array of one",
            seen=show(ans),
            expected=f'[{{"jsonrpc":"2.0","result":[...],"id":"{one}"}}]',
        )
        await link.silent([_req("RPC.List"), _req("RPC.List")])
    return None


@check("jsonrpc.parse_error", section="jsonrpc.md §6", title="-32700 with a null id for text that is not JSON",
       only=SCHEMES, upsets=True)  # fmt: skip
async def _parse_error(s: Session) -> str | None:
    async with _link(s) as link:
        ans = await link.call(b'{"jsonrpc": "2.0", "method": "RPC.List", "id": 1')
        err = _error_of(ans, -32700, id_=None)
        expect(err.get("message") == "Parse error", "message Parse error", seen=show(err), expected='"Parse error"')
    return None


@check("jsonrpc.invalid_request", section="jsonrpc.md §6", title="-32600 with a null id; [] is one error, [1,2] two",
       only=SCHEMES)  # fmt: skip
async def _invalid_request(s: Session) -> str | None:
    async with _link(s) as link:
        _error_of(await link.call({"jsonrpc": "1.0", "method": "RPC.List", "id": 5}), -32600, id_=None)
        _error_of(await link.call({"jsonrpc": "2.0", "method": 1, "id": 6}), -32600, id_=None)
        ans = await link.call([])
        expect(isinstance(ans, dict), "the empty array is answered with one object, not an array", seen=show(ans),
               expected='{"jsonrpc":"2.0","error":{"code":-32600,...},"id":null}')  # fmt: skip
        _error_of(ans, -32600, id_=None)
        ans = await link.call([1, 2])
        expect(isinstance(ans, list) and len(ans) == 2, "each invalid element gets its own response",
               seen=show(ans), expected="an array of two -32600 responses")  # fmt: skip
        for item in ans:
            _error_of(item, -32600, id_=None)
    return None


@check("jsonrpc.method_not_found", section="jsonrpc.md §6", title="-32601 for a method no handler matches",
       only=SCHEMES)  # fmt: skip
async def _method_not_found(s: Session) -> str | None:
    async with _link(s) as link:
        rid = _new_id()
        name = f"No.Such.{rid}"
        err = _error_of(await link.call(_req(name, rid)), -32601, id_=rid)
        expect(err.get("message") == "Method not found", "message Method not found", seen=show(err),
               expected='"Method not found"')  # fmt: skip
    return None


@check("jsonrpc.invalid_params", section="jsonrpc.md §9", title="-32602 when params do not fit RPC.Describe's name",
       only=SCHEMES, needs=["RPC.Describe"])  # fmt: skip
async def _invalid_params(s: Session) -> str | None:
    async with _link(s) as link:
        rid = _new_id()
        _error_of(await link.call(_req("RPC.Describe", rid, {"nmae": "RPC.List"})), -32602, id_=rid)
        rid = _new_id()
        ans = await link.call(_req("RPC.Describe", rid, ["RPC.List"]))
        expect(
            isinstance(ans, dict) and isinstance(ans.get("result"), dict) and ans["result"].get("name") == "RPC.List",
            "by-position params are bound to the declared names",
            seen=show(ans),
            expected='"result": {"name": "RPC.List", "args_fmt": ...}',
        )
    return None


@check("jsonrpc.server_error", section="jsonrpc.md §7", title="an mgRPC error is -32000 with data.mgrpc_code",
       only=SCHEMES, needs=["RPC.Describe"])  # fmt: skip
async def _server_error(s: Session) -> str | None:
    async with _link(s) as link:
        rid = _new_id()
        err = _error_of(await link.call(_req("RPC.Describe", rid, {"name": f"No.Such.{rid}"})), -32000, id_=rid)
        expect(
            err.get("data") == {"mgrpc_code": 404} and bool(err.get("message")),
            "the handler's 404 travels as data.mgrpc_code with its message",
            seen=show(err),
            expected='{"code":-32000,"message":"name not found","data":{"mgrpc_code":404}}',
        )
    return None


@check("jsonrpc.http", section="jsonrpc.md §8", title="POST /jsonrpc statuses; JSON-RPC on POST /rpc", only=HTTP)
async def _http_statuses(s: Session) -> str | None:
    from conformance.checks.web import _base, _http

    async with _link(s) as link:
        assert isinstance(link, _HttpLink)
        status, _h, body = await _http(s, "GET", link.url)
        expect(status == 405, "GET /jsonrpc is 405", seen=f"HTTP {status} {show(body)}", expected="405")
        rid = _new_id()
        status, _h, body = await _http(s, "POST", _base(s), _text(_req("RPC.List", rid)))
        ans = json.loads(body) if status == 200 else None
        expect(
            isinstance(ans, dict) and ans.get("jsonrpc") == "2.0" and ans.get("id") == rid,
            "a JSON-RPC request on POST /rpc is answered in JSON-RPC",
            seen=f"HTTP {status} {show(body)}",
            expected=f'200 {{"jsonrpc":"2.0","result":[...],"id":"{rid}"}}',
        )
    return None
