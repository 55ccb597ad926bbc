"""OTA checks (docs/protocol/ota.md §1-§2, tool.md §4): the streaming update exactly as ``mos ota`` drives it.

All but the status/boot-state shape checks change the device (they install firmware and reboot it),
so they run only when asked (``--ota BUNDLE`` or ``--ota-generate``). Each destructive check starts
from an idle, committed device and leaves it that way.

The bundle is the user's ``--ota`` file, or (``--ota-generate``) a bundle for the device's ``arch``
(from ``Sys.GetInfo``) made by :func:`generate_bundle` with the parts that arch requires (app and fs
for esp32/esp8266) — the firmware image format of mgrpc's virtual device, so it boots there; a real
board needs a real bundle.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import zipfile
from typing import Any

from conformance.model import CheckFailed, CheckSkipped, check, expect
from conformance.rawjson import show
from conformance.session import Session
from rpc.errors import MgrpcError
from rpc.frame import Frame
from updater.errors import UpdaterError
from updater.manifest import read_manifest

__all__ = ["bundle_manifest", "corrupt_bundle", "generate_bundle"]

STATE_NAMES = {0: "idle", 1: "progress", 2: "error", 3: "success"}
BOOT_KEYS = ("active_slot", "is_committed", "revert_slot", "commit_timeout")


# The parts a device of each arch requires in a bundle (updater.md §3); other archs need the app only.
# ESP8266 names its app part "fw" and needs flash addresses; both ESP chips refuse a bundle without
# an fs part ("Incomplete update package").
REQUIRED_PARTS: dict[str, tuple[str, ...]] = {"esp32": ("app", "fs"), "esp32c3": ("app", "fs"), "esp8266": ("fw", "fs")}
GENERATED_FS_SIZE = 64 << 10


def generate_bundle(arch: str, version: str, *, app_size: int = 16 << 10) -> bytes:
    """A fw.zip for ``arch`` reporting ``version``: the parts that arch requires (updater.md §3) —
    always an app (mgrpc virtual-device firmware image) and, for esp32/esp8266 and the virtual device,
    an fs part holding a LittleFS image (block size 4096, the kind the virtual device mounts) with an
    empty ``conf0.json``. Every part carries ``size``, ``cs_sha1`` and ``cs_sha256``.
    """
    from updater.bundle import BundlePart, build_bundle, make_fs_image, virtual_build_id
    from updater.firmware import firmware_chunks

    name = "conformance"
    build_id = virtual_build_id(version)

    def chunks() -> Any:
        return firmware_chunks(name, version, build_id, arch, "ok", total_size=app_size, seed=1234)

    fs_image = make_fs_image({"conf0.json": b"{}"}, fs_size=GENERATED_FS_SIZE)
    app_name, fs_name = REQUIRED_PARTS.get(arch.lower(), ("app", "fs"))
    if app_name == "fw":  # ESP8266: rboot slot addresses (the device uses its own build constants)
        parts = [
            BundlePart("fw", chunks, {"type": "app", "src": f"{name}.bin", "addr": 0x2000, "addr1": 0x102000}),
            BundlePart(
                fs_name,
                fs_image,
                {"type": "fs", "src": "fs.img", "addr": 0xBB000, "addr1": 0x1BB000, "fs_size": GENERATED_FS_SIZE},
            ),
        ]
    else:
        parts = [
            BundlePart(app_name, chunks, {"type": "app", "src": f"{name}.bin", "ptn": "app_0"}),
            BundlePart(fs_name, fs_image, {"type": "fs", "src": "fs.img", "ptn": "fs_0", "fs_size": GENERATED_FS_SIZE}),
        ]
    return build_bundle(platform=arch, version=version, build_id=build_id, name=name, parts=parts)


def bundle_manifest(bundle: bytes) -> dict[str, Any]:
    """The ``manifest.json`` of a bundle ({} if it cannot be read)."""
    try:
        return read_manifest(bundle)
    except UpdaterError:
        return {}


def corrupt_bundle(bundle: bytes) -> bytes:
    """The bundle with one byte flipped in the middle of its largest non-manifest entry (CRC mismatch)."""
    zf = zipfile.ZipFile(io.BytesIO(bundle))
    infos = [i for i in zf.infolist() if not i.filename.endswith("manifest.json") and i.file_size > 0]
    if not infos:
        raise CheckSkipped("the bundle has no data entry to corrupt")
    info = max(infos, key=lambda i: i.file_size)
    hdr = info.header_offset
    name_len = int.from_bytes(bundle[hdr + 26 : hdr + 28], "little")
    extra_len = int.from_bytes(bundle[hdr + 28 : hdr + 30], "little")
    pos = hdr + 30 + name_len + extra_len + info.compress_size // 2
    out = bytearray(bundle)
    out[pos] ^= 0xFF
    return bytes(out)


# -- helpers -------------------------------------------------------------------------------------


async def _bundle(s: Session, variant: str = "a") -> bytes:
    """The bundle to install; generated bundles differ per ``variant`` (so a re-install changes fw_id)."""
    if s.options.ota_bundle is not None:
        return s.options.ota_bundle
    if not s.options.ota_generate:
        raise CheckSkipped("no bundle (--ota BUNDLE or --ota-generate)")
    key = f"ota_bundle_{variant}"
    if key not in s.facts:
        info = await s.get_info()
        version = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + f"-conf-{variant}"
        s.facts[key] = generate_bundle(str(info.get("arch", "esp32")), version)
    bundle: bytes = s.facts[key]
    return bundle


async def _status(s: Session) -> dict[str, Any]:
    res = await s.call("OTA.Status")
    expect(
        isinstance(res, dict) and isinstance(res.get("state"), int),
        "OTA.Status must return {state: int, ...}",
        seen=show(res),
        expected='{"state": 0, ...}',
    )
    assert isinstance(res, dict)
    return res


async def _boot_state(s: Session) -> dict[str, Any]:
    res = await s.call("OTA.GetBootState")
    expect(
        isinstance(res, dict) and all(k in res for k in BOOT_KEYS),
        "OTA.GetBootState shape",
        seen=show(res),
        expected='{"active_slot": N, "is_committed": B, "revert_slot": N, "commit_timeout": N}',
    )
    assert isinstance(res, dict)
    return res


async def _ready(s: Session) -> dict[str, Any]:
    """Bring the device to idle and committed; returns its boot state."""
    st = await _status(s)
    if st["state"] == 1:
        await s.request("OTA.End")  # abort a leftover update, as mos tells the user to
        st = await _status(s)
    expect(st["state"] in (0, 2, 3), "device not idle before the check", seen=show(st), expected="state 0 or 2")
    bs = await _boot_state(s)
    if not bs["is_committed"]:
        await s.call("OTA.Commit")
        bs = await _boot_state(s)
    return bs


def _begin_args(size: int) -> dict[str, Any]:
    # mos ota's defaults (tool.md §4): --update-timeout 10m, --commit-timeout 5m, size of the zip.
    return {"timeout": 600, "commit_timeout": 300, "size": size}


async def _write(s: Session, offset: int, data: bytes) -> Frame:
    return await s.request("OTA.Write", {"offset": offset, "data": base64.b64encode(data).decode("ascii")})


def _err(resp: Frame) -> str:
    return show(resp.raw or resp.encode("device"))

async def _expect_untouched(s: Session, before: dict[str, Any], info: dict[str, Any], what: str) -> None:
    """After refused bundles: the device comes back with the same boot state and running firmware."""
    await asyncio.sleep(0.3)  # a device that (wrongly) accepted it would be rebooting now
    await s.wait_up()
    after = await _boot_state(s)
    expect(after == before, f"boot state changed by {what}", seen=show(after), expected=show(before))
    info2 = await s.get_info(fresh=True)
    expect(
        info2.get("fw_id") == info.get("fw_id"),
        f"running firmware changed by {what}",
        seen=info2.get("fw_id"),
        expected=info.get("fw_id"),
    )



async def _write_all(s: Session, bundle: bytes, *, start: int = 0) -> Frame | None:
    """Write the bundle from ``start`` in chunks; returns the first error reply (None if all succeeded)."""
    chunk = s.options.ota_chunk_size
    for off in range(start, len(bundle), chunk):
        resp = await _write(s, off, bundle[off : off + chunk])
        if not resp.ok:
            return resp
    return None


async def _wait_reboot(s: Session, before: dict[str, Any]) -> dict[str, Any]:
    """Wait until the device has rebooted; returns the boot state after.

    Evidence of the reboot: our channel dropped, the device stopped answering, ``OTA.Status`` left
    ``success`` (3), or ``Sys.GetInfo`` reports another ``fw_id`` or a smaller ``uptime`` than ``before``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + s.options.reboot_timeout_s
    p = await s.probe()
    seen_success = False
    while loop.time() < deadline:
        if p.closed:
            break
        try:
            resp = await p.request("OTA.Status", timeout_s=1.0)
        except (MgrpcError, OSError):
            resp = None
        if resp is None:
            break  # dropped or silent: rebooting
        state = resp.result.get("state") if isinstance(resp.result, dict) else None
        if state == 3:
            seen_success = True
        elif seen_success:
            break
        else:
            try:
                info = await p.request("Sys.GetInfo", timeout_s=1.0)
            except (MgrpcError, OSError):
                info = None
            res = info.result if info is not None and isinstance(info.result, dict) else None
            if res is not None and (res.get("fw_id") != before.get("fw_id") or _uptime(res) < _uptime(before)):
                break
        await asyncio.sleep(0.1)
    else:
        raise CheckFailed("device did not reboot", seen="no reboot", expected="a reboot into the new slot")
    await s.wait_up(timeout_s=max(1.0, deadline - loop.time()))
    s.facts.pop("getinfo", None)
    return await _boot_state(s)


