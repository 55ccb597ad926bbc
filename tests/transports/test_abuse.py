"""Listeners under abuse (issue #14 §4), on 127.0.0.1 with bounded loops: idle connections, a peer
that never reads, oversized frames, invalid UTF-8, a flood of requests, slowloris HTTP headers. In
every case a well-behaved client keeps being served, and what the device holds stays bounded by its
configured limits."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

import transports
from rpc.errors import UsageError
from rpc.node import Node

T = 10.0


def _node() -> Node:
    node = Node(id="esp32_ABUSE", max_frame_size=4096)
    node.add_handler("Test.Big", lambda ctx, p: "x" * 3000)
    return node


@pytest.fixture
async def tcp() -> AsyncIterator[tuple[Any, Node]]:
    node = _node()
    lst = await transports.listen("tcp://127.0.0.1:0?max_conns=20&max_out_buffer=65536", node)
    yield lst, node
    await lst.close()
    await node.close()


def _addr(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    assert u.hostname is not None and u.port is not None
    return u.hostname, u.port


async def _ping(url: str) -> None:
    async with await transports.connect(url, timeout_s=T) as c:
        assert await asyncio.wait_for(c.call("RPC.Ping"), T)


async def test_idle_connections_never_lock_a_client_out(tcp: tuple[Any, Node]) -> None:
    lst, _ = tcp
    host, port = _addr(lst.url)
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(60)]  # 3 x max_conns
    try:
        await asyncio.sleep(0.2)
        assert len(lst.channels) <= 20
        await _ping(lst.url)  # the quietest idle one made room
        assert len(lst.channels) <= 20
    finally:
        for _, w in idle:
            w.close()


async def test_a_client_that_made_a_call_outlives_a_burst_of_idle_connections(tcp: tuple[Any, Node]) -> None:
    # Before, the connection quiet the longest went first: a client whose last call was a moment before
    # a burst of idle connections was the oldest, and lost its connection.
    lst, _ = tcp
    host, port = _addr(lst.url)
    async with await transports.connect(lst.url, timeout_s=T) as good:
        assert await good.call("RPC.Ping")
        conns = []
        for i in range(60):  # 3 x max_conns, a third of them in the middle of a frame that never ends
            _, w = await asyncio.open_connection(host, int(port))
            if i % 3 == 0:
                w.write(b'{"id":1,"src":"x","method":"RPC.Pi')
            conns.append(w)
        try:
            for _ in range(100):
                await asyncio.sleep(0.01)
            assert len(lst.channels) <= 20
            assert await asyncio.wait_for(good.call("RPC.Ping"), T), "the same connection still serves"
        finally:
            for w in conns:
                w.close()


async def test_a_peer_that_never_reads_is_cut_off(tcp: tuple[Any, Node]) -> None:
    lst, _ = tcp
    host, port = _addr(lst.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    request = b'{"id":1,"src":"x","method":"Test.Big"}\n'
    for _ in range(100):  # shrink the device's kernel buffer too, so the test needs few requests
        await asyncio.sleep(0.01)
        if lst.channels:
            break
    for ch in lst.channels:
        ch._writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = asyncio.get_running_loop()
    sent = 0
    try:
        for _ in range(2000):  # each asks for ~3 KB; never read one of them
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, request), 1)
            except (OSError, TimeoutError):
                break  # the device closed it (or stopped reading from a dead peer)
            sent += 1
            if not lst.channels:
                break
            for ch in lst.channels:  # bounded: never more than the limit plus one reply is queued
                assert ch._writer.transport.get_write_buffer_size() <= 65536 + 4096
            if sent % 50 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        assert not lst.channels, "a peer that reads nothing must be closed once max_out_buffer is reached"
        await _ping(lst.url)
    finally:
        sock.close()


@pytest.mark.parametrize(
    "junk",
    [
        b'{"id":1,"method":"RPC.Ping","params":"' + b"A" * 200_000 + b'"}\n',  # far over max_frame_size
        b'{"id":1,"method":"RPC.Ping","params":"\xff\xfe\xc3\x28"}\n',  # invalid UTF-8
        b"\xff" * 10_000 + b"\n",
        b'"""' * 1000 + b"\x04" * 100 + b"\n\n\n",
    ],
)
async def test_oversized_and_invalid_frames_are_dropped_and_the_link_lives(tcp: tuple[Any, Node], junk: bytes) -> None:
    lst, _ = tcp
    host, port = _addr(lst.url)
    r, w = await asyncio.open_connection(host, int(port))
    try:
        w.write(junk + b'{"id":77,"src":"x","method":"RPC.Ping"}\n')
        await w.drain()
        line = await asyncio.wait_for(r.readline(), T)
        while b'"id":77' not in line:
            line = await asyncio.wait_for(r.readline(), T)
        assert b'"result"' in line
    finally:
        w.close()


