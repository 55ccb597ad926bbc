"""Inputs the soak's fuzzer (bench/soak.py, fuzz section) found crashing the codecs, kept as tests."""

from __future__ import annotations

import asyncio

import pytest

from rpc.codec import MsgpackCodec
from rpc.errors import FrameError
from rpc.frame import Frame, parse_frame


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"id\ud800":14,"src":"mos","method":"Config.Get"}',  # a lone surrogate in a key
        rb'{"id":2,"src":"mos","method":"OTA.Writ\ud800e","params":{}}',  # ... in the method
        rb'{"id":3,"src":"mos","method":"RPC.Ping","params":["\udfff"]}',  # ... deep in params
    ],
)
def test_lone_surrogate_escape_is_a_frame_error(raw: bytes) -> None:
    # json.loads accepts "\ud800", but the string has no UTF-8 form: every reply or forwarded copy
    # raised UnicodeEncodeError (the MQTT device's duplicate check did, on the method name).
    with pytest.raises(FrameError, match="surrogate"):
        parse_frame(raw)


def test_surrogate_pairs_and_escaped_backslashes_still_parse() -> None:
    assert parse_frame(rb'{"method":"RPC.Ping","params":"\ud83d\ude00"}').params == "\U0001f600"
    assert parse_frame(rb'{"method":"RPC.Ping","params":"\\ud800"}').params == "\\ud800"


def test_msgpack_encode_of_an_integer_beyond_64_bits_is_a_frame_error() -> None:
    # A JSON request may carry any integer; its echo over a msgpack link raised OverflowError.
    frame = parse_frame(b'{"id":1,"src":"mos","method":"RPC.Ping","params":{"n":18446744073709551621}}')
    with pytest.raises(FrameError, match="msgpack"):
        MsgpackCodec().encode(Frame(id=frame.id, dst=frame.src, result=frame.arguments), "device")


@pytest.mark.parametrize("style", ["device", "mos"])
def test_json_encode_of_bytes_from_a_msgpack_peer_is_a_frame_error(style: str) -> None:
    # msgpack frames may hold raw bytes; writing such a frame on a JSON link raised TypeError.
    frame = MsgpackCodec().decode(MsgpackCodec().encode(Frame(id=1, method="X", params={"d": b"\x00"}), "mos"))
    with pytest.raises(FrameError, match="JSON"):
        frame.encode(style)  # type: ignore[arg-type]


async def test_mqtt_device_drops_a_surrogate_method_without_raising() -> None:
    from transports.mqtt import MqttDeviceChannel, MqttMessage

    ch = MqttDeviceChannel(None, "dev")  # type: ignore[arg-type]  # decoding needs no connection
    payload = rb'{"id":2,"src":"mos","method":"OTA.Writ\ud800e","params":{}}'
    assert ch._decode(MqttMessage("dev/rpc", payload)) is None
    await asyncio.sleep(0)
