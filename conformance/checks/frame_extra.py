"""More frame rules (docs/protocol/frames.md §1): responses the device did not ask for are ignored."""

from __future__ import annotations

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
