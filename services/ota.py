"""The OTA RPC service (rpc-service-ota): ``OTA.Status/Begin/Write/End/Update/Commit/Revert/
GetBootState/SetBootState/CreateSnapshot`` over the Layer-1 updater (spec/ota.md §1).

Decisions where the spec is *[inferred]* (the streaming methods' device source is closed):

* ``OTA.Status`` returns ``state`` (0 idle, 1 progress, 2 error, 3 success), ``msg``, ``is_committed``,
  ``commit_timeout``, ``partition`` (running slot), ``progress_percent``, plus ``bytes_written`` and
  ``size`` of the current update so a client can resume where it stopped.
* ``OTA.Begin {timeout, commit_timeout, size}``: refused with -1 ``Update already in progress`` while
  one runs, and with -1 ``Previous update has not been committed yet`` when the running firmware is
  uncommitted. ``timeout`` (s, default ``update.timeout``) aborts the update after that long without
  progress (``update.timeout`` <= 0: no such limit).
* ``OTA.Write {offset, data}``: ``offset`` must equal the bytes accepted so far; an exact repeat of the
  last accepted chunk (same offset, same data) is acknowledged again without writing (mos retries a
  write whose reply was lost); anything else is -1 ``Expected offset N, got M``. A failure of the
  updater (bad bundle) is ``{"code": <negative>, "message": "<message>"}`` and ends the update (state 2).
* ``OTA.End``: with all ``size`` bytes in, finalizes; success replies ``null`` and reboots ~100 ms later
  into the new slot, uncommitted. Before all bytes arrived it aborts and returns to idle with
  -1 ``Update aborted``.
* ``OTA.Update {url, commit_timeout, timeout}``: the reply is deferred until the download is applied:
  success is ``{"code": 0, "message": "Update applied, finalizing"}`` through the error path (as the
  device does) and a reboot; failure ``{"code": <negative>, "message": "<negative> <text>"}`` (newer
  devices' form), e.g. ``-404 Invalid HTTP response code``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rpc.errors import HandlerError
from rpc.node import Context, Node
from services.firmware import Firmware
from updater.context import UpdaterContext, UpdaterState
from updater.errors import UpdaterError

__all__ = ["OtaService", "OtaState", "add_ota_service", "slot_view"]

log = logging.getLogger("mgrpc.services.ota")


class OtaState:
    """``mgos_ota_state`` values."""

    IDLE = 0
    PROGRESS = 1
    ERROR = 2
    SUCCESS = 3
    NAMES = {0: "idle", 1: "progress", 2: "error", 3: "success"}


@dataclass
class _Update:
    ctx: UpdaterContext
    size: int | None
    written: int = 0
    last_offset: int = -1
    last_data: bytes = b""
    source: str = "rpc"
    timeout_s: float = 600.0  # no-progress limit (update.timeout / OTA.Begin "timeout"); <= 0: none


class OtaService:
    """OTA state for one booted firmware; handlers registered by :func:`add_ota_service`.

    ``on_progress(done, total, state, message)`` lets a device report progress (dashboard, shadow).
    """

    def __init__(self, fw: Firmware, *, default_timeout_s: int = 600) -> None:
        if fw.storage is None:
            raise ValueError("the OTA service needs firmware with storage")
        self.fw = fw
        self.storage = fw.storage
        self.default_timeout_s = default_timeout_s
        self.state = OtaState.IDLE
        self.msg = "idle"
        self.update: _Update | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.on_progress: list[Callable[[int, int | None, int, str], None]] = []

    # -- update lifecycle ---------------------------------------------------------------------------
    def _cfg(self, key: str, default: Any) -> Any:
        cfg = self.fw.config
        if cfg is None:
            return default
        try:
            return cfg.get(key)
        except HandlerError:
            return default

    def begin(
        self,
        *,
        size: int | None,
        commit_timeout_s: int,
        timeout_s: int | None,
        source: str = "rpc",
        ignore_same_version: bool = False,
    ) -> _Update:
        """Start an update (raises :class:`HandlerError` -1 when one cannot start)."""
        if self.state == OtaState.PROGRESS:
            raise HandlerError(-1, "Update already in progress")
        if not self.storage.is_committed:
            raise HandlerError(-1, "Previous update has not been committed yet")
        keys = [self._cfg(f"update.key{i}", "") or None for i in range(8)]
        ctx = UpdaterContext(
            self.storage, arch=self.fw.arch, commit_timeout_s=max(0, commit_timeout_s), total_size=size,
            keys=keys, sig_req_mask=int(self._cfg("update.sig_req_mask", -1)),
            ignore_same_version=ignore_same_version, allow_deflate=bool(self._cfg("update.allow_deflate", False)),
        )  # fmt: skip
        timeout_s = timeout_s if timeout_s and timeout_s > 0 else self.default_timeout_s
        self.update = _Update(ctx, size, source=source, timeout_s=timeout_s)
        self._set(OtaState.PROGRESS, "progress")
        if timeout_s > 0:  # update.timeout <= 0: no watchdog (not an instant abort)
            self._arm_watchdog(timeout_s)
        log.info("update started (%s, %s bytes)", source, size)
        return self.update

    def write(self, data: bytes) -> int:
        """Feed bytes into the running update; returns the updater's result (<0 = failed)."""
        u = self.require_update()
        res = u.ctx.process(data)
        u.written += len(data)
        self._progress()
        if res < 0:
            self._stop(OtaState.ERROR, u.ctx.status_message)
        return res

    def finish(self) -> int:
        """Finalize; on success schedule the reboot into the new slot."""
        u = self.require_update()
        res = u.ctx.finish()
        if res < 0:
            self._stop(OtaState.ERROR, u.ctx.status_message)
            return res
        self._stop(OtaState.SUCCESS, u.ctx.status_message)
        if u.ctx.reboot_required:
            self.fw.reboot(0.1)
        return res

    def write_at(self, offset: int, data: bytes) -> None:
        """The ``OTA.Write`` rules: ``data`` must continue the update exactly where it stands.

        An exact repeat of the last accepted chunk (same offset, same data) is acknowledged again
        without writing (a client retries a write whose reply was lost). Any other offset than the
        bytes accepted so far is -1 ``Expected offset N, got M``; data beyond the size announced in
        ``OTA.Begin`` is -1 too; neither touches the update. An updater failure (bad bundle) ends
        the update (state 2) and is raised with the updater's code and message.
        """
        u = self.require_update()
        if offset == u.last_offset and data == u.last_data and offset >= 0:
            return  # exact repeat of the last chunk: its reply was lost, nothing to do
        if offset != u.written:
            raise HandlerError(-1, f"Expected offset {u.written}, got {offset}")
        if u.size is not None and u.written + len(data) > u.size:
            raise HandlerError(-1, f"Data beyond the announced size {u.size}")
        res = self.write(data)
        if res < 0:
            raise HandlerError(res, u.ctx.status_message)
        u.last_offset, u.last_data = offset, data

    def end(self) -> None:
        """The ``OTA.End`` rules: finalize a complete update, abort an incomplete one.

        Before all announced bytes arrived (or with the archive unfinished) the update is aborted
        (back to idle, the running slot untouched) and -1 ``Update aborted: ...`` raised; a failed
        finalization is raised with the updater's code and message; success reboots into the new slot.
        """
        u = self.require_update()
        short = u.size is not None and u.written < u.size
        if short or u.ctx.state != UpdaterState.WRITE_FINISHED:
            self.abort("Update aborted")
            if short:
                raise HandlerError(-1, f"Update aborted: {u.written} of {u.size} bytes received")
            raise HandlerError(-1, f"Update aborted: the archive is incomplete after {u.written} bytes")
        res = self.finish()
        if res < 0:
            raise HandlerError(res, u.ctx.status_message)

    def commit(self) -> bool:
        """Commit the running firmware (OTA.Commit, GET /update/commit); False if it already was.

        Progress listeners hear of it, so e.g. the shadow agent publishes the committed status.
        """
        if not self.storage.commit():
            return False
        self._notify()
        return True

    def abort(self, message: str = "Update aborted") -> None:
        """Give up the running update; the boot config and running slot are untouched."""
        if self.update is not None and self.state == OtaState.PROGRESS:
            self.update.ctx.abort(message)
            self._stop(OtaState.IDLE, message)

    def require_update(self) -> _Update:
        """The update in progress; -1 ``No update in progress`` when there is none."""
        if self.update is None or self.state != OtaState.PROGRESS:
            raise HandlerError(-1, "No update in progress")
        return self.update

    def _set(self, state: int, msg: str) -> None:
        self.state = state
        self.msg = msg
        self._notify()

    def _stop(self, state: int, msg: str) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._set(state, msg)

    def _arm_watchdog(self, timeout_s: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._watchdog_s = timeout_s
        self._watchdog = loop.call_later(timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        log.warning("Update timed out")
        self.abort("Update timed out")

    def _progress(self) -> None:
        if self._watchdog is not None:
            self._arm_watchdog(self._watchdog_s)
        self._notify()

    def _notify(self) -> None:
        u = self.update
        done = u.written if u else 0
        total = u.size if u else None
        for cb in list(self.on_progress):
            try:
                cb(done, total, self.state, self.msg)
            except Exception:
                log.exception("progress callback failed")

    def status(self) -> dict[str, Any]:
        """The ``OTA.Status`` object."""
        u = self.update
        size = u.size if u else 0
        written = u.written if u else 0
        pct = int(written * 100 / size) if size else 0
        if self.state != OtaState.PROGRESS:
            pct = 100 if self.state == OtaState.SUCCESS else 0
        bs = self.storage.get_boot_state()
        return {
            "state": self.state,
            "msg": self.msg,
            "is_committed": bool(bs["is_committed"]),
            "commit_timeout": int(bs["commit_timeout"]),
            "partition": int(self.storage.running_slot),
            "progress_percent": pct,
            "bytes_written": written,
            "size": size or 0,
        }


def decode_data(value: Any, *, code: int) -> bytes:
    """Chunk data: base64 text (JSON, as mos sends it) or raw bytes (msgpack links between mgrpc ends)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    try:
        return base64.b64decode(value or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise HandlerError(code, "Invalid data (base64 expected)") from None


INT32_MAX = 2**31 - 1


def _int(p: dict[str, Any], key: str, default: int) -> int:
    v = p.get(key, default)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)  # the 2017 README shows "commit_timeout": "300"
    if isinstance(v, bool) or not isinstance(v, int):
        raise HandlerError(400, f"{key} must be an integer")
    if not -INT32_MAX <= v <= INT32_MAX:
        raise HandlerError(400, f"{key} out of range")
    return v


def slot_view(storage: Any) -> list[dict[str, Any]]:
    """Both slots as ``OTA.GetBootState {"slots": true}`` reports them (an mgrpc extension, like
    ``mcumgr image list``): ``slot``, ``version``, ``build_id``, ``size``, ``sha256`` of the app image,
    ``valid`` (the image is complete), ``active`` (the boot config selects it), ``running`` (the
    firmware now running came from it), and ``committed``: the active slot's commit flag; for the
    other slot, whether it holds the committed firmware the device falls back to (a valid revert slot).
    """
    loader = storage.loader
    cfg = loader.load()
    out = []
    for i, s in enumerate(cfg.slots):
        valid = loader.slot_valid(cfg, i)
        active = i == cfg.active_slot
        out.append({
            "slot": i, "version": s.version, "build_id": s.build_id, "size": s.app_len,
            "sha256": s.app_sha256.hex() if valid else "", "valid": valid, "active": active,
            "running": i == storage.running_slot,
            "committed": cfg.committed if active else (valid and i == cfg.revert_slot),
        })  # fmt: skip
    return out


def add_ota_service(
    node: Node, fw: Firmware, *, ota: OtaService | None = None, http_fetch: Callable[..., Any] | None = None
) -> OtaService:
    """Register the OTA.* handlers; returns the :class:`OtaService` holding the update state."""
    svc = ota or OtaService(fw, default_timeout_s=int(fw.config.get("update.timeout") if fw.config else 600))
    st = svc.storage

    def status(ctx: Context, params: Any) -> Any:
        return svc.status()

    def begin(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        size = p.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise HandlerError(400, "size must be a positive integer")
        svc.begin(
            size=size, commit_timeout_s=_int(p, "commit_timeout", 0), timeout_s=_int(p, "timeout", 0),
        )  # fmt: skip
        return None

    def write(ctx: Context, params: Any) -> Any:
        svc.require_update()  # "No update in progress" comes before any complaint about the params
        p = params if isinstance(params, dict) else {}
        svc.write_at(_int(p, "offset", -1), decode_data(p.get("data"), code=-1))
        return None

    def end(ctx: Context, params: Any) -> Any:
        svc.end()
        return None

    async def update(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        url = p.get("url")
        if not isinstance(url, str) or not url:
            raise HandlerError(-1, "Malformed request")
        if http_fetch is None:
            raise HandlerError(-1, "Failed to init updater")
        try:
            u = svc.begin(
                size=None, commit_timeout_s=_int(p, "commit_timeout", 0), timeout_s=_int(p, "timeout", 0),
                source="url", ignore_same_version=bool(p.get("ignore_same_version", False)),
            )  # fmt: skip
        except HandlerError:
            raise HandlerError(-1, "Failed to init updater") from None
        from services.polling import poll_headers  # ota-http-client's headers (ota.md §4-c); lazy: no cycle

        code, message = await http_fetch(svc, u, url, headers=poll_headers(fw))
        if code < 0:
            raise HandlerError(code, f"{code} {message}")
        raise HandlerError(0, message)

    def commit(ctx: Context, params: Any) -> Any:
        if not svc.commit():
            raise HandlerError(-1)
        return None

    def revert(ctx: Context, params: Any) -> Any:
        if st.is_committed or not st.revert():
            raise HandlerError(-1)
        fw.reboot(0.1)
        return None

    def get_boot_state(ctx: Context, params: Any) -> Any:
        try:
            state = st.get_boot_state()
            if isinstance(params, dict) and params.get("slots") is True:
                state = {**state, "slots": slot_view(st)}  # our extension; mos never asks for it
            return state
        except UpdaterError as e:
            raise HandlerError(e.code) from None

    def set_boot_state(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        # commit_timeout < 0 is a recognised field that stores nothing: the boot loader ignores it.
        changes = {k: p[k] for k in ("active_slot", "is_committed", "revert_slot", "commit_timeout") if k in p}
        try:
            st.set_boot_state(**changes)
        except UpdaterError as e:
            raise HandlerError(e.code) from None
        return None

    def create_snapshot(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        if svc.state == OtaState.PROGRESS:
            # The snapshot would overwrite the slot the update is writing: the update would still
            # "succeed" and the device then fall back from a damaged image.
            raise HandlerError(-1, "Cannot create snapshots while an update is in progress")
        try:
            slot = st.create_snapshot(
                set_as_revert=bool(p.get("set_as_revert", False)), commit_timeout=_int(p, "commit_timeout", -1)
            )
        except UpdaterError as e:
            raise HandlerError(e.code, e.message) from None
        return {"slot": slot}

    node.add_handler("OTA.Status", status)
    node.add_handler("OTA.Begin", begin, args_fmt="{timeout: %d, commit_timeout: %d, size: %d}")
    node.add_handler("OTA.Write", write, args_fmt="{offset: %d, data: %V}")
    node.add_handler("OTA.End", end)
    node.add_handler("OTA.Update", update, args_fmt="{url: %T, commit_timeout: %d}")
    node.add_handler("OTA.Commit", commit)
    node.add_handler("OTA.Revert", revert)
    node.add_handler("OTA.CreateSnapshot", create_snapshot, args_fmt="{set_as_revert: %B, commit_timeout: %d}")
    node.add_handler("OTA.GetBootState", get_boot_state)
    node.add_handler(
        "OTA.SetBootState", set_boot_state,
        args_fmt="{active_slot: %d, is_committed: %B, revert_slot: %d, commit_timeout: %d}",
    )  # fmt: skip
    return svc

