"""Built-in services every device has (docs/protocol/frames.md §4): RPC.List, RPC.Describe, RPC.Ping, Sys.GetInfo."""

from __future__ import annotations

import asyncio
import json

from conformance.model import check, expect
from conformance.probe import Probe
from conformance.rawjson import member_text, show
from conformance.session import Session
from rpc.errors import MgrpcError
from rpc.frame import Frame

GETINFO_KEYS = (
    "id",
    "app",
    "fw_version",
    "fw_id",
    "mg_version",
    "mg_id",
    "mac",
    "arch",
    "uptime",
    "public_key",
    "ram_size",
    "ram_free",
    "ram_min_free",
    "fs_size",
    "fs_free",
)
GETINFO_INTS = ("uptime", "ram_size", "ram_free", "ram_min_free", "fs_size", "fs_free")
GETINFO_STRS = ("id", "app", "fw_version", "fw_id", "mg_version", "mg_id", "mac", "arch")


def _raw(frame: Frame) -> bytes:
    return frame.raw if frame.raw is not None else frame.encode("device")


@check("rpc.list", section="frames.md §4", title="RPC.List: compact array of method names")
async def _rpc_list(s: Session) -> str | None:
    resp = await s.request("RPC.List")
    raw = _raw(resp)
    res = resp.result
    expect(
        isinstance(res, list) and all(isinstance(x, str) for x in res),
        "RPC.List must return an array of strings",
        seen=show(raw),
        expected='["RPC.List",...]',
    )
    for name in ("RPC.List", "RPC.Describe", "RPC.Ping", "Sys.GetInfo"):
        expect(name in res, f"RPC.List must include {name}", seen=show(res), expected=f"... {name!r} ...")
    text = member_text(raw, "result") or ""
    expect(
        text == json.dumps(res, separators=(",", ":")),
        "RPC.List array must be printed with no spaces",
        seen=show(text),
        expected=show(json.dumps(res, separators=(",", ":"))),
    )
    return f"{len(res)} methods"


@check("rpc.describe", section="frames.md §4", title="RPC.Describe: name/args_fmt, 400 and 404", needs=["RPC.Describe"])
async def _rpc_describe(s: Session) -> str | None:
    resp = await s.request("RPC.Describe", {"name": "RPC.Describe"})
    res = resp.result
    expect(
        isinstance(res, dict) and res.get("name") == "RPC.Describe" and isinstance(res.get("args_fmt"), str),
        "RPC.Describe must return {name, args_fmt}",
        seen=show(_raw(resp)),
        expected='{"name": "RPC.Describe", "args_fmt": "{name: %T}"}',
    )
    expect(
        list(res) == ["name", "args_fmt"],
        "RPC.Describe members must be name, args_fmt",
        seen=show(res),
        expected='{"name": ..., "args_fmt": ...}',
    )
    resp = await s.request("RPC.Describe", {})
    err = resp.error
    expect(
        err is not None and err.code == 400 and err.message == "name is required",
        "missing name must be 400",
        seen=show(_raw(resp)),
        expected='"error":{"code":400,"message":"name is required"}',
    )
    resp = await s.request("RPC.Describe", {"name": "Conformance.NoSuchMethod"})
    err = resp.error
    expect(
        err is not None and err.code == 404 and err.message == "name not found",
        "unknown name must be 404",
        seen=show(_raw(resp)),
        expected='"error":{"code":404,"message":"name not found"}',
    )
    return None


@check("rpc.ping", section="frames.md §4", title="RPC.Ping: {channel_info: <text>}")
async def _rpc_ping(s: Session) -> str | None:
    resp = await s.request("RPC.Ping")
    res = resp.result
    expect(
        isinstance(res, dict) and isinstance(res.get("channel_info"), str),
        "RPC.Ping must return {channel_info: string}",
        seen=show(_raw(resp)),
        expected='{"channel_info": "<text>"}',
    )
    return f"channel_info={res['channel_info']!r}"