def _uptime(info: dict[str, Any]) -> float:
    v = info.get("uptime")
    return float(v) if isinstance(v, int | float) else float("inf")


def _expect_new_slot(before: dict[str, Any], after: dict[str, Any], what: str, *, commit_timeout: int) -> None:
    """After an update: the other slot runs, uncommitted, with ``commit_timeout``."""
    expect(
        after["active_slot"] != before["active_slot"]
        and after["is_committed"] is False
        and after["commit_timeout"] == commit_timeout,
        f"after {what} the new slot runs uncommitted, with commit_timeout {commit_timeout}",
        seen=show(after),
        expected=f"active_slot != {before['active_slot']}, is_committed false, commit_timeout {commit_timeout}",
    )


async def _expect_reverted(s: Session, before: dict[str, Any], info_before: dict[str, Any], what: str) -> None:
    """After a revert: the device reboots into the previous slot, committed, with the previous firmware."""
    back = await _wait_reboot(s, await s.get_info(fresh=True))
    expect(
        back["active_slot"] == before["active_slot"] and back["is_committed"] is True,
        f"after {what} the previous slot must run, committed",
        seen=show(back),
        expected=f"active_slot {before['active_slot']}, is_committed true",
    )
    info = await s.get_info(fresh=True)
    expect(
        info.get("fw_id") == info_before.get("fw_id"),
        "the previous firmware must run again",
        seen=info.get("fw_id"),
        expected=info_before.get("fw_id"),
    )


