"""msgpack frames between two mgrpc ends: same members, binary data without base64."""

from __future__ import annotations

import pytest

from rpc.client import AsyncClient
from rpc.codec import MsgpackCodec, codec_by_name
from rpc.errors import FrameError, UsageError
from rpc.frame import ErrorInfo, Frame
from rpc.loopback import loop_pair
from rpc.node import Node


def test_roundtrip_keeps_members_and_bytes() -> None:
    c = MsgpackCodec()
    req = Frame.request("OTA.Write", {"offset": 0, "data": bytes(range(256))}, id=7, src="mos", tag="t")
    back = c.decode(c.encode(req, "mos"))
    assert back == req.replace(raw=back.raw)
    rep = Frame(id=7, src="dev", dst="mos", error=ErrorInfo(-1, "x"))
    assert c.decode(c.encode(rep, "device")).error == ErrorInfo(-1, "x")
    unk = Frame.request("M", 1, id=1, extra={"x_custom": [1, 2]})
    assert c.decode(c.encode(unk, "mos")).extra == {"x_custom": [1, 2]}


def test_smaller_than_json_for_binary_chunks() -> None:
    import base64

    chunk = bytes(512)
    js = Frame.request("OTA.Write", {"offset": 0, "data": base64.b64encode(chunk).decode()}, id=2**40, src="mos")
    mp = Frame.request("OTA.Write", {"offset": 0, "data": chunk}, id=2**40, src="mos")
    assert len(MsgpackCodec().encode(mp, "mos")) < 0.8 * len(js.encode("mos"))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\x01\x02", b"\xda\x00\x10abc"])
def test_bad_messages_raise_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        MsgpackCodec().decode(data)


def test_codec_by_name() -> None:
    assert codec_by_name("json").name == "json"
    assert codec_by_name("MSGPACK").name == "msgpack"
    with pytest.raises(UsageError, match="valid codecs: json, msgpack"):
        codec_by_name("cbor")


async def test_calls_over_msgpack_link() -> None:
    dev = Node(id="dev")
    got: list[bytes] = []
    dev.add_handler("Blob.Put", lambda ctx, p: got.append(p["data"]) or len(p["data"]))
    dev.add_handler("Blob.Get", lambda ctx, p: {"data": b"\x00\xff" * 4})
    a, b = loop_pair(codec_a=MsgpackCodec(), codec_b=MsgpackCodec())
    dev.add_channel(b)
    client = AsyncClient(a)
    assert await client.call("Blob.Put", {"data": b"\x00\x01\x02"}) == 3
    assert got == [b"\x00\x01\x02"]
    assert await client.call("Blob.Get") == {"data": b"\x00\xff" * 4}
    await client.close()


async def test_loop_url_codec_and_ble_refuses_binary_codecs() -> None:
    import transports
    from rpc.errors import UsageError as UE

    dev = Node(id="dev")
    dev.add_handler("Blob.Len", lambda ctx, p: len(p["data"]))
    lst = await transports.listen("loop://codec-test?codec=msgpack", dev)
    try:
        async with await transports.connect("loop://codec-test?codec=msgpack") as c:
            assert c.channel.binary and await c.call("Blob.Len", {"data": b"\x00\x01"}) == 2
        async with await transports.connect("loop://codec-test") as c:  # the listener's codec by default
            assert c.channel.binary
        with pytest.raises(UE, match="speaks the msgpack codec"):
            await transports.connect("loop://codec-test?codec=json")
    finally:
        await lst.close()
    with pytest.raises(UE, match="JSON frames only"):
        await transports.open_client("ble://dev1?codec=msgpack")
