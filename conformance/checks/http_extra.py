"""More HTTP rules (docs/protocol/transports.md §3.2, §3.5): string results in REST mode and
``OPTIONS /rpc``."""

from __future__ import annotations

from conformance.checks.web import HTTP, _base, _http
from conformance.model import check, expect
from conformance.rawjson import show
from conformance.session import Session

__all__: list[str] = []


@check(
    "http.rest_string_result",
    section="transports.md §3.2, §3.5",
    title="REST string result sent without its quotes",
    only=HTTP,
    needs=["Config.Get"],
)
async def _http_rest_string_result(s: Session) -> str | None:
    dev = await s.device_id()
    status, _, body = await _http(s, "POST", _base(s) + "/Config.Get", b'{"key":"device.id"}')
    expect(
        status == 200 and body == dev.encode() + b"\r\n",
        "a string result is the bare text in REST mode",
        seen=f"{status} {show(body)}",
        expected=f"200 {dev}\\r\\n",
    )
    return None


@check(
    "http.options_rpc", section="transports.md §3.5", title="OPTIONS /rpc (no method) is an empty frame: 400", only=HTTP
)
async def _http_options_rpc(s: Session) -> str | None:
    status, _, body = await _http(s, "OPTIONS", _base(s))
    expect(status == 400, "OPTIONS /rpc is handled as an empty frame", seen=f"{status} {show(body)}", expected="400")
    return None