@check("sys.getinfo", section="frames.md §4", title="Sys.GetInfo: fields, order, types")
async def _sys_getinfo(s: Session) -> str | None:
    resp = await s.request("Sys.GetInfo")
    res = resp.result
    expect(isinstance(res, dict), "Sys.GetInfo must return an object", seen=show(_raw(resp)), expected="an object")
    missing = [k for k in GETINFO_KEYS if k not in res]
    expect(
        not missing, f"Sys.GetInfo lacks {', '.join(missing)}", seen=show(list(res)), expected=show(list(GETINFO_KEYS))
    )
    order = [k for k in res if k in GETINFO_KEYS]
    expect(
        order == list(GETINFO_KEYS),
        "Sys.GetInfo members out of order",
        seen=show(order),
        expected=show(list(GETINFO_KEYS)),
    )
    bad = [k for k in GETINFO_INTS if isinstance(res[k], bool) or not isinstance(res[k], int)]
    bad += [k for k in GETINFO_STRS if not isinstance(res[k], str)]
    expect(
        not bad,
        f"wrong types for {', '.join(bad)}",
        seen=show({k: res[k] for k in bad}),
        expected="integers for sizes/uptime, strings for names",
    )
    if resp.src:
        expect(
            res["id"] == resp.src,
            "Sys.GetInfo id must be the device id (reply src)",
            seen=f"id={res['id']!r}",
            expected=f"id={resp.src!r}",
        )
    s.facts["getinfo"] = res
    return f"{res['app']} {res['fw_version']} ({res['arch']})"


@check(
    "sys.reboot_bad_delay",
    section="frames.md §4",
    title="Sys.Reboot with delay_ms < 0: 400 invalid delay value",
    needs=["Sys.Reboot"],
)
async def _sys_reboot_bad_delay(s: Session) -> str | None:
    resp = await s.request("Sys.Reboot", {"delay_ms": -1})
    err = resp.error
    expect(
        err is not None and err.code == 400 and err.message == "invalid delay value",
        "a negative delay must be refused (and the device must not reboot)",
        seen=show(_raw(resp)),
        expected='"error":{"code":400,"message":"invalid delay value"}',
    )
    return None


SETDEBUG_UDP = (
    (400, "invalid udp_log_addr"),  # a device built with UDP logging
    (501, "MGOS_ENABLE_DEBUG_UDP is not enabled"),  # one without (the reference device, RD-E13)
)


@check(
    "sys.setdebug_errors",
    section="frames.md §4-e; real-device.md RD-E13",
    title="Sys.SetDebug: level -5 is 400 invalid level; a bad udp_log_addr 400 (or 501 without UDP logging)",
    needs=["Sys.SetDebug"],
)
async def _sys_setdebug_errors(s: Session) -> str | None:
    # Both requests are refused, so nothing about the device's logging changes.
    resp = await s.request("Sys.SetDebug", {"level": -5})
    err = resp.error
    expect(
        err is not None and err.code == 400 and err.message == "invalid level",
        "a log level out of range must be refused",
        seen=show(_raw(resp)),
        expected='"error":{"code":400,"message":"invalid level"}',
    )
    resp = await s.request("Sys.SetDebug", {"udp_log_addr": "conformance:not-an-address"})
    err = resp.error
    expect(
        err is not None and (err.code, err.message) in SETDEBUG_UDP,
        "an address that is not host:port must be refused",
        seen=show(_raw(resp)),
        expected=" or ".join(f'"error":{{"code":{c},"message":"{m}"}}' for c, m in SETDEBUG_UDP),
    )
    return f"udp_log_addr: {err.code if err else ''}"


@check(
    "sys.reboot",
    section="frames.md §4",
    title="Sys.Reboot answers null, then the device restarts",
    destructive=True,
    needs=["Sys.Reboot", "Sys.GetInfo"],
)
async def _sys_reboot(s: Session) -> str | None:
    before = await s.get_info(fresh=True)
    up = before.get("uptime")
    if isinstance(up, int | float) and up < 2:
        # Uptime is in whole seconds: a device that has just booted could not show it restarting.
        await asyncio.sleep(2.5 - up)
        before = await s.get_info(fresh=True)
    resp = await s.request("Sys.Reboot", {"delay_ms": 100})
    expect(
        resp.ok and resp.result is None,
        "Sys.Reboot must answer null before rebooting",
        seen=show(_raw(resp)),
        expected="result null",
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + s.options.reboot_timeout_s
    p = await s.probe()
    evidence = ""
    while loop.time() < deadline and not evidence:
        await asyncio.sleep(0.1)
        if p.closed:
            evidence = "connection dropped"
            break
        try:
            got = await s.exchange(Frame(id=Probe.new_id(), src="mos", method="Sys.GetInfo"), timeout_s=1.0)
        except (MgrpcError, OSError):  # HTTP: the server is down while the device restarts
            got = None
        if got is None:
            evidence = "stopped answering"
        elif isinstance(got.result, dict) and got.result.get("uptime", 0) < before.get("uptime", 0):
            evidence = "uptime restarted"
    expect(
        bool(evidence),
        "no sign of a reboot (connection, silence or uptime)",
        seen="device kept running",
        expected="a restart",
    )
    await s.wait_up()
    s.facts.pop("getinfo", None)
    return evidence
