"""JSON-RPC 2.0 dialect of the router (rpc/jsonrpc.py, docs/protocol/jsonrpc.md): jsonrpcserver
dispatching against the node's own handlers; and the client-side codec (``?dialect=jsonrpc``)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

import transports
from rpc.auth import Acl, Authenticator, htdigest_line
from rpc.errors import FrameError, HandlerError, UsageError
from rpc.frame import ErrorInfo, Frame, RawJSON, parse_frame
from rpc.jsonrpc import JsonRpcCodec, ParamSpec, with_dialect
from rpc.node import Context, Node
from tests.helpers import RecordingChannel

T = 5.0


@pytest.fixture
def dev() -> Node:
    node = Node(id="dev")
    node.seen = []  # type: ignore[attr-defined]

    def fail(ctx: Context, p: Any) -> Any:
        raise HandlerError(418, "I'm a teapot")

    def crash(ctx: Context, p: Any) -> Any:
        raise ZeroDivisionError("secret detail")

    async def slow_sum(ctx: Context, p: Any) -> Any:
        await asyncio.sleep(0)
        return p["a"] + p.get("b", 0)

    def note(ctx: Context, p: Any) -> Any:
        node.seen.append((p, ctx.channel.type, ctx.frame.nr))  # type: ignore[attr-defined]

    node.add_handler("Sys.Echo", lambda ctx, p: p)
    node.add_handler("Sys.Fail", fail)
    node.add_handler("Sys.Crash", crash)
    node.add_handler("Math.Sum", slow_sum, params=("a", "b?"))
    node.add_handler("Note", note)
    node.add_handler("Glob.*", lambda ctx, p: ctx.method)
    node.add_handler("Raw", lambda ctx, p: RawJSON('{"a": [1, 2]}'))
    node.add_handler("Bad.Result", lambda ctx, p: object())
    return node


async def exchange(ch: RecordingChannel, wire: bytes) -> Any:
    ch.deliver_bytes(wire)
    return json.loads(await ch.next_sent(T))


async def no_reply(ch: RecordingChannel, dev: Node) -> None:
    """Nothing was sent for what came before: a later request's answer is the next thing sent."""
    ch.deliver_bytes(b'{"jsonrpc":"2.0","id":"probe","method":"Sys.Echo"}')
    assert json.loads(await ch.next_sent(T)) == {"jsonrpc": "2.0", "result": None, "id": "probe"}


