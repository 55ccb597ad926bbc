"""Stream framing checks on raw bytes: serial (docs/protocol/transports.md §1) and TCP (§7).

These talk to the port directly (:mod:`conformance.rawio`), closing the session's probe first so
no other reader shares the port. On a serial device the link modes (``\"\"\"`` compat, CRC) are
sticky for the device's lifetime (transports.md errata), so a device that already talked to ``mos``
answers a newline-style client in compat mode; that is accepted and noted. A TCP connection is a
fresh channel, so there the reply style must follow the request exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

from conformance.golden import load
from conformance.model import CheckFailed, CheckSkipped, check, expect
from conformance.probe import Probe
from conformance.rawio import RawStream, open_raw_serial, open_raw_tcp
from conformance.rawjson import show
from conformance.session import Session
from rpc.framing import crc32_hex

SERIAL = ("serial",)
TCP = ("tcp",)
_HEX8 = re.compile(rb"[0-9a-fA-F]{8}")
_SERIAL = load("serial")
HANDSHAKE = bytes.fromhex(_SERIAL["handshake_hex"])
HANDSHAKE_REPLY = bytes.fromhex(_SERIAL["handshake_reply_hex"])
HANDSHAKE_ACK = bytes.fromhex(_SERIAL["handshake_ack_hex"])


async def _open(s: Session) -> RawStream:
    await s.close()  # the raw checks own the port while they run
    if s.scheme == "serial":
        baud = int(s.parsed.option("baud") or s.parsed.option("baud_rate") or 115200)
        return await open_raw_serial(s.parsed.path, baud=baud)
    if s.scheme == "tcp":
        if s.parsed.port is None:
            raise CheckSkipped("tcp:// URL without a port")
        return await open_raw_tcp(s.parsed.host or "127.0.0.1", s.parsed.port)
    raise CheckSkipped(f"not a stream transport: {s.scheme}")


async def _opened(s: Session) -> RawStream:
    raw = await _open(s)
    raw.on_write = s.note_sent
    return raw


def _request(method: str = "RPC.Ping") -> tuple[int, bytes]:
    fid = Probe.new_id()
    return fid, json.dumps({"src": "mos", "id": fid, "method": method}, separators=(",", ":")).encode()


class _Reply:
    """One reply located in the received bytes: what preceded it, its JSON, metadata and terminator."""

    def __init__(self, buf: bytes, start: int, end: int) -> None:
        self.quoted_open = buf[max(0, start - 3) : start] == b'"""'
        body = buf[start:end]
        j = body.rfind(b"}")
        self.json = body[: j + 1]
        self.meta = body[j + 1 :]
        self.quoted_close = buf[end : end + 3] == b'"""'
        self.wire = buf[max(0, start - 4) : end + 4]

    @property
    def crc(self) -> bytes:
        return self.meta.split(b",", 1)[0]


def _find(buf: bytes, fid: int) -> _Reply | None:
    k = buf.find(b'{"id":%d' % fid)
    if k < 0:
        k = buf.find(b'{"id":"%d"' % fid)
    if k < 0:
        return None
    ends = [e for e in (buf.find(b"\n", k), buf.find(b'"""', k)) if e >= 0]
    if not ends:
        return None
    return _Reply(buf, k, min(ends))


async def _reply(s: Session, raw: RawStream, fid: int) -> _Reply:
    ok = await raw.wait_for(lambda b: _find(b, fid) is not None, timeout_s=s.options.timeout_s)
    if not ok:
        raise CheckFailed("no reply", seen=show(bytes(raw.buffer)) or "nothing", expected=f'a frame {{"id":{fid},...}}')
    found = _find(bytes(raw.buffer), fid)
    assert found is not None
    return found


