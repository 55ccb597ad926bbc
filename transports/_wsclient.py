"""A small WebSocket client (RFC 6455) on asyncio streams: what ``ws://`` needs from one, nothing more.

Why not aiohttp's client: importing it costs about 0.15 s (its connector builds TLS contexts at import
time), more than a whole ``mgrpc call`` over WebSocket should take (bench/cli.py). The device side
keeps aiohttp's server.

What it does: the opening handshake (``Sec-WebSocket-Key``/``Accept`` checked, subprotocols, extra
headers, no extensions), masked TEXT/BINARY messages out, TEXT/BINARY messages in (fragments joined),
PINGs answered with PONGs, the closing handshake. The frame codec (:class:`FrameParser`,
:func:`encode_frame`) is sans-I/O.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from rpc.errors import TransportError

__all__ = ["FrameParser", "WsConnection", "WsHandshakeError", "WsProtocolError", "connect", "encode_frame"]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 16 << 20  # bytes of one incoming message, fragments included
_MAX_HEADER = 64 << 10
_READ_SIZE = 65536


class WsHandshakeError(TransportError):
    """The server did not switch protocols properly (``status`` is its HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WsProtocolError(TransportError):
    """The server broke the framing rules (bad frame, message too big)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One complete incoming frame of interest: a data message (``opcode`` TEXT/BINARY) or a control frame."""

    opcode: int
    data: bytes


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    # XOR with the repeated key through big integers: one C-level pass instead of a loop per byte.
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes, *, mask: bool = True) -> bytes:
    """One final frame (FIN set) with ``opcode`` and ``payload``; masked, as a client must send it."""
    n = len(payload)
    head = bytearray((0x80 | opcode,))
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mask_bit | 127)
        head += n.to_bytes(8, "big")
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + _mask(payload, key)


class FrameParser:
    """Sans-I/O parser of the frames a server sends: ``feed(bytes)`` returns the complete
    :class:`Message` s (fragmented data messages joined; control frames as they come)."""

    def __init__(self, *, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._frag_op: int | None = None
        self._frags: list[bytes] = []
        self._frag_len = 0

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes; return the messages they complete (raises :class:`WsProtocolError`)."""
        self._buf += data
        out: list[Message] = []
        while True:
            done, msg = self._one()
            if not done:
                return out
            if msg is not None:
                out.append(msg)

    def _one(self) -> tuple[bool, Message | None]:
        """(False, None): more bytes needed; (True, message or None for a non-final fragment)."""
        buf = self._buf
        if len(buf) < 2:
            return False, None
        b0, b1 = buf[0], buf[1]
        if b0 & 0x70:
            raise WsProtocolError("reserved bits set (no extension was negotiated)")
        fin, opcode, masked, n = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return False, None
            n, pos = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return False, None
            n, pos = int.from_bytes(buf[2:10], "big"), 10
        if n > self.max_message:
            raise WsProtocolError(f"a {n}-byte frame is more than {self.max_message}")
        key = b""
        if masked:
            if len(buf) < pos + 4:
                return False, None
            key, pos = bytes(buf[pos : pos + 4]), pos + 4
        if len(buf) < pos + n:
            return False, None
        payload = bytes(buf[pos : pos + n])
        del buf[: pos + n]
        if key:
            payload = _mask(payload, key)
        if opcode >= 0x8:  # control frames: never fragmented, at most 125 bytes
            if not fin or n > 125:
                raise WsProtocolError("bad control frame")
            return True, Message(opcode, payload)
        if opcode == OP_CONT:
            if self._frag_op is None:
                raise WsProtocolError("continuation frame without a message")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._frag_op is not None:
                raise WsProtocolError("new message before the last one ended")
            if fin:
                return True, Message(opcode, payload)
            self._frag_op = opcode
        else:
            raise WsProtocolError(f"unknown opcode {opcode}")
        self._frags.append(payload)
        self._frag_len += n
        if self._frag_len > self.max_message:
            raise WsProtocolError(f"a message of more than {self.max_message} bytes")
        if not fin:
            return True, None
        op, data = self._frag_op, b"".join(self._frags)
        self._frag_op, self._frags, self._frag_len = None, [], 0
        assert op is not None
        return True, Message(op, data)


class WsConnection:
    """An open client connection: :meth:`send_str` / :meth:`send_bytes`, iterate for messages
    (``(is_text, data)``; PINGs are answered on the way), :meth:`close`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: str | None) -> None:
        self.protocol = protocol
        self._reader = reader
        self._writer = writer
        self._parser = FrameParser()
        self._pending: list[Message] = []
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._close_sent = False
        self._error: BaseException | None = None

    @property
    def closed(self) -> bool:
        """True once either side closed (or the connection broke)."""
        return self._closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        """The underlying transport's extra info (``"sockname"``, ``"peername"``, ...)."""
        return self._writer.get_extra_info(name, default)

    def exception(self) -> BaseException | None:
        """What broke the connection, if anything did."""
        return self._error

    async def _write(self, frame: bytes) -> None:
        if self._closed:
            raise ConnectionResetError("WebSocket is closed")
        async with self._write_lock:
            self._writer.write(frame)
            await self._writer.drain()

    async def send_str(self, text: str) -> None:
        """Send one TEXT message."""
        await self._write(encode_frame(OP_TEXT, text.encode("utf-8")))

    async def send_bytes(self, data: bytes) -> None:
        """Send one BINARY message."""
        await self._write(encode_frame(OP_BINARY, data))

    async def receive(self) -> tuple[bool, bytes] | None:
        """The next data message as ``(is_text, data)``; None when the connection has ended."""
        while not self._closed:
            if self._pending:
                msg = self._pending.pop(0)
                if msg.opcode in (OP_TEXT, OP_BINARY):
                    return msg.opcode == OP_TEXT, msg.data
                if msg.opcode == OP_PING:
                    with contextlib.suppress(OSError):
                        await self._write(encode_frame(OP_PONG, msg.data))
                elif msg.opcode == OP_CLOSE:
                    self._finish(msg.data[:2] or b"\x03\xe8")
                continue
            try:
                data = await self._reader.read(_READ_SIZE)
            except (OSError, asyncio.IncompleteReadError) as e:
                self._error = e
                data = b""
            if not data:
                self._finish(None)
                break
            try:
                self._pending.extend(self._parser.feed(data))
            except WsProtocolError as e:
                self._error = e
                self._finish(b"\x03\xea")  # 1002: protocol error
        return None

    def __aiter__(self) -> AsyncIterator[tuple[bool, bytes]]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[tuple[bool, bytes]]:
        while (msg := await self.receive()) is not None:
            yield msg

    async def close(self, code: int = 1000) -> None:
        """The closing handshake (a CLOSE frame, then the TCP connection goes)."""
        self._finish(code.to_bytes(2, "big"))
        with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)

    def _finish(self, close_payload: bytes | None) -> None:
        if not self._close_sent and close_payload is not None and not self._writer.is_closing():
            self._close_sent = True
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(encode_frame(OP_CLOSE, close_payload))
        self._closed = True
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()


