"""Frame-level device checks (docs/protocol/frames.md §1-§3, §5, §8): what any transport must carry unchanged.

Over MQTT the host side rewrites ``src``/``dst`` (transports.md §4), so the checks about those two
members are done by the ``mqtt`` group on raw MQTT messages instead.
"""

from __future__ import annotations

import random
import string

from conformance.golden import load
from conformance.model import CheckFailed, check, expect
from conformance.probe import Probe, id_key
from conformance.rawjson import member_order, member_text, show
from conformance.session import Session
from rpc.errors import MgrpcError
from rpc.frame import ABSENT, Frame

MQTT = ("mqtt", "mqtts")
# Where incoming frames are bounded: the spec names the limit for UART input (transports.md §1.2 (6));
# our in-process loop enforces the node's limit too.
STREAMS = ("serial", "tcp", "loop")


def _token(prefix: str) -> str:
    return prefix + "".join(random.choices(string.ascii_lowercase + string.digits, k=8))


def _raw(frame: Frame) -> bytes:
    return frame.raw if frame.raw is not None else frame.encode("device")


@check("frame.id_numeric_bare", section="frames.md §1.2", title="numeric id echoed bare")
async def _id_numeric_bare(s: Session) -> str | None:
    fid = Probe.new_id()
    resp = await s.request("RPC.Ping", id=fid)
    text = member_text(_raw(resp), "id")
    expect(
        text == str(fid), "a numeric id must be echoed as a bare number", seen=f'"id":{text}', expected=f'"id":{fid}'
    )
    return None


@check("frame.id_string", section="frames.md §1.2, §9", title="string id echoed as a string")
async def _id_string(s: Session) -> str | None:
    fid = _token("conf-")
    resp = await s.request("RPC.Ping", id=fid)
    text = member_text(_raw(resp), "id")
    expect(
        text == f'"{fid}"',
        "a string id must be echoed as the same string",
        seen=f'"id":{text}',
        expected=f'"id":"{fid}"',
    )
    return None


@check("frame.id_non_digits_quoted", section="frames.md §1.2", title="a negative number id is echoed as a string")
async def _id_non_digits_quoted(s: Session) -> str | None:
    fid = -(Probe.new_id() % 100000) - 1
    resp = await s.request("RPC.Ping", id=fid)
    text = member_text(_raw(resp), "id")
    expect(
        text == f'"{fid}"',
        "an id whose text is not all digits is written as a JSON string",
        seen=f'"id":{text}',
        expected=f'"id":"{fid}"',
    )
    return None


@check("frame.envelope_order", section="frames.md §1.2", title="reply envelope: id, src, dst, tag, payload")
async def _envelope_order(s: Session) -> str | None:
    resp = await s.request("RPC.Ping", tag=_token("t"))
    raw = _raw(resp)
    order = [m for m in member_order(raw) if m in ("id", "src", "dst", "tag", "key", "result", "error")]
    want = [m for m in ("id", "src", "dst", "tag", "key") if m in order] + [
        m for m in order if m in ("result", "error")
    ]
    expect(
        order == want and order[-1:] in (["result"], ["error"]),
        "reply members out of the device order",
        seen=show(raw),
        expected="{id,src,dst,tag,...,result|error} in that order",
    )
    text = raw.decode("utf-8", "replace")
    head = text[: text.find('"result"')] if '"result"' in text else text
    expect(
        not any(c in head for c in " \t\r\n"),
        "whitespace in the reply envelope",
        seen=show(raw),
        expected="no whitespace between envelope members",
    )
    return None


@check(
    "frame.src_dst_swap", section="frames.md §1.2, §8", title="reply dst = request src, src = device id", not_on=MQTT
)
async def _src_dst_swap(s: Session) -> str | None:
    src = _token("conf-")
    resp = await s.request("RPC.Ping", src=src)
    expect(resp.dst == src, "reply dst must be the request's src", seen=f"dst={resp.dst!r}", expected=f"dst={src!r}")
    expect(
        bool(resp.src), "reply must carry the device's id in src", seen=f"src={resp.src!r}", expected="src=<device id>"
    )
    return None


@check("frame.src_is_dst", section="frames.md §1.2", title="reply src = the request's non-empty dst", not_on=MQTT)
async def _src_is_dst(s: Session) -> str | None:
    dev = await s.device_id()
    resp = await s.request("RPC.Ping", dst=dev, src=_token("conf-"))
    expect(
        resp.src == dev, "reply src must be the dst the request used", seen=f"src={resp.src!r}", expected=f"src={dev!r}"
    )
    return None


