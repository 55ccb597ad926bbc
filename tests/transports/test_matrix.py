"""The same scenario on every transport, with real peers on 127.0.0.1 (pty relay, aiohttp, mosquitto,
bumble's link): call, error, notification, large frame, concurrent calls, and the device going away
and coming back on the same address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import transports
from rpc.client import AsyncClient
from rpc.errors import HandlerError, RemoteError
from rpc.node import Node

pytestmark = pytest.mark.timeout(90)


@dataclass
class Setup:
    """How to serve a node on one transport and how a client reaches it."""

    listen_url: str
    client_url: Callable[[str], str]  # from the listener's bound URL
    listen_opts: dict[str, Any] = field(default_factory=dict)
    client_opts: dict[str, Any] = field(default_factory=dict)
    cleanup: list[Callable[[], Any]] = field(default_factory=list)


def _same(url: str) -> str:
    return url


@pytest.fixture(params=["tcp", "udp", "serial", "ws", "http", "mqtt", "ble", "loop"])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    kind = request.param
    if kind == "tcp":
        yield Setup("tcp://127.0.0.1:0", _same)
    elif kind == "udp":
        yield Setup("udp://127.0.0.1:0", _same)
    elif kind == "ws":
        yield Setup("ws://127.0.0.1:0/rpc", _same)
    elif kind == "http":
        yield Setup("http://127.0.0.1:0/rpc", _same)
    elif kind == "loop":
        yield Setup("loop://matrix", _same)
    elif kind == "serial":
        from transports.linkemu import LinkEmulator

        link = LinkEmulator(baud=None)
        link.start()
        yield Setup(f"serial://{link.a_path}", lambda _u: f"serial://{link.b_path}")
        link.stop()
    elif kind == "mqtt":
        from tests.mosquitto import Mosquitto, require_mosquitto

        require_mosquitto()
        broker = Mosquitto().start()
        yield Setup(f"mqtt://127.0.0.1:{broker.port}", lambda _u: f"mqtt://127.0.0.1:{broker.port}/matrix-dev")
        broker.stop()
    elif kind == "ble":
        from transports.ble_testing import BumbleAir

        air = BumbleAir()
        yield Setup(
            "ble://", lambda _u: "ble://matrix-dev?timeout_s=2", listen_opts={"link": air.link},
            client_opts={"bleak_backend": air.client_backend, "bleak_scanner_backend": air.scanner_backend},
        )  # fmt: skip


def device_node() -> tuple[Node, list[Any]]:
    node = Node(id="matrix-dev")
    notes: list[Any] = []
    node.add_handler("T.Echo", lambda ctx, p: p)
    node.add_handler("T.Note", lambda ctx, p: notes.append(p))

    def fail(ctx: Any, p: Any) -> Any:
        raise HandlerError(-7, "nope")

    async def slow(ctx: Any, p: Any) -> Any:
        await asyncio.sleep(0.01 * (p % 5))
        return p

    node.add_handler("T.Fail", fail)
    node.add_handler("T.Slow", slow)
    return node, notes


async def _connect(s: Setup, bound: str) -> AsyncClient:
    return await transports.connect(s.client_url(bound), timeout_s=10, **s.client_opts)


async def _eventually(cond: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_transport_scenario(setup: Setup) -> None:
    node, notes = device_node()
    lst = await transports.listen(setup.listen_url, node, **setup.listen_opts)
    bound = lst.url
    try:
        client = await _connect(setup, bound)
        # call and error
        assert await client.call("T.Echo", {"a": [1, "é"]}) == {"a": [1, "é"]}
        with pytest.raises(RemoteError) as ei:
            await client.call("T.Fail")
        assert (ei.value.code, ei.value.message) == (-7, "nope")
        with pytest.raises(RemoteError, match="No handler for T.Nope"):
            await client.call("T.Nope")
        # notification: runs, no reply
        client.notify("T.Note", {"n": 1})
        await _eventually(lambda: notes == [{"n": 1}], "the notification")
        # a large frame (close to the device's 4096-byte limit)
        big = "x" * 3600
        assert await client.call("T.Echo", big) == big
        # concurrent calls, answered out of order
        got = await asyncio.gather(*(client.call("T.Slow", i) for i in range(20)))
        assert got == list(range(20))
        await client.close()
        # the device goes away...
        await lst.close()
        down = await _try_call(setup, bound)
        assert down is not None, "a call succeeded while the device was away"
        # ...and comes back on the same address
        lst = await transports.listen(bound if setup.listen_url != "ble://" else setup.listen_url, node,
                                      **setup.listen_opts)  # fmt: skip
        client = await _connect(setup, lst.url)
        assert await client.call("T.Echo", "back") == "back"
        await client.close()
    finally:
        await lst.close()
        await node.close()


async def _try_call(s: Setup, bound: str) -> BaseException | None:
    try:
        c = await asyncio.wait_for(_connect(s, bound), 15)
    except (OSError, TimeoutError) as e:
        return e
    try:
        await c.call("T.Echo", 1, timeout_s=0.5)
    except (OSError, TimeoutError, RemoteError) as e:
        return e
    finally:
        await c.close()
    return None


