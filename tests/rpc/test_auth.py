"""Digest auth and ACL (spec/frame.md §6): challenge format, mos-style retry, stale nonce, deny."""

from __future__ import annotations

import json

import pytest

from rpc.auth import Acl, Authenticator, Credentials, htdigest_line, make_auth, parse_creds
from rpc.client import AsyncClient
from rpc.errors import RemoteError, UsageError
from rpc.frame import parse_frame
from rpc.loopback import loop_pair
from rpc.node import Node
from tests.helpers import RecordingChannel

NOW = 1_600_000_000


def make_device(tmp_path, *, algorithm: str = "MD5", acl: str | None = None, clock=lambda: NOW + 10) -> Node:
    pw = tmp_path / "rpc_auth.txt"
    pw.write_text(htdigest_line("admin", "RPC", "secret", algorithm=algorithm) + "\n")
    auth = Authenticator(
        password_file=pw, realm="RPC", algorithm=algorithm,
        acl=Acl.parse(acl or '[{"method":"Sys.*","acl":"+admin"},{"method":"*","acl":"*"}]'), clock=clock,
    )  # fmt: skip
    node = Node(id="dev", auth=auth)
    node.add_handler("Sys.Secret", lambda ctx, p: {"user": ctx.user})
    node.add_handler("Pub.Echo", lambda ctx, p: p)
    return node


async def test_challenge_message_is_what_mos_parses(tmp_path) -> None:
    dev = make_device(tmp_path, clock=lambda: NOW)
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"mos","id":1,"method":"Sys.Secret"}')
    assert await ch.next_sent() == (
        b'{"id":1,"src":"dev","dst":"mos","error":{"code":401,"message":"{\\"auth_type\\": \\"digest\\", '
        b'\\"nonce\\": 1600000000, \\"nc\\": 1, \\"realm\\": \\"RPC\\", \\"algorithm\\": \\"MD5\\"}"}}'
    )


def test_make_auth_member_order_and_response() -> None:
    auth = make_auth({"realm": "RPC", "nonce": 1600000000, "algorithm": "MD5"}, Credentials("u", "p"), cnonce=123456789)
    assert list(auth) == ["realm", "username", "nonce", "cnonce", "algorithm", "response"]
    # response = MD5(HA1:nonce:1:cnonce:auth:HA2), HA2 = MD5("dummy_method:dummy_uri")
    import hashlib

    ha1 = hashlib.md5(b"u:RPC:p").hexdigest()
    ha2 = hashlib.md5(b"dummy_method:dummy_uri").hexdigest()
    want = hashlib.md5(f"{ha1}:1600000000:1:123456789:auth:{ha2}".encode()).hexdigest()
    assert auth["response"] == want
    assert "algorithm" not in make_auth({"realm": "R", "nonce": 1}, Credentials("u", "p"))
    assert make_auth({"realm": "R", "nonce": 1, "opaque": "xyz"}, Credentials("u", "p"))["opaque"] == "xyz"


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
async def test_client_retries_once_with_same_id(tmp_path, algorithm: str) -> None:
    dev = make_device(tmp_path, algorithm=algorithm)
    a, b = loop_pair()
    dev.add_channel(b)
    seen: list[bytes] = []
    orig = b.deliver_bytes

    def spy(data: bytes):
        seen.append(data)
        return orig(data)

    b.deliver_bytes = spy  # type: ignore[method-assign]
    client = AsyncClient(a, creds=Credentials("admin", "secret"))
    assert await client.call("Sys.Secret") == {"user": "admin"}
    first, second = (parse_frame(x) for x in seen)
    assert first.id == second.id and first.auth is None and second.auth is not None
    assert second.auth["username"] == "admin" and second.auth.get("algorithm") == algorithm
    # public methods need no auth
    assert await client.call("Pub.Echo", 5) == 5
    await client.close()


async def test_wrong_password_and_no_creds_fail_401(tmp_path) -> None:
    dev = make_device(tmp_path)
    for creds in (Credentials("admin", "wrong"), None):
        a, b = loop_pair()
        dev.add_channel(b)
        client = AsyncClient(a, creds=creds)
        with pytest.raises(RemoteError) as ei:
            await client.call("Sys.Secret")
        assert ei.value.code == 401
        assert json.loads(ei.value.message)["auth_type"] == "digest"
        await client.close()