async def _install(s: Session, bundle: bytes) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Full ``mos ota`` sequence; returns (boot state before, boot state after the reboot, info before)."""
    before = await _ready(s)
    info_before = await s.get_info(fresh=True)
    st = await _status(s)
    expect(
        st["state"] in (0, 2, 3),
        "mos ota refuses to start unless OTA.Status state is idle or error",
        seen=show(st),
        expected="state 0 or 2",
    )
    resp = await s.request("OTA.Begin", _begin_args(len(bundle)))
    expect(resp.ok, "OTA.Begin with mos's arguments must succeed", seen=_err(resp), expected="result null")
    bad = await _write_all(s, bundle)
    expect(bad is None, "OTA.Write of a good bundle failed", seen=_err(bad) if bad else "", expected="result null")
    resp = await s.request("OTA.End")
    expect(resp.ok, "OTA.End of a complete good bundle must succeed", seen=_err(resp), expected="result null")
    after = await _wait_reboot(s, info_before)
    return before, after, info_before


# -- non-destructive -----------------------------------------------------------------------------


UPDATE = ("OTA.Status", "OTA.GetBootState", "OTA.Begin", "OTA.Write", "OTA.End")


@check(
    "ota.status",
    section="ota.md §1.1",
    title="OTA.Status: {state: 0..3, ...}, idle when no update runs",
    needs=["OTA.Status"],
)
async def _ota_status(s: Session) -> str | None:
    st = await _status(s)
    expect(
        st["state"] in STATE_NAMES,
        "state must be 0 idle, 1 progress, 2 error or 3 success",
        seen=show(st),
        expected="state in 0..3",
    )
    return f"state={st['state']} ({STATE_NAMES[st['state']]})"


@check(
    "ota.boot_state",
    section="ota.md §1.9",
    title="OTA.GetBootState: active_slot, is_committed, revert_slot, commit_timeout",
    needs=["OTA.GetBootState"],
)
async def _ota_boot_state(s: Session) -> str | None:
    bs = await _boot_state(s)
    types_ok = (
        isinstance(bs["active_slot"], int)
        and isinstance(bs["is_committed"], bool)
        and isinstance(bs["revert_slot"], int)
        and isinstance(bs["commit_timeout"], int)
    )
    expect(types_ok, "boot state member types", seen=show(bs), expected="ints and an is_committed bool")
    return None


# -- destructive ---------------------------------------------------------------------------------


@check(
    "ota.write_duplicate",
    section="ota.md §1.3",
    title="state progress during an update; exact repeat of a chunk accepted (mos retries)",
    destructive=True,
    needs=UPDATE,
)
async def _ota_write_duplicate(s: Session) -> str | None:
    bundle = await _bundle(s)
    await _ready(s)
    chunk = s.options.ota_chunk_size
    resp = await s.request("OTA.Begin", _begin_args(len(bundle)))
    expect(resp.ok, "OTA.Begin must succeed", seen=_err(resp), expected="result null")
    try:
        st = await _status(s)
        expect(
            st["state"] == 1,
            "while an update runs OTA.Status must say progress (mos refuses to start then)",
            seen=show(st),
            expected="state 1",
        )
        first = await _write(s, 0, bundle[:chunk])
        expect(first.ok, "first OTA.Write must succeed", seen=_err(first), expected="result null")
        again = await _write(s, 0, bundle[:chunk])
        expect(
            again.ok,
            "the same offset and data again (a retry) must be accepted",
            seen=_err(again),
            expected="result null",
        )
        nxt = await _write(s, chunk, bundle[chunk : 2 * chunk])
        expect(nxt.ok, "the next chunk after a repeat must be accepted", seen=_err(nxt), expected="result null")
    finally:
        await s.request("OTA.End")  # abort: not all bytes were sent
    return None


@check("ota.write_gap", section="ota.md §1.3", title="OTA.Write with a gap rejected", destructive=True, needs=UPDATE)
async def _ota_write_gap(s: Session) -> str | None:
    bundle = await _bundle(s)
    before = await _ready(s)
    chunk = s.options.ota_chunk_size
    resp = await s.request("OTA.Begin", _begin_args(len(bundle)))
    expect(resp.ok, "OTA.Begin must succeed", seen=_err(resp), expected="result null")
    try:
        first = await _write(s, 0, bundle[:chunk])
        expect(first.ok, "first OTA.Write must succeed", seen=_err(first), expected="result null")
        gap = await _write(s, 2 * chunk, bundle[2 * chunk : 3 * chunk])
        expect(
            gap.error is not None and gap.error.code != 0,
            "a write past the received data must be an error",
            seen=_err(gap),
            expected='"error":{"code":<negative>,...}',
        )
    finally:
        await s.request("OTA.End")
    after = await _boot_state(s)
    expect(after == before, "boot state changed by a rejected update", seen=show(after), expected=show(before))
    return None


@check(
    "ota.abort",
    section="ota.md §1.4",
    title="OTA.End before all bytes: aborted, back to idle, slot untouched",
    destructive=True,
    needs=UPDATE,
)
async def _ota_abort(s: Session) -> str | None:
    bundle = await _bundle(s)
    before = await _ready(s)
    info = await s.get_info(fresh=True)
    chunk = s.options.ota_chunk_size
    resp = await s.request("OTA.Begin", _begin_args(len(bundle)))
    expect(resp.ok, "OTA.Begin must succeed", seen=_err(resp), expected="result null")
    first = await _write(s, 0, bundle[:chunk])
    expect(first.ok, "first OTA.Write must succeed", seen=_err(first), expected="result null")
    end = await s.request("OTA.End")
    expect(
        end.error is not None and end.error.code != 0,
        "OTA.End before all data must report the abort",
        seen=_err(end),
        expected="an error (update aborted)",
    )
    st = await _status(s)
    expect(
        st["state"] in (0, 2),
        "after the abort the device must not be updating",
        seen=show(st),
        expected="state 0 (idle) or 2 (error)",
    )
    after = await _boot_state(s)
    expect(after == before, "boot state changed by an aborted update", seen=show(after), expected=show(before))
    info2 = await s.get_info(fresh=True)
    expect(
        info2.get("fw_id") == info.get("fw_id"),
        "running firmware changed",
        seen=info2.get("fw_id"),
        expected=info.get("fw_id"),
    )
    resp = await s.request("OTA.Begin", _begin_args(len(bundle)))
    expect(resp.ok, "a new update must be possible after an abort", seen=_err(resp), expected="result null")
    await s.request("OTA.End")
    return None


@check(
    "ota.bad_bundle",
    section="ota.md §1.3-§1.4; updater.md §1",
    title="corrupt bundle rejected, running slot untouched",
    destructive=True,
    needs=UPDATE,
)
async def _ota_bad_bundle(s: Session) -> str | None:
    bundle = corrupt_bundle(await _bundle(s))
    before = await _ready(s)
    info = await s.get_info(fresh=True)
    resp = await s.request("OTA.Begin", _begin_args(len(bundle)))
    expect(resp.ok, "OTA.Begin must succeed", seen=_err(resp), expected="result null")
    bad = await _write_all(s, bundle)
    end = await s.request("OTA.End")
    rejected = bad is not None or (end.error is not None and end.error.code != 0)
    expect(
        rejected,
        "a bundle with a corrupted entry (CRC mismatch) must be rejected by OTA.Write or OTA.End",
        seen=_err(end),
        expected="an error",
    )
    await _expect_untouched(s, before, info, "a rejected bundle")
    return f"rejected with {(bad or end).error}"


@check(
    "ota.update",
    section="ota.md §1.2-§1.4, §2; tool.md §4",
    title="Status/Begin/Write/End, reboot into the new slot uncommitted",
    destructive=True,
    needs=UPDATE,
)
async def _ota_update(s: Session) -> str | None:
    bundle = await _bundle(s)
    before, after, _ = await _install(s, bundle)
    s.facts["ota_installed"] = (before, after)
    expect(
        after["active_slot"] != before["active_slot"],
        "after the update the device must run the other slot",
        seen=show(after),
        expected=f"active_slot != {before['active_slot']}",
    )
    expect(
        after["is_committed"] is False,
        "a fresh update must boot uncommitted",
        seen=show(after),
        expected="is_committed false",
    )
    expect(
        after["revert_slot"] == before["active_slot"],
        "revert slot must be the previous firmware's slot",
        seen=show(after),
        expected=f"revert_slot {before['active_slot']}",
    )
    version = bundle_manifest(bundle).get("version")
    info = await s.get_info(fresh=True)
    if version:
        expect(
            info.get("fw_version") == version,
            "Sys.GetInfo must report the new firmware's version",
            seen=info.get("fw_version"),
            expected=version,
        )
    st = await _status(s)
    expect(st["state"] in (0, 3), "after the reboot OTA.Status must be idle", seen=show(st), expected="state 0")
    return f"slot {before['active_slot']} -> {after['active_slot']}, fw_version {info.get('fw_version')}"


@check(
    "ota.begin_uncommitted",
    section="ota.md §1.2",
    title="OTA.Begin refused while uncommitted",
    destructive=True,
    needs=UPDATE,
)
async def _ota_begin_uncommitted(s: Session) -> str | None:
    bs = await _boot_state(s)
    if bs["is_committed"]:
        raise CheckSkipped("device is committed (ota.update did not run or failed)")
    resp = await s.request("OTA.Begin", _begin_args(1000))
    if resp.ok:
        await s.request("OTA.End")
    expect(
        not resp.ok,
        "a new update must be refused while the running firmware is uncommitted",
        seen=_err(resp),
        expected="an error (Previous update has not been committed yet)",
    )
    return None


@check(
    "ota.commit",
    section="ota.md §1.6",
    title="OTA.Commit commits once; again is -1",
    destructive=True,
    needs=(*UPDATE, "OTA.Commit"),
)
async def _ota_commit(s: Session) -> str | None:
    bs = await _boot_state(s)
    if bs["is_committed"]:
        await _install(s, await _bundle(s))
    resp = await s.request("OTA.Commit")
    expect(
        resp.ok and resp.result is None,
        "OTA.Commit of uncommitted firmware returns null",
        seen=_err(resp),
        expected="result null",
    )
    after = await _boot_state(s)
    expect(
        after["is_committed"] is True,
        "boot state must be committed after OTA.Commit",
        seen=show(after),
        expected="is_committed true",
    )
    again = await s.request("OTA.Commit")
    expect(
        again.error is not None and again.error.code != 0,
        "OTA.Commit when already committed is an error",
        seen=_err(again),
        expected='"error":{"code":-1}',
    )
    return None


@check(
    "ota.revert",
    section="ota.md §1.7",
    title="OTA.Revert boots the previous slot, committed",
    destructive=True,
    needs=(*UPDATE, "OTA.Revert"),
)
async def _ota_revert(s: Session) -> str | None:
    bundle = await _bundle(s, "b")
    before, _, info_before = await _install(s, bundle)
    resp = await s.request("OTA.Revert")
    expect(resp.ok, "OTA.Revert of uncommitted firmware must succeed", seen=_err(resp), expected="result null")
    await _expect_reverted(s, before, info_before, "the revert")
    again = await s.request("OTA.Revert")
    expect(
        again.error is not None and again.error.code != 0,
        "OTA.Revert when committed is an error",
        seen=_err(again),
        expected='"error":{"code":-1}',
    )
    return None