@check("frame.tag_copied", section="frames.md §1", title="tag copied into the reply")
async def _tag_copied(s: Session) -> str | None:
    tag = _token("tag-")
    resp = await s.request("RPC.Ping", tag=tag)
    expect(resp.tag == tag, "tag must be copied verbatim", seen=f"tag={resp.tag!r}", expected=f"tag={tag!r}")
    return None


@check(
    "frame.wrong_dst_dropped", section="frames.md §3", title="wrong dst dropped without reply", not_on=MQTT, upsets=True
)
async def _wrong_dst_dropped(s: Session) -> str | None:
    fid = Probe.new_id()
    frame = Frame(id=fid, src="mos", dst=_token("not-this-device-"), method="RPC.Ping")
    got = await s.exchange_silent(frame)
    answers = [f for f in got if f.is_response and f.id is not None and str(f.id) == str(fid)]
    expect(
        not answers,
        "a request for another dst must be dropped",
        seen=show(_raw(answers[0])) if answers else "",
        expected="no reply",
    )
    return None


@check(
    "frame.notification_silent",
    section="frames.md §1; transports.md §3.1",
    title="request without id gets no reply (HTTP: none, or the request left open)",
    upsets=True,
)
async def _notification_silent(s: Session) -> str | None:
    frame = Frame(src="mos", method="RPC.Ping", tag=_token("n-"))
    got = await s.exchange_silent(frame)
    answers = [f for f in got if f.is_response]
    expect(
        not answers,
        "a notification (no id) must not be answered",
        seen=show(_raw(answers[0])) if answers else "",
        expected="no reply",
    )
    return None


@check("frame.args_accepted", section="frames.md §1", title="legacy args accepted like params", needs=["RPC.Describe"])
async def _args_accepted(s: Session) -> str | None:
    resp = await s.request("RPC.Describe", args={"name": "RPC.Ping"})
    got = resp.result.get("name") if isinstance(resp.result, dict) else None
    expect(
        resp.error is None and got == "RPC.Ping",
        "args must be read when params is absent",
        seen=show(_raw(resp)),
        expected='result {"name": "RPC.Ping", ...}',
    )
    return None


@check("frame.params_wins", section="frames.md §1", title="params wins over args", needs=["RPC.Describe"])
async def _params_wins(s: Session) -> str | None:
    resp = await s.request("RPC.Describe", {"name": "RPC.List"}, args={"name": "RPC.Ping"})
    got = resp.result.get("name") if isinstance(resp.result, dict) else None
    expect(
        resp.error is None and got == "RPC.List",
        "with both params and args, params must win",
        seen=show(_raw(resp)),
        expected='result {"name": "RPC.List", ...}',
    )
    return None


@check("frame.not_found_404", section="frames.md §3, §5", title="unknown method: 404 No handler for <M>")
async def _not_found_404(s: Session) -> str | None:
    method = "Conformance." + _token("NoSuch")
    resp = await s.request(method)
    want = load("frames")["not_found_message"].format(method=method)
    err = resp.error
    expect(
        err is not None and err.code == 404 and err.message == want,
        "wrong reply to an unknown method",
        seen=show(_raw(resp)),
        expected=f'"error":{{"code":404,"message":"{want}"}}',
    )
    expect(resp.result is ABSENT, "an error reply must not carry a result", seen=show(_raw(resp)), expected="no result")
    return None


@check("frame.method_case_insensitive", section="frames.md §3", title="method names match case-insensitively")
async def _method_case_insensitive(s: Session) -> str | None:
    for name in ("rpc.ping", "RPC.PING", "Rpc.Ping"):
        resp = await s.request(name)
        if resp.error is not None and resp.error.code != 0:
            raise CheckFailed(f"{name} was not routed to RPC.Ping", seen=show(_raw(resp)), expected="a result")
    return None


@check("frame.unknown_members_ignored", section="frames.md §1, §1.1", title="v and unknown members ignored")
async def _unknown_members_ignored(s: Session) -> str | None:
    fid = Probe.new_id()
    frame = Frame(id=fid, src="mos", method="RPC.Ping", v=2, extra={"conformance_extra": {"x": [1, 2]}})
    resp = await s.exchange(frame)
    expect(
        resp is not None and resp.ok,
        "a request with v and an unknown member must still be answered",
        seen=show(_raw(resp)) if resp is not None else "no response",
        expected="a result",
    )
    return None


# What a device can receive in one message besides rpc.max_frame_size: Mongoose OS reads every HTTP
# and WebSocket connection into a buffer of 3 KiB (MGOS_RECV_MBUF_LIMIT, compiled in, not in the
# config), and MQTT messages into mqtt.recv_mbuf_limit (config; default 3072); a bigger message never
# completes. The request that must be answered is kept under both, with room for headers and topic.
HTTP_SERVER_RECV_LIMIT = 3072
HEADROOM = 384


