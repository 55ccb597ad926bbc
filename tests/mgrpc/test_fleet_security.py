"""Issue #16 (2): the dashboard is safe to expose — loopback by default, credentials required
anywhere else, state-changing requests refused without them, cross-site requests refused, TLS."""

from __future__ import annotations

import base64
import ssl
from typing import Any

import aiohttp
import pytest

from mgrpc.fleet.security import COOKIE, CSRF_HEADER, Guard, SecurityError, is_loopback
from mgrpc.wiring import start_fleet
from rpc.auth import htdigest_line
from tests.device_helpers import bundle
from tests.mosquitto import make_tls_files

TOKEN = "s3cret-token-0123456789"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_loopback_names() -> None:
    for h in ("127.0.0.1", "127.0.0.1:8080", "localhost", "localhost:1", "[::1]:80", "::1", "127.3.2.1"):
        assert is_loopback(h), h
    for h in ("0.0.0.0", "10.0.0.5", "example.com", "[::]:80", "evil.localhost.example"):
        assert not is_loopback(h), h


async def test_any_other_address_requires_credentials(tmp_path) -> None:
    for listen in ("http://0.0.0.0:0", "http://[::]:0", "http://10.1.2.3:0"):
        with pytest.raises(SecurityError, match="without credentials"):
            await start_fleet(broker="", db_path=tmp_path / "x.sqlite", listen=listen)
    with pytest.raises(ValueError, match="TLS needs both"):
        await start_fleet(broker="", db_path=tmp_path / "x.sqlite", listen="https://127.0.0.1:0")
    with pytest.raises(SecurityError, match="cannot read the password file"):
        Guard(password_file=tmp_path / "missing")


def test_guard_sessions_expire_and_are_shared_by_processes_with_the_same_credentials() -> None:
    now = [1000.0]
    a = Guard(token=TOKEN, clock=lambda: now[0])
    b = Guard(token=TOKEN, clock=lambda: now[0])
    s = a.new_session("token")
    assert b.session_user(s) == "token" and b.csrf_token(s) == a.csrf_token(s)
    assert Guard(token=TOKEN + "x").session_user(s) is None  # other credentials, other key
    assert a.session_user(s[:-1] + ("0" if s[-1] != "0" else "1")) is None  # forged
    now[0] += 13 * 3600
    assert a.session_user(s) is None  # expired