def _accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


async def connect(
    url: str,
    *,
    protocols: Sequence[str] = (),
    origin: str | None = None,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> WsConnection:
    """Open ``url`` (``ws://`` or ``wss://``) and do the opening handshake.

    Raises :class:`WsHandshakeError` when the server answers anything but a proper ``101``, and
    ``OSError`` when it cannot be reached.
    """
    parts = urlsplit(url)
    secure = parts.scheme.lower() == "wss"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if secure and ssl_context is None:
        ssl_context = ssl.create_default_context()
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_context if secure else None, server_hostname=host if secure else None, limit=_MAX_HEADER
    )
    try:
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        host_header = host if ":" not in host else f"[{host}]"
        if parts.port is not None and parts.port != (443 if secure else 80):
            host_header += f":{parts.port}"
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host_header}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if origin:
            lines.append(f"Origin: {origin}")
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            raise WsHandshakeError(0, "the server closed the connection during the handshake") from e
        except asyncio.LimitOverrunError as e:
            raise WsHandshakeError(0, "the server's handshake answer is too long") from e
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = status_line.split(" ", 2)
        try:
            status = int(fields[1])
        except (IndexError, ValueError):
            raise WsHandshakeError(0, f"not an HTTP answer: {status_line!r}") from None
        answer: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                answer[name.strip().lower()] = value.strip()
        if status != 101:
            raise WsHandshakeError(status, f"{status} {fields[2] if len(fields) > 2 else ''}".strip())
        if answer.get("upgrade", "").lower() != "websocket" or "upgrade" not in answer.get("connection", "").lower():
            raise WsHandshakeError(101, "the server did not upgrade to WebSocket")
        if answer.get("sec-websocket-accept") != _accept_for(key):
            raise WsHandshakeError(101, "wrong Sec-WebSocket-Accept")
        if answer.get("sec-websocket-extensions"):
            raise WsHandshakeError(101, "the server chose an extension nobody asked for")
        protocol = answer.get("sec-websocket-protocol") or None
        if protocol is not None and protocol not in protocols:
            raise WsHandshakeError(101, f"the server chose subprotocol {protocol!r}, not one offered")
    except BaseException:
        writer.close()
        raise
    return WsConnection(reader, writer, protocol)
