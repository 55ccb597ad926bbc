"""msgpack over stream transports (TCP, serial): binary frames, OTA data without base64."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import transports
from rpc.framing import BadCrc, BinaryStreamDecoder, BinaryStreamEncoder, FrameBytes, Junk, Oversize
from rpc.host.ota import ota_update
from tests.device_helpers import start_device
from transports.linkemu import LinkEmulator
from updater.bundle import make_virtual_bundle


def _events(chunks: list[bytes]) -> list[object]:
    dec = BinaryStreamDecoder(max_frame_size=100)
    out: list[object] = []
    for c in chunks:
        dec.feed(c)
        out.extend(dec.events())
    return out


def test_frames_junk_bad_crc_and_oversize() -> None:
    enc = BinaryStreamEncoder()
    good = enc.encode(b"\x81\xa1a\x01")
    bad = bytearray(enc.encode(b"\x81\xa1b\x02"))
    bad[-1] ^= 1
    big = enc.encode(b"x" * 200)
    evs = _events([b"log line\n" + good + bytes(bad) + big + good])
    kinds = [type(e) for e in evs]
    assert FrameBytes in kinds and BadCrc in kinds and Oversize in kinds and Junk in kinds
    frames = [e.data for e in evs if isinstance(e, FrameBytes)]
    assert frames == [b"\x81\xa1a\x01", b"\x81\xa1a\x01"]  # the frame after the bad ones is recovered


@settings(max_examples=300)
@given(payloads=st.lists(st.binary(max_size=60), max_size=5), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_any_split_gives_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(BinaryStreamEncoder.encode(p) for p in payloads)
    pieces, last = [], 0
    for c in sorted(set(x for x in cuts if x < len(wire))):
        pieces.append(wire[last:c])
        last = c
    pieces.append(wire[last:])
    assert [e.data for e in _events(pieces) if isinstance(e, FrameBytes)] == payloads


@pytest.mark.parametrize("kind", ["tcp", "serial"])
async def test_msgpack_ota_over_stream(tmp_path, kind: str) -> None:
    if kind == "tcp":
        link = None
        dev = await start_device(tmp_path, "bin-tcp", ["tcp://127.0.0.1:0?codec=msgpack"])
        url = dev.urls[0]
    else:
        link = LinkEmulator(baud=None)
        link.start()
        dev = await start_device(tmp_path, "bin-serial", [f"serial://{link.a_path}?codec=msgpack"])
        url = f"serial://{link.b_path}?codec=msgpack"
    try:
        fw = make_virtual_bundle("esp32", "6.1", app_size=16384, fs_size=16384)
        async with await transports.connect(url) as c:
            assert c.channel.binary
            assert (await c.call("Sys.GetInfo"))["id"] == dev.id
            res = await ota_update(c, fw, chunk_size=2048)
            await res.client.close()
        assert (await dev.wait_booted(boots=2)).version == "6.1"
    finally:
        await dev.stop()
        if link is not None:
            link.stop()


# -- one device, both codecs ------------------------------------------------------------------------


def _dual_events(chunks: list[bytes]) -> list[object]:
    from rpc.framing import DeviceStreamDecoder, DualStreamDecoder

    dec = DualStreamDecoder(DeviceStreamDecoder(max_frame_size=200), BinaryStreamDecoder(max_frame_size=200))
    out: list[object] = []
    for c in chunks:
        dec.feed(c)
        out.extend(dec.events())
    return out


def test_dual_decoder_takes_text_and_binary_frames_from_one_stream() -> None:
    from rpc.framing import Handshake

    binary = BinaryStreamEncoder.encode(b"\x81\xa1a\x01")
    big = BinaryStreamEncoder.encode(b"x" * 300)
    wire = b'"""\x04"""\n\n' + b'{"id":1,"method":"RPC.Ping"}\n' + binary + big + b'\n{"id":2}\n' + binary
    for pieces in ([wire], [bytes([b]) for b in wire]):
        evs = _dual_events(pieces)
        frames = [e.data for e in evs if isinstance(e, FrameBytes)]
        assert frames == [b'{"id":1,"method":"RPC.Ping"}', b"\x81\xa1a\x01", b'{"id":2}', b"\x81\xa1a\x01"]
        assert any(isinstance(e, Handshake) for e in evs)
        assert any(isinstance(e, Oversize) for e in evs)


@settings(max_examples=200)
@given(
    # binary payloads as msgpack maps start (0x80-0x8F), text ones as JSON objects
    payloads=st.lists(
        st.one_of(st.binary(max_size=40).map(lambda b: b"\x81" + b), st.just(b'{"id":7}')), max_size=6
    ),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_dual_decoder_any_split_gives_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(b"\n" + p + b"\n" if p.startswith(b"{") else BinaryStreamEncoder.encode(p) for p in payloads)
    pieces, last = [], 0
    for c in sorted(set(x for x in cuts if x < len(wire))):
        pieces.append(wire[last:c])
        last = c
    pieces.append(wire[last:])
    assert [e.data for e in _dual_events(pieces) if isinstance(e, FrameBytes)] == payloads


def test_auto_codec_answers_in_the_codec_the_peer_used() -> None:
    from rpc.codec import AutoCodec, MsgpackCodec, device_codec
    from rpc.frame import Frame

    codec = device_codec(MsgpackCodec())
    assert isinstance(codec, AutoCodec) and codec.name == "msgpack"
    assert codec.decode(b' {"id":1,"src":"mos","method":"RPC.Ping"}\n').method == "RPC.Ping"
    assert codec.name == "json"
    assert codec.encode(Frame(id=1, src="dev", dst="mos", result=True), "device").startswith(b"{")
    packed = MsgpackCodec().encode(Frame(id=2, src="m", method="Sys.GetInfo"), "mos")
    assert codec.decode(packed).method == "Sys.GetInfo"
    assert codec.name == "msgpack"
    assert not codec.encode(Frame(id=2, src="dev", dst="m", result=1), "device").startswith(b"{")


@pytest.mark.parametrize("kind", ["tcp", "serial", "ws"])
async def test_a_msgpack_device_serves_json_clients_too(tmp_path, kind: str) -> None:
    """A device listening with ?codec=msgpack answers mos-style JSON clients and msgpack clients."""
    link = None
    if kind == "serial":
        link = LinkEmulator(baud=None)
        link.start()
        dev = await start_device(tmp_path, "dual-serial", [f"serial://{link.a_path}?codec=msgpack"])
        base = f"serial://{link.b_path}"
    else:
        listen = "tcp://127.0.0.1:0?codec=msgpack" if kind == "tcp" else "ws://127.0.0.1:0/rpc?codec=msgpack"
        dev = await start_device(tmp_path, f"dual-{kind}", [listen])
        base = dev.urls[0].split("?", 1)[0]
    try:
        for url in (base, f"{base}?codec=msgpack", base):  # JSON, msgpack, JSON again
            async with await transports.connect(url, timeout_s=10) as c:
                assert c.channel.binary == url.endswith("msgpack")
                assert (await c.call("Sys.GetInfo"))["id"] == dev.id
                assert (await c.call("RPC.Ping")) is not None
    finally:
        await dev.stop()
        if link is not None:
            link.stop()