async def _post(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with s.post(url, **kw) as resp:
        return resp.status, await resp.json()


async def test_token_and_password_logins_csrf_and_tls(tmp_path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    pw = tmp_path / "users.htdigest"
    pw.write_text(htdigest_line("ops", "fleet", "hunter22") + "\n")
    f = await start_fleet(broker="", db_path=tmp_path / "fleet.sqlite", listen="https://127.0.0.1:0", token=TOKEN,
                          password_file=pw, tls_cert=tls.server_cert, tls_key=tls.server_key)  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    url = f.url
    assert url.startswith("https://127.0.0.1:")
    rollout = {"devices": ["x"], "bundle": "nope", "method": "push"}
    try:
        # no TLS trust, no connection
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectorError):
                await s.get(url + "/api/state")
        conn = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=conn) as s:
            # nothing without credentials, except what devices download
            async with s.get(url + "/api/state") as resp:
                assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
            status, body = await _post(s, url + "/api/rollouts", json=rollout)
            assert status == 401 and "log in" in body["error"]
            async with s.get(url + "/update", headers={"X-MGOS-Device-ID": "x"}) as resp:
                assert resp.status == 304
            assert f.app.rollouts == {}
            # a bearer token (a program): no CSRF token needed, the request reaches the API
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            status, body = await _post(s, url + "/api/rollouts", json=rollout, headers=bearer)
            assert status == 400 and "unknown bundle" in body["error"]
            status, _ = await _post(s, url + "/api/rollouts", json=rollout, headers={"Authorization": "Bearer nope"})
            assert status == 401
            # uploads too
            form = aiohttp.FormData()
            form.add_field("file", bundle("1.1"), filename="fw.zip", content_type="application/zip")
            assert (await _post(s, url + "/api/bundles", data=form))[0] == 401
            assert f.app.db.bundles() == []
        # a browser: ?token= once sets a Secure, HttpOnly, SameSite=Strict session cookie
        conn = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=conn, cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.get(url + "/api/state?token=wrong") as resp:
                assert resp.status == 401
            async with s.get(url + "/api/state?token=" + TOKEN) as resp:
                assert resp.status == 200
                cookie = resp.headers["Set-Cookie"]
                assert all(x in cookie for x in ("HttpOnly", "SameSite=Strict", "Secure", COOKIE + "="))
                csrf = (await resp.json())["csrf"]
            async with s.get(url + "/api/state") as resp:  # the cookie alone now
                assert resp.status == 200
            status, body = await _post(s, url + "/api/rollouts", json=rollout)  # cookie but no CSRF token
            assert status == 403 and CSRF_HEADER in body["error"]
            status, body = await _post(s, url + "/api/rollouts", json=rollout, headers={CSRF_HEADER: "forged"})
            assert status == 403
            evil = {CSRF_HEADER: csrf, "Origin": "https://evil.example"}
            status, body = await _post(s, url + "/api/rollouts", json=rollout, headers=evil)
            assert status == 403 and "cross-site" in body["error"]
            status, body = await _post(s, url + "/api/rollouts", json=rollout,
                                       headers={CSRF_HEADER: csrf, "Sec-Fetch-Site": "cross-site"})  # fmt: skip
            assert status == 403 and "cross-site" in body["error"]
            ok = {CSRF_HEADER: csrf, "Origin": url, "Sec-Fetch-Site": "same-origin"}
            status, body = await _post(s, url + "/api/rollouts", json=rollout, headers=ok)
            assert status == 400 and "unknown bundle" in body["error"]  # through to the API
        # the password file: HTTP Basic
        conn = aiohttp.TCPConnector(ssl=ctx)
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.get(url + "/api/state", headers=basic("ops", "wrong")) as resp:
                assert resp.status == 401
            async with s.get(url + "/api/state", headers=basic("ops", "hunter22")) as resp:
                assert resp.status == 200
                csrf = (await resp.json())["csrf"]
                session = resp.cookies[COOKIE].value
            ops = basic("ops", "hunter22")
            # Basic auth is sent by browsers on their own: it needs the CSRF token as a cookie does
            status, _ = await _post(s, url + "/api/rollouts", json=rollout, headers=ops)
            assert status == 403
            status, body = await _post(s, url + "/api/rollouts", json=rollout, headers={**ops, CSRF_HEADER: csrf},
                                       cookies={COOKIE: session})  # fmt: skip
            assert status == 400 and "unknown bundle" in body["error"]
        assert f.app.rollouts == {}
    finally:
        await f.close()


async def test_loopback_without_credentials_still_refuses_cross_site_and_rebinding(tmp_path) -> None:
    f = await start_fleet(broker="", db_path=tmp_path / "fleet.sqlite")
    rollout = {"devices": ["x"], "bundle": "nope", "method": "push"}
    try:
        async with aiohttp.ClientSession() as s:
            # a program on this machine (no Origin): allowed
            status, body = await _post(s, f.url + "/api/rollouts", json=rollout)
            assert status == 400 and "unknown bundle" in body["error"]
            # a web page elsewhere posting to 127.0.0.1
            for hdrs in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
                status, body = await _post(s, f.url + "/api/rollouts", json=rollout, headers=hdrs)
                assert status == 403 and "cross-site" in body["error"], hdrs
            # our own page: needs the token it read from /api/state
            async with s.get(f.url + "/api/state") as resp:
                csrf = (await resp.json())["csrf"]
            status, _ = await _post(s, f.url + "/api/rollouts", json=rollout, headers={"Origin": f.url})
            assert status == 403
            status, body = await _post(s, f.url + "/api/rollouts", json=rollout,
                                       headers={"Origin": f.url, CSRF_HEADER: csrf})  # fmt: skip
            assert status == 400 and "unknown bundle" in body["error"]
            # DNS rebinding: a page of evil.example resolved to 127.0.0.1 (its Host header gives it away)
            async with s.get(f.url + "/api/state", headers={"Host": "evil.example"}) as resp:
                assert resp.status == 421
    finally:
        await f.close()


def test_cli_refuses_to_expose_the_dashboard_without_credentials(tmp_path) -> None:
    from tests.mgrpc.cli_proc import run_cli

    r = run_cli("dashboard", "--listen", "http://0.0.0.0:0", "--db", str(tmp_path / "f.sqlite"), timeout_s=30)
    assert "without credentials" in r.error_line(2)
    short = tmp_path / "token"
    short.write_text("abc\n")
    r = run_cli("dashboard", "--token-file", str(short), "--db", str(tmp_path / "f.sqlite"), timeout_s=30)
    assert "too short" in r.error_line(2)
