"""OTA by download and over the device's HTTP server (docs/protocol/ota.md §1.5, §3, §4).

``OTA.Update`` and ``GET /update?url=`` make the device fetch a bundle from a URL: the suite serves
it itself (:mod:`conformance.fwserver`) on an address the device can reach (``--ota-serve-host``, or
found from the device URL). ``POST /update`` pushes a bundle as ``multipart/form-data`` and
``/update/commit``, ``/update/revert`` end an update. All of these install firmware, so they run
only with ``--ota``/``--ota-generate``; a device without the HTTP endpoints (404) skips them.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any
from urllib.parse import quote, urlsplit

from conformance.checks.ota import (
    UPDATE,
    _boot_state,
    _bundle,
    _err,
    _expect_new_slot,
    _expect_reverted,
    _expect_untouched,
    _ready,
    _status,
    _wait_reboot,
    bundle_manifest,
    corrupt_bundle,
)
from conformance.checks.web import _http
from conformance.fwserver import FirmwareServer, serve_host
from conformance.model import CheckSkipped, check, expect
from conformance.rawjson import show
from conformance.session import Session
from rpc.frame import Frame

__all__: list[str] = []

WEB = ("http", "https", "ws", "wss")  # the schemes whose URL names the device's HTTP server
PULL = (*UPDATE, "OTA.Update", "OTA.Commit")


def _web_base(s: Session) -> str:
    parts = urlsplit(s.url)
    scheme = "https" if parts.scheme in ("https", "wss") else "http"
    return f"{scheme}://{parts.netloc}"


async def _server(s: Session, files: dict[str, bytes]) -> FirmwareServer:
    return await FirmwareServer(serve_host(s.url, s.options.ota_serve_host), files).start()


def _long(s: Session) -> float:
    """How long a reply that waits for a whole download may take."""
    return s.options.timeout_s + s.options.reboot_timeout_s


async def _update(s: Session, params: dict[str, Any]) -> Frame:
    return await s.request("OTA.Update", params, timeout_s=_long(s))


def _ok_code(resp: Frame) -> bool:
    """Success of OTA.Update: through the error path with code 0 (ota.md §1.5-c), or a plain result."""
    return resp.error is None or resp.error.code == 0


async def _no_reboot(s: Session, before: dict[str, Any], info: dict[str, Any], what: str) -> None:
    """The device kept running the same firmware, with the same boot state, without a reboot."""
    await asyncio.sleep(0.3)  # a device that (wrongly) reboots would be going down now
    await s.wait_up()
    info2 = await s.get_info(fresh=True)
    up1, up2 = info.get("uptime"), info2.get("uptime")
    rebooted = isinstance(up1, int | float) and isinstance(up2, int | float) and up2 < up1
    expect(not rebooted, f"the device rebooted after {what}", seen=f"uptime {up1} -> {up2}", expected="no reboot")
    after = await _boot_state(s)
    expect(after == before, f"boot state changed by {what}", seen=show(after), expected=show(before))


@check(
    "ota.update_pull",
    section="ota.md §1.5-a, §1.5-c, §1.5-e, §4-c, §4-f",
    title="OTA.Update {url}: replies after the download, with the X-MGOS headers; reboots uncommitted",
    destructive=True,
    needs=PULL,
    budget=4.0,
)
async def _ota_update_pull(s: Session) -> str | None:
    bundle = await _bundle(s, "p")
    before = await _ready(s)
    info = await s.get_info(fresh=True)
    async with await _server(s, {"/fw/p.zip": bundle}) as srv:
        # mos's arguments (commit_timeout a number) plus the overall timeout the spec allows (§1.5-e).
        resp = await _update(s, {"url": srv.url("/fw/p.zip"), "commit_timeout": 300, "timeout": 600})
        got_at = time.monotonic()
        expect(_ok_code(resp), "OTA.Update of a good bundle must succeed", seen=_err(resp), expected="code 0")
        gets = [r for r in srv.requests if r.path == "/fw/p.zip"]
        expect(bool(gets), "the device must download the URL", seen="no request", expected="GET /fw/p.zip")
        req = gets[0]
        expect(
            0 < req.done_at <= got_at,
            "the reply must be held back until the download is finished",
            seen="the reply came before the last byte was sent",
            expected="reply after the download",
        )
    dev_id = req.headers.get("x-mgos-device-id", "")
    fw = req.headers.get("x-mgos-fw-version", "")
    want_fw = f"{info.get('arch')} {info.get('fw_version')} {info.get('fw_id')}"
    expect(
        dev_id.split(" ")[0] == info.get("id") and len(dev_id.split(" ")) == 2 and fw == want_fw,
        "the download carries X-MGOS-Device-ID: <device.id> <mac> and X-MGOS-FW-Version: <arch> <fw_version> <fw_id>",
        seen=f"X-MGOS-Device-ID: {dev_id!r}, X-MGOS-FW-Version: {fw!r}",
        expected=f"X-MGOS-Device-ID: '{info.get('id')} <mac>', X-MGOS-FW-Version: {want_fw!r}",
    )
    after = await _wait_reboot(s, info)
    expect(
        after["active_slot"] != before["active_slot"] and after["is_committed"] is False,
        "after OTA.Update the device must run the new slot, uncommitted",
        seen=show(after),
        expected=f"active_slot != {before['active_slot']}, is_committed false",
    )
    expect(
        after["commit_timeout"] == 300,
        "the commit_timeout argument must be the boot state's commit timeout",
        seen=show(after),
        expected="commit_timeout 300",
    )
    version = bundle_manifest(bundle).get("version")
    info2 = await s.get_info(fresh=True)
    expect(
        not version or info2.get("fw_version") == version,
        "Sys.GetInfo must report the downloaded firmware's version",
        seen=info2.get("fw_version"),
        expected=version,
    )
    await s.call("OTA.Commit")
    return f"slot {before['active_slot']} -> {after['active_slot']}"


@check(
    "ota.update_pull_errors",
    section="ota.md §1.5-d, §1.5-e, §4-d",
    title="OTA.Update: 404 -> -404, refused connection -> -10, 304 -> success without reboot",
    destructive=True,
    needs=PULL,
    budget=3.0,
)
async def _ota_update_pull_errors(s: Session) -> str | None:
    before = await _ready(s)
    info = await s.get_info(fresh=True)
    async with await _server(s, {}) as srv:
        resp = await _update(s, {"url": srv.url("/missing.zip")})
        err = resp.error
        expect(
            err is not None and err.code == -404 and (err.message or "").startswith("-404 "),
            "an HTTP 404 answer is result -404, the message prefixed with it",
            seen=_err(resp),
            expected='"error":{"code":-404,"message":"-404 Invalid HTTP response code"}',
        )
        resp = await _update(s, {"url": srv.url("/unchanged.zip")})
        err = resp.error
        expect(
            err is not None and err.code == 0 and "Not Modified" in (err.message or ""),
            "an HTTP 304 answer ends the update successfully, status Not Modified",
            seen=_err(resp),
            expected='"error":{"code":0,"message":"Not Modified"}',
        )
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind((srv.host, 0))
            closed = srv.url("/x.zip").replace(f":{srv.port}/", f":{sock.getsockname()[1]}/")
        resp = await _update(s, {"url": closed})
        err = resp.error
        expect(
            err is not None and err.code == -10,
            "a refused connection is result -10 (Failed to connect)",
            seen=_err(resp),
            expected='"error":{"code":-10,"message":"-10 Failed to connect"}',
        )
    st = await _status(s)
    expect(st["state"] != 1, "no update may be left in progress", seen=show(st), expected="state 0, 2 or 3")
    await _no_reboot(s, before, info, "failed or unneeded downloads")
    return None


async def _web(s: Session, method: str, path: str, body: bytes | None = None, **kw: Any) -> tuple[int, dict, bytes]:
    status, headers, data = await _http(s, method, _web_base(s) + path, body, **kw)
    if status == 404:
        raise CheckSkipped("the device serves no /update endpoints (ota-http-server)")
    return status, headers, data


@check(
    "ota.http_pull",
    section="ota.md §3-h, §3-i, §3-j, §4-e",
    title="GET /update?url=: 409 while busy, 200 and reboot; /update/commit; same version: no reboot",
    destructive=True,
    only=WEB,
    needs=UPDATE,
    budget=5.0,
)
async def _ota_http_pull(s: Session) -> str | None:
    bundle = await _bundle(s, "q")
    before = await _ready(s)
    info = await s.get_info(fresh=True)
    async with await _server(s, {"/fw/q.zip": bundle}) as srv:
        query = f"/update?url={quote(srv.url('/fw/q.zip'), safe='')}&commit_timeout=120"
        resp = await s.request("OTA.Begin", {"timeout": 600, "commit_timeout": 300, "size": 1000})
        expect(resp.ok, "OTA.Begin must succeed", seen=_err(resp), expected="result null")
        try:
            status, _, body = await _web(s, "GET", query)
        finally:
            await s.request("OTA.End")  # abort the update that kept the device busy
        expect(
            status == 409 and body == b"Another update is in progress.\r\n",
            "a pull while an update runs is refused",
            seen=f"{status} {show(body)}",
            expected="409 Another update is in progress.\\r\\n",
        )
        expect(not srv.requests, "nothing may be downloaded while busy", seen=len(srv.requests), expected=0)
        status, _, body = await _web(s, "GET", query, timeout_s=_long(s))
        expect(
            status == 200 and re.fullmatch(rb"\(-?\d+\) .*\r\n", body) is not None,
            "a successful pull answers 200 (<result>) <message>",
            seen=f"{status} {show(body)}",
            expected="200 (<result>) <message>\\r\\n",
        )
        after = await _wait_reboot(s, info)
        _expect_new_slot(before, after, "the pull (commit_timeout of the query)", commit_timeout=120)
        status, headers, body = await _web(s, "GET", "/update/commit")
        expect(
            status == 200 and body == b"Ok\r\n" and headers.get("Content-Type", "").startswith("text/html"),
            "GET /update/commit of uncommitted firmware answers 200 Ok",
            seen=f"{status} {headers.get('Content-Type')} {show(body)}",
            expected="200 text/html Ok\\r\\n",
        )
        committed = await _boot_state(s)
        expect(committed["is_committed"] is True, "committed now", seen=show(committed), expected="is_committed true")
        info = await s.get_info(fresh=True)
        # The same bundle again: ignore_same_version is on by default for /update (§3-h, §4-e).
        status, _, body = await _web(s, "GET", query.split("&", 1)[0], timeout_s=_long(s))
        expect(
            status == 200 and b"Version is the same as current" in body,
            "pulling the running version again ends successfully without an update",
            seen=f"{status} {show(body)}",
            expected="200 (<result>) Version is the same as current\\r\\n",
        )
    await _no_reboot(s, committed, info, "pulling the running version")
    return None


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        ctype = "Content-Type: application/zip\r\n" if filename else ""
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n{ctype}\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def _push(s: Session, parts: list[tuple[str, str | None, bytes]]) -> tuple[int, dict, bytes]:
    boundary = "conformance-" + str(time.monotonic_ns())
    return await _web(
        s,
        "POST",
        "/update",
        _multipart(parts, boundary),
        content_type=f"multipart/form-data; boundary={boundary}",
        timeout_s=_long(s),
    )


@check(
    "ota.http_push",
    section="ota.md §3-b, §3-c, §3-d, §3-j",
    title="POST /update multipart (any file field, commit_timeout after it): 200 text/plain; /update/revert",
    destructive=True,
    only=WEB,
    needs=UPDATE,
    budget=5.0,
)
async def _ota_http_push(s: Session) -> str | None:
    bundle = await _bundle(s, "r")
    before = await _ready(s)
    info = await s.get_info(fresh=True)
    # A file field that is not called "file", then commit_timeout after the file (§3-b, §3-c).
    status, headers, body = await _push(s, [("upload", "fw.zip", bundle), ("commit_timeout", None, b"150")])
    expect(
        status == 200
        and headers.get("Content-Type", "").startswith("text/plain")
        and headers.get("Connection", "").lower() == "close"
        and body.endswith(b"\r\n"),
        "a good bundle pushed as multipart is answered 200, text/plain, Connection: close, <message>\\r\\n",
        seen=f"{status} {show(headers)} {show(body)}",
        expected="200 Content-Type: text/plain, Connection: close, body ending \\r\\n",
    )
    _expect_new_slot(before, await _wait_reboot(s, info), "the push (commit_timeout sent after the file)",
                     commit_timeout=150)  # fmt: skip
    status, headers, body = await _web(s, "GET", "/update/revert")
    expect(
        status == 200 and body == b"Ok\r\n",
        "GET /update/revert of uncommitted firmware answers 200 Ok",
        seen=f"{status} {show(body)}",
        expected="200 Ok\\r\\n",
    )
    await _expect_reverted(s, before, info, "/update/revert")
    return None


@check(
    "ota.http_push_bad",
    section="ota.md §3-e",
    title="POST /update of a corrupt bundle: error status, <message>\\r\\n, slot untouched",
    destructive=True,
    only=WEB,
    needs=UPDATE,
    budget=3.0,
)
async def _ota_http_push_bad(s: Session) -> str | None:
    bundle = corrupt_bundle(await _bundle(s))
    before = await _ready(s)
    info = await s.get_info(fresh=True)
    status, _, body = await _push(s, [("file", "fw.zip", bundle)])
    expect(
        status in (400, 500) and body.endswith(b"\r\n") and len(body) > 2,
        "a bundle that fails is answered with an error status and its message",
        seen=f"{status} {show(body)}",
        expected="500 <negative code> <message>\\r\\n (400 on 2017 firmware)",
    )
    await _expect_untouched(s, before, info, "a refused push")
    st = await _status(s)
    expect(st["state"] != 1, "no update may be left in progress", seen=show(st), expected="state 0 or 2")
    return f"{status} {body.decode('utf-8', 'replace').strip()}"