async def _answered(s: Session, raw: RawStream, data: bytes, fid: int) -> bool:
    """Write ``data``; then barrier requests until one is answered; True if ``fid`` got a reply.

    A barrier read together with a discarded frame may be discarded with it (a byte >= 0x80 empties
    the device's whole input buffer, transports.md §1.2 (1)), so barriers are repeated, each a new
    write, until one is answered within the reply timeout.
    """
    await raw.write(data)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + s.options.timeout_s
    ids: list[int] = []
    while True:
        await asyncio.sleep(0.05)  # a separate read on the device
        bid, barrier = _request()
        ids.append(bid)
        await raw.write(barrier + crc32_hex(barrier).encode() + b"\n")
        wait = min(0.5, max(0.0, deadline - loop.time()))
        if await raw.wait_for(lambda b: any(_find(b, i) is not None for i in ids), timeout_s=wait):
            break
        if loop.time() >= deadline:
            raise CheckFailed(
                "no reply to the barrier request after the frame",
                seen=show(bytes(raw.buffer)) or "nothing",
                expected="a reply to RPC.Ping",
            )
    await asyncio.sleep(s.options.quiet_s)
    return _find(bytes(raw.buffer), fid) is not None


def _check_crc(rep: _Reply) -> None:
    expect(
        bool(_HEX8.fullmatch(rep.crc)),
        "after a request with a valid CRC the reply must carry a CRC",
        seen=show(rep.wire),
        expected="{json}<8 hex digits CRC-32>",
    )
    expect(
        rep.crc.decode().lower() == crc32_hex(rep.json),
        "reply CRC does not match its JSON",
        seen=rep.crc.decode(),
        expected=crc32_hex(rep.json),
    )


# -- serial ---------------------------------------------------------------------------------------


def _plain(method: str = "RPC.Ping") -> tuple[int, bytes]:
    fid, req = _request(method)
    return fid, req + b"\n"


def _has_reply(fid: int) -> Callable[[bytes], bool]:
    return lambda buf: _find(buf, fid) is not None


async def _fresh_link(s: Session, raw: RawStream) -> _Reply:
    """A plain request's reply on a link whose modes are not yet learned.

    If the device already learned CRC or the triple-quote delimiter from an earlier client (the modes are sticky
    until it reboots), a fresh channel needs a reboot: with ``--destructive`` the device is rebooted
    (``Sys.Reboot``; the port stays open), otherwise the check is skipped.
    """
    fid, req = _plain()
    await raw.write(req)
    rep = await _reply(s, raw, fid)
    if not (rep.quoted_open or _HEX8.fullmatch(rep.crc)):
        return rep
    if not s.options.destructive or not s.offers("Sys.Reboot"):
        raise CheckSkipped(
            "the link modes were already learned (sticky until a reboot); --destructive reboots for a fresh channel"
        )
    rid, reboot = _request("Sys.Reboot")
    reboot = reboot[:-1] + b',"params":{"delay_ms":50}}'
    await raw.write(reboot + b"\n")
    await _reply(s, raw, rid)
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + s.options.reboot_timeout_s
    while loop.time() < deadline:
        raw.take()
        gid, req = _plain("Sys.GetInfo")
        await raw.write(req)
        ok = await raw.wait_for(_has_reply(gid), timeout_s=1.0)
        got = _find(bytes(raw.buffer), gid) if ok else None
        if got is not None:
            if not (got.quoted_open or _HEX8.fullmatch(got.crc)):
                return got
            doc = json.loads(got.json)
            up = doc.get("result", {}).get("uptime") if isinstance(doc.get("result"), dict) else None
            expect(
                not (isinstance(up, int) and up < 2),
                'after a reboot the link must start without CRC and without """ (modes are learned anew)',
                seen=show(got.wire),
                expected="\\n{json}\\n to a plain request",
            )
        await asyncio.sleep(0.3)
    raise CheckFailed("the device did not come back after Sys.Reboot", seen="no plain reply", expected="a reply")