async def test_a_flood_of_requests_is_answered_in_full(tcp: tuple[Any, Node]) -> None:
    lst, _ = tcp
    host, port = _addr(lst.url)
    r, w = await asyncio.open_connection(host, int(port))
    n = 3000  # far beyond max_queue_length (25): a device answers in order, nothing is lost
    try:
        w.write(b"".join(b'{"id":%d,"src":"x","method":"RPC.Ping"}\n' % i for i in range(1, n + 1)))
        seen = 0
        while seen < n:
            line = await asyncio.wait_for(r.readline(), T)
            seen += b'"result"' in line
        await _ping(lst.url)
    finally:
        w.close()


async def test_slowloris_headers_do_not_block_other_clients() -> None:
    node = _node()
    lst = await transports.listen("http://127.0.0.1:0/rpc", node)
    host, port = _addr(lst.url)
    slow = []
    try:
        for _ in range(100):
            _, w = await asyncio.open_connection(host, int(port))
            w.write(b"POST /rpc HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the end of the headers
            slow.append(w)
        await asyncio.sleep(0.1)
        for w in slow:
            w.write(b"a")
        await _ping(lst.url)
        ws = await transports.listen(lst.url.replace("http://", "ws://"), node)
        await _ping(ws.url)
        await ws.close()
    finally:
        for w in slow:
            w.close()
        await lst.close()
        await node.close()


@pytest.mark.parametrize("option", ["max_conns=0", "max_conns=x", "max_out_buffer=-1"])
async def test_bad_limits_are_usage_errors(option: str) -> None:
    node = _node()
    with pytest.raises(UsageError):
        await transports.listen(f"tcp://127.0.0.1:0?{option}", node)
    await node.close()


def _ws_frame(text: bytes) -> bytes:
    """One masked TEXT frame, as a client must send it."""
    mask = b"\x01\x02\x03\x04"
    n = len(text)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))


async def test_a_websocket_peer_that_never_reads_is_dropped() -> None:
    from transports import ws as ws_mod

    node = _node()
    lst = await transports.listen("ws://127.0.0.1:0/rpc", node)
    host, port = _addr(lst.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, (
            f"GET /rpc HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:  # the 101 answer; nothing is read after it
            head += await asyncio.wait_for(loop.sock_recv(sock, 1), T)
        assert b" 101 " in head
        chans = [ch for ch in node.channels if ch.type == "WS_in"]
        for ch in chans:  # shrink the device's kernel buffer too, so few requests are needed
            ch._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        frame = _ws_frame(b'{"id":1,"src":"x","method":"Test.Big"}')
        for i in range(5000):  # ~3 KB replies each
            if not any(ch.type == "WS_in" for ch in node.channels):
                break
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, frame), 1)
            except (OSError, TimeoutError):
                break
            if i % 20 == 0:
                await asyncio.sleep(0)
            for ch in node.channels:  # never much more than the limits of replies waiting
                if ch.type == "WS_in":
                    assert ch._sending <= ws_mod.MAX_PENDING_SENDS
                    assert ch._transport.get_write_buffer_size() <= ws_mod.MAX_OUT_BUFFER + 8192
        await asyncio.sleep(0.2)
        assert not any(ch.type == "WS_in" for ch in node.channels), "the non-reading peer must be dropped"
        await _ping(lst.url)
    finally:
        sock.close()
        await lst.close()
        await node.close()


# -- ws:// and http:// (one aiohttp server per host:port): max_conns, header_timeout, idle_timeout


