"""The rpc-gatts length protocol on plain bytes (transports/ble_proto.py, spec/transports.md §5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transports.ble_proto import (
    AttError,
    FrameReassembler,
    FrameReceiver,
    FrameSender,
    GattProtocolError,
    RxState,
    decode_length,
    encode_length,
    read_chunk_size,
    write_chunk_size,
    write_chunks,
)

VECTORS = Path(__file__).parents[2].parent / "shared" / "vectors"


def test_uuids_spell_ascii() -> None:
    from transports import ble_proto

    for uuid, text in [
        (ble_proto.SERVICE_UUID, "_mOS_RPC_SVC_ID_"),
        (ble_proto.DATA_UUID, "_mOS_RPC_data___"),
        (ble_proto.RX_CTL_UUID, "_mOS_RPC_rx_ctl_"),
        (ble_proto.TX_CTL_UUID, "_mOS_RPC_tx_ctl_"),
    ]:
        assert bytes.fromhex(uuid.replace("-", "")).decode() == text


def test_length_is_big_endian() -> None:
    assert encode_length(100) == b"\x00\x00\x00\x64"
    assert decode_length(b"\x00\x00\x01\x00") == 256
    with pytest.raises(ValueError):
        encode_length(-1)
    with pytest.raises(ValueError):
        encode_length(1 << 32)
    with pytest.raises(GattProtocolError):
        decode_length(b"\x00\x01")


def test_length_vectors() -> None:
    path = VECTORS / "serial_frames_generated.json"
    if not path.exists():
        pytest.skip("shared/vectors not present")
    frames = json.loads(path.read_text())["frames"]
    checked = 0
    for f in frames:
        if "ble_tx_ctl_length_hex" not in f:
            continue
        data = f["json"].encode()
        assert encode_length(len(data)).hex() == f["ble_tx_ctl_length_hex"]
        rx = FrameReceiver()
        rx.write_tx_ctl(bytes.fromhex(f["ble_tx_ctl_length_hex"]))
        out = [rx.write_data(c) for c in write_chunks(data, mtu=23)]
        assert out[-1] == data and all(o is None for o in out[:-1])
        checked += 1
    assert checked


def test_chunk_sizes() -> None:
    assert write_chunk_size(23) == 20
    assert read_chunk_size(23) == 21
    assert write_chunk_size(247) == 244
    with pytest.raises(ValueError):
        write_chunk_size(22)
    assert list(write_chunks(b"a" * 45, mtu=23)) == [b"a" * 20, b"a" * 20, b"a" * 5]
    assert list(write_chunks(b"", mtu=23)) == []


# -- device receiver -----------------------------------------------------------------------------------


def test_receiver_short_tx_ctl_is_request_not_supported() -> None:
    rx = FrameReceiver()
    for bad in (b"", b"\x00", b"\x00\x00\x05"):
        with pytest.raises(GattProtocolError) as ei:
            rx.write_tx_ctl(bad)
        assert ei.value.att_error is AttError.REQUEST_NOT_SUPPORTED
    assert rx.state is RxState.IDLE


def test_receiver_too_large_is_insufficient_resources() -> None:
    rx = FrameReceiver(max_frame_size=4096)
    rx.write_tx_ctl(encode_length(4096))
    assert rx.state is RxState.RECEIVING
    rx.write_data(b"x" * 10)
    with pytest.raises(GattProtocolError) as ei:
        rx.write_tx_ctl(encode_length(4097))
    assert ei.value.att_error is AttError.INSUFFICIENT_RESOURCES
    # the rejected write changed nothing: the partial frame is still there
    assert rx.expected == 4096 and rx.received == 10


def test_receiver_more_than_announced_is_invalid_offset_and_keeps_data() -> None:
    rx = FrameReceiver()
    rx.write_tx_ctl(encode_length(5))
    assert rx.write_data(b"abc") is None
    with pytest.raises(GattProtocolError) as ei:
        rx.write_data(b"def")
    assert ei.value.att_error is AttError.INVALID_OFFSET
    assert rx.write_data(b"de") == b"abcde"
    assert rx.state is RxState.IDLE


def test_receiver_data_without_length_is_invalid_offset() -> None:
    rx = FrameReceiver()
    with pytest.raises(GattProtocolError) as ei:
        rx.write_data(b"{}")
    assert ei.value.att_error is AttError.INVALID_OFFSET
    assert rx.write_data(b"") is None


def test_receiver_tx_ctl_discards_partial_frame() -> None:
    rx = FrameReceiver()
    rx.write_tx_ctl(encode_length(10))
    rx.write_data(b"01234")
    rx.write_tx_ctl(encode_length(2) + b"extra")  # extra bytes after the length are ignored
    assert rx.received == 0
    assert rx.write_data(b"{}") == b"{}"


def test_receiver_zero_length_cancels() -> None:
    rx = FrameReceiver()
    rx.write_tx_ctl(encode_length(3))
    rx.write_data(b"a")
    rx.write_tx_ctl(encode_length(0))
    assert rx.state is RxState.IDLE
    with pytest.raises(GattProtocolError):
        rx.write_data(b"a")


def test_receiver_one_frame_after_another() -> None:
    rx = FrameReceiver()
    for frame in (b'{"a":1}', b'{"b":2}'):
        rx.write_tx_ctl(encode_length(len(frame)))
        assert rx.write_data(frame) == frame
    assert rx.state is RxState.IDLE


@given(frame=st.binary(min_size=1, max_size=600), cuts=st.lists(st.integers(min_value=0, max_value=600)))
def test_receiver_any_split_yields_same_frame(frame: bytes, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if 0 < c < len(frame)})
    parts = [frame[a:b] for a, b in zip([0, *points], [*points, len(frame)], strict=True)]
    rx = FrameReceiver()
    rx.write_tx_ctl(encode_length(len(frame)))
    results = [rx.write_data(p) for p in parts]
    assert results[-1] == frame
    assert all(r is None for r in results[:-1])


@given(frame=st.binary(min_size=1, max_size=4096), mtu=st.integers(min_value=23, max_value=517))
def test_write_chunks_roundtrip(frame: bytes, mtu: int) -> None:
    chunks = list(write_chunks(frame, mtu=mtu))
    assert b"".join(chunks) == frame
    assert all(0 < len(c) <= mtu - 3 for c in chunks)
    rx = FrameReceiver()
    rx.write_tx_ctl(encode_length(len(frame)))
    assert [rx.write_data(c) for c in chunks][-1] == frame


# -- device sender + client reassembler ---------------------------------------------------------------


def test_sender_announces_and_chunks() -> None:
    tx = FrameSender()
    assert tx.read_rx_ctl() == b"\x00\x00\x00\x00"
    assert tx.read_data(23).data == b""
    assert tx.queue(b"A" * 50) == 50  # became pending: announce
    assert tx.queue(b"B" * 5) == 0  # queued behind it
    assert tx.read_rx_ctl() == encode_length(50)
    c1 = tx.read_data(23)
    assert c1 == type(c1)(b"A" * 21, 0)
    c2 = tx.read_data(23)
    assert c2.data == b"A" * 21 and c2.announce == 0
    c3 = tx.read_data(23)
    assert c3.data == b"A" * 8 and c3.announce == 5  # sent; the next frame is pending now
    assert tx.read_rx_ctl() == encode_length(5)
    assert tx.read_data(23).data == b"B" * 5
    assert tx.read_rx_ctl() == encode_length(0)
    assert len(tx) == 0


def test_sender_rx_ctl_read_rewinds() -> None:
    tx = FrameSender()
    tx.queue(b"0123456789" * 5)
    tx.read_data(23)
    assert tx.offset == 21
    assert tx.read_rx_ctl() == encode_length(50)
    assert tx.offset == 0
    assert tx.read_data(23).data == b"0123456789" * 2 + b"0"


def test_sender_rejects_empty_and_overflow() -> None:
    tx = FrameSender(max_queued=1)
    with pytest.raises(ValueError):
        tx.queue(b"")
    tx.queue(b"x")
    with pytest.raises(OSError):
        tx.queue(b"y")
    tx.clear()
    assert tx.pending_length == 0


@given(
    frames=st.lists(st.binary(min_size=1, max_size=700), min_size=1, max_size=5),
    mtu=st.integers(min_value=23, max_value=300),
)
def test_sender_to_reassembler_roundtrip(frames: list[bytes], mtu: int) -> None:
    tx = FrameSender()
    announced = [tx.queue(f) for f in frames]
    assert announced[0] == len(frames[0]) and all(a == 0 for a in announced[1:])
    got = []
    length = decode_length(tx.read_rx_ctl())
    while length:
        asm = FrameReassembler(length, max_frame_size=4096)
        frame = None
        while frame is None:
            chunk = tx.read_data(mtu)
            assert len(chunk.data) <= mtu - 2
            frame = asm.feed(chunk.data)
        got.append(frame)
        assert chunk.announce == tx.pending_length
        length = decode_length(tx.read_rx_ctl())
    assert got == frames


def test_reassembler_errors() -> None:
    with pytest.raises(GattProtocolError) as ei:
        FrameReassembler(5000, max_frame_size=4096)
    assert ei.value.att_error is AttError.INSUFFICIENT_RESOURCES
    asm = FrameReassembler(4)
    with pytest.raises(GattProtocolError):
        asm.feed(b"")
    with pytest.raises(GattProtocolError):
        asm.feed(b"12345")
    assert asm.feed(b"12") is None and asm.remaining == 2
    assert asm.feed(b"34") == b"1234"
    with pytest.raises(GattProtocolError):
        asm.feed(b"5")
