"""Stream framing (rpc/framing.py) against spec/transports.md §1 and §7, both roles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpc.errors import FrameError
from rpc.framing import (
    HANDSHAKE,
    HANDSHAKE_ACK,
    HANDSHAKE_REPLY,
    BadCrc,
    DeviceLinkModes,
    DeviceStreamDecoder,
    DeviceStreamEncoder,
    Empty,
    FlowControl,
    FrameBytes,
    Handshake,
    Junk,
    MosStreamDecoder,
    MosStreamEncoder,
    NonAscii,
    Oversize,
    StreamEvent,
    crc32_hex,
)

VECTORS = Path(__file__).parents[2].parent / "shared" / "vectors"

REQ = b'{"src":"mos","id":1580229426716,"method":"Sys.GetInfo"}'
REQ_WIRE = b'\n"""{"src":"mos","id":1580229426716,"method":"Sys.GetInfo"}0e34eaa7"""\n'
# The precomputed frames of §1.7 (mos requests and device replies in compat+crc mode look alike).
PRECOMPUTED = [
    b'\n"""{"src":"mos","id":1580229426716,"method":"Config.Get","params":{"key":"device.id"}}3ef7bcac"""\n',
    b'\n"""{"src":"mos","id":1580229426717,"method":"RPC.List"}ff5d7149"""\n',
    b'\n"""{"id":1580229426716,"src":"esp32_0A1B2C","dst":"mos","result":"esp32_0A1B2C"}0fc29b5a"""\n',
    b'\n"""{"id":1580229426717,"src":"esp32_0A1B2C","dst":"mos","error":{"code":404,'
    b'"message":"No handler for Foo.Bar"}}e0bb366d"""\n',
]


def run(dec: MosStreamDecoder | DeviceStreamDecoder, *chunks: bytes) -> list[StreamEvent]:
    """Feed chunks and collect every event."""
    out: list[StreamEvent] = []
    for c in chunks:
        dec.feed(c)
        out.extend(dec.events())
    return out


def coalesce(events: list[StreamEvent]) -> list[StreamEvent]:
    """Merge adjacent Junk/NonAscii events (their split may follow the input's chunking)."""
    out: list[StreamEvent] = []
    for ev in events:
        prev = out[-1] if out else None
        if isinstance(ev, Junk) and isinstance(prev, Junk):
            out[-1] = Junk(prev.data + ev.data)
        elif isinstance(ev, NonAscii) and isinstance(prev, NonAscii):
            out[-1] = NonAscii(prev.data + ev.data)
        else:
            out.append(ev)
    return out


def junk_text(events: list[StreamEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Junk))


def device_pair() -> tuple[DeviceStreamDecoder, DeviceStreamEncoder]:
    dec = DeviceStreamDecoder()
    return dec, DeviceStreamEncoder(modes=dec.modes)


def device_answer(dec: DeviceStreamDecoder, enc: DeviceStreamEncoder, data: bytes) -> tuple[list[StreamEvent], bytes]:
    """Feed the device and apply its automatic answers; return events and bytes it writes."""
    dec.feed(data)
    evs = list(dec.events())
    for ev in evs:
        enc.handle(ev)
    return evs, enc.data_to_send()


# --------------------------------------------------------------------------------------------
# §1.7 byte trace


def test_mos_encoder_exact_bytes() -> None:
    enc = MosStreamEncoder()
    assert enc.handshake() == bytes.fromhex("222222042222220a0a") == HANDSHAKE
    assert enc.ack() == bytes.fromhex("222222") == HANDSHAKE_ACK
    assert enc.encode(REQ) == REQ_WIRE
    assert crc32_hex(b'{"method":"Sys.GetInfo"}') == "010a4ff9"
    for wire in PRECOMPUTED:
        body = wire[4:-4]
        assert enc.encode(body[:-8]) == wire


def test_tcp_encoder_has_no_crc() -> None:
    assert MosStreamEncoder(crc=False).encode(REQ) == b'\n"""' + REQ + b'"""\n'


def test_encoder_trims_go_newline_and_handles_inner_newline() -> None:
    assert MosStreamEncoder().encode(REQ + b"\n") == REQ_WIRE
    # A raw newline can only be whitespace in valid JSON: it becomes a space, CRC over the result.
    assert MosStreamEncoder().encode(b'{"a":\n1}') == b'\n"""{"a": 1}' + crc32_hex(b'{"a": 1}').encode() + b'"""\n'
    enc = DeviceStreamEncoder()
    enc.queue_frame(b'{\n"a":1}')
    assert enc.data_to_send() == b'\n{ "a":1}\n'
    with pytest.raises(FrameError):
        MosStreamEncoder().encode(b'{"a":"x\ny"}')
    with pytest.raises(FrameError):
        DeviceStreamEncoder().queue_frame(b'{"a":"x\ny"}')


def test_full_byte_trace_device_side() -> None:
    dec, enc = device_pair()
    # mos -> dev: handshake; dev -> mos: "\n" for the empty frame, """\x04""", then "\n\n".
    evs, out = device_answer(dec, enc, HANDSHAKE)
    assert evs == [Empty(), Handshake(), Empty(), Empty()]
    assert out == bytes.fromhex("0a222222042222220a0a")
    assert dec.modes == DeviceLinkModes(compat=True, crc=False)
    # mos -> dev: ack; only a "\n" gets queued, nothing is transmitted by itself.
    evs, out = device_answer(dec, enc, HANDSHAKE_ACK)
    assert (evs, out) == ([Empty()], b"")
    # mos -> dev: the request in 16-byte chunks.
    got: list[StreamEvent] = []
    for i in range(0, len(REQ_WIRE), 16):
        evs, out = device_answer(dec, enc, REQ_WIRE[i : i + 16])
        assert out == b""
        got += evs
    assert [e for e in got if not isinstance(e, Empty)] == [FrameBytes(REQ, True)]
    assert dec.modes == DeviceLinkModes(compat=True, crc=True)
    # dev -> mos: the reply, preceded by the queued "\n"s and framed like mos frames.
    reply = b'{"id":1580229426716,"src":"esp32_0A1B2C","dst":"mos","result":"esp32_0A1B2C"}'
    enc.queue_frame(reply)
    out = enc.data_to_send()
    newlines = 2 + sum(isinstance(e, Empty) for e in got)  # + the ack's and the frame's own
    assert out == b"\n" * newlines + PRECOMPUTED[2][1:]
    assert enc.data_to_send() == b""


def test_full_byte_trace_mos_side() -> None:
    dec = MosStreamDecoder()
    evs = run(dec, bytes.fromhex("0a222222042222220a0a"))
    assert [e for e in evs if not isinstance(e, Junk)] == [Handshake()]
    reply = b'{"id":1580229426716,"src":"esp32_0A1B2C","dst":"mos","result":{"fw_version":"1.0"}}'
    wire = b'\n\n\n"""' + reply + crc32_hex(reply).encode() + b'"""\n\n'
    evs = run(dec, wire)
    assert [e for e in evs if not isinstance(e, Junk)] == [FrameBytes(reply, True)]
    assert set(junk_text(evs)) <= {0x0A}


def test_precomputed_frames_roundtrip_both_directions() -> None:
    for wire in PRECOMPUTED:
        body = wire[4:-12]
        # mos: the "\n" before """ is junk (a frame starts only at a delimiter followed by '{').
        assert run(MosStreamDecoder(), wire) == [Junk(b"\n"), FrameBytes(body, True)]
        dec, enc = device_pair()
        evs, _ = device_answer(dec, enc, wire)
        assert evs == [Empty(), Empty(), FrameBytes(body, True), Empty()]  # "\n", """, frame, "\n"
        enc.queue_frame(body)
        assert enc.data_to_send() == b"\n\n\n" + wire  # the queued "\n" answers go out first


# --------------------------------------------------------------------------------------------
# vectors


def load_vectors() -> dict:
    path = VECTORS / "serial_frames_generated.json"
    if not path.exists():
        pytest.skip("shared/vectors not present")
    return json.loads(path.read_text())


def test_vector_handshake() -> None:
    v = load_vectors()["handshake"]
    assert HANDSHAKE.hex() == v["mos_to_device_hex"]
    assert HANDSHAKE_ACK.hex() == v["mos_ack_hex"]
    dec, enc = device_pair()
    _, out = device_answer(dec, enc, bytes.fromhex(v["mos_to_device_hex"]))
    assert out.hex() == v["device_reply_to_that_hex"]
    assert [e for e in run(MosStreamDecoder(), out) if not isinstance(e, Junk)] == [Handshake()]


def test_vector_frames() -> None:
    frames = load_vectors()["frames"]
    assert frames
    for f in frames:
        body = f["json"].encode()
        mos_wire = bytes.fromhex(f["wire_mos_style_hex"])
        line_wire = bytes.fromhex(f["wire_line_style_hex"])
        assert crc32_hex(body) == f["crc32"], f["desc"]
        assert MosStreamEncoder().encode(body) == mos_wire, f["desc"]
        # Device decodes both styles; it answers in the style it learned.
        dec, enc = device_pair()
        evs, _ = device_answer(dec, enc, mos_wire)
        assert [e for e in evs if not isinstance(e, Empty)] == [FrameBytes(body, True)]
        enc.data_to_send()
        enc.queue_frame(body)
        assert enc.data_to_send().lstrip(b"\n") == mos_wire[1:]
        dec, enc = device_pair()
        assert run(dec, line_wire) == [FrameBytes(body, True)]
        assert dec.modes == DeviceLinkModes(compat=False, crc=True)
        enc.queue_frame(body)
        assert enc.data_to_send() == b"\n" + line_wire
        # mos decodes the device's answers in either style.
        assert run(MosStreamDecoder(), mos_wire) == [Junk(b"\n"), FrameBytes(body, True)]
        assert run(MosStreamDecoder(), b"\n" + line_wire) == [FrameBytes(body, True)]


# --------------------------------------------------------------------------------------------
# mos decoder


def test_console_junk_between_frames() -> None:
    a, b = PRECOMPUTED[2], PRECOMPUTED[3]
    log1 = b"[Jan  1 00:00:00.123] mgos_init     Init done\r\n"
    log2 = b"esp32 boot: partial line without newline "
    evs = run(MosStreamDecoder(), log1 + a + log2 + b + b"tail\n")
    assert [e for e in evs if not isinstance(e, Junk)] == [FrameBytes(a[4:-12], True), FrameBytes(b[4:-12], True)]
    # The "\n" around """ delimiters are junk too; the last "\n" waits for the byte after it.
    assert junk_text(evs) == log1 + b"\n\n" + log2 + b"\n\ntail"


def test_mos_frame_needs_a_delimiter_before_it() -> None:
    # A frame not preceded by a delimiter is console output to mos.
    evs = run(MosStreamDecoder(), b'{"id":1}\n', b"x")
    assert coalesce(evs) == [Junk(b'{"id":1}\nx')]
    evs = run(MosStreamDecoder(), b'junk\n{"id":1}\n')
    assert evs == [Junk(b"junk"), FrameBytes(b'{"id":1}', None)]


def test_mos_bad_crc_and_malformed_metadata() -> None:
    wire = REQ_WIRE.replace(b"0e34eaa7", b"0e34eaa8")
    _, ev = run(MosStreamDecoder(), wire)
    assert isinstance(ev, BadCrc) and ev.data == REQ and "mismatch" in ev.reason
    (ev,) = run(MosStreamDecoder(), b'\n{"id":1}zz\n')
    assert isinstance(ev, BadCrc) and "malformed" in ev.reason
    # Extra metadata fields are allowed; trailing whitespace is trimmed first.
    crc = crc32_hex(b'{"id":1}').encode()
    assert run(MosStreamDecoder(), b'\n{"id":1}' + crc + b",a,b \r\n") == [FrameBytes(b'{"id":1}', True)]


def test_mos_flow_control_removed() -> None:
    wire = PRECOMPUTED[2]
    evs = run(MosStreamDecoder(), b"\x13" + wire[:20] + b"\x11" + wire[20:])
    assert evs == [FlowControl(xoff=True), Junk(b"\n"), FlowControl(xoff=False), FrameBytes(wire[4:-12], True)]
    # On TCP XON/XOFF are not special (and end up inside the frame, which then fails its CRC).
    evs = run(MosStreamDecoder(flow_control=False), wire[:20] + b"\x11" + wire[20:])
    assert isinstance(evs[-1], BadCrc)


def test_mos_eof_completes_frame() -> None:
    dec = MosStreamDecoder()
    assert run(dec, b'\n{"id":7}') == []
    dec.feed_eof()
    assert list(dec.events()) == [FrameBytes(b'{"id":7}', None)]
    dec = MosStreamDecoder()
    assert run(dec, b'xy""') == [Junk(b"xy")]  # '""' may still become a delimiter
    dec.feed_eof()
    assert list(dec.events()) == [Junk(b'""')]


def test_mos_oversize() -> None:
    dec = MosStreamDecoder(max_frame_size=10)
    evs = run(dec, b'\n{"a":"0123456789"}\n', b'\n{"id":1}\n')
    assert evs == [Oversize(18), FrameBytes(b'{"id":1}', None)]
    dec = MosStreamDecoder(max_frame_size=10)
    evs = run(dec, b'\n{"a":"01234', b"56789", b'"}', b'\n\n{"id":1}\n')
    assert evs == [Oversize(18), FrameBytes(b'{"id":1}', None)]


def test_mos_split_at_every_byte() -> None:
    wire = bytes.fromhex("0a222222042222220a0a") + b"log\r\n" + PRECOMPUTED[2] + b"\n" + PRECOMPUTED[3]
    whole = coalesce(run(MosStreamDecoder(), wire))
    assert [e for e in whole if not isinstance(e, Junk)] == [
        Handshake(), FrameBytes(PRECOMPUTED[2][4:-12], True), FrameBytes(PRECOMPUTED[3][4:-12], True)
    ]
    for i in range(len(wire) + 1):
        assert coalesce(run(MosStreamDecoder(), wire[:i], wire[i:])) == whole, i
    assert coalesce(run(MosStreamDecoder(), *[wire[i : i + 1] for i in range(len(wire))])) == whole


# --------------------------------------------------------------------------------------------
# device decoder / encoder


def test_device_empty_frames_wait_for_next_transmission() -> None:
    dec, enc = device_pair()
    evs, out = device_answer(dec, enc, b"\n \r\n\t\n")
    assert evs == [Empty(), Empty(), Empty()] and out == b""
    assert enc.pending == 3
    enc.queue_frame(b'{"id":1}')
    assert enc.data_to_send() == b'\n\n\n\n{"id":1}\n'


def test_device_modes_learned_and_sticky() -> None:
    dec, enc = device_pair()
    assert run(dec, b'{"id":1}\n') == [FrameBytes(b'{"id":1}', None)]
    enc.queue_frame(b"{}")
    assert enc.data_to_send() == b"\n{}\n"
    run(dec, b'{"id":1}' + crc32_hex(b'{"id":1}').encode() + b"\n")
    enc.queue_frame(b"{}")
    assert enc.data_to_send() == b"\n{}" + crc32_hex(b"{}").encode() + b"\n"
    run(dec, b'{"id":2}"""')
    assert dec.modes == DeviceLinkModes(compat=True, crc=True)
    run(dec, b'{"id":3}\n')  # no """ and no crc: modes stay on
    enc.queue_frame(b"{}")
    assert enc.data_to_send() == b'\n"""{}' + crc32_hex(b"{}").encode() + b'"""\n'


def test_device_metadata_rules() -> None:
    crc = crc32_hex(b'{"method":"Sys.GetInfo"}').encode()
    body = b'{"method":"Sys.GetInfo"}'
    for tail in (crc, crc + b",a,b", crc.upper()):
        assert run(DeviceStreamDecoder(), body + tail + b"\n") == [FrameBytes(body, True)]
    # Shorter than 8 characters: discarded unchecked, crc mode not learned.
    dec = DeviceStreamDecoder()
    assert run(dec, body + b"abc\n") == [FrameBytes(body, None)]
    assert not dec.modes.crc
    # Mismatch: dropped, reported, crc mode not learned.
    dec = DeviceStreamDecoder()
    (ev,) = run(dec, body + b"00000000\n")
    assert isinstance(ev, BadCrc) and ev.data == body
    assert not dec.modes.crc


def test_device_drops_leading_bytes_and_frames_without_brace() -> None:
    assert run(DeviceStreamDecoder(), b'xx {"id":1}\n') == [Junk(b"xx "), FrameBytes(b'{"id":1}', None)]
    assert run(DeviceStreamDecoder(), b"hello\n") == [Junk(b"hello")]


def test_device_handshake_only_for_exact_eof_frame() -> None:
    assert run(DeviceStreamDecoder(), b"\x04\n") == [Handshake()]
    assert run(DeviceStreamDecoder(), b" \x04\n") == [Junk(b" \x04")]


def test_device_non_ascii_discards_buffer() -> None:
    dec = DeviceStreamDecoder()
    evs = run(dec, b'{"id":1,"s":"caf', "é".encode(), b'"}\n{"id":2}\n')
    assert evs == [NonAscii(b'{"id":1,"s":"caf\xc3\xa9'), Junk(b'"}'), FrameBytes(b'{"id":2}', None)]


def test_device_oversize_discarded() -> None:
    dec = DeviceStreamDecoder(max_frame_size=16)
    big = b'{"a":"' + b"x" * 30 + b'"}'
    evs = run(dec, big + b'\n{"id":1}\n')
    assert evs[0] == Oversize(23)
    assert evs[-1] == FrameBytes(b'{"id":1}', None)
    # A frame of exactly max_frame_size + 6 bytes (delimiter included) is still accepted.
    ok = b'{"a":"' + b"x" * 14 + b'"}'  # 22 bytes
    assert run(DeviceStreamDecoder(max_frame_size=16), ok + b"\n") == [FrameBytes(ok, None)]


def test_device_split_at_every_byte() -> None:
    wire = HANDSHAKE + HANDSHAKE_ACK + REQ_WIRE + b'{"id":5}\n' + PRECOMPUTED[0]
    whole = run(DeviceStreamDecoder(), wire)
    assert [e for e in whole if not isinstance(e, Empty)] == [
        Handshake(), FrameBytes(REQ, True), FrameBytes(b'{"id":5}', None), FrameBytes(PRECOMPUTED[0][4:-12], True)
    ]
    for i in range(len(wire) + 1):
        assert run(DeviceStreamDecoder(), wire[:i], wire[i:]) == whole, i


def test_device_handshake_reply_constant() -> None:
    enc = DeviceStreamEncoder()
    enc.queue_handshake_reply()
    assert enc.data_to_send() == HANDSHAKE_REPLY == bytes.fromhex("22222204222222")


def test_device_answers_decoded_by_mos_after_random_newlines() -> None:
    dec, enc = device_pair()
    _, hs_reply = device_answer(dec, enc, HANDSHAKE + HANDSHAKE_ACK + REQ_WIRE)
    enc.queue_frame(b'{"id":1580229426716,"result":null}')
    out = hs_reply + enc.data_to_send()
    evs = [e for e in run(MosStreamDecoder(), out) if not isinstance(e, Junk)]
    assert evs == [Handshake(), FrameBytes(b'{"id":1580229426716,"result":null}', True)]


# --------------------------------------------------------------------------------------------
# properties

_alphabet = st.sampled_from([b"\n", b'"""', b'"', b"{", b"}", b"\x04", b"\x11", b"\x13", b" ", b"a", b"0",
                             b'{"id":1}', b"445df8c5", b",", b"\r", b"\x80"])
_streams = st.lists(_alphabet, max_size=40).map(b"".join)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=300, deadline=None)
@given(_streams, st.lists(st.integers(min_value=0, max_value=1000), max_size=8))
def test_mos_random_chunking_gives_identical_events(data: bytes, cuts: list[int]) -> None:
    whole = coalesce(run(MosStreamDecoder(max_frame_size=12), data))
    assert coalesce(run(MosStreamDecoder(max_frame_size=12), *_chunks(data, cuts))) == whole


