"""transports._wsclient: the WebSocket frame codec (sans-I/O) and the handshake's refusals."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transports._wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    FrameParser,
    Message,
    WsHandshakeError,
    WsProtocolError,
    connect,
    encode_frame,
)


def _frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A server frame (unmasked), possibly not final."""
    raw = encode_frame(opcode, payload, mask=False)
    return raw if fin else bytes((raw[0] & 0x7F,)) + raw[1:]


@settings(max_examples=200)
@given(payload=st.binary(max_size=70000), cuts=st.lists(st.integers(0, 70020), max_size=6), masked=st.booleans())
def test_any_split_of_any_size_gives_the_message(payload: bytes, cuts: list[int], masked: bool) -> None:
    wire = encode_frame(OP_BINARY, payload, mask=masked)  # 7-bit, 16-bit and 64-bit lengths
    p = FrameParser()
    got: list[Message] = []
    last = 0
    for c in sorted({x for x in cuts if x < len(wire)}):
        got += p.feed(wire[last:c])
        last = c
    got += p.feed(wire[last:])
    assert got == [Message(OP_BINARY, payload)]


def test_fragments_are_joined_and_control_frames_pass_between() -> None:
    wire = _frame(OP_TEXT, b"he", fin=False) + _frame(OP_PING, b"x") + _frame(OP_CONT, b"llo")
    assert FrameParser().feed(wire) == [Message(OP_PING, b"x"), Message(OP_TEXT, b"hello")]


@pytest.mark.parametrize(
    "wire",
    [
        bytes((0xC1, 0x00)),  # RSV1 without an extension
        _frame(OP_CONT, b"x"),  # continuation of nothing
        _frame(OP_TEXT, b"a", fin=False) + _frame(OP_TEXT, b"b"),  # new message inside a fragmented one
        bytes((0x80 | OP_CLOSE, 126)) + (200).to_bytes(2, "big") + bytes(200),  # control frame over 125 bytes
        bytes((0x83, 0x00)),  # unknown opcode
    ],
)
def test_protocol_errors(wire: bytes) -> None:
    with pytest.raises(WsProtocolError):
        FrameParser().feed(wire)


def test_message_size_bound() -> None:
    with pytest.raises(WsProtocolError, match="more than 100"):
        FrameParser(max_message=100).feed(_frame(OP_BINARY, bytes(101)))


async def test_handshake_refusals() -> None:
    answers = {
        "status": b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        "accept": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: wrong\r\n\r\n",
    }

    async def serve(answer: bytes) -> tuple[asyncio.Server, int]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    for kind, answer in answers.items():
        server, port = await serve(answer)
        try:
            with pytest.raises(WsHandshakeError) as ei:
                await asyncio.wait_for(connect(f"ws://127.0.0.1:{port}/rpc"), 5)
            assert (ei.value.status == 404) if kind == "status" else "Accept" in ei.value.message
        finally:
            server.close()
            await server.wait_closed()
