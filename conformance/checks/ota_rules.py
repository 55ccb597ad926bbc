"""More OTA rules (docs/protocol/ota.md §1.1-§1.10, updater.md §1.3, §2.1): a second Begin, Status
members, OTA.Update's argument check, SetBootState, CreateSnapshot and bundles that break a rule.

The checks that change the device run only when asked (``--destructive``); each leaves the device
idle and committed.
"""

from __future__ import annotations

import asyncio
import io
import json
import zipfile

from conformance.checks.ota import (
    _begin_args,
    _boot_state,
    _bundle,
    _err,
    _expect_untouched,
    _ready,
    _status,
    _write_all,
)
from conformance.model import CheckFailed, check, expect
from conformance.rawjson import show
from conformance.session import Session

__all__: list[str] = []


@check(
    "ota.begin_busy",
    section="ota.md §1.2",
    title="OTA.Begin refused while an update runs",
    destructive=True,
    needs=["OTA.Begin", "OTA.End", "OTA.Status", "OTA.GetBootState"],
)
async def _ota_begin_busy(s: Session) -> str | None:
    await _ready(s)
    resp = await s.request("OTA.Begin", _begin_args(4096))
    expect(resp.ok, "OTA.Begin must succeed", seen=_err(resp), expected="result null")
    try:
        again = await s.request("OTA.Begin", _begin_args(4096))
        expect(
            again.error is not None and again.error.code != 0,
            "a second OTA.Begin while an update runs must be an error",
            seen=_err(again),
            expected="an error (update already in progress)",
        )
    finally:
        await s.request("OTA.End")  # abort: no data was written
    st = await _status(s)
    expect(st["state"] in (0, 2), "after the abort the device must not be updating", seen=show(st), expected="0 or 2")
    return None


@check(
    "ota.set_boot_state",
    section="ota.md §1.10",
    title="OTA.SetBootState: -2 without a known field; a given commit_timeout is stored",
    destructive=True,
    needs=["OTA.SetBootState", "OTA.GetBootState"],
)
async def _ota_set_boot_state(s: Session) -> str | None:
    before = await _boot_state(s)
    resp = await s.request("OTA.SetBootState", {"conformance": 1})
    expect(
        resp.error is not None and resp.error.code == -2,
        "OTA.SetBootState with no recognised field must be error -2",
        seen=_err(resp),
        expected='"error":{"code":-2}',
    )
    want = int(before["commit_timeout"]) + 17
    try:
        resp = await s.request("OTA.SetBootState", {"commit_timeout": want})
        expect(resp.ok, "OTA.SetBootState {commit_timeout} must succeed", seen=_err(resp), expected="result null")
        after = await _boot_state(s)
        expect(
            after["commit_timeout"] == want
            and {k: after[k] for k in ("active_slot", "is_committed", "revert_slot")}
            == {k: before[k] for k in ("active_slot", "is_committed", "revert_slot")},
            "the given field must be stored and the absent ones kept",
            seen=show(after),
            expected=f"commit_timeout {want}, other fields as before {show(before)}",
        )
    finally:
        await s.request("OTA.SetBootState", {"commit_timeout": int(before["commit_timeout"])})
    return None


@check(
    "ota.create_snapshot",
    section="ota.md §1.8",
    title="OTA.CreateSnapshot: {slot: inactive}; set_as_revert leaves the firmware uncommitted",
    destructive=True,
    needs=["OTA.CreateSnapshot", "OTA.GetBootState", "OTA.Commit"],
)
async def _ota_create_snapshot(s: Session) -> str | None:
    before = await _ready(s)
    resp = await s.request("OTA.CreateSnapshot", {"set_as_revert": True, "commit_timeout": 0})
    if resp.error is not None and resp.error.code == -1 and "Failed to create snapshot" in (resp.error.message or ""):
        return "not supported on this platform (-1 Failed to create snapshot)"
    expect(resp.ok, "OTA.CreateSnapshot of committed firmware must succeed", seen=_err(resp), expected='{"slot": N}')
    res = resp.result
    after = await _boot_state(s)
    try:
        expect(
            isinstance(res, dict) and isinstance(res.get("slot"), int) and res["slot"] != before["active_slot"],
            "the snapshot goes to the inactive slot",
            seen=show(res),
            expected=f'{{"slot": N}} with N != {before["active_slot"]}',
        )
        expect(
            after["is_committed"] is False and after["revert_slot"] == res["slot"],
            "set_as_revert: the firmware becomes uncommitted with the snapshot as revert slot",
            seen=show(after),
            expected=f"is_committed false, revert_slot {res['slot']}",
        )
        again = await s.request("OTA.CreateSnapshot", {})
        expect(
            again.error is not None and again.error.code != 0,
            "a snapshot while uncommitted must be refused",
            seen=_err(again),
            expected='"error":{"code":-1,"message":"Cannot create snapshots in uncommitted state"}',
        )
    finally:
        bs = await _boot_state(s)
        if not bs["is_committed"]:
            done = await s.request("OTA.Commit")
            if not done.ok:
                raise CheckFailed("OTA.Commit after the snapshot failed", seen=_err(done), expected="result null")
    return None


