"""The checked-in conformance vectors match the code, the spec's examples and the reference device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import transports
from conformance import golden
from conformance.probe import Probe
from conformance.refdevice import make_node
from rpc.frame import Frame, RawJSON, parse_frame
from rpc.framing import BadCrc, DeviceStreamDecoder, FrameBytes

SHARED = Path(__file__).parents[2].parent / "shared" / "vectors"


def test_checked_in_vectors_are_current() -> None:
    assert golden.main(["--check"]) == 0


def test_serial_streams_match_the_spec_examples() -> None:
    streams = {s["name"]: s for s in golden.load("serial")["streams"]}
    assert streams["mos_request"]["crc32"] == "0e34eaa7"  # transports.md §1.7
    assert streams["minimal_notification"]["crc32"] == "010a4ff9"  # frames.md §7.11
    assert golden.load("serial")["handshake_hex"] == "222222042222220a0a"


@pytest.mark.parametrize("stream", golden.load("serial")["streams"], ids=lambda s: s["name"])
def test_serial_streams_decode_as_documented(stream: dict) -> None:
    dec = DeviceStreamDecoder()
    dec.feed(bytes.fromhex(stream["wire_hex"]))
    events = list(dec.events())
    frames = [e.data for e in events if isinstance(e, FrameBytes)]
    if stream["name"] == "bad_crc":
        assert frames == [] and any(isinstance(e, BadCrc) for e in events)
    else:
        assert frames == [stream["json"].encode()]


def test_serial_vectors_agree_with_the_research_vectors() -> None:
    path = SHARED / "serial_frames_generated.json"
    if not path.exists():
        pytest.skip("../shared/vectors not present")
    theirs = json.loads(path.read_text())
    ours = golden.load("serial")
    assert theirs["handshake"]["mos_to_device_hex"] == ours["handshake_hex"]
    wire = {f["json"]: f["wire_mos_style_hex"] for f in theirs["frames"]}
    mine = next(s for s in ours["streams"] if s["name"] == "mos_request")
    assert wire[mine["json"]] == mine["wire_hex"]


async def test_reference_device_answers_the_frame_pairs_byte_exactly() -> None:
    vectors = golden.load("frames")
    node = make_node(device_id=vectors["device_id"])
    node.add_handler("Config.Get", lambda ctx, p: vectors["device_id"])
    node.add_handler("Sys.GetInfo", lambda ctx, p: RawJSON('{"id": "esp32_0A1B2C"}'))
    node.add_handler("OTA.Commit", lambda ctx, p: None)
    node.add_handler("RPC.Ping", lambda ctx, p: {"channel_info": "UART0" if ctx.frame.tag else ""})
    lst = await transports.listen("loop://vectors", node)
    probe = await Probe.open("loop://vectors")
    try:
        for pair in vectors["pairs"]:
            req = parse_frame(pair["request"])
            if pair["reply"] is None:
                mark = await probe.send(req)
                barrier = await probe.request("RPC.Ping", id=Probe.new_id(), timeout_s=2)
                assert barrier is not None
                got = [f for f in probe.frames[mark:] if f is not barrier]
                assert got == [], pair["name"]
                continue
            resp = await probe.exchange(req, timeout_s=2)
            assert resp is not None, pair["name"]
            assert resp.raw == pair["reply"].encode(), pair["name"]
    finally:
        await probe.close()
        await lst.close()


def test_id_echo_table_matches_the_device_encoder() -> None:
    for case in golden.load("frames")["id_echo"]:
        assert case["echo"] in Frame(id=case["id"], src="d", result=None).to_json("device")


def test_ota_sequence_vector_is_mos_shaped() -> None:
    seq = [json.loads(t) for t in golden.load("ota")["sequence"]]
    assert [f["method"] for f in seq] == ["OTA.Status", "OTA.Begin", "OTA.Write", "OTA.Write", "OTA.Write", "OTA.End"]
    assert list(seq[1]["params"]) == ["timeout", "commit_timeout", "size"]
    assert [f["params"]["offset"] for f in seq[2:5]] == [0, 512, 1024]
