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
    # no entry matches: 403
    uart.inject(b'{"src":"mos","id":4,"method":"Other.X"}')
    assert parse_frame(await uart.next_sent()).error.code == 403  # type: ignore[union-attr]


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
