"""More frame rules (docs/protocol/frames.md §1): responses the device did not ask for are ignored."""

from __future__ import annotations

import re

from conformance.model import check, expect
from conformance.probe import Probe, id_key
from conformance.rawjson import show
from conformance.session import Session
from rpc.frame import Frame

__all__: list[str] = []


def _raw(frame: Frame) -> bytes:
    return frame.raw if frame.raw is not None else frame.encode("device")


@check(
    "frame.response_ignored",
    section="frames.md §1; real-device.md RD-E10",
    title="an unsolicited response gets no reply",
)
async def _response_ignored(s: Session) -> str | None:
    fid = Probe.new_id()
    got = await s.exchange_silent(Frame(id=fid, src="mos", result={"conformance": True}))
    answers = [f for f in got if id_key(f.id) == fid]
    expect(
        not answers,
        "a frame without method is a response; one the device did not ask for must be ignored",
        seen=show(_raw(answers[0])) if answers else "",
        expected="no reply",
    )
    return None


_INFO = {
    "serial": (r"UART\d+", "UART<n>"),
    "ws": (r"[0-9A-Fa-f.:\[\]]+:\d+", "<peer ip>:<port>"),
    "wss": (r"[0-9A-Fa-f.:\[\]]+:\d+", "<peer ip>:<port>"),
    "http": (r"[0-9A-Fa-f.:\[\]]+:\d+", "<peer ip>:<port>"),
    "https": (r"[0-9A-Fa-f.:\[\]]+:\d+", "<peer ip>:<port>"),
    "mqtt": (r"", '""'),
    "mqtts": (r"", '""'),
}


@check(
    "rpc.ping_channel_info",
    section="frames.md §4; transports.md §1.2, §2; real-device.md RD-E15",
    title="RPC.Ping channel_info: UART<n>, peer ip:port on HTTP/WS, empty on MQTT",
    needs=["RPC.Ping"],
)
async def _ping_channel_info(s: Session) -> str | None:
    if s.scheme not in _INFO:
        return f"no channel_info form is specified for {s.scheme}://"
    pattern, form = _INFO[s.scheme]
    resp = await s.request("RPC.Ping")
    info = resp.result.get("channel_info") if isinstance(resp.result, dict) else None
    expect(
        isinstance(info, str) and re.fullmatch(pattern, info) is not None,
        f"channel_info over {s.scheme}:// must be {form}",
        seen=show(_raw(resp)),
        expected=f'{{"channel_info": "{form}"}}',
    )
    return None