@settings(max_examples=300, deadline=None)
@given(_streams, st.lists(st.integers(min_value=0, max_value=1000), max_size=8))
def test_device_random_chunking_gives_identical_events(data: bytes, cuts: list[int]) -> None:
    d1, d2 = DeviceStreamDecoder(max_frame_size=8), DeviceStreamDecoder(max_frame_size=8)
    whole = coalesce(run(d1, data))
    assert coalesce(run(d2, *_chunks(data, cuts))) == whole
    assert d1.modes == d2.modes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=1000), max_size=6))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    mos, dev = MosStreamDecoder(max_frame_size=64), DeviceStreamDecoder(max_frame_size=64)
    enc = DeviceStreamEncoder(modes=dev.modes)
    for piece in _chunks(data, cuts):
        mos.feed(piece)
        dev.feed(piece)
        for ev in dev.events():
            enc.handle(ev)
    mos.feed_eof()
    evs = list(mos.events())
    assert all(isinstance(e, StreamEventTypes) for e in evs)
    enc.data_to_send()


StreamEventTypes = (FrameBytes, Junk, Handshake, Empty, BadCrc, FlowControl, Oversize, NonAscii)


def test_device_utf8_allowed_when_not_ascii_only() -> None:
    body = '{"s":"é"}'.encode()
    assert run(DeviceStreamDecoder(ascii_only=False), body + b"\n") == [FrameBytes(body, None)]
