"""Config key checks beyond ``config.get`` (docs/protocol/tool.md §6; real-device.md)."""

from __future__ import annotations

from conformance.model import check, expect
from conformance.rawjson import show
from conformance.session import Session

__all__: list[str] = []


@check(
    "config.get_unknown_key",
    section="tool.md §6; real-device.md RD-E13",
    title="Config.Get of an unknown key: 404 invalid config key",
    needs=["Config.Get"],
)
async def _config_get_unknown_key(s: Session) -> str | None:
    resp = await s.request("Config.Get", {"key": "conformance.no_such_key"})
    err = resp.error
    expect(
        err is not None and err.code == 404,
        "an unknown config key must be an error",
        seen=show(resp.raw or resp.encode("device")),
        expected='"error":{"code":404,"message":"invalid config key"}',
    )
    return None
