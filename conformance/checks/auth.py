"""Frame-level digest authentication (docs/protocol/frames.md §6); runs only when credentials are given."""

from __future__ import annotations

import json

from conformance.model import CheckSkipped, check, expect
from conformance.probe import Probe
from conformance.rawjson import show
from conformance.session import Session
from rpc.auth import Credentials, make_auth
from rpc.frame import Frame

CHALLENGE_KEYS = ("auth_type", "nonce", "nc", "realm", "algorithm")
HTTP = ("http", "https")  # HTTP channels authenticate with headers instead (http.auth_challenge)


async def _challenge(s: Session, fid: int) -> tuple[Frame, dict[str, object]]:
    resp = await s.request(s.options.auth_method, id=fid, auto_auth=False)
    err = resp.error
    expect(
        err is not None and err.code == 401,
        f"{s.options.auth_method} without auth must be answered 401",
        seen=show(resp.raw or b""),
        expected='"error":{"code":401,"message":"{\\"auth_type\\": \\"digest\\", ...}"}',
    )
    assert err is not None
    try:
        doc = json.loads(err.message or "")
    except ValueError:
        doc = None
    expect(
        isinstance(doc, dict),
        "the 401 message must be a JSON document in a string",
        seen=show(err.message or ""),
        expected='{"auth_type": "digest", "nonce": N, "nc": 1, "realm": "...", "algorithm": "MD5"}',
    )
    assert isinstance(doc, dict)
    return resp, doc


@check("auth.challenge", section="frames.md §6", title="401 digest challenge format", not_on=HTTP)
async def _auth_challenge(s: Session) -> str | None:
    if s.options.creds is None:
        raise CheckSkipped("no credentials given (--rpc-creds)")
    s.require(s.options.auth_method)
    _, doc = await _challenge(s, Probe.new_id())
    expect(
        list(doc) == list(CHALLENGE_KEYS),
        "challenge members must be auth_type, nonce, nc, realm, algorithm",
        seen=show(doc),
        expected=show(list(CHALLENGE_KEYS)),
    )
    ok = (
        doc["auth_type"] == "digest"
        and isinstance(doc["nonce"], int)
        and doc["nc"] == 1
        and isinstance(doc["realm"], str)
        and doc["algorithm"] in ("MD5", "SHA-256")
    )
    expect(
        ok,
        "challenge values wrong",
        seen=show(doc),
        expected='auth_type "digest", integer nonce, nc 1, realm string, algorithm MD5|SHA-256',
    )
    return f"realm={doc['realm']} algorithm={doc['algorithm']}"


@check(
    "auth.digest_retry",
    section="frames.md §6; transports.md §4.5",
    title="same id re-sent with auth is accepted; bad password is not",
    not_on=HTTP,
)
async def _auth_digest_retry(s: Session) -> str | None:
    creds = s.options.creds
    if creds is None:
        raise CheckSkipped("no credentials given (--rpc-creds)")
    s.require(s.options.auth_method)
    fid = Probe.new_id()
    _, doc = await _challenge(s, fid)
    p = await s.probe()
    good = Frame(id=fid, src="mos", method=s.options.auth_method, auth=make_auth(doc, creds))
    resp = await s.auth_retry(p, good, s.options.timeout_s)
    expect(
        resp is not None and resp.ok,
        "the retry with valid digest auth (same id) must succeed",
        seen="no response" if resp is None else show(resp.raw or b""),
        expected="a result",
    )
    bad = Frame(
        id=Probe.new_id(),
        src="mos",
        method=s.options.auth_method,
        auth=make_auth(doc, Credentials(creds.user, creds.password + "-wrong")),
    )
    resp = await p.exchange(bad, timeout_s=s.options.timeout_s)
    expect(
        resp is not None and resp.error is not None and resp.error.code in (401, 403),
        "a wrong password must not be accepted",
        seen="no response" if resp is None else show(resp.raw or b""),
        expected="error 401 (or 403)",
    )
    return None