async def test_request_result_members_and_id_echoed(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    for rid in (5, "a-1", 2.5, None):
        resp = await exchange(ch, json.dumps({"jsonrpc": "2.0", "id": rid, "method": "Sys.Echo", "params": [1, "é"]}).encode())
        assert resp == {"jsonrpc": "2.0", "result": [1, "é"], "id": rid}
    # by-name params, handler without declared params gets them as sent
    assert (await exchange(ch, b'{"jsonrpc":"2.0","id":1,"method":"sys.echo","params":{"x":1}}'))["result"] == {"x": 1}
    # a coroutine handler, and a RawJSON result decoded into the value it holds
    assert (await exchange(ch, b'{"jsonrpc":"2.0","id":2,"method":"Math.Sum","params":{"a":2,"b":3}}'))["result"] == 5
    assert (await exchange(ch, b'{"jsonrpc":"2.0","id":3,"method":"Raw"}'))["result"] == {"a": [1, 2]}
    # builtins are the same handlers: RPC.List answers an array, not a string
    assert "Sys.Echo" in (await exchange(ch, b'{"jsonrpc":"2.0","id":4,"method":"RPC.List"}'))["result"]


async def test_one_registry_glob_patterns(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    assert (await exchange(ch, b'{"jsonrpc":"2.0","id":1,"method":"GLOB.Anything"}'))["result"] == "GLOB.Anything"
    dev.add_handler("Glob.Anything", lambda ctx, p: "newest wins")
    assert (await exchange(ch, b'{"jsonrpc":"2.0","id":2,"method":"Glob.Anything"}'))["result"] == "newest wins"
    dev.remove_handler("Glob.*")
    resp = await exchange(ch, b'{"jsonrpc":"2.0","id":3,"method":"Glob.Other"}')
    assert resp == {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found", "data": "Glob.Other"}, "id": 3}


async def test_notification_runs_without_reply(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel("WS_in"))
    ch.deliver_bytes(b'{"jsonrpc":"2.0","method":"Note","params":[7]}')
    ch.deliver_bytes(b'{"jsonrpc":"2.0","method":"Nope"}')  # unknown method, still a notification: silent
    await no_reply(ch, dev)
    assert dev.seen == [([7], "WS_in", True)]  # type: ignore[attr-defined]
    # an id of null is a request, not a notification
    assert await exchange(ch, b'{"jsonrpc":"2.0","method":"Note","params":[8],"id":null}') == {
        "jsonrpc": "2.0", "result": None, "id": None}  # fmt: skip


async def test_batch(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "Sys.Echo", "params": [1]},
        {"jsonrpc": "2.0", "method": "Note", "params": ["n"]},
        {"jsonrpc": "2.0", "id": "x", "method": "Nope"},
        1,
        {"jsonrpc": "2.0", "id": 9, "method": "Math.Sum", "params": [4, 5]},
    ]
    resp = await exchange(ch, json.dumps(batch).encode())
    assert isinstance(resp, list) and len(resp) == 4
    by_id = {json.dumps(r["id"]): r for r in resp}
    assert by_id["1"]["result"] == [1]
    assert by_id['"x"']["error"]["code"] == -32601
    assert by_id["null"]["error"] == {"code": -32600, "message": "Invalid request", "data": "The request failed schema validation"}
    assert by_id["9"]["result"] == 9
    assert dev.seen == [(["n"], "UART", True)]  # type: ignore[attr-defined]
    # a one-element batch is answered with an array
    assert await exchange(ch, b'[{"jsonrpc":"2.0","id":2,"method":"Sys.Echo"}]') == [{"jsonrpc": "2.0", "result": None, "id": 2}]
    # a batch of notifications only: nothing at all
    ch.deliver_bytes(b'[{"jsonrpc":"2.0","method":"Note","params":[1]},{"jsonrpc":"2.0","method":"Note","params":[2]}]')
    await no_reply(ch, dev)


async def test_invalid_requests(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    invalid = {"code": -32600, "message": "Invalid request", "data": "The request failed schema validation"}
    # the empty array is one invalid request, not an empty batch
    assert await exchange(ch, b"[]") == {"jsonrpc": "2.0", "error": invalid, "id": None}
    # an array of non-requests: one error each
    assert await exchange(ch, b"[1,2,3]") == [{"jsonrpc": "2.0", "error": invalid, "id": None}] * 3
    for wire in (
        b'{"jsonrpc":"2.0","id":1,"method":1}',  # method not a string
        b'{"jsonrpc":"1.0","id":1,"method":"Sys.Echo"}',  # wrong version
        b'{"jsonrpc":"2.0","id":1,"method":"Sys.Echo","params":"scalar"}',  # params neither array nor object
        b'{"jsonrpc":"2.0","id":1}',  # no method
        b'{"jsonrpc":"2.0","id":1,"method":"Sys.Echo","src":5}',  # an envelope member of the wrong type
        b'{"jsonrpc":"2.0","id":1,"method":"Sys.Echo","key":"k"}',  # an mgRPC member outside the envelope
        b'[[{"jsonrpc":"2.0","id":1,"method":"Sys.Echo"}]]',  # a nested batch
    ):
        resp = await exchange(ch, wire)
        item = resp[0] if isinstance(resp, list) else resp
        assert item == {"jsonrpc": "2.0", "error": invalid, "id": None}, wire


async def test_parse_error_has_null_id(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    resp = await exchange(ch, b'{"jsonrpc":"2.0","method":"Sys.Echo","id":1')
    assert resp["id"] is None and resp["error"]["code"] == -32700 and resp["error"]["message"] == "Parse error"
    resp = await exchange(ch, b'[{"jsonrpc":"2.0","method":"Sys.Echo","id":1},{"jsonrpc":')
    assert resp["id"] is None and resp["error"]["code"] == -32700
    # mgRPC junk that names no JSON-RPC member stays junk: dropped, as a device drops it
    ch.deliver_bytes(b"{not json")
    await no_reply(ch, dev)


async def test_declared_params(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())

    async def err(params: Any) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 1, "method": "Math.Sum", "params": params}
        resp = await exchange(ch, json.dumps(body).encode())
        return resp["error"]  # type: ignore[no-any-return]

    assert (await err({"b": 1}))["code"] == -32602  # a required one missing
    assert (await err({"a": 1, "c": 2}))["code"] == -32602  # an unknown name
    assert (await err([1, 2, 3]))["code"] == -32602  # too many by position
    e = await err([])
    assert e["message"] == "Invalid params" and "a" in e["data"]
    # by position: bound to the declared names and handed over as an object
    assert (await exchange(ch, b'{"jsonrpc":"2.0","id":2,"method":"Math.Sum","params":[1,2]}'))["result"] == 3
    assert (await exchange(ch, b'{"jsonrpc":"2.0","id":3,"method":"Math.Sum","params":[1]}'))["result"] == 1
    # RPC.Describe declares its name
    resp = await exchange(ch, b'{"jsonrpc":"2.0","id":4,"method":"RPC.Describe","params":["Math.Sum"]}')
    assert resp["result"] == {"name": "Math.Sum", "args_fmt": ""}
    # mgRPC frames are not checked against the declaration (a device does not check)
    ch.inject(b'{"src":"mos","id":5,"method":"Math.Sum","params":{"a":1,"zz":0}}')
    assert parse_frame(await ch.next_sent(T)).result == 1


def test_param_spec_parse() -> None:
    spec = ParamSpec.parse(("name", "offset?"))
    assert spec.names == ("name", "offset") and spec.required == {"name"}
    assert spec.as_object([1], {}) == {"name": 1}
    for bad in ("name", ("a", "a"), ("1x",)):
        with pytest.raises(UsageError):
            ParamSpec.parse(bad)  # type: ignore[arg-type]


async def test_errors_map_to_jsonrpc_codes(dev: Node, caplog: pytest.LogCaptureFixture) -> None:
    ch = dev.add_channel(RecordingChannel())
    assert await exchange(ch, b'{"jsonrpc":"2.0","id":1,"method":"Sys.Fail"}') == {
        "jsonrpc": "2.0", "error": {"code": -32000, "message": "I'm a teapot", "data": {"mgrpc_code": 418}}, "id": 1,
    }  # fmt: skip
    resp = await exchange(ch, b'{"jsonrpc":"2.0","id":2,"method":"Sys.Crash"}')
    assert resp == {"jsonrpc": "2.0", "error": {"code": -32603, "message": "Internal error"}, "id": 2}
    assert "secret detail" not in json.dumps(resp) and "secret detail" in caplog.text  # logged, not sent
    resp = await exchange(ch, b'{"jsonrpc":"2.0","id":3,"method":"Bad.Result"}')
    assert resp["error"]["code"] == -32603


async def test_auth_and_acl_apply_alike(tmp_path: Any) -> None:
    pw = tmp_path / "rpc_auth.txt"
    pw.write_text(htdigest_line("admin", "RPC", "secret") + "\n")
    acl = Acl.parse('[{"method":"Pub.*","ch_type":"MQTT","acl":"-*"},{"method":"Sys.*","acl":"+admin"},{"method":"*","acl":"*"}]')
    node = Node(id="dev", auth=Authenticator(password_file=pw, acl=acl, clock=lambda: 1_600_000_000))
    node.add_handler("Pub.Echo", lambda ctx, p: p)
    node.add_handler("Sys.Secret", lambda ctx, p: ctx.user)
    uart = node.add_channel(RecordingChannel("UART"))
    mqtt = node.add_channel(RecordingChannel("MQTT"))
    assert (await exchange(uart, b'{"jsonrpc":"2.0","id":1,"method":"Pub.Echo","params":[1]}'))["result"] == [1]
    assert (await exchange(mqtt, b'{"jsonrpc":"2.0","id":2,"method":"Pub.Echo","params":[1]}'))["error"] == {
        "code": -32000, "message": "unauthorized", "data": {"mgrpc_code": 403}}  # fmt: skip
    err = (await exchange(uart, b'{"jsonrpc":"2.0","id":3,"method":"Sys.Secret"}'))["error"]
    assert err["code"] == -32000 and err["data"] == {"mgrpc_code": 401}
    assert json.loads(err["message"])["auth_type"] == "digest"
    # the request may answer the challenge itself, with mgRPC's auth member
    from rpc.auth import Credentials, make_auth

    answer = make_auth(json.loads(err["message"]), Credentials("admin", "secret"))
    ok = await exchange(uart, json.dumps({"jsonrpc": "2.0", "id": 6, "method": "Sys.Secret", "auth": answer}).encode())
    assert ok == {"jsonrpc": "2.0", "result": "admin", "id": 6}
    # a channel whose transport authenticated the user (HTTP digest) passes
    uart.user = "admin"
    assert (await exchange(uart, b'{"jsonrpc":"2.0","id":4,"method":"Sys.Secret"}'))["result"] == "admin"
    # an unknown method is looked up before the ACL is asked, as over mgRPC (real-device.md RD-A14)
    assert (await exchange(mqtt, b'{"jsonrpc":"2.0","id":5,"method":"Pub.Nope"}'))["error"]["code"] == -32601


async def test_mgrpc_envelope_members(dev: Node) -> None:
    dev.add_handler("Who", lambda ctx, p: [ctx.src, ctx.frame.tag, ctx.frame.dst])
    ch = dev.add_channel(RecordingChannel("MQTT"))
    sent: list[Frame] = []
    send = ch.send

    async def recording_send(frame: Frame) -> None:
        sent.append(frame)
        await send(frame)

    ch.send = recording_send  # type: ignore[method-assign]
    resp = await exchange(ch, b'{"jsonrpc":"2.0","id":1,"method":"Who","src":"client/rpc-resp/x","tag":"t","dst":"dev"}')
    # the answer is pure JSON-RPC; the envelope only routes it (dst = the request's src)
    assert resp == {"jsonrpc": "2.0", "result": ["client/rpc-resp/x", "t", "dev"], "id": 1}
    assert sent[-1].dst == "client/rpc-resp/x"
    # a request for another device is dropped, as an mgRPC frame is
    ch.deliver_bytes(b'{"jsonrpc":"2.0","id":2,"method":"Who","dst":"someone-else"}')
    await no_reply(ch, dev)


async def test_mgrpc_frames_untouched(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    # "jsonrpc" inside params does not make a frame JSON-RPC
    ch.inject(b'{"src":"mos","id":1,"method":"Sys.Echo","params":{"jsonrpc":"2.0"}}')
    assert await ch.next_sent(T) == b'{"id":1,"src":"dev","dst":"mos","result":{"jsonrpc": "2.0"}}'
    ch.inject(b'{"src":"mos","id":2,"method":"Nope"}')
    assert await ch.next_sent(T) == b'{"id":2,"src":"dev","dst":"mos","error":{"code":404,"message":"No handler for Nope"}}'


async def test_missing_jsonrpcserver_names_the_extra(dev: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jsonrpcserver", None)
    ch = dev.add_channel(RecordingChannel())
    resp = await exchange(ch, b'{"jsonrpc":"2.0","id":1,"method":"Sys.Echo"}')
    assert resp["error"]["code"] == -32603 and "mgrpc[jsonrpc]" in resp["error"]["data"]
    # mgRPC is unaffected
    ch.inject(b'{"src":"mos","id":2,"method":"Sys.Echo","params":1}')
    assert parse_frame(await ch.next_sent(T)).result == 1


async def test_oversize_jsonrpc_batch_dropped() -> None:
    node = Node(id="dev", max_frame_size=64)
    node.add_handler("E", lambda ctx, p: p)
    ch = node.add_channel(RecordingChannel())
    ch.deliver_bytes(json.dumps([{"jsonrpc": "2.0", "id": i, "method": "E"} for i in range(10)]).encode())
    ch.deliver_bytes(b'{"jsonrpc":"2.0","id":"ok","method":"E"}')
    assert json.loads(await ch.next_sent(T))["id"] == "ok"


# -- client side: the codec -------------------------------------------------------------------------


def test_codec_writes_jsonrpc_requests_and_restores_frames() -> None:
    codec = JsonRpcCodec()
    req = Frame.request("Sys.Echo", {"a": 1}, id=1 << 41, src="mos", dst="dev", tag="T")
    wire = json.loads(codec.encode(req, "mos"))
    assert wire == {"jsonrpc": "2.0", "method": "Sys.Echo", "params": {"a": 1}, "id": 1}  # our own numbering
    back = codec.decode(b'{"jsonrpc":"2.0","result":[1],"id":1}')
    assert (back.id, back.src, back.dst, back.tag, back.result) == (1 << 41, "dev", "mos", "T", [1])
    # a second requester with the same id cannot collide
    codec.encode(Frame.request("A", id=7, src="one"), "mos")
    codec.encode(Frame.request("B", id=7, src="two"), "mos")
    assert codec.decode(b'{"jsonrpc":"2.0","result":2,"id":3}').dst == "two"
    assert codec.decode(b'{"jsonrpc":"2.0","result":1,"id":2}').dst == "one"
    # errors: data.mgrpc_code gives the mgRPC code back; others keep theirs
    codec.encode(Frame.request("X", id=1), "mos")
    assert codec.decode(b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"m","data":{"mgrpc_code":404}},"id":4}').error == ErrorInfo(404, "m")
    assert codec.decode(b'{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"},"id":null}').error == ErrorInfo(-32601, "Method not found")
    # notification: no id; no params member when there are none
    assert json.loads(codec.encode(Frame.request("N"), "mos")) == {"jsonrpc": "2.0", "method": "N"}
    with pytest.raises(FrameError, match="object or an array"):
        codec.encode(Frame.request("N", 5, id=1), "mos")
    # an mgRPC frame from the peer is read as is
    assert codec.decode(b'{"id":1,"src":"d","dst":"mos","result":1}').src == "d"


def test_dialect_option() -> None:
    assert isinstance(with_dialect(JsonRpcCodec().inner, "JSONRPC"), JsonRpcCodec)
    plain = JsonRpcCodec().inner
    assert with_dialect(plain, "mgrpc") is plain and with_dialect(plain, None) is plain
    with pytest.raises(UsageError, match="valid dialects: mgrpc, jsonrpc"):
        with_dialect(plain, "soap")


async def test_dialect_url_option_client_only() -> None:
    node = Node(id="dev")
    with pytest.raises(UsageError, match="client option"):
        await transports.listen("tcp://127.0.0.1:0?dialect=jsonrpc", node)
    listener = await transports.listen("loop://jr-dialect", node)
    try:
        with pytest.raises(UsageError, match="valid dialects"):
            await transports.connect("loop://jr-dialect?dialect=soap")
        # loop:// carries JSON-RPC too
        async with await transports.connect("loop://jr-dialect?dialect=jsonrpc", timeout_s=T) as client:
            assert await client.call("RPC.Describe", ["RPC.Ping"]) == {"name": "RPC.Ping", "args_fmt": ""}
    finally:
        await listener.close()
        await node.close()


# -- stream framing for the dialect -------------------------------------------------------------------------


def test_line_decoder_any_split() -> None:
    from rpc.framing import FrameBytes, LineStreamDecoder, Oversize

    wire = b'\n{"a":1}\n\n  {"b":2}\r\n{"c":3}'
    for step in (1, 3, len(wire)):
        dec = LineStreamDecoder()
        for i in range(0, len(wire), step):
            dec.feed(wire[i : i + step])
        dec.feed_eof()
        assert list(dec.events()) == [FrameBytes(b'{"a":1}'), FrameBytes(b'{"b":2}'), FrameBytes(b'{"c":3}')]
    dec = LineStreamDecoder(max_size=8)
    dec.feed(b'{"long":"line"}\n{"a":1}\n')
    assert list(dec.events()) == [Oversize(15), FrameBytes(b'{"a":1}')]


def test_device_stream_decoder_keeps_a_batch_whole() -> None:
    from rpc.framing import DeviceStreamDecoder, FrameBytes, Junk

    dec = DeviceStreamDecoder(ascii_only=False)
    dec.feed(b'[{"jsonrpc":"2.0","method":"A","id":1}, {"jsonrpc":"2.0","method":"B"}]\n')
    dec.feed(b"[boot] {not a batch}\n")  # console text stays junk + frame, as rpc-uart reads it
    dec.feed(b'{"jsonrpc": "2.0", "method"\n')  # no closing brace: whole, and no CRC mode learned
    events = list(dec.events())
    assert events[0] == FrameBytes(b'[{"jsonrpc":"2.0","method":"A","id":1}, {"jsonrpc":"2.0","method":"B"}]')
    assert events[1:3] == [Junk(b"[boot] "), FrameBytes(b"{not a batch}")]
    assert events[3] == FrameBytes(b'{"jsonrpc": "2.0", "method"') and not dec.modes.crc
    unlimited = DeviceStreamDecoder(max_frame_size=0)
    unlimited.feed(b'{"x":"' + b"y" * 10000 + b'"}\n')
    assert [type(e) for e in unlimited.events()] == [FrameBytes]
