"""HTTP sides of OTA on the device: the pull client (``OTA.Update``, ota-http-client) and the
ota-http-server endpoints (``POST /update``, ``GET /update?url=``, ``/update/commit``,
``/update/revert``), spec/ota.md §3, §4. aiohttp is imported on first use.

Decisions: a download with chunked transfer encoding is accepted (real devices refuse it with
``Invalid content-length, perhaps chunked-encoding``; we can stream it, so we do); a connection that
closes before ``Content-Length`` bytes is ``-5 Update failed``; a refused connection ``-10 Failed to
connect``; any HTTP status but 200/304 ``-<status> Invalid HTTP response code``.

Access: the endpoints are checked against the node's RPC authenticator and ACL as the RPC methods
they stand for (``/update`` = ``OTA.Update``, ``/update/commit`` = ``OTA.Commit``, ``/update/revert``
= ``OTA.Revert``, on channel type ``HTTP``), with the HTTP digest of ``Authorization``. Where the ACL
asks for a user, a request without valid credentials gets ``401`` and a ``WWW-Authenticate: Digest``
challenge, a user the ACL denies ``403`` -- before any byte of an upload is read. (A stock device
protects them only with its separate ``http.auth_*`` settings; one rule for every path to OTA
leaves no back door.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from rpc.auth import http_challenge_header, verify_http_digest
from rpc.errors import HandlerError
from services.ota import OtaService, OtaState, _Update
from updater.bootcfg import MAX_COMMIT_TIMEOUT_S

__all__ = ["fetch_update", "register_http_endpoints"]

log = logging.getLogger("mgrpc.services.ota_http")
READ_CHUNK = 4096
CONNECT_TIMEOUT_S = 30.0


async def fetch_update(svc: OtaService, u: _Update, url: str, *, headers: Mapping[str, str] | None = None,
                       finalize: bool = True) -> tuple[int, str]:
    """Stream ``url`` into the running update ``u``; returns (result code, message).

    0 = applied (and a reboot scheduled when ``finalize``), 1 = nothing to do (304 or same version),
    < 0 = failed (the update is aborted, nothing switched).
    """
    import aiohttp

    # No overall limit (aiohttp's default is 5 min, which would cut a slow but progressing download):
    # like the device's update.timeout, only a stall of the update's no-progress timeout ends it.
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=u.timeout_s if u.timeout_s > 0 else None
    )
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers=dict(headers or {})) as resp,
        ):
            if resp.status == 304:
                _abort_if_current(svc, u, "Not Modified")  # back to idle, "Not Modified"
                return 1, "Not Modified"
            if resp.status != 200:
                _abort_if_current(svc, u, "Invalid HTTP response code")
                return -resp.status, "Invalid HTTP response code"
            if u.size is None and resp.content_length is not None:
                u.size = resp.content_length
                u.ctx.total_size = resp.content_length
            async for chunk in resp.content.iter_chunked(READ_CHUNK):
                if u.ctx.result < 0:
                    break  # aborted meanwhile (watchdog, reboot): the service may run another update now
                res = svc.write(chunk)
                if res < 0:
                    return res, u.ctx.status_message
                if res > 0:  # done early (e.g. same version)
                    break
    except aiohttp.ClientConnectorError:
        _abort_if_current(svc, u, "Failed to connect")
        return -10, "Failed to connect"
    except (aiohttp.ClientPayloadError, aiohttp.ClientError, OSError) as e:
        log.warning("download of %s failed: %s", url, e)
        _abort_if_current(svc, u, "Update failed")
        return -5, "Update failed"
    except BaseException:
        # Cancelled (the poller or the stack stopped) or a bug: end the update rather than leave the
        # service "in progress", refusing every other update until the watchdog fires.
        _abort_if_current(svc, u, "Update aborted")
        raise
    if u.ctx.result < 0:
        return -5, u.ctx.status_message
    if u.ctx.result > 0 and not u.ctx.reboot_required:
        svc.state, svc.msg = OtaState.IDLE, u.ctx.status_message
        return 1, u.ctx.status_message
    if u.size is not None and u.written < u.size:
        _abort_if_current(svc, u, "Update failed")
        return -5, "Update failed"
    if not finalize:
        return 0, "downloaded"
    res = svc.finish()
    if res < 0:
        return res, u.ctx.status_message
    return 0, u.ctx.status_message


def _abort_if_current(svc: OtaService, u: _Update, message: str) -> None:
    """Abort ``u`` if it is still the service's running update (never someone else's)."""
    if svc.update is u and svc.state == OtaState.PROGRESS:
        svc.abort(message)


def register_http_endpoints(node: Any, svc: OtaService, *, commit_timeout_default: int = 0) -> None:
    """Serve ``/update`` and friends through the node's HTTP transports (``node.http_handlers``)."""

    async def handle(request: Any) -> Any:
        from aiohttp import web

        path = request.path.rstrip("/")
        refused = _refusal(request, node, _PATH_METHODS.get(path, "OTA.Update"))
        if refused is not None:
            return refused
        if path == "/update/commit":
            ok = svc.commit()
            return web.Response(status=200 if ok else 400, text="Ok\r\n" if ok else "Error\r\n",
                                content_type="text/html")
        if path == "/update/revert":
            ok = not svc.storage.is_committed and svc.storage.revert()
            if ok:
                svc.fw.reboot(0.1)
            return web.Response(status=200 if ok else 400, text="Ok\r\n" if ok else "Error\r\n",
                                content_type="text/html")
        if path != "/update":
            return web.Response(status=404, text="Not Found\r\n")
        if request.method == "POST" and request.content_type.startswith("multipart/"):
            return await _push(request, svc, commit_timeout_default)
        return await _pull(request, svc, commit_timeout_default)

    node.http_handlers["/update"] = handle


