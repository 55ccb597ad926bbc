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


def _creds(s: Session) -> Credentials:
    creds = s.options.creds
    if creds is None:
        raise CheckSkipped("no credentials given (--rpc-creds)")
    s.require(s.options.auth_method)
    return creds


def _nonce(doc: dict[str, object]) -> int:
    nonce = doc.get("nonce")
    expect(
        isinstance(nonce, int) and not isinstance(nonce, bool),
        "the challenge's nonce must be an integer (the device's unix time)",
        seen=show(doc),
        expected='"nonce": <integer>',
    )
    assert isinstance(nonce, int)
    return nonce


def _answer(resp: Frame | None) -> str:
    return "no response" if resp is None else show(resp.raw or b"")


def _is_401(resp: Frame | None) -> bool:
    return resp is not None and resp.error is not None and resp.error.code == 401


NONCE_OFFSETS = (("more than an hour old", -3600 - 300), ("from the future", 600))


@check(
    "auth.nonce_window",
    section="frames.md §6-k; real-device.md RD-A6",
    title="a right digest for a stale or future nonce: 401 again; for the issued nonce: accepted",
    not_on=HTTP,
)
async def _auth_nonce_window(s: Session) -> str | None:
    creds = _creds(s)
    method = s.options.auth_method
    p = await s.probe()
    for label, offset in NONCE_OFFSETS:
        _, doc = await _challenge(s, Probe.new_id())
        nonce = _nonce(doc) + offset
        frame = Frame(id=Probe.new_id(), src="mos", method=method, auth=make_auth({**doc, "nonce": nonce}, creds))
        resp = await p.exchange(frame, timeout_s=s.options.timeout_s)
        expect(
            _is_401(resp),
            f"a digest computed with the right password for a nonce {label} must not authenticate",
            seen=_answer(resp),
            expected="error 401 with a new challenge",
            sent=show(frame.encode("mos")),
        )
    # The control: the same kind of answer, for the nonce the device issued, is accepted.
    _, doc = await _challenge(s, Probe.new_id())
    frame = Frame(id=Probe.new_id(), src="mos", method=method, auth=make_auth(doc, creds))
    resp = await s.auth_retry(p, frame, s.options.timeout_s)
    expect(
        resp is not None and resp.ok,
        "the digest for the nonce the device issued must be accepted",
        seen=_answer(resp),
        expected="a result",
        sent=show(frame.encode("mos")),
    )
    return None


AUTH_MEMBERS = ("realm", "username", "nonce", "cnonce", "response")


@check(
    "auth.incomplete_object",
    section="frames.md §6-l; real-device.md RD-A7",
    title="an auth object missing any one member: 400 bad request",
    not_on=HTTP,
)
async def _auth_incomplete(s: Session) -> str | None:
    creds = _creds(s)
    method = s.options.auth_method
    p = await s.probe()
    _, doc = await _challenge(s, Probe.new_id())
    full = make_auth(doc, creds)
    for member in AUTH_MEMBERS:
        auth = {k: v for k, v in full.items() if k != member}
        frame = Frame(id=Probe.new_id(), src="mos", method=method, auth=auth)
        resp = await p.exchange(frame, timeout_s=s.options.timeout_s)
        err = resp.error if resp is not None else None
        expect(
            err is not None and err.code == 400 and err.message == "bad request",
            f"an auth object without {member!r} must be refused as a bad request",
            seen=_answer(resp),
            expected='"error":{"code":400,"message":"bad request"}',
            sent=show(frame.encode("mos")),
        )
    return None


@check(
    "auth.object_variants",
    section="frames.md §6-l; real-device.md RD-A5",
    title="auth with the nonce as a string, or without algorithm (MD5): accepted",
    not_on=HTTP,
)
async def _auth_variants(s: Session) -> str | None:
    creds = _creds(s)
    method = s.options.auth_method
    p = await s.probe()
    variants: list[tuple[str, object]] = [("the nonce written as a JSON string", "string")]
    _, doc = await _challenge(s, Probe.new_id())
    if str(doc.get("algorithm") or "MD5").upper() == "MD5":
        variants.append(("no algorithm member (MD5 is the default)", "no-algorithm"))
    note = None if len(variants) == 2 else "algorithm omitted not tried: the device asks for SHA-256"
    for i, (label, kind) in enumerate(variants):
        if i:
            _, doc = await _challenge(s, Probe.new_id())
        nonce = _nonce(doc)
        auth = make_auth(doc, creds)
        if kind == "string":
            auth["nonce"] = str(nonce)
        else:
            auth = make_auth({**doc, "algorithm": ""}, creds)
        frame = Frame(id=Probe.new_id(), src="mos", method=method, auth=auth)
        resp = await s.auth_retry(p, frame, s.options.timeout_s)
        expect(
            resp is not None and resp.ok,
            f"a right digest with {label} must be accepted",
            seen=_answer(resp),
            expected="a result",
            sent=show(frame.encode("mos")),
        )
    return note


@check(
    "auth.notification_silent",
    section="frames.md §6-g, §1-a; real-device.md RD-A9",
    title="a notification that needs auth gets no reply (not even the 401)",
    not_on=HTTP,
    upsets=True,
)
async def _auth_notification_silent(s: Session) -> str | None:
    _creds(s)
    await _challenge(s, Probe.new_id())  # the method does need auth here
    got = await s.exchange_silent(Frame(src="mos", method=s.options.auth_method))
    answers = [f for f in got if f.is_response]
    expect(
        not answers,
        "a notification (no id) that needs auth must not be answered, not even with the 401 challenge",
        seen=show(answers[0].raw or b"") if answers else "",
        expected="no reply",
    )
    return None


@check(
    "auth.acl_denied",
    section="frames.md §6-d, §6-m; real-device.md RD-A3",
    title="a method no ACL entry matches (--denied-method): 403 unauthorized, with or without auth",
)
async def _auth_acl_denied(s: Session) -> str | None:
    method = s.options.denied_method
    if not method:
        raise CheckSkipped("no --denied-method given (a method of the device that no rpc.acl entry matches)")
    s.require(method)
    want = '"error":{"code":403,"message":"unauthorized"}'
    resp = await s.request(method, auto_auth=False)
    err = resp.error
    expect(
        err is not None and err.code == 403 and err.message == "unauthorized",
        f"{method} matches no ACL entry: refused outright (no challenge), whoever asks",
        seen=_answer(resp),
        expected=want,
    )
    creds = s.options.creds
    if creds is None or s.scheme in HTTP or not s.offers(s.options.auth_method):
        return "tried without credentials only"
    _, doc = await _challenge(s, Probe.new_id())
    frame = Frame(id=Probe.new_id(), src="mos", method=method, auth=make_auth(doc, creds))
    authed = await s.auth_retry(await s.probe(), frame, s.options.timeout_s)
    err = authed.error if authed is not None else None
    expect(
        err is not None and err.code == 403 and err.message == "unauthorized",
        f"{method} matches no ACL entry: refused even with valid digest auth",
        seen=_answer(authed),
        expected=want,
        sent=show(frame.encode("mos")),
    )
    return None