async def test_stale_nonce_is_not_authenticated(tmp_path) -> None:
    dev = make_device(tmp_path, clock=lambda: NOW + 3600)
    ch = dev.add_channel(RecordingChannel())
    auth = make_auth({"realm": "RPC", "nonce": NOW, "algorithm": "MD5"}, Credentials("admin", "secret"))
    ch.inject(json.dumps({"src": "mos", "id": 1, "method": "Sys.Secret", "auth": auth}).encode())
    assert parse_frame(await ch.next_sent()).error.code == 401  # type: ignore[union-attr]
    # a nonce from the future is refused too
    auth = make_auth({"realm": "RPC", "nonce": NOW + 4000, "algorithm": "MD5"}, Credentials("admin", "secret"))
    ch.inject(json.dumps({"src": "mos", "id": 2, "method": "Sys.Secret", "auth": auth}).encode())
    assert parse_frame(await ch.next_sent()).error.code == 401  # type: ignore[union-attr]


async def test_incomplete_auth_is_bad_request(tmp_path) -> None:
    dev = make_device(tmp_path)
    ch = dev.add_channel(RecordingChannel())
    ch.inject(b'{"src":"mos","id":1,"method":"Sys.Secret","auth":{"realm":"RPC"}}')
    assert await ch.next_sent() == b'{"id":1,"src":"dev","dst":"mos","error":{"code":400,"message":"bad request"}}'


async def test_acl_deny_and_channel_type(tmp_path) -> None:
    acl = json.dumps(
        [
            {"method": "Pub.*", "ch_type": "MQTT", "acl": "-*"},
            {"method": "Sys.*", "acl": "+other"},
            {"method": "Pub.*", "acl": "*"},
        ]
    )
    dev = make_device(tmp_path, acl=acl)
    uart = dev.add_channel(RecordingChannel("UART"))
    mqtt = dev.add_channel(RecordingChannel("MQTT"))
    uart.inject(b'{"src":"mos","id":1,"method":"Pub.Echo","params":1}')
    assert parse_frame(await uart.next_sent()).result == 1
    mqtt.inject(b'{"src":"mos","id":2,"method":"Pub.Echo","params":1}')
    assert await mqtt.next_sent() == b'{"id":2,"src":"dev","dst":"mos","error":{"code":403,"message":"unauthorized"}}'
    # authenticated as admin, but the ACL names only "other": 403
    auth = make_auth({"realm": "RPC", "nonce": NOW, "algorithm": "MD5"}, Credentials("admin", "secret"))
    uart.inject(json.dumps({"src": "mos", "id": 3, "method": "Sys.Secret", "auth": auth}).encode())
    err = parse_frame(await uart.next_sent()).error
    assert err is not None and (err.code, err.message) == (403, "unauthorized")
    # no entry matches a method that exists: 403
    dev.add_handler("Other.X", lambda ctx, p: "ran")
    uart.inject(b'{"src":"mos","id":4,"method":"Other.X"}')
    assert parse_frame(await uart.next_sent()).error.code == 403  # type: ignore[union-attr]
    # a method that does not exist is 404 whatever the ACL: it is looked up first (RD-A14)
    uart.inject(b'{"src":"mos","id":5,"method":"Other.Nope"}')
    assert parse_frame(await uart.next_sent()).error.code == 404  # type: ignore[union-attr]


async def test_missing_password_file_500(tmp_path) -> None:
    auth = Authenticator(password_file=tmp_path / "missing", acl=Acl.parse('[{"method":"*","acl":"+admin"}]'),
                         clock=lambda: NOW)  # fmt: skip
    dev = Node(id="dev", auth=auth)
    ch = dev.add_channel(RecordingChannel())
    a = make_auth({"realm": "RPC", "nonce": NOW, "algorithm": "MD5"}, Credentials("admin", "x"))
    ch.inject(json.dumps({"src": "mos", "id": 1, "method": "RPC.List", "auth": a}).encode())
    err = parse_frame(await ch.next_sent()).error
    assert err is not None and (err.code, err.message) == (500, "failed to open password file")


def test_parse_creds(tmp_path) -> None:
    assert parse_creds("u:p:x") == Credentials("u", "p:x")
    f = tmp_path / "c"
    f.write_text("  joe:pw \n")
    assert parse_creds(f"@{f}") == Credentials("joe", "pw")
    with pytest.raises(UsageError):
        parse_creds("nocolon")


async def test_retry_survives_a_duplicated_challenge(tmp_path) -> None:
    """An MQTT broker may deliver a request twice (two matching subscriptions) and the device answers
    both: the duplicate 401 of the first attempt arrives after the retry was sent, with the same id.
    The client must take the retry's answer, not the stale challenge."""
    dev = make_device(tmp_path)
    a, b = loop_pair()
    dev.add_channel(b)
    orig = dev.frame_received

    def twice(channel, frame):  # every request handled (and answered) twice
        orig(channel, frame)
        if frame.method:
            orig(channel, frame)

    dev.frame_received = twice  # type: ignore[method-assign]
    client = AsyncClient(a, creds=Credentials("admin", "secret"))
    assert await client.call("Sys.Secret") == {"user": "admin"}
    await client.close()
    # A real rejection still fails (after the grace period), as a 401.
    a, b = loop_pair()
    dev.add_channel(b)
    client = AsyncClient(a, creds=Credentials("admin", "wrong"))
    with pytest.raises(RemoteError) as ei:
        await client.call("Sys.Secret")
    assert ei.value.code == 401
    await client.close()