_PATH_METHODS = {"/update": "OTA.Update", "/update/commit": "OTA.Commit", "/update/revert": "OTA.Revert"}


def _refusal(request: Any, node: Any, method: str) -> Any:
    """None when the node's auth/ACL allows ``method`` for this request, else the 401/403 response."""
    from aiohttp import web

    auth = getattr(node, "auth", None)
    if auth is None:
        return None
    user = None
    header = request.headers.get("Authorization", "")
    if header and hasattr(auth, "realm"):
        user = verify_http_digest(auth, header, request.method)
    decision = auth.check(method, "HTTP", None, user)
    if decision.allowed:
        return None
    headers = {"Connection": "close"}
    if decision.code == 401 and hasattr(auth, "realm"):
        try:  # the challenge the authenticator just made (a new nonce() call would waste one)
            nonce = int(json.loads(decision.message or "")["nonce"])
        except (ValueError, KeyError, TypeError):
            nonce = int(auth.nonce())
        headers["WWW-Authenticate"] = http_challenge_header(auth.realm, auth.algorithm, nonce)
        return web.Response(status=401, text="Unauthorized\r\n", headers=headers)
    return web.Response(status=403, text="Forbidden\r\n", headers=headers)


async def _push(request: Any, svc: OtaService, commit_timeout_default: int) -> Any:
    from aiohttp import web

    def reply(status: int, text: str) -> Any:
        return web.Response(status=status, text=text + "\r\n", content_type="text/plain",
                            headers={"Connection": "close"})

    cfg = svc.fw.config
    if cfg is not None and not cfg.get("update.enable_post"):
        return reply(400, "POST updates are disabled.")
    if svc.state == OtaState.PROGRESS:
        return reply(409, "Another update is in progress.")
    reader = await request.multipart()
    commit_timeout = commit_timeout_default
    u: _Update | None = None
    result = 0
    try:
        async for part in reader:
            if part.filename:
                if u is None:
                    try:
                        u = svc.begin(size=None, commit_timeout_s=commit_timeout, timeout_s=None, source="post")
                    except HandlerError as e:
                        return reply(400, e.message or "Update failed")
                while chunk := await part.read_chunk(READ_CHUNK):
                    if u.ctx.result < 0:  # aborted meanwhile (watchdog): never feed another update
                        return reply(500, f"{u.ctx.result} {u.ctx.status_message}")
                    result = svc.write(chunk)
                    if result < 0:
                        return reply(500, f"{result} {u.ctx.status_message}")
            elif part.name == "commit_timeout":
                text = (await part.text()).strip()
                if text.lstrip("-").isdigit():
                    commit_timeout = int(text)
                    if commit_timeout > MAX_COMMIT_TIMEOUT_S:
                        if u is not None:
                            _abort_if_current(svc, u, "Update aborted")
                        return reply(400, f"Invalid commit_timeout (at most {MAX_COMMIT_TIMEOUT_S} s)")
                    if u is not None:
                        u.ctx.commit_timeout_s = max(0, commit_timeout)
    except BaseException:
        # The upload broke off (client gone, malformed multipart, cancelled): the stream ended before
        # the archive did, so the update fails now instead of blocking others until its watchdog.
        if u is not None:
            _abort_if_current(svc, u, "Update aborted")
        raise
    if u is None:
        return reply(400, "Update aborted")
    if u.ctx.result < 0:  # aborted meanwhile (watchdog): never finish another update
        return reply(500, f"{u.ctx.result} {u.ctx.status_message}")
    if u.ctx.result > 0 and not u.ctx.reboot_required:
        svc.state, svc.msg = OtaState.IDLE, u.ctx.status_message
        return reply(200, u.ctx.status_message)
    res = svc.finish()
    if res < 0:
        return reply(500, f"{res} {u.ctx.status_message}")
    return reply(200, u.ctx.status_message)


async def _pull(request: Any, svc: OtaService, commit_timeout_default: int) -> Any:
    from aiohttp import web

    def reply(status: int, text: str) -> Any:
        return web.Response(status=status, text=text + "\r\n", content_type="text/plain")

    params = dict(request.query)
    if request.method == "POST":
        params.update(await request.post())
    cfg = svc.fw.config
    url = str(params.get("url") or (cfg.get("update.url") if cfg else "") or "")
    if not url:
        return reply(400, "Update URL not specified and none is configured.")
    if svc.state == OtaState.PROGRESS:
        return reply(409, "Another update is in progress.")
    ct = str(params.get("commit_timeout", "")).strip()
    commit_timeout = int(ct) if ct.lstrip("-").isdigit() else commit_timeout_default
    if commit_timeout > MAX_COMMIT_TIMEOUT_S:
        return reply(400, f"Invalid commit_timeout (at most {MAX_COMMIT_TIMEOUT_S} s)")
    isv = str(params.get("ignore_same_version", "1")).strip()
    try:
        u = svc.begin(size=None, commit_timeout_s=commit_timeout, timeout_s=None, source="pull",
                      ignore_same_version=(int(isv) > 0) if isv.lstrip("-").isdigit() else True)
    except HandlerError:
        return reply(409, "Failed to create updater context.")
    from services.polling import poll_headers  # as ota-http-client sends them (ota.md §4-c)

    code, message = await fetch_update(svc, u, url, headers=poll_headers(svc.fw))
    return reply(200 if code >= 0 else 500, f"({code if code < 0 else 1}) {message}")
