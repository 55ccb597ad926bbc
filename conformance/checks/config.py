"""Config service checks (docs/protocol/tool.md §6, frames.md §7.2/§7.4): what ``mos config-get/-set`` rely on."""

from __future__ import annotations

from typing import Any

from conformance.model import CheckSkipped, check, expect
from conformance.rawjson import show
from conformance.session import Session
from rpc.frame import ABSENT, Frame

__all__: list[str] = []


def _raw(frame: Frame) -> bytes:
    return frame.raw if frame.raw is not None else frame.encode("device")


async def _get(s: Session, key: str | None = None) -> Any:
    resp = await s.request("Config.Get", {"key": key} if key else ABSENT)
    if resp.error is not None and resp.error.code == 404 and "No handler" in (resp.error.message or ""):
        raise CheckSkipped("the device has no Config service")
    expect(resp.ok, f"Config.Get {key or ''} failed", seen=show(_raw(resp)), expected="a result")
    return resp.result


@check(
    "config.get",
    section="tool.md §6; frames.md §7.2, §7.4",
    title="Config.Get: whole config and {key: device.id}",
    needs=["Config.Get"],
)
async def _config_get(s: Session) -> str | None:
    whole = await _get(s)
    expect(
        isinstance(whole, dict) and isinstance(whole.get("device"), dict),
        "Config.Get must return the config object",
        seen=show(whole),
        expected='{"device": {"id": ...}, ...}',
    )
    dev = await s.device_id()
    value = await _get(s, "device.id")
    expect(
        value == dev, "Config.Get {key: device.id} must return the id as a string", seen=show(value), expected=show(dev)
    )
    return None


@check(
    "config.set",
    section="tool.md §6",
    title="Config.Set changes a value (restored afterwards, not saved)",
    destructive=True,
    needs=["Config.Get", "Config.Set"],
)
async def _config_set(s: Session) -> str | None:
    old = await _get(s, "debug.level")
    if not isinstance(old, int):
        raise CheckSkipped("the device has no integer debug.level")
    new = 3 if old != 3 else 2
    try:
        resp = await s.request("Config.Set", {"config": {"debug": {"level": new}}})
        expect(resp.ok, "Config.Set of debug.level failed", seen=show(_raw(resp)), expected="result null")
        got = await _get(s, "debug.level")
        expect(got == new, "Config.Get must return the value just set", seen=show(got), expected=show(new))
    finally:
        await s.request("Config.Set", {"config": {"debug": {"level": old}}})
    back = await _get(s, "debug.level")
    expect(back == old, "the value could not be restored", seen=show(back), expected=show(old))
    return None