async def _receive_budget(s: Session, limit: int) -> tuple[int, str]:
    """How big a frame the device can certainly take on this transport, and where the bound comes from."""
    if s.scheme in STREAMS:
        return limit, f"rpc.max_frame_size {limit}"
    if s.scheme in MQTT:
        mbuf = await s.config_value("mqtt.recv_mbuf_limit")
        mbuf = mbuf if isinstance(mbuf, int) and mbuf > 0 else HTTP_SERVER_RECV_LIMIT
        if mbuf < limit:
            return mbuf, f"mqtt.recv_mbuf_limit {mbuf}"
        return limit, f"rpc.max_frame_size {limit}"
    if s.scheme in ("ws", "wss", "http", "https") and limit > HTTP_SERVER_RECV_LIMIT:
        return HTTP_SERVER_RECV_LIMIT, f"the HTTP server's receive buffer ({HTTP_SERVER_RECV_LIMIT})"
    return limit, f"rpc.max_frame_size {limit}"


@check(
    "frame.max_frame_size",
    section="frames.md §2; transports.md §1.2 (6), §2.6, §3.6, §4.6",
    title="frames under the device's limits answered, oversize dropped, device survives",
    upsets=True,
    budget=2.0,
)
async def _max_frame_size(s: Session) -> str | None:
    limit = await s.frame_limit()
    budget, why = await _receive_budget(s, limit)
    small = Frame(id=Probe.new_id(), src="mos", method="RPC.Ping", params={"pad": ""})
    pad = max(0, budget - HEADROOM - len(small.encode("mos")))
    fits = small.replace(params={"pad": "x" * pad})
    n_fits = len(fits.encode("mos"))
    resp = await s.exchange(fits)
    expect(
        resp is not None and resp.ok,
        f"a {n_fits}-byte frame (under {why}) must be answered",
        seen="no response" if resp is None else show(_raw(resp)),
        expected="a result",
        sent=f"RPC.Ping with a {n_fits}-byte frame",
    )
    big = Frame(id=Probe.new_id(), src="mos", method="RPC.Ping", params={"pad": "y" * (2 * limit)})
    n_big = len(big.encode("mos"))
    if s.scheme in STREAMS:
        # The spec bounds stream (UART) input: the frame is discarded and the channel stays usable.
        got = await s.exchange_silent(big)
        answers = [f for f in got if f.is_response and str(f.id) == str(big.id) and f.ok]
        expect(
            not answers,
            f"a {n_big}-byte frame (over rpc.max_frame_size {limit}) must not be processed",
            seen=show(_raw(answers[0])) if answers else "",
            expected="dropped (or an error)",
            sent=f"RPC.Ping with a {n_big}-byte frame",
        )
        return f"limit {limit} ({'from the device' if s.facts.get('max_frame_size') else 'option'})"
    # Elsewhere the spec sets no rule for an oversized message (a device may answer, drop it, reset
    # or stall the connection); what is required is that the device answers again afterwards.
    fate = await _oversize_fate(s, big)
    await s.reopen()
    again = await s.exchange(Frame(id=Probe.new_id(), src="mos", method="RPC.Ping"))
    expect(
        again is not None,
        f"after a {n_big}-byte frame the device must answer again on a new connection",
        seen="no response to RPC.Ping",
        expected="a response",
        sent=f"RPC.Ping with a {n_big}-byte frame, then RPC.Ping on a new connection",
    )
    return f"{n_fits} bytes answered ({why}); {n_big} bytes: {fate}; device answers after it"


async def _oversize_fate(s: Session, big: Frame) -> str:
    """Send ``big`` and a barrier on the same channel; say what became of it."""
    p = await s.probe()
    try:
        mark = await p.send(big, timeout_s=s.options.timeout_s)
    except TimeoutError:
        return "no answer (the request stayed open)"
    except (MgrpcError, OSError) as e:
        return f"refused ({e})"
    key = id_key(big.id)
    got = await p.wait_for(lambda f: f.is_response and id_key(f.id) == key, start=mark, timeout_s=s.options.quiet_s)
    if got is not None:
        return "answered" if got.ok else f"error {got.error.code if got.error else ''}"
    if p.closed:
        return "connection closed"
    try:
        barrier = await p.request("RPC.Ping", timeout_s=s.options.timeout_s)
    except (MgrpcError, OSError):
        barrier = None
    if barrier is None:
        return "the connection stopped answering"
    late = [f for f in p.frames[mark:] if f.is_response and id_key(f.id) == key]
    return "answered" if late else "dropped"
