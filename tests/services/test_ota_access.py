"""Where the ACL requires a user, every path to OTA is refused without credentials (issue #14 §5):
RPC on every transport, REST ``/rpc/OTA.*``, ``POST /update`` and the ``/update/*`` endpoints; with
the credentials each works, and nothing was written before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

import transports
from rpc.auth import Acl, Authenticator, Credentials, http_digest_authorization, parse_digest_header
from rpc.errors import MgrpcError, RemoteError
from services.device import VirtualDevice
from tests.device_helpers import bundle
from tests.mosquitto import Mosquitto, mosquitto_broker  # noqa: F401

ACL = '[{"method":"OTA.*","acl":"+admin"},{"method":"*","acl":"*"}]'
ADMIN = Credentials("admin", "s3cret")


def _device(tmp_path: Path, urls: list[str]) -> VirtualDevice:
    auth = Authenticator(users={"admin": "s3cret", "guest": "guest"}, acl=Acl.parse(ACL))
    return VirtualDevice(id="esp32_ACL", state_dir=tmp_path / "dev", listen=urls, listen_fn=transports.listen,
                         auth=auth)  # fmt: skip


def _running_image(dev: VirtualDevice) -> bytes:
    st = dev.storage
    assert st is not None
    part = st.layout.app[st.running_slot]
    return st.flash.read(part.offset, part.size)


@pytest.mark.parametrize("scheme", ["tcp", "ws", "http", "mqtt", "loop"])
async def test_ota_rpc_needs_credentials_on_every_transport(
    scheme: str, tmp_path: Path, mosquitto_broker: Callable[..., Mosquitto]  # noqa: F811
) -> None:
    broker = mosquitto_broker() if scheme == "mqtt" else None
    listen = {
        "tcp": "tcp://127.0.0.1:0", "ws": "ws://127.0.0.1:0/rpc", "http": "http://127.0.0.1:0/rpc",
        "mqtt": broker.url() if broker else "", "loop": f"loop://acl-{tmp_path.name}",
    }[scheme]  # fmt: skip
    dev = _device(tmp_path, [listen])
    await dev.start()
    try:
        url = broker.url("esp32_ACL") if broker else dev.urls[0]
        before = _running_image(dev)
        async with await transports.connect(url, timeout_s=10) as anon:
            assert "fw_version" in await anon.call("Sys.GetInfo")  # the ACL lets anyone else in
            for method, params in [
                ("OTA.Begin", {"size": 1000}), ("OTA.Write", {"offset": 0, "data": "UEsDBA=="}),
                ("OTA.End", {}), ("OTA.Update", {"url": "http://127.0.0.1:1/fw.zip"}), ("OTA.Commit", {}),
                ("OTA.Revert", {}), ("OTA.SetBootState", {"active_slot": 1}), ("OTA.CreateSnapshot", {}),
                ("ota.begin", {"size": 1}),  # methods match case-insensitively: no way around by spelling
            ]:  # fmt: skip
                with pytest.raises((RemoteError, MgrpcError)) as e:
                    await anon.call(method, params)
                assert "401" in str(e.value) or "auth" in str(e.value).lower(), (method, e.value)
        async with await transports.connect(url, timeout_s=10, creds=Credentials("guest", "guest")) as guest:
            with pytest.raises(MgrpcError):
                await guest.call("OTA.Begin", {"size": 1000})  # a user the ACL does not name
        async with await transports.connect(url, timeout_s=10, creds=Credentials("admin", "wrong")) as bad:
            with pytest.raises(MgrpcError):
                await bad.call("OTA.Begin", {"size": 1000})
        assert _running_image(dev) == before and dev.ota is not None and dev.ota.state == 0
        async with await transports.connect(url, timeout_s=10, creds=ADMIN) as admin:
            assert (await admin.call("OTA.Status"))["state"] == 0
            assert (await admin.call("OTA.GetBootState"))["is_committed"] is True
    finally:
        await dev.stop()


async def _digest(session: aiohttp.ClientSession, method: str, url: str, path: str, *, fw: bytes | None = None
                  ) -> tuple[int, str]:  # fmt: skip
    """One request answered 401, then the same with the digest ``Authorization`` (as mos/curl do)."""
    async with session.request(method, url, data=_form(fw) if fw else None) as r:
        if r.status != 401:
            return r.status, await r.text()
        challenge = parse_digest_header(r.headers["WWW-Authenticate"])
    assert challenge is not None
    authz = http_digest_authorization(challenge, ADMIN, method=method, uri=path)
    async with session.request(method, url, data=_form(fw) if fw else None, headers={"Authorization": authz}) as r:
        return r.status, await r.text()


def _form(data: bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("commit_timeout", "120")
    form.add_field("file", data, filename="fw.zip", content_type="application/zip")
    return form


async def test_http_paths_to_ota_need_credentials(tmp_path: Path) -> None:
    dev = _device(tmp_path, ["http://127.0.0.1:0/rpc"])
    await dev.start()
    base = dev.urls[0].rsplit("/rpc", 1)[0]
    fw = bundle("5.1")
    try:
        before = _running_image(dev)
        async with aiohttp.ClientSession() as s:
            for method, path, kw in [
                ("POST", "/update", {"data": _form(fw)}),
                ("GET", "/update?url=http://127.0.0.1:1/fw.zip", {}),
                ("GET", "/update/commit", {}), ("GET", "/update/revert", {}),
                ("POST", "/rpc/OTA.Begin", {"data": '{"size":1000}'}),
                ("POST", "/rpc/OTA.Write", {"data": '{"offset":0,"data":"UEsDBA=="}'}),
                ("GET", "/rpc/OTA.Commit", {}), ("POST", "/rpc/ota.update", {"data": '{"url":"http://x/"}'}),
                ("POST", "/rpc", {"data": '{"id":1,"method":"OTA.Begin","params":{"size":1000}}'}),
            ]:  # fmt: skip
                async with s.request(method, base + path, **kw) as r:
                    assert r.status == 401, (path, r.status, await r.text())
                    assert r.headers["WWW-Authenticate"].startswith("Digest "), path
            # a wrong password is no better
            bad = http_digest_authorization({"realm": "RPC", "nonce": f"{int(dev.auth.nonce()):x}"},  # type: ignore[union-attr]
                                            Credentials("admin", "nope"), method="POST", uri="/update")  # fmt: skip
            async with s.post(base + "/update", data=_form(fw), headers={"Authorization": bad}) as r:
                assert r.status == 401
            assert _running_image(dev) == before and dev.boots == 1
            # with the credentials the upload goes through, and the device boots the new firmware
            status, text = await _digest(s, "POST", base + "/update", "/update", fw=fw)
            assert (status, text) == (200, "Update applied, finalizing\r\n")
        info = await dev.wait_booted(boots=2)
        assert info.version == "5.1"
        async with aiohttp.ClientSession() as s:
            assert await _digest(s, "GET", base + "/update/commit", "/update/commit") == (200, "Ok\r\n")
    finally:
        await dev.stop()



async def test_device_serves_https_and_wss_with_a_cert_and_key(tmp_path: Path) -> None:
    """The device side of https:// and wss:// (?cert=&key=): RPC, REST and the OTA push over TLS, ACL as above."""
    import ssl

    from tests.transports.test_ws import _self_signed

    cert, key = _self_signed(tmp_path)
    dev = _device(tmp_path, [f"https://127.0.0.1:0/rpc?cert={cert}&key={key}"])
    await dev.start()
    try:
        url = dev.urls[0].split("?", 1)[0]
        assert url.startswith("https://")
        async with await transports.connect(f"{url}?ca={cert}", timeout_s=10, creds=ADMIN) as c:
            assert (await c.call("OTA.GetBootState"))["is_committed"] is True
        ws = await transports.listen(f"wss://127.0.0.1:0/rpc?cert={cert}&key={key}", dev.node)  # type: ignore[arg-type]
        try:
            wss_url = ws.url.split("?", 1)[0]
            async with await transports.connect(f"{wss_url}?ca={cert}", timeout_s=10) as c:
                with pytest.raises(MgrpcError):
                    await c.call("OTA.Begin", {"size": 10})  # no credentials: refused over TLS too
        finally:
            await ws.close()
        ctx = ssl.create_default_context(cafile=str(cert))
        base = url.rsplit("/rpc", 1)[0]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.post(base + "/update", data=_form(bundle("5.2"))) as r:
                assert r.status == 401
            assert await _digest(s, "POST", base + "/update", "/update", fw=bundle("5.2")) == (
                200, "Update applied, finalizing\r\n")  # fmt: skip
        assert (await dev.wait_booted(boots=2)).version == "5.2"
    finally:
        await dev.stop()
