"""Frames: golden examples of spec/frame.md §7 byte for byte, both directions; property tests."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpc.errors import FrameError, FrameTooLarge
from rpc.frame import ABSENT, ErrorInfo, Frame, RawJSON, frozen_quote, parse_frame

ID = 1580229426716

# (frame as built by the sender, exact bytes, style)
MOS_REQUESTS = [
    (Frame.request("Sys.GetInfo", id=ID, src="mos"), b'{"src":"mos","id":1580229426716,"method":"Sys.GetInfo"}'),
    (
        Frame.request("Config.Get", {"key": "device.id"}, id=ID, src="mos"),
        b'{"src":"mos","id":1580229426716,"method":"Config.Get","params":{"key":"device.id"}}',
    ),
    (
        Frame.request("Config.Get", {"key": "device.id"}, id=ID, src="mos", compat_args=True),
        b'{"src":"mos","id":1580229426716,"method":"Config.Get","args":{"key":"device.id"}}',
    ),
    (
        Frame.request("OTA.Write", {"offset": 0, "data": "AAECAwQFBgcICQoLDA0ODw=="}, id=1580229426718, src="mos"),
        b'{"src":"mos","id":1580229426718,"method":"OTA.Write","params":{"offset":0,"data":"AAECAwQFBgcICQoLDA0ODw=="}}',
    ),
    (
        Frame.request("Sys.GetInfo", id=ID, src="esp32_0A1B2C/rpc-resp/mos-1298498081", dst="esp32_0A1B2C"),
        b'{"src":"esp32_0A1B2C/rpc-resp/mos-1298498081","dst":"esp32_0A1B2C","id":1580229426716,"method":"Sys.GetInfo"}',
    ),
]

DEV = "esp32_0A1B2C"
DEVICE_REPLIES = [
    (
        Frame(id=ID, src=DEV, dst="mos", result="esp32_0A1B2C"),
        b'{"id":1580229426716,"src":"esp32_0A1B2C","dst":"mos","result":"esp32_0A1B2C"}',
    ),
    (
        Frame(id=1580229426717, src=DEV, dst="mos", error=ErrorInfo(404, "No handler for Foo.Bar")),
        b'{"id":1580229426717,"src":"esp32_0A1B2C","dst":"mos","error":{"code":404,"message":"No handler for Foo.Bar"}}',
    ),
    (
        Frame(id=1580229426718, src=DEV, dst="mos", result=None),
        b'{"id":1580229426718,"src":"esp32_0A1B2C","dst":"mos","result":null}',
    ),
    (
        Frame(id=1580229426719, src=DEV, dst="mos", result={"channel_info": "UART0"}),
        b'{"id":1580229426719,"src":"esp32_0A1B2C","dst":"mos","result":{"channel_info": "UART0"}}',
    ),
    (
        Frame(id=1580229426720, src=DEV, dst="mos", result={"name": "RPC.Describe", "args_fmt": "{name: %T}"}),
        b'{"id":1580229426720,"src":"esp32_0A1B2C","dst":"mos","result":{"name": "RPC.Describe", "args_fmt": "{name: %T}"}}',
    ),
    (
        Frame(id=ID, src=DEV, dst="esp32_0A1B2C/rpc-resp/mos-1298498081", result=RawJSON("{}")),
        b'{"id":1580229426716,"src":"esp32_0A1B2C","dst":"esp32_0A1B2C/rpc-resp/mos-1298498081","result":{}}',
    ),
]


@pytest.mark.parametrize(("frame", "wire"), MOS_REQUESTS)
def test_mos_requests_encode_and_parse(frame: Frame, wire: bytes) -> None:
    assert frame.encode("mos") == wire
    parsed = parse_frame(wire)
    assert parsed == frame
    assert parsed.raw == wire
    assert parsed.encode("mos") == wire


@pytest.mark.parametrize(("frame", "wire"), DEVICE_REPLIES)
def test_device_replies_encode_and_parse(frame: Frame, wire: bytes) -> None:
    assert frame.encode("device") == wire
    parsed = parse_frame(wire)
    assert parsed.id == frame.id and parsed.src == frame.src and parsed.dst == frame.dst
    assert parsed.error == frame.error
    if frame.error is None:
        assert parsed.result == json.loads(
            json.dumps(frame.result) if not isinstance(frame.result, RawJSON) else frame.result
        )
    # re-encoding the parsed reply in device style reproduces the bytes
    assert parsed.encode("device") == wire


def test_minimal_and_legacy_requests() -> None:
    f = parse_frame(b'{"method":"Sys.GetInfo"}')
    assert f.is_request and not f.wants_reply and f.arguments is None
    legacy = parse_frame(b'{"method":"Math.Add","args":{"a":1,"b":2},"src":"joe/32efc823aa","id":1772}')
    assert legacy.arguments == {"a": 1, "b": 2} and legacy.id == 1772 and legacy.src == "joe/32efc823aa"


def test_params_win_over_args() -> None:
    f = parse_frame(b'{"id":1,"method":"X","args":{"a":1},"params":{"a":2}}')
    assert f.arguments == {"a": 2}


def test_reply_ids_device_rule() -> None:
    assert Frame(id=123, src="d", result=1).encode("device").startswith(b'{"id":123,')
    assert Frame(id="abc", src="d", result=1).encode("device").startswith(b'{"id":"abc",')
    # negative / fractional numbers come back as strings of their text, as a device does
    assert Frame(id=-5, src="d", result=1).encode("device").startswith(b'{"id":"-5",')
    assert Frame(id=1.5, src="d", result=1).encode("device").startswith(b'{"id":"1.5",')
    # deliberate difference: a string id stays a string (a device would write invalid bare 007)
    assert Frame(id="007", src="d", result=1).encode("device").startswith(b'{"id":"007",')


def test_device_envelope_order_tag_key_and_null_src() -> None:
    f = Frame(id=7, src="dev", dst="me", tag="t1", key="k", result=None)
    assert f.encode("device") == b'{"id":7,"src":"dev","dst":"me","tag":"t1","key":"k","result":null}'
    assert Frame(id=7, result=None).encode("device") == b'{"id":7,"src":null,"result":null}'
    assert Frame(id=7, src="d", error=ErrorInfo(-1)).encode("device") == b'{"id":7,"src":"d","error":{"code":-1}}'


def test_frozen_escaping() -> None:
    assert frozen_quote('a"b\\c') == '"a\\"b\\\\c"'
    assert frozen_quote("\b\t\n\v\f\r") == '"\\b\\t\\n\\v\\f\\r"'
    assert frozen_quote("\x01\x1f") == '"\\u0001\\u001f"'
    # a literal backslash followed by "u000b" text is not mistaken for an escape
    assert frozen_quote("\\u000b") == '"\\\\u000b"'
    assert frozen_quote("é") == '"é"'


def test_mos_html_escaping_for_mqtt() -> None:
    f = Frame.request("X", {"s": "<a&b>"}, id=1, src="mos")
    assert f.encode("mos") == b'{"src":"mos","id":1,"method":"X","params":{"s":"<a&b>"}}'
    assert (
        f.encode("mos", html_escape=True)
        == b'{"src":"mos","id":1,"method":"X","params":{"s":"\\u003ca\\u0026b\\u003e"}}'
    )


def test_unknown_members_kept_and_reencoded() -> None:
    wire = b'{"src":"a","id":5,"method":"M","params":1,"x_custom":{"k":[1,2]},"trace":{"id":"t"}}'
    f = parse_frame(wire)
    assert f.extra == {"x_custom": {"k": [1, 2]}}
    assert f.trace == {"id": "t"}
    assert parse_frame(f.encode("mos")) == f


def test_auth_nr_and_error_code_zero() -> None:
    f = parse_frame(b'{"id":1,"method":"M","auth":{"realm":"RPC"},"nr":true}')
    assert f.auth == {"realm": "RPC"} and f.nr
    ok = parse_frame(b'{"id":1,"src":"d","error":{"code":0,"message":"Update applied, finalizing"}}')
    assert ok.ok and ok.error is not None and ok.error.code == 0
    bad = parse_frame(b'{"id":1,"src":"d","error":{"code":-1}}')
    assert not bad.ok and bad.error == ErrorInfo(-1, None)


def test_result_absent_vs_null() -> None:
    assert parse_frame(b'{"id":1}').result is ABSENT
    assert parse_frame(b'{"id":1,"result":null}').result is None


@pytest.mark.parametrize(
    "wire",
    [b"", b"[]", b"nope", b'{"id":true}', b'{"id":[1]}', b'{"method":5}', b'{"error":"x"}', b'{"error":{"code":"a"}}',
     b'{"auth":1}', b"\xff\xfe", b'{"src":{}}'],
)  # fmt: skip
def test_bad_frames_rejected_clearly(wire: bytes) -> None:
    with pytest.raises(FrameError):
        parse_frame(wire)


def test_frame_size_limit() -> None:
    body = b'{"id":1,"method":"M","params":"' + b"x" * 5000 + b'"}'
    with pytest.raises(FrameTooLarge, match="exceeds the maximum frame size of 4096"):
        parse_frame(body)
    assert parse_frame(body, max_size=8192).params == "x" * 5000


json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = st.none() | st.integers(0, 2**53) | st.text(min_size=1, max_size=12)
names = st.text(max_size=16)


@settings(max_examples=1500)
@given(
    fid=ids, src=names, dst=names, method=st.text(min_size=1, max_size=16), params=json_values, tag=names,
    style=st.sampled_from(["mos", "device"]),
)  # fmt: skip
def test_any_request_survives_encode_parse(fid, src, dst, method, params, tag, style) -> None:
    f = Frame.request(method, params, id=fid, src=src, dst=dst, tag=tag)
    back = parse_frame(f.encode(style), max_size=0)
    assert back.method == method and back.params == params and back.tag == tag and back.dst == dst
    if style == "mos":
        assert back.src == src
        assert back.id == (fid if fid not in ("", 0) else None)


@settings(max_examples=1500)
@given(fid=st.integers(0, 2**53) | st.text(min_size=1, max_size=12), result=json_values, src=names, dst=names)
def test_any_reply_survives_device_encode_parse(fid, result, src, dst) -> None:
    f = Frame(id=fid, src=src, dst=dst, result=result)
    back = parse_frame(f.encode("device"), max_size=0)
    assert back.id == fid and back.result == result and back.dst == dst
    assert back.src == src if src else back.src == ""


@settings(max_examples=3000)
@given(st.binary(max_size=300))
def test_parser_never_raises_anything_but_frame_error(data: bytes) -> None:
    try:
        parse_frame(data)
    except FrameError:
        pass


@settings(max_examples=1000)
@given(json_values)
def test_parser_on_arbitrary_json(value) -> None:
    try:
        parse_frame(json.dumps(value).encode())
    except FrameError:
        pass


def test_mos_error_omits_an_empty_message_as_go_omitempty() -> None:
    # mos's FrameError has `Message string json:"message,omitempty"`: "" is not written
    assert Frame(id=5, error=ErrorInfo(404, "")).encode("mos") == b'{"id":5,"error":{"code":404}}'
    assert Frame(id=5, error=ErrorInfo(404, "x")).encode("mos") == b'{"id":5,"error":{"code":404,"message":"x"}}'
