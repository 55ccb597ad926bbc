"""FS service checks (docs/protocol/tool.md §6; real-device.md): what ``mos ls/get/put/rm`` rely on.

Each check runs only when the device lists the FS methods it needs in ``RPC.List`` (``needs``). The write check
is destructive (it creates, appends to and removes one file named ``conformance-<random>.txt``).
"""

from __future__ import annotations

import base64
import random
import string
from typing import Any

from conformance.model import CheckSkipped, check, expect
from conformance.rawjson import show
from conformance.session import Session
from rpc.frame import Frame

__all__: list[str] = []


def _raw(frame: Frame) -> bytes:
    return frame.raw if frame.raw is not None else frame.encode("device")


async def _ok(s: Session, method: str, params: Any) -> Any:
    resp = await s.request(method, params)
    expect(resp.ok, f"{method} failed", seen=show(_raw(resp)), expected="a result")
    return resp.result


async def _names(s: Session) -> list[str]:
    res = await _ok(s, "FS.List", {})
    expect(
        isinstance(res, list) and all(isinstance(n, str) for n in res),
        "FS.List must return an array of file names",
        seen=show(res),
        expected='["index.html", ...]',
    )
    assert isinstance(res, list)
    return res


@check("fs.list", section="tool.md §6", title="FS.List: an array of file name strings", needs=["FS.List"])
async def _fs_list(s: Session) -> str | None:
    names = await _names(s)
    return f"{len(names)} files"


@check(
    "fs.get_errors",
    section="tool.md §6; real-device.md RD-E13",
    title="FS.Get: 400 without filename, error for a missing file",
    needs=["FS.Get"],
)
async def _fs_get_errors(s: Session) -> str | None:
    resp = await s.request("FS.Get", {})
    err = resp.error
    expect(
        err is not None and err.code == 400 and err.message == "filename is required",
        "FS.Get without a filename must be refused",
        seen=show(_raw(resp)),
        expected='"error":{"code":400,"message":"filename is required"}',
    )
    missing = "conformance-missing-" + "".join(random.choices(string.ascii_lowercase, k=8)) + ".txt"
    resp = await s.request("FS.Get", {"filename": missing})
    expect(
        resp.error is not None and resp.error.code != 0,
        "FS.Get of a file that does not exist must be an error",
        seen=show(_raw(resp)),
        expected=f'"error":{{"code":400,"message":"failed to open file \\"{missing}\\""}}',
    )
    return None


def _get_result(res: Any) -> tuple[bytes, int]:
    expect(
        isinstance(res, dict) and isinstance(res.get("data"), str) and isinstance(res.get("left"), int),
        "FS.Get must return {data: <base64>, left: <int>}",
        seen=show(res),
        expected='{"data": "...", "left": 0}',
    )
    return base64.b64decode(res["data"]), res["left"]


@check(
    "fs.put_get_remove",
    section="tool.md §6",
    title="FS.Put (and append), FS.Get with offset/len and left, FS.Remove",
    destructive=True,
    needs=["FS.List", "FS.Get", "FS.Put", "FS.Remove"],
)
async def _fs_put_get_remove(s: Session) -> str | None:
    name = "conformance-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8)) + ".txt"
    first, second = b"hello, ", b"conformance"
    resp = await s.request("FS.Put", {"filename": name, "data": base64.b64encode(first).decode(), "append": False})
    if resp.error is not None and resp.error.code == 400 and "failed to open file" in (resp.error.message or ""):
        raise CheckSkipped(f"the device cannot create files ({resp.error.message})")
    expect(resp.ok, "FS.Put of a new file failed", seen=show(_raw(resp)), expected="success")
    try:
        note = None
        if s.scheme in ("mqtt", "mqtts"):
            # The broker may deliver a request on <id>/rpc twice and the device then runs it twice
            # (transports.md §4.5-a): an append is not idempotent, so write the whole file instead.
            both = base64.b64encode(first + second).decode()
            await _ok(s, "FS.Put", {"filename": name, "data": both, "append": False})
            note = "append not checked over MQTT (a request may be delivered twice, transports.md §4.5-a)"
        else:
            await _ok(s, "FS.Put", {"filename": name, "data": base64.b64encode(second).decode(), "append": True})
        whole = first + second
        data, left = _get_result(await _ok(s, "FS.Get", {"filename": name}))
        expect(
            data == whole, "FS.Get must return what FS.Put wrote (append adds)", seen=show(data), expected=show(whole)
        )
        expect(left == 0, "left must be 0 after reading everything", seen=left, expected=0)
        data, left = _get_result(await _ok(s, "FS.Get", {"filename": name, "offset": 2, "len": 3}))
        expect(
            data == whole[2:5] and left == len(whole) - 5,
            "FS.Get with offset and len returns that slice and the bytes left after it",
            seen=f"data={data!r} left={left}",
            expected=f"data={whole[2:5]!r} left={len(whole) - 5}",
        )
        expect(name in await _names(s), "FS.List must list the new file", seen="not listed", expected=name)
    finally:
        removed = await s.request("FS.Remove", {"filename": name})
    expect(removed.ok, "FS.Remove of an existing file failed", seen=show(_raw(removed)), expected="success")
    expect(name not in await _names(s), "the removed file is still listed", seen=name, expected="not listed")
    resp = await s.request("FS.Get", {"filename": name})
    expect(
        resp.error is not None and resp.error.code != 0,
        "FS.Get of the removed file must be an error",
        seen=show(_raw(resp)),
        expected="an error",
    )
    return note
