"""Router rules of spec/frame.md §3 and §8, built-ins of §4, pending calls (JSON-RPC 2.0: tests/rpc/test_jsonrpc.py)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

import transports
from rpc.errors import ChannelClosed, HandlerError, QueueOverflow, RemoteError, RpcTimeout
from rpc.frame import parse_frame
from rpc.node import Node
from tests.helpers import RecordingChannel

DEV = "esp32_0A1B2C"


@pytest.fixture
def dev() -> Node:
    node = Node(id=DEV)
    node.add_handler("Sys.Echo", lambda ctx, p: p, args_fmt="{value: %T}")
    node.add_handler("Config.Get", lambda ctx, p: DEV if p == {"key": "device.id"} else None)
    return node


async def test_reply_envelope_swaps_src_dst_and_copies_tag(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"mos","id":1580229426716,"method":"Config.Get","params":{"key":"device.id"},"tag":"T9"}')
    assert await ch.next_sent() == (
        b'{"id":1580229426716,"src":"esp32_0A1B2C","dst":"mos","tag":"T9","result":"esp32_0A1B2C"}'
    )


async def test_reply_src_is_request_dst_when_ours(dev: Node) -> None:
    dev.ids.append("alias")
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"mos","dst":"alias","id":3,"method":"Sys.Echo","params":1}')
    assert await ch.next_sent() == b'{"id":3,"src":"alias","dst":"mos","result":1}'


async def test_wrong_dst_dropped_silently_and_nonpersistent_closed(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"mos","dst":"other","id":1,"method":"Sys.Echo"}')
    await ch.settle()
    assert ch.sent == [] and not ch.closed
    ws = dev.add_channel(RecordingChannel("WS_in", persistent=False))
    ws.inject(b'{"src":"mos","dst":"other","id":1,"method":"Sys.Echo"}')
    await ws.settle()
    assert ws.sent == [] and ws.closed


async def test_notification_runs_but_gets_no_reply(dev: Node) -> None:
    seen = []
    dev.add_handler("Note.It", lambda ctx, p: seen.append(p))
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"mos","method":"Note.It","params":{"a":1}}')
    await ch.settle()
    assert seen == [{"a": 1}] and ch.sent == []


async def test_unknown_method_404(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"mos","id":1580229426717,"method":"Foo.Bar"}')
    assert await ch.next_sent() == (
        b'{"id":1580229426717,"src":"esp32_0A1B2C","dst":"mos","error":{"code":404,"message":"No handler for Foo.Bar"}}'
    )


async def test_glob_case_insensitive_newest_first(dev: Node) -> None:
    dev.add_handler("Foo.*", lambda ctx, p: "glob")
    dev.add_handler("foo.bar|Foo.Baz", lambda ctx, p: "alt")
    dev.add_handler("F?o.Qux", lambda ctx, p: "qmark")
    ch = dev.add_channel(RecordingChannel())
    for i, m in enumerate(["FOO.BAR", "foo.baz", "Foo.Other", "fxo.qux"]):
        ch.inject(json.dumps({"src": "m", "id": i, "method": m}).encode())
    results = [parse_frame(await ch.next_sent()).result for _ in range(4)]
    assert results == ["alt", "alt", "glob", "qmark"]
    # an older exact handler is shadowed by a newer matching glob
    dev.add_handler("Sys.*", lambda ctx, p: "shadow")
    ch.inject(b'{"src":"m","id":9,"method":"Sys.Echo","params":1}')
    assert parse_frame(await ch.next_sent()).result == "shadow"


async def test_handler_exceptions_never_escape(dev: Node, caplog: pytest.LogCaptureFixture) -> None:
    def boom(ctx, p):
        raise RuntimeError("kaput")

    async def aboom(ctx, p):
        await asyncio.sleep(0)
        raise KeyError("x")

    def coded(ctx, p):
        raise HandlerError(-3, "nope")

    dev.add_handler("Boom", boom)
    dev.add_handler("ABoom", aboom)
    dev.add_handler("Coded", coded)
    ch = dev.add_channel(RecordingChannel())
    with caplog.at_level(logging.ERROR, "mgrpc.rpc"):
        ch.inject(b'{"src":"m","id":1,"method":"Boom"}')
        assert (
            await ch.next_sent()
            == b'{"id":1,"src":"esp32_0A1B2C","dst":"m","error":{"code":500,"message":"internal error"}}'
        )
        ch.inject(b'{"src":"m","id":2,"method":"ABoom"}')
        assert parse_frame(await ch.next_sent()).error.code == 500  # type: ignore[union-attr]
    assert "kaput" in caplog.text  # traceback logged
    ch.inject(b'{"src":"m","id":3,"method":"Coded"}')
    assert await ch.next_sent() == b'{"id":3,"src":"esp32_0A1B2C","dst":"m","error":{"code":-3,"message":"nope"}}'
    # still serving
    ch.inject(b'{"src":"m","id":4,"method":"Sys.Echo","params":"ok"}')
    assert parse_frame(await ch.next_sent()).result == "ok"


async def test_params_and_args(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"m","id":1,"method":"Sys.Echo","args":{"a":1}}')
    assert parse_frame(await ch.next_sent()).result == {"a": 1}
    ch.inject(b'{"src":"m","id":2,"method":"Sys.Echo","args":{"a":1},"params":{"a":2}}')
    assert parse_frame(await ch.next_sent()).result == {"a": 2}


async def test_builtins(dev: Node) -> None:
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"mos","id":1,"method":"RPC.List"}')
    assert await ch.next_sent() == (
        b'{"id":1,"src":"esp32_0A1B2C","dst":"mos","result":["Config.Get","Sys.Echo","RPC.Ping","RPC.Describe","RPC.List"]}'
    )
    ch.inject(b'{"src":"mos","id":1580229426720,"method":"RPC.Describe","params":{"name":"RPC.Describe"}}')
    assert await ch.next_sent() == (
        b'{"id":1580229426720,"src":"esp32_0A1B2C","dst":"mos","result":{"name": "RPC.Describe", "args_fmt": "{name: %T}"}}'
    )
    ch.inject(b'{"src":"mos","id":2,"method":"RPC.Describe"}')
    assert parse_frame(await ch.next_sent()).error.message == "name is required"  # type: ignore[union-attr]
    ch.inject(b'{"src":"mos","id":3,"method":"RPC.Describe","params":{"name":"sys.echo"}}')
    err = parse_frame(await ch.next_sent()).error
    assert err is not None and (err.code, err.message) == (404, "name not found")  # exact, case-sensitive
    ch.inject(b'{"src":"mos","id":1580229426719,"method":"RPC.Ping"}')
    assert await ch.next_sent() == (
        b'{"id":1580229426719,"src":"esp32_0A1B2C","dst":"mos","result":{"channel_info": "UART0"}}'
    )


async def test_src_learning_routes_requests_and_duplicates(dev: Node) -> None:
    a = dev.add_channel(RecordingChannel())
    b = dev.add_channel(RecordingChannel())
    a.inject(b'{"src":"peerA","id":1,"method":"Sys.Echo"}')
    await a.next_sent()
    assert a.address == "peerA"
    b.inject(b'{"src":"peerA","id":2,"method":"Sys.Echo"}')  # duplicate id: not learned
    await b.next_sent()
    assert b.address is None
    task = asyncio.ensure_future(dev.call("Peer.Method", {"x": 1}, dst="peerA", timeout_s=5))
    req = parse_frame(await a.next_sent())
    assert req.method == "Peer.Method" and req.dst == "peerA" and req.src == DEV and b.sent == []
    a.inject(json.dumps({"id": req.id, "src": "peerA", "dst": DEV, "result": 42}).encode())
    assert await task == 42


async def test_default_route_and_no_route(dev: Node) -> None:
    with pytest.raises(OSError):
        await dev.call("X", dst="nobody")
    d = dev.add_channel(RecordingChannel("MQTT"), default=True)
    task = asyncio.ensure_future(dev.call("X", dst="nobody", timeout_s=5))
    req = parse_frame(await d.next_sent())
    d.inject(json.dumps({"id": req.id, "src": "nobody", "dst": DEV, "error": {"code": 0}}).encode())
    assert await task is None  # error code 0 is success


async def test_rpc_local_loopback(dev: Node) -> None:
    seen = []

    def who(ctx, p):
        seen.append((ctx.src, ctx.frame.dst))
        return "me"

    dev.add_handler("Who", who)
    assert await dev.call("Who", dst="RPC.LOCAL", timeout_s=2) == "me"
    assert seen == [("RPC.LOCAL", "")]


async def test_pending_correlation_timeout_and_queue_cap(dev: Node) -> None:
    d = dev.add_channel(RecordingChannel(), default=True)
    with pytest.raises(RpcTimeout) as ei:
        await dev.call("Slow", timeout_s=0.05)
    assert isinstance(ei.value, TimeoutError)
    d.sent.clear()
    tasks = [asyncio.ensure_future(dev.call("Q", i, timeout_s=10)) for i in range(26)]
    await d.settle()
    done, _ = await asyncio.wait(tasks, timeout=1)
    assert len(done) == 1
    with pytest.raises(RemoteError) as ei2:
        tasks[0].result()
    assert (ei2.value.code, ei2.value.message) == (429, "Request queue overflow")
    # answer the others out of order: each future gets its own reply
    reqs = [parse_frame(w) for w in d.sent]
    for r in reversed(reqs[1:]):
        d.inject(json.dumps({"id": r.id, "src": "x", "dst": DEV, "result": r.params}).encode())
    assert [await t for t in tasks[1:]] == list(range(1, 26))
    # an unsolicited response is ignored
    d.inject(b'{"id":999999,"src":"x","result":1}')
    await d.settle()


async def test_channel_close_fails_pending(dev: Node) -> None:
    d = dev.add_channel(RecordingChannel(), default=True)
    task = asyncio.ensure_future(dev.call("X", timeout_s=5))
    await d.settle()
    await d.close()
    with pytest.raises(ChannelClosed):
        await task


async def test_ordering_of_sync_handlers(dev: Node) -> None:
    order: list[int] = []
    dev.add_handler("W", lambda ctx, p: order.append(p))
    ch = dev.add_channel(RecordingChannel())
    for i in range(20):
        ch.inject(json.dumps({"src": "m", "id": i, "method": "W", "params": i}).encode())
    await ch.settle()
    assert order == list(range(20))


async def test_mos_style_node_answers_404_like_mos() -> None:
    mos = Node(id="mos", style="mos", builtins=False)
    ch = mos.add_channel(RecordingChannel(style="mos"))
    ch.inject(b'{"src":"dev","id":12,"method":"Dash.Console.Event"}')
    assert await ch.next_sent() == b'{"id":12,"error":{"code":404,"message":"Method [Dash.Console.Event] not found"}}'
    ch.inject(b'{"src":"dev","id":13,"method":"X","nr":true}')
    await ch.settle()
    assert ch.sent == []


async def test_client_over_loop_url(dev: Node) -> None:
    lst = await transports.listen("loop://router-test", dev)
    try:
        async with await transports.connect("loop://router-test") as c:
            assert await c.call("sys.echo", {"v": [1, "é"]}) == {"v": [1, "é"]}
            with pytest.raises(RemoteError) as ei:
                await c.call("Foo.Bar")
            assert str(ei.value) == "remote error 404: No handler for Foo.Bar"
            many = await asyncio.gather(*(c.call("Sys.Echo", i) for i in range(100)))
            assert many == list(range(100))
            frame = await c.call_frame("Sys.Echo", 1)
            assert frame.raw is not None and frame.raw.startswith(b'{"id":')
    finally:
        await lst.close()


def test_blocking_client(dev: Node) -> None:
    async def serve() -> None:
        await transports.listen("loop://blocking", dev)

    # the blocking client runs its own loop; the device must live on that loop too
    from rpc.client import AsyncClient, Client
    from rpc.loopback import loop_pair

    async def factory() -> AsyncClient:
        a, b = loop_pair("x")
        dev.add_channel(b)
        return await AsyncClient(a).start()

    with Client(factory) as c:
        assert c.call("Sys.Echo", {"a": 1}) == {"a": 1}
        with pytest.raises(RemoteError):
            c.call("Nope")
        with pytest.raises(TimeoutError):
            c.call("Sys.Echo", 1, timeout_s=0.0)


async def test_broadcast_goes_to_broadcast_enabled_channels_only(dev: Node) -> None:
    uart = dev.add_channel(RecordingChannel("UART"))
    uart.broadcast = True
    mqtt = dev.add_channel(RecordingChannel("MQTT"))
    mqtt.broadcast = False
    assert dev.broadcast("Sys.Event", {"x": 1}) == 1
    sent = parse_frame(await uart.next_sent())
    assert sent.method == "Sys.Event" and sent.params == {"x": 1} and not sent.wants_reply
    await mqtt.settle()
    assert mqtt.sent == []


async def test_cancelled_call_leaves_nothing_pending(dev: Node) -> None:
    d = dev.add_channel(RecordingChannel(), default=True)
    task = asyncio.ensure_future(dev.call("X", timeout_s=None))
    await d.settle()
    assert dev.pending_count == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the abandoned call must not keep a slot of the 25-call cap (with no timeout it never would)
    assert dev.pending_count == 0


async def test_queue_overflow_is_its_own_error(dev: Node) -> None:
    dev.max_queue_length = 1
    d = dev.add_channel(RecordingChannel(), default=True)
    first = asyncio.ensure_future(dev.call("A", timeout_s=5))
    await d.settle()
    second = asyncio.ensure_future(dev.call("B", timeout_s=5))
    await d.settle()
    with pytest.raises(QueueOverflow) as ei:
        await first
    assert isinstance(ei.value, RemoteError) and ei.value.code == 429
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)


def test_device_ids_never_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node(id=DEV)
    # rand() & 0xffff can be 0; a repeated id would overwrite a pending call with the same key
    monkeypatch.setattr("rpc.node.random.getrandbits", lambda n: 0)
    first, second = node.new_id(), node.new_id()
    assert first != second


async def test_loop_listener_forgets_closed_links(dev: Node) -> None:
    lst = await transports.listen("loop://router-forget", dev)
    try:
        for _ in range(5):
            async with await transports.connect("loop://router-forget") as c:
                assert await c.call("Sys.Echo", 1) == 1
        # a long-lived device accepts many short connections: closed links must not pile up
        assert len(lst.channels) <= 1 and dev.channels == []
    finally:
        await lst.close()