@check(
    "ota.status_fields",
    section="ota.md §1.1",
    title="OTA.Status: state, msg, is_committed, commit_timeout, partition, progress_percent",
    needs=["OTA.Status", "OTA.GetBootState"],
)
async def _ota_status_fields(s: Session) -> str | None:
    st = await _status(s)
    bs = await _boot_state(s)
    types = {
        "state": int,
        "msg": str,
        "is_committed": bool,
        "commit_timeout": int,
        "partition": int,
        "progress_percent": int,
    }
    bad = [
        k for k, t in types.items() if k not in st or not isinstance(st[k], t) or (t is int and isinstance(st[k], bool))
    ]
    expect(
        not bad,
        f"OTA.Status members missing or of the wrong type: {', '.join(bad)}",
        seen=show(st),
        expected='{"state": 0, "msg": "idle", "is_committed": true, "commit_timeout": 0, "partition": 0, ...}',
    )
    expect(
        st["is_committed"] == bs["is_committed"],
        "OTA.Status is_committed must agree with OTA.GetBootState",
        seen=f"Status {show(st)}; GetBootState {show(bs)}",
        expected=f"is_committed {bs['is_committed']}",
    )
    return None


@check(
    "ota.update_malformed",
    section="ota.md §1.5",
    title="OTA.Update without url: -1 Malformed request",
    needs=["OTA.Update"],
)
async def _ota_update_malformed(s: Session) -> str | None:
    resp = await s.request("OTA.Update", {"commit_timeout": 300})
    err = resp.error
    expect(
        err is not None and err.code == -1 and err.message == "Malformed request",
        "OTA.Update without a url must be refused at once",
        seen=_err(resp),
        expected='"error":{"code":-1,"message":"Malformed request"}',
    )
    return None


def _rebuild(bundle: bytes, variant: str) -> bytes:
    """``bundle`` rewritten (stored entries) so that it breaks one rule of updater.md §1.3/§2.1."""
    src = zipfile.ZipFile(io.BytesIO(bundle))
    entries = [(i.filename, src.read(i)) for i in src.infolist()]
    if variant == "manifest_last":
        entries = entries[1:] + entries[:1]
    else:
        manifest = json.loads(entries[0][1])
        if variant == "wrong_platform":
            manifest["platform"] = "conformance-no-such-platform"
        elif variant == "no_version":
            manifest.pop("version", None)
        entries[0] = (entries[0][0], json.dumps(manifest, indent=1, sort_keys=True).encode())
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, (name, data) in enumerate(entries):
            deflate = variant == "deflated" and i > 0
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return out.getvalue()


BUNDLE_RULES = {
    "manifest_last": "manifest.json must be the first entry (updater.md §1.3-a)",
    "wrong_platform": "the manifest's platform must be the device's (updater.md §2.1-b)",
    "no_version": "a manifest without version is refused (updater.md §2.1-a)",
    "deflated": "deflated entries are refused (updater.md §1.2-a)",
}


@check(
    "ota.bundle_rules",
    section="updater.md §1.2, §1.3, §2.1; ota.md §1.4",
    title="bundles with the manifest last, another platform, no version or deflated entries are refused",
    destructive=True,
    needs=["OTA.Status", "OTA.GetBootState", "OTA.Begin", "OTA.Write", "OTA.End"],
)
async def _ota_bundle_rules(s: Session) -> str | None:
    good = await _bundle(s)
    before = await _ready(s)
    info = await s.get_info(fresh=True)
    for variant, rule in BUNDLE_RULES.items():
        bundle = _rebuild(good, variant)
        await _ready(s)
        resp = await s.request("OTA.Begin", _begin_args(len(bundle)))
        expect(resp.ok, "OTA.Begin must succeed", seen=_err(resp), expected="result null")
        bad = await _write_all(s, bundle)
        end = await s.request("OTA.End")
        expect(
            bad is not None or (end.error is not None and end.error.code != 0),
            f"a bundle that breaks a rule must be refused: {rule}",
            seen=_err(end),
            expected="an error from OTA.Write or OTA.End",
        )
        await asyncio.sleep(0.3)  # a device that (wrongly) accepted it would be rebooting now
        await s.wait_up()
    await _expect_untouched(s, before, info, "refused bundles")
    return None