async def _raw_http(host: str, port: int, data: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection(host, port)
    if data:
        w.write(data)
        await w.drain()
    return r, w


async def _closed_by_peer(reader: asyncio.StreamReader, within_s: float = T) -> bool:
    """True if the device closes the connection (EOF or reset) within ``within_s``."""
    try:
        while await asyncio.wait_for(reader.read(65536), within_s):
            pass
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        pass
    return True


async def _eventually(predicate: Any, within_s: float = T) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture
async def web_pair() -> AsyncIterator[tuple[Any, Any, Node]]:
    """A ws and an http listener on one server, with small limits."""
    node = _node()
    ws = await transports.listen("ws://127.0.0.1:0/rpc?max_conns=8&header_timeout=0.5&idle_timeout=30", node)
    http = await transports.listen(ws.url.replace("ws://", "http://").split("?")[0], node)
    assert http.server is ws.server
    yield ws, http, node
    await http.close()
    await ws.close()
    await node.close()


async def test_slowloris_heads_are_closed_after_header_timeout(web_pair: tuple[Any, Any, Node]) -> None:
    ws, _, _ = web_pair
    host, port = _addr(ws.url)
    slow = [await _raw_http(host, port, b"POST /rpc HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(5)]
    try:
        for r, w in slow:  # a byte now and then never finishes the head: closed all the same
            w.write(b"a")
            assert await _closed_by_peer(r), "a head that never ends must be closed after header_timeout"
        assert await _eventually(lambda: len(ws.server.connections) == 0)
        await _ping(ws.url)
    finally:
        for _, w in slow:
            w.close()


async def test_idle_and_half_open_connections_beyond_max_conns_make_room(web_pair: tuple[Any, Any, Node]) -> None:
    ws, http, _ = web_pair
    host, port = _addr(ws.url)
    async with await transports.connect(ws.url, timeout_s=T) as good:  # a client that has made a call
        assert await good.call("RPC.Ping")
        idle = [await _raw_http(host, port) for _ in range(20)]  # 2.5 x max_conns, silent
        half = [await _raw_http(host, port, b"GET /rpc HTTP/1.1\r\n") for _ in range(10)]
        try:
            assert await _eventually(lambda: len(ws.server.connections) <= 8)
            dropped = [r for r, _ in idle + half if await _closed_by_peer(r, 0.05)]
            assert len(dropped) >= 30 - 7, "all but max_conns - 1 of them must have been closed"
            assert len(ws.server.connections) <= 8
            assert await good.call("RPC.Ping"), "the client that made a call keeps its connection"
            await _ping(http.url)  # and a new client is served
            assert len(ws.server.connections) <= 8
        finally:
            for _, w in idle + half:
                w.close()


async def test_idle_websockets_beyond_max_conns_make_room() -> None:
    node = _node()
    lst = await transports.listen("ws://127.0.0.1:0/rpc?max_conns=4", node)
    try:
        quiet = [await transports.connect(lst.url, timeout_s=T) for _ in range(4)]  # upgraded, never a message
        async with await transports.connect(lst.url, timeout_s=T) as good:
            assert await good.call("RPC.Ping")
            assert len(lst.server.connections) <= 4
            more = [await transports.connect(lst.url, timeout_s=T) for _ in range(6)]
            assert await good.call("RPC.Ping")
            assert len(lst.server.connections) <= 4
            for c in more:
                await c.close()
        for c in quiet:
            await c.close()
    finally:
        await lst.close()
        await node.close()


async def test_idle_timeout_closes_a_silent_connection() -> None:
    node = _node()
    lst = await transports.listen("http://127.0.0.1:0/rpc?idle_timeout=0.3", node)
    host, port = _addr(lst.url)
    try:
        r, w = await _raw_http(host, port)
        assert await _closed_by_peer(r)
        w.close()
        body = b'{"id":1,"src":"x","method":"RPC.Ping"}'
        head = b"POST /rpc HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(body)
        r, w = await _raw_http(host, port, head + body)
        assert b" 200 " in await asyncio.wait_for(r.readline(), T)
        assert await _closed_by_peer(r), "a keep-alive connection left idle is closed too"
        w.close()
    finally:
        await lst.close()
        await node.close()


async def test_a_chunked_body_over_max_frame_size_is_refused_before_its_end() -> None:
    node = _node()  # max_frame_size 4096
    lst = await transports.listen("http://127.0.0.1:0/rpc", node)
    host, port = _addr(lst.url)
    try:
        for path in ("/rpc", "/rpc/RPC.Ping", "/jsonrpc"):
            r, w = await _raw_http(host, port, f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                                              "Transfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
            chunk = b"10000\r\n" + b"A" * 0x10000 + b"\r\n"
            status = b""
            try:
                for _ in range(200):  # up to 12.5 MiB, never the last chunk: the answer must come first
                    w.write(chunk)
                    await w.drain()
                    try:
                        status = await asyncio.wait_for(r.readline(), 0.01)
                    except TimeoutError:
                        continue
                    break
            except (ConnectionError, OSError):
                status = status or await r.readline()
            finally:
                w.close()
            assert status.split()[1:2] in ([b"400"], [b"413"]), (path, status)
        await _ping(lst.url)
    finally:
        await lst.close()
        await node.close()


@pytest.mark.parametrize("scheme", ["ws", "http"])
@pytest.mark.parametrize("option", ["max_conns=0", "max_conns=1.5", "header_timeout=0", "idle_timeout=-1",
                                    "idle_timeout=nan", "header_timeout=x"])  # fmt: skip
async def test_bad_web_limits_are_usage_errors(scheme: str, option: str) -> None:
    node = _node()
    with pytest.raises(UsageError, match=option.split("=")[0]):
        await transports.listen(f"{scheme}://127.0.0.1:0/rpc?{option}", node)
    await node.close()


async def test_listeners_on_one_server_cannot_disagree_on_limits() -> None:
    node = _node()
    ws = await transports.listen("ws://127.0.0.1:0/rpc?max_conns=5", node)
    port = _addr(ws.url)[1]
    try:
        with pytest.raises(UsageError, match="max_conns=5"):
            await transports.listen(f"http://127.0.0.1:{port}/rpc?max_conns=6", node)
        http = await transports.listen(f"http://127.0.0.1:{port}/rpc?max_conns=5&header_timeout=10", node)
        assert http.server.limits.max_conns == 5
        await http.close()
    finally:
        await ws.close()
        await node.close()
