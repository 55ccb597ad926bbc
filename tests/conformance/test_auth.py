"""The auth checks (frames.md §6) against a device with digest auth, and their failure modes."""

from __future__ import annotations

from typing import Any

import transports
from conformance import runner
from conformance.model import Outcome
from conformance.refdevice import make_node
from conformance.session import Options
from rpc.auth import Acl, Authenticator, Credentials
from rpc.errors import HandlerError

ACL = '[{"method":"Sys.GetInfo","acl":"+admin"},{"method":"*","acl":"*"}]'


async def _run(node: Any, name: str, creds: Credentials | None) -> runner.Report:
    lst = await transports.listen(f"loop://{name}", node)
    try:
        opts = Options(timeout_s=2.0, quiet_s=0.1, creds=creds)
        return await runner.run(f"loop://{name}", options=opts, only=["auth", "sys", "frame"])
    finally:
        await lst.close()


def _protected_node() -> Any:
    node = make_node()
    node.auth = Authenticator(users={"admin": "s3cret"}, acl=Acl.parse(ACL))
    return node


async def test_auth_checks_pass_with_the_right_credentials() -> None:
    report = await _run(_protected_node(), "auth-ok", Credentials("admin", "s3cret"))
    assert report.ok, [(r.name, r.message, r.seen) for r in report.failed()]
    results = report.by_name()
    assert results["auth.challenge"].outcome is Outcome.PASS
    assert "realm=RPC" in results["auth.challenge"].message
    assert results["auth.digest_retry"].outcome is Outcome.PASS
    assert results["sys.getinfo"].outcome is Outcome.PASS  # answered after the automatic digest retry


async def test_wrong_credentials_fail_the_retry_check() -> None:
    report = await _run(_protected_node(), "auth-bad", Credentials("admin", "nope"))
    assert report.by_name()["auth.digest_retry"].outcome is Outcome.FAIL


async def test_device_without_auth_fails_the_challenge_check() -> None:
    report = await _run(make_node(), "auth-none", Credentials("admin", "s3cret"))
    assert report.by_name()["auth.challenge"].outcome is Outcome.FAIL


async def test_malformed_challenge_is_caught() -> None:
    node = make_node()

    def deny(ctx: Any, params: Any) -> Any:
        raise HandlerError(401, "login please")  # not the JSON document mos parses

    node.add_handler("Sys.GetInfo", deny)
    report = await _run(node, "auth-text", Credentials("admin", "s3cret"))
    challenge = report.by_name()["auth.challenge"]
    assert challenge.outcome is Outcome.FAIL
    assert "JSON" in challenge.message


async def test_http_digest_auth_checks() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/rpc"
    lst = await transports.listen(url, _protected_node())
    try:
        opts = Options(timeout_s=2.0, quiet_s=0.1, creds=Credentials("admin", "s3cret"))
        report = await runner.run(url, options=opts, only=["http", "sys", "auth"])
        bad = await runner.run(url, options=Options(timeout_s=2.0, creds=Credentials("admin", "x")), only=["http"])
    finally:
        await lst.close()
    assert report.ok, [(r.name, r.message, r.seen) for r in report.failed()]
    results = report.by_name()
    assert results["http.auth_challenge"].outcome is Outcome.PASS
    assert results["sys.getinfo"].outcome is Outcome.PASS  # the probe's transport answered the 401
    assert results["auth.challenge"].outcome is Outcome.SKIP  # frame-level auth does not apply to HTTP
    assert bad.by_name()["http.auth_challenge"].outcome is Outcome.FAIL