@check(
    "serial.learned_modes",
    section="transports.md §1.1-§1.2, §1.9",
    title='CRC and """ switched on by the first frame carrying them, then sticky',
    only=SERIAL,
    upsets=True,
)
async def _serial_learned_modes(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        rep = await _fresh_link(s, raw)
        expect(
            not rep.quoted_open and not rep.quoted_close and rep.meta.strip() == b"",
            'before any CRC or """ a plain request gets a plain reply',
            seen=show(rep.wire),
            expected="\\n{json}\\n",
        )
        fid, req = _request()
        await raw.write(req + crc32_hex(req).encode() + b"\n")
        rep = await _reply(s, raw, fid)
        _check_crc(rep)
        expect(not rep.quoted_open, 'CRC alone must not switch """ on', seen=show(rep.wire), expected="{json}<crc>\\n")
        fid, req = _plain()
        await raw.write(req)
        rep = await _reply(s, raw, fid)
        expect(
            bool(_HEX8.fullmatch(rep.crc)),
            "CRC mode is sticky: a later request without CRC still gets a CRC",
            seen=show(rep.wire),
            expected="{json}<crc>\\n",
        )
        fid, req = _request()
        await raw.write(b'"""' + req + b'"""')
        rep = await _reply(s, raw, fid)
        expect(
            rep.quoted_open and rep.quoted_close,
            'a """-framed request switches """ framing on',
            seen=show(rep.wire),
            expected='"""{json}<crc>"""',
        )
        fid, req = _plain()
        await raw.write(req)
        rep = await _reply(s, raw, fid)
        expect(
            rep.quoted_open and rep.quoted_close and bool(_HEX8.fullmatch(rep.crc)),
            '""" and CRC modes are sticky: a later plain request still gets """ and a CRC',
            seen=show(rep.wire),
            expected='\\n"""{json}<crc>"""\\n',
        )
    finally:
        await raw.close()
    return None


@check(
    "serial.line_style", section="transports.md §1.1, §1.8", title="newline style: {json}crc\\n answered", only=SERIAL
)
async def _serial_line_style(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        fid, req = _request()
        await raw.write(req + crc32_hex(req).encode() + b"\n")
        rep = await _reply(s, raw, fid)
        _check_crc(rep)
        if rep.quoted_open:
            return 'device already in """ compat mode (sticky); reply framed with """'
        expect(
            not rep.quoted_close,
            'newline-style reply must not use the """ delimiter',
            seen=show(rep.wire),
            expected="\\n{json}<crc>\\n",
        )
    finally:
        await raw.close()
    return None


@check("serial.crc_optional", section="transports.md §1.1-§1.2", title="frame without CRC accepted", only=SERIAL)
async def _serial_crc_optional(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        fid, req = _request()
        await raw.write(req + b"\n")
        await _reply(s, raw, fid)
    finally:
        await raw.close()
    return None


@check("serial.bad_crc_dropped", section="transports.md §1.2 (5)", title="frame with a wrong CRC dropped", only=SERIAL)
async def _serial_bad_crc_dropped(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        fid, req = _request()
        bad = f"{int(crc32_hex(req), 16) ^ 0x5A5A5A5A:08x}".encode()
        got = await _answered(s, raw, req + bad + b"\n", fid)
        rep = _find(bytes(raw.buffer), fid)
        expect(
            not got,
            "a frame whose CRC does not match must be dropped",
            seen=show(rep.wire) if rep else "",
            expected="no reply",
        )
    finally:
        await raw.close()
    return None


@check(
    "serial.handshake",
    section="transports.md §1.4, §1.7",
    title='0x04 handshake answered with """\\x04"""',
    only=SERIAL,
)
async def _serial_handshake(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        await raw.write(HANDSHAKE)
        ok = await raw.wait_for(lambda b: HANDSHAKE_REPLY in b, timeout_s=s.options.timeout_s)
        expect(
            ok,
            "the handshake must be answered",
            seen=show(bytes(raw.buffer)) or "nothing",
            expected='"""\\x04""" (22 22 22 04 22 22 22)',
        )
        await raw.write(HANDSHAKE_ACK)
    finally:
        await raw.close()
    return None


@check(
    "serial.mos_style",
    section="transports.md §1.1, §1.7",
    title='mos framing \\n"""{json}crc"""\\n answered alike',
    only=SERIAL,
)
async def _serial_mos_style(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        await raw.write(HANDSHAKE)
        await raw.wait_for(lambda b: HANDSHAKE_REPLY in b, timeout_s=s.options.timeout_s)
        await raw.write(HANDSHAKE_ACK)
        fid, req = _request()
        await raw.write(b'\n"""' + req + crc32_hex(req).encode() + b'"""\n')
        rep = await _reply(s, raw, fid)
        expect(
            rep.quoted_open and rep.quoted_close,
            'after """ input the reply must be framed with """',
            seen=show(rep.wire),
            expected='\\n"""{json}<crc>"""\\n',
        )
        _check_crc(rep)
    finally:
        await raw.close()
    return None


@check(
    "serial.crc_reply",
    section="transports.md §1.1",
    title="reply carries a correct CRC after a CRC'd request",
    only=SERIAL,
)
async def _serial_crc_reply(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        fid, req = _request("Sys.GetInfo")
        await raw.write(b'\n"""' + req + crc32_hex(req).encode() + b'"""\n')
        _check_crc(await _reply(s, raw, fid))
    finally:
        await raw.close()
    return None


@check(
    "serial.junk_tolerance",
    section="transports.md §1.2 (3, 5), §1.7",
    title="junk, empty lines and \\n runs tolerated",
    only=SERIAL,
    upsets=True,
)
async def _serial_junk_tolerance(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        fid, req = _request()
        await raw.write(b"\n\n  \nsome console junk\n\n\nxx" + req + crc32_hex(req).encode() + b"\n\n\n")
        await _reply(s, raw, fid)
    finally:
        await raw.close()
    return None


@check(
    "serial.non_ascii_dropped",
    section="transports.md §1.2 (1), §1.9",
    title="a byte >= 0x80 discards the buffered input",
    only=SERIAL,
    upsets=True,
)
async def _serial_non_ascii_dropped(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        fid = Probe.new_id()
        req = ('{"src":"mos","id":%d,"method":"RPC.Ping","params":{"x":"\u00e9"}}' % fid).encode("utf-8")
        got = await _answered(s, raw, req + crc32_hex(req).encode() + b"\n", fid)
        expect(not got, "a frame with raw non-ASCII bytes must be discarded", seen="a reply", expected="no reply")
    finally:
        await raw.close()
    return None


# -- tcp ------------------------------------------------------------------------------------------


@check("tcp.mos_style", section="transports.md §7", title='\\n"""{json}"""\\n (no CRC) answered alike', only=TCP)
async def _tcp_mos_style(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        fid, req = _request()
        await raw.write(b'\n"""' + req + b'"""\n')
        rep = await _reply(s, raw, fid)
        expect(
            rep.quoted_open and rep.quoted_close and rep.meta.strip() == b"",
            'reply must be framed like the request: \\n"""{json}"""\\n, no CRC',
            seen=show(rep.wire),
            expected='\\n"""{json}"""\\n',
        )
    finally:
        await raw.close()
    return None


@check("tcp.line_style", section="transports.md §7, §1.2", title="newline-delimited frame answered", only=TCP)
async def _tcp_line_style(s: Session) -> str | None:
    raw = await _opened(s)
    try:
        fid, req = _request()
        await raw.write(b"junk line\n" + req + b"\n")
        rep = await _reply(s, raw, fid)
        expect(
            not rep.quoted_open,
            'a fresh connection that never sent """ must get newline framing',
            seen=show(rep.wire),
            expected="\\n{json}\\n",
        )
    finally:
        await raw.close()
    return None