# -- nonce staleness and replay (issue #14 §5) ----------------------------------------------------


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _auth(clock: Clock) -> Authenticator:
    return Authenticator(users={"admin": "secret"}, acl=Acl.parse('[{"method":"*","acl":"+admin"}]'), clock=clock)


def _answer(auth: Authenticator, nonce: int, cnonce: int = 7) -> dict:
    return make_auth({"realm": "RPC", "nonce": nonce, "algorithm": "MD5"}, Credentials("admin", "secret"), cnonce=cnonce)


def test_nonces_are_never_issued_twice() -> None:
    clock = Clock(NOW)
    auth = _auth(clock)
    assert [auth.nonce() for _ in range(3)] == [NOW, NOW + 1, NOW + 2]  # three challenges in one second
    clock.t = NOW + 100
    assert auth.nonce() == NOW + 100  # back on the clock as soon as it has caught up
    issued = [auth.nonce() for _ in range(1000)]  # a flood of requests without credentials
    assert max(issued) == NOW + 100 + 60  # never more than a minute ahead of the clock


@pytest.mark.parametrize("nonce", [float("inf"), float("-inf"), float("nan"), [1], {"a": 1}, "abc"])
def test_a_nonce_that_is_no_number_is_a_bad_request(nonce: object) -> None:
    # "nonce": Infinity raised OverflowError out of the router (found when the soak fuzzed auth members)
    auth = _auth(Clock(NOW))
    decision = auth.check("X", "WS", {"realm": "RPC", "username": "admin", "nonce": nonce, "cnonce": 1,
                                      "response": "x"}, None)  # fmt: skip
    assert not decision.allowed and decision.code == 400


def test_a_replayed_digest_answer_is_refused() -> None:
    clock = Clock(NOW)
    auth = _auth(clock)
    answer = _answer(auth, auth.nonce())
    assert auth.check("Sys.Reboot", "WS", answer, None).allowed
    again = auth.check("Sys.Reboot", "WS", answer, None)  # the same frame auth, captured and resent
    assert not again.allowed and again.code == 401
    assert auth.check("Sys.Reboot", "WS", _answer(auth, auth.nonce(), cnonce=8), None).allowed  # a fresh one is fine


@pytest.mark.parametrize("age_s, ok", [(0, True), (3599, True), (3600, False), (-1, False), (-3600, False)])
def test_stale_and_future_nonces_are_refused(age_s: int, ok: bool) -> None:
    clock = Clock(NOW)
    auth = _auth(clock)
    answer = _answer(auth, NOW - age_s)
    assert auth.check("Sys.Reboot", "WS", answer, None).allowed is ok


def test_forgetting_old_answers_makes_their_nonces_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    import rpc.auth as auth_mod

    monkeypatch.setattr(auth_mod, "USED_NONCES_MAX", 2)
    clock = Clock(NOW)
    auth = _auth(clock)
    first = auth.nonce()
    assert auth.check("X", "WS", _answer(auth, first, 1), None).allowed
    assert auth.check("X", "WS", _answer(auth, auth.nonce(), 2), None).allowed
    assert auth.check("X", "WS", _answer(auth, auth.nonce(), 3), None).allowed  # evicts the first answer
    # it is no longer remembered, so its nonce must not be accepted any more (else it could be replayed)
    assert not auth.check("X", "WS", _answer(auth, first, 1), None).allowed
    assert not auth.check("X", "WS", _answer(auth, first, 99), None).allowed


def test_a_replayed_http_authorization_header_is_refused() -> None:
    from rpc.auth import http_challenge_header, http_digest_authorization, parse_digest_header, verify_http_digest

    clock = Clock(NOW)
    auth = _auth(clock)
    challenge = parse_digest_header(http_challenge_header("RPC", "MD5", auth.nonce()))
    assert challenge is not None
    header = http_digest_authorization(challenge, Credentials("admin", "secret"), method="POST", uri="/update")
    assert verify_http_digest(auth, header, "POST") == "admin"
    assert verify_http_digest(auth, header, "POST") is None  # the same header again: a replay
    # mos's HTTP codec sends a fixed cnonce; a new challenge (a new nonce) makes the same client work again
    challenge2 = parse_digest_header(http_challenge_header("RPC", "MD5", auth.nonce()))
    assert challenge2 is not None
    assert verify_http_digest(auth, http_digest_authorization(challenge2, Credentials("admin", "secret")), "POST")
