"""WebSocket checks on the raw upgrade and control frames (docs/protocol/transports.md §2; RFC 6455).

The aiohttp client used by the ``ws`` checks hides the upgrade's headers (a subprotocol that was not
asked for simply reads as none) and answers control frames itself, so these checks speak RFC 6455
over a plain socket: the exact ``101`` answer, a ping, and the closing handshake.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
import struct
from urllib.parse import urlsplit

from conformance.model import CheckSkipped, check, expect
from conformance.rawjson import show
from conformance.session import Session

__all__: list[str] = []

WS = ("ws", "wss")
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PROTOCOL = "clubby.cesanta.com"


class _RawWs:
    """One raw WebSocket connection: the upgrade answer's status and headers, frames in and out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head = b""

    @classmethod
    async def open(cls, s: Session, key: str) -> _RawWs:
        parts = urlsplit(s.url)
        tls = parts.scheme == "wss"
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if tls else 80)
        ctx: ssl.SSLContext | None = None
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), s.options.timeout_s)
        ws = cls(reader, writer)
        path = parts.path or "/"
        req = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {PROTOCOL}\r\nOrigin: https://api.cesanta.com/\r\n\r\n"
        )
        writer.write(req.encode("latin-1"))
        await writer.drain()
        ws.head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), s.options.timeout_s)
        lines = ws.head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ")
        ws.status = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                ws.headers[k.strip().lower()] = v.strip()
        return ws

    def send(self, op: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes((0x80 | op,)) + (bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + struct.pack(">H", n))
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def recv(self) -> tuple[int, bytes]:
        """The next frame (opcode, payload); (-1, b"") when the connection ended."""
        try:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
            mask = await self.reader.readexactly(4) if b1 & 0x80 else b""
            data = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError):
            return -1, b""
        if mask:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        return b0 & 0x0F, data

    async def recv_control(self, s: Session) -> tuple[int, bytes] | None:
        """The next control frame or end of connection (data frames skipped); None on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.options.timeout_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                op, data = await asyncio.wait_for(self.recv(), left)
            except TimeoutError:
                return None
            if op == -1 or op >= 0x8:
                return op, data

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()


async def _open(s: Session) -> tuple[_RawWs, str]:
    key = base64.b64encode(os.urandom(16)).decode()
    try:
        ws = await _RawWs.open(s, key)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise CheckSkipped(f"raw connection failed: {e}") from None
    return ws, key


@check(
    "ws.upgrade", section="transports.md §2", title="101 answer: Upgrade, Accept, subprotocol echoed verbatim", only=WS
)
async def _ws_upgrade(s: Session) -> str | None:
    ws, key = await _open(s)
    try:
        h = ws.headers
        expect(ws.status == 101, "the upgrade must be answered 101", seen=show(ws.head), expected="HTTP/1.1 101 ...")
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        expect(
            h.get("upgrade", "").lower() == "websocket" and h.get("sec-websocket-accept") == accept,
            "Upgrade: websocket and the RFC 6455 Sec-WebSocket-Accept",
            seen=show(ws.head),
            expected=f"Upgrade: websocket, Sec-WebSocket-Accept: {accept}",
        )
        proto = h.get("sec-websocket-protocol")
        expect(
            proto in (None, PROTOCOL),
            "the requested subprotocol must be echoed verbatim (or no protocol header at all)",
            seen=f"Sec-WebSocket-Protocol: {proto}",
            expected=f"Sec-WebSocket-Protocol: {PROTOCOL}",
        )
    finally:
        await ws.close()
    return None if proto else "no subprotocol header (older mongoose)"


@check(
    "ws.ping_pong",
    section="transports.md §2; real-device.md RD-E18",
    title="a PING is answered with its PONG",
    only=WS,
)
async def _ws_ping_pong(s: Session) -> str | None:
    ws, _ = await _open(s)
    try:
        payload = os.urandom(8).hex().encode()
        ws.send(0x9, payload)
        await ws.writer.drain()
        got = await ws.recv_control(s)
        expect(
            got is not None and got[0] == 0xA and got[1] == payload,
            "a PING must be answered with a PONG carrying the same data",
            seen="nothing" if got is None else f"opcode {got[0]:#x} {show(got[1])}",
            expected=f"PONG {show(payload)}",
        )
    finally:
        await ws.close()
    return None


@check(
    "ws.close_handshake",
    section="transports.md §2; real-device.md RD-E18",
    title="a CLOSE is answered (CLOSE or disconnect)",
    only=WS,
)
async def _ws_close_handshake(s: Session) -> str | None:
    ws, _ = await _open(s)
    try:
        ws.send(0x8, struct.pack(">H", 1000))
        await ws.writer.drain()
        got = await ws.recv_control(s)
        expect(
            got is not None and got[0] in (0x8, -1),
            "after a CLOSE the device must answer CLOSE (or drop the connection)",
            seen="the connection stayed open" if got is None else f"opcode {got[0]:#x}",
            expected="CLOSE",
        )
    finally:
        await ws.close()
    return None if got is None or got[0] == 0x8 else "connection dropped without a CLOSE"


@check(
    "ws.invalid_json_ignored",
    section="transports.md §2.5",
    title="a message that is not JSON is ignored; the connection stays usable",
    only=WS,
)
async def _ws_invalid_json_ignored(s: Session) -> str | None:
    ws, _ = await _open(s)
    try:
        ws.send(0x1, b'{"id":1,')
        fid = int.from_bytes(os.urandom(5), "big") | (1 << 40)
        ws.send(0x1, b'{"src":"mos","id":%d,"method":"RPC.Ping"}' % fid)
        await ws.writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.options.timeout_s
        answered = False
        while not answered and loop.time() < deadline:
            try:
                op, data = await asyncio.wait_for(ws.recv(), deadline - loop.time())
            except TimeoutError:
                break
            if op == -1:
                break
            answered = op in (0x1, 0x2) and b'"id":%d' % fid in data
        expect(
            answered,
            "after a message that is not JSON the next request must still be answered on the same connection",
            seen="the connection was closed or the request went unanswered",
            expected="a reply to the RPC.Ping",
        )
    finally:
        await ws.close()
    return None
