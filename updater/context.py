"""UpdaterContext: applies a fw.zip stream to the inactive slot (spec/updater.md §1.3, §3, §5).

::

    ctx = UpdaterContext(storage, arch="esp32", commit_timeout_s=300, total_size=len(zip_bytes))
    for chunk in source:
        r = ctx.process(chunk)      # > 0 done (e.g. same version), 0 need more, < 0 failed
        if r != 0:
            break
    r = ctx.finish()                # > 0: "Update applied, finalizing" -> reboot (storage.boot())

The zip events (:mod:`updater.zipstream`) drive a state machine whose legal moves are the table
``_TRANSITIONS``: ``(state, event type) -> handler``; each handler returns the next state; an event
with no entry in the table is a malformed archive. States are the device's (§1.3).

Decisions (documented here, tested in ``tests/updater/``):

* Parts: a part named ``app`` or ``fw``, or of type ``app``, goes to the inactive app partition; a
  part named ``fs`` or of type ``fs`` to the inactive fs partition. Every other part (``boot``, ``pt``,
  ``nvs``, ...) is skipped, as are zip entries no part names.
* The app part is **required** (``Incomplete update package`` when the manifest lacks it or the zip
  lacks its file); the fs part is optional: without one, :meth:`finish` copies the running fs into the
  new slot (no merge then). If the manifest names an fs file the zip must contain it.
* Per part: the entry size must equal ``size`` when given (``Invalid size``); data larger than the
  partition is ``Image too big``; ``cs_sha1``/``cs_sha256``, when given, are checked over the data as
  it streams (``Digest mismatch``).
* Refused before anything is written: running firmware uncommitted (``Previous update has not been
  committed yet``), ``Wrong platform``, bad signatures when ``sig_req_mask != -1``, and an
  ``on_begin(manifest)`` hook (the MGOS_EVENT_OTA_BEGIN handler) returning False (``OTA aborted by
  the MGOS_EVENT_OTA_BEGIN handler``).
* A flash failure while writing is ``Write failed`` (code -11).
* Same version as the running firmware (version and build_id) with ``ignore_same_version`` (as
  ota-http-client means it: "skip an update to the version already running"):
  ``Version is the same as current``, result > 0, nothing written, no reboot
  (:attr:`reboot_required` is false). Without the flag (the default, as for ``OTA.Begin``) the same
  version is installed again.
* Data is written in 512-byte programs (the device's backend chunk); a sector is erased when the
  write cursor first enters it; all-0xFF programs are skipped (they would not change erased flash).
* **Only the inactive slot is ever written**; the boot config changes only in :meth:`finish`. So any
  error (and any power cut) before that leaves the running slot, its fs and the boot config as they
  were.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .bootcfg import MAX_COMMIT_TIMEOUT_S, SlotState, stored_identity
from .errors import FlashError, UpdaterError
from .manifest import MANIFEST_FILE_NAME, Manifest, Part
from .slotstorage import WRITE_CHUNK_SIZE, PartSink, SlotStorage
from .zipstream import ArchiveEnd, EntryData, EntryEnd, EntryStart, Event, ZipStreamParser

__all__ = ["WRITE_CHUNK_SIZE", "StorageLike", "UpdaterContext", "UpdaterState", "part_target"]

StorageLike = SlotStorage  # the name this module used before the seam had its own module

log = logging.getLogger("mgrpc.updater.context")

MAX_MANIFEST_SIZE = 64 * 1024  # the device holds the manifest in RAM
PROGRESS_EVERY_BYTES = 50_000

MSG_APPLIED = "Update applied, finalizing"
MSG_SAME_VERSION = "Version is the same as current"


class UpdaterState(enum.IntEnum):
    """The device's updater states (numbers as in the 2018 source, spec/updater.md §1.3)."""

    INITED = 0
    WAITING_MANIFEST_HEADER = 1
    WAITING_MANIFEST = 2
    WAITING_FILE_HEADER = 3
    WAITING_FILE = 4
    SKIPPING_DATA = 5
    SKIPPING_DESCRIPTOR = 6  # never entered: the parser refuses data descriptors outright
    WRITE_FINISHED = 7
    FINALIZE = 8
    FINISHED = 9


def part_target(part: Part) -> str | None:
    """``"app"``, ``"fs"`` or None (skip) for a manifest part."""
    if part.name in ("app", "fw") or part.type == "app":
        return "app"
    if part.name == "fs" or part.type == "fs":
        return "fs"
    return None


class UpdaterContext:
    """One update: feed the fw.zip with :meth:`process`, then :meth:`finish` (see the module doc)."""

    def __init__(
        self,
        storage: SlotStorage,
        *,
        arch: str,
        ignore_same_version: bool = False,
        allow_deflate: bool = False,
        keys: Iterable[str | None] = (),
        sig_req_mask: int = -1,
        commit_timeout_s: int = 0,
        total_size: int | None = None,
        on_progress: Callable[[int, int | None], None] | None = None,
        on_begin: Callable[[Manifest], bool | None] | None = None,
    ) -> None:
        if not 0 <= commit_timeout_s <= MAX_COMMIT_TIMEOUT_S:
            raise ValueError(f"commit_timeout_s must be 0..{MAX_COMMIT_TIMEOUT_S}, got {commit_timeout_s}")
        self.storage = storage
        self.arch = arch
        self.ignore_same_version = ignore_same_version
        self.keys = tuple(keys)
        self.sig_req_mask = sig_req_mask
        self.commit_timeout_s = commit_timeout_s
        self.total_size = total_size
        self.on_progress = on_progress
        self.on_begin = on_begin
        self.state = UpdaterState.INITED
        self.result = 0
        self.status_message = "idle"
        self.bytes_processed = 0
        self.manifest: Manifest | None = None
        self.reboot_required = False
        self.sig_check_result = 0
        self._parser = ZipStreamParser(allow_deflate=allow_deflate)
        self._manifest_buf = bytearray()
        self._manifest_extra = b""
        self._writer: PartSink | None = None
        self._writer_kind = ""
        self._done: dict[str, PartSink] = {}
        self._target_slot = -1
        self._last_progress = 0
        # The state table: legal (state, event) pairs and the handler for each.
        self._transitions: dict[tuple[UpdaterState, type], Callable[[Any], UpdaterState]] = {
            (UpdaterState.WAITING_MANIFEST_HEADER, EntryStart): self._on_manifest_start,
            (UpdaterState.WAITING_MANIFEST, EntryData): self._on_manifest_data,
            (UpdaterState.WAITING_MANIFEST, EntryEnd): self._on_manifest_end,
            (UpdaterState.WAITING_FILE_HEADER, EntryStart): self._on_file_start,
            (UpdaterState.WAITING_FILE_HEADER, ArchiveEnd): self._on_archive_end,
            (UpdaterState.WAITING_FILE, EntryData): self._on_file_data,
            (UpdaterState.WAITING_FILE, EntryEnd): self._on_file_end,
            (UpdaterState.SKIPPING_DATA, EntryData): self._on_skipped_data,
            (UpdaterState.SKIPPING_DATA, EntryEnd): self._on_skipped_end,
        }

    # -- public API -----------------------------------------------------------------------------------

    @property
    def progress_percent(self) -> int:
        """Percent of ``total_size`` processed (0 when the total is unknown), for OTA.Status."""
        if not self.total_size:
            return 0
        return min(100, self.bytes_processed * 100 // self.total_size)

    @property
    def target_slot(self) -> int:
        """The slot being written (-1 before the update starts)."""
        return self._target_slot

    def process(self, chunk: bytes) -> int:
        """Feed the next piece of the fw.zip. Returns > 0 done, 0 need more, < 0 failed."""
        if self.state is UpdaterState.FINISHED:
            return self.result  # the device swallows what comes after the end
        try:
            if self.state is UpdaterState.INITED:
                self._begin()
            self.bytes_processed += len(chunk)
            self._parser.feed(chunk)
            for ev in self._parser.events():
                self._dispatch(ev)
                if self.state is UpdaterState.FINISHED:
                    break
        except FlashError as exc:
            log.error("flash write failed: %s", exc)
            return self._fail(UpdaterError("Write failed", code=exc.code))
        except UpdaterError as exc:
            return self._fail(exc)
        self._report_progress()
        return self.result

    def finish(self) -> int:
        """The source says the input is complete: finalize (switch the boot config) or fail."""
        if self.state is UpdaterState.FINISHED:
            return self.result
        if self.state is not UpdaterState.WRITE_FINISHED:
            return self._fail(UpdaterError("Not all data was processed"))
        self.state = UpdaterState.FINALIZE
        try:
            self._check_target()
            if "fs" not in self._done:
                # App-only update: the new slot gets a copy of the running fs (no merge needed).
                self.storage.copy_fs(self.storage.running_slot, self._target_slot)
            app = self._done["app"]
            state = SlotState(
                app_len=app.written,
                app_crc32=app.crc32,
                app_sha256=app.sha256.digest() if app.sha256 is not None else b"",
                version=self.manifest.version if self.manifest else "",
                build_id=self.manifest.build_id if self.manifest else "",
            )
            self.storage.finalize_update(
                self._target_slot, state, fs_updated="fs" in self._done, commit_timeout_s=self.commit_timeout_s
            )
        except UpdaterError as exc:
            return self._fail(UpdaterError("Failed to set boot config", code=exc.code))
        self.state = UpdaterState.FINISHED
        self.result = 1
        self.reboot_required = True
        self.status_message = MSG_APPLIED
        log.info("update to slot %d applied (%d bytes)", self._target_slot, self.bytes_processed)
        self._report_progress(force=True)
        return self.result

    def abort(self, message: str = "Update aborted") -> int:
        """Give up (source failed, OTA.End before all data, ...); nothing is switched."""
        if self.state is UpdaterState.FINISHED:
            return self.result
        return self._fail(UpdaterError(message))

    # -- internals ------------------------------------------------------------------------------------

    def _fail(self, exc: UpdaterError) -> int:
        self.state = UpdaterState.FINISHED
        self.result = exc.code if exc.code < 0 else -1
        self.status_message = exc.message
        self._writer = None
        log.warning("update failed: %s", exc.message)
        return self.result

    def _begin(self) -> None:
        if not self.storage.is_committed:
            raise UpdaterError("Previous update has not been committed yet")
        if self.storage.reboot_pending:
            # e.g. OTA.Revert answered and the reboot has not happened yet: the "inactive" slot is
            # the one the next boot will use, so it must not be written.
            raise UpdaterError("Reboot pending, cannot update now")
        self._target_slot = self.storage.inactive_slot
        self.storage.begin_slot(self._target_slot)
        self.status_message = "progress"
        self.state = UpdaterState.WAITING_MANIFEST_HEADER

    def _check_target(self) -> None:
        """Refuse to go on if the boot state changed under the update (SetBootState, revert): the
        slot being written might now be the one the next boot uses."""
        if self.storage.reboot_pending or self.storage.inactive_slot != self._target_slot:
            raise UpdaterError("Failed to set boot config")
        cfg_active = self.storage.get_boot_state()["active_slot"]
        if cfg_active == self._target_slot:
            raise UpdaterError("Failed to set boot config")

    def _dispatch(self, ev: Event) -> None:
        handler = self._transitions.get((self.state, type(ev)))
        if handler is None:
            raise UpdaterError(f"Malformed archive (unexpected {type(ev).__name__} in state {self.state.name})")
        self.state = handler(ev)

    def _report_progress(self, *, force: bool = False) -> None:
        if self.on_progress is None:
            return
        if force or self.bytes_processed - self._last_progress >= PROGRESS_EVERY_BYTES or (
            self.total_size is not None and self.bytes_processed >= self.total_size
        ):
            self._last_progress = self.bytes_processed
            self.on_progress(self.bytes_processed, self.total_size)

    # manifest

    def _on_manifest_start(self, ev: EntryStart) -> UpdaterState:
        if ev.name != MANIFEST_FILE_NAME:
            raise UpdaterError("Malformed archive (manifest.json must be the first entry)")
        if ev.size > MAX_MANIFEST_SIZE:
            raise UpdaterError("Out of memory")
        self._manifest_extra = ev.extra
        return UpdaterState.WAITING_MANIFEST

    def _on_manifest_data(self, ev: EntryData) -> UpdaterState:
        self._manifest_buf += ev.data
        return UpdaterState.WAITING_MANIFEST

    def _on_manifest_end(self, ev: EntryEnd) -> UpdaterState:
        m = Manifest.parse(bytes(self._manifest_buf))
        self._manifest_buf = bytearray()
        m.check_platform(self.arch)
        self._check_signatures(m)
        self.manifest = m
        if self.on_begin is not None and self.on_begin(m) is False:
            raise UpdaterError("OTA aborted by the MGOS_EVENT_OTA_BEGIN handler")
        log.info("manifest: %s %s (%s) for %s", m.name, m.version, m.build_id, m.platform)
        # The running identity comes from the boot config, which keeps only a prefix of long names.
        if self.ignore_same_version and stored_identity(m.version, m.build_id) == (
            self.storage.running_version,
            self.storage.running_build_id,
        ):
            self.result = 1
            self.status_message = MSG_SAME_VERSION
            return UpdaterState.FINISHED
        targets = {part_target(p): p for p in m.parts.values()}
        app = targets.get("app")
        if app is None or not app.src:
            raise UpdaterError("Incomplete update package")
        for kind, part in targets.items():
            if kind is not None and part.size is not None and part.size > self._capacity(kind):
                raise UpdaterError("Image too big")
        return UpdaterState.WAITING_FILE_HEADER

    def _check_signatures(self, m: Manifest) -> None:
        if self.sig_req_mask < 0:
            return
        from .signing import verify_signatures  # imports cryptography only when keys are used

        # Raises UpdaterError ("Signature check failed: ...") unless the required bits verify.
        self.sig_check_result = verify_signatures(m.raw, self._manifest_extra, list(self.keys), self.sig_req_mask)

    def _capacity(self, kind: str) -> int:
        return self.storage.part_capacity(self._target_slot, kind)

    # files

    def _on_file_start(self, ev: EntryStart) -> UpdaterState:
        assert self.manifest is not None
        part = self.manifest.part_for_file(ev.name)
        kind = part_target(part) if part is not None else None
        if part is None or kind is None:
            log.debug("skipping %s", ev.name)
            self._parser.skip_current()
            return UpdaterState.SKIPPING_DATA
        if kind in self._done:
            raise UpdaterError(f"Malformed archive (second file for the {kind} part)")
        self._check_target()
        if ev.size > self._capacity(kind):
            raise UpdaterError("Image too big")
        if part.size is not None and ev.size != part.size:
            raise UpdaterError("Invalid size")
        log.info("writing %s (%d bytes) to the %s of slot %d", ev.name, ev.size, kind, self._target_slot)
        self._writer = self.storage.open_part(self._target_slot, kind, part)
        self._writer_kind = kind
        return UpdaterState.WAITING_FILE

    def _on_file_data(self, ev: EntryData) -> UpdaterState:
        assert self._writer is not None
        self._writer.feed(ev.data)
        return UpdaterState.WAITING_FILE

    def _on_file_end(self, ev: EntryEnd) -> UpdaterState:
        writer = self._writer
        assert writer is not None
        writer.close()
        writer.set_crc32(ev.crc32)
        writer.verify()
        self._done[self._writer_kind] = writer
        self._writer = None
        return UpdaterState.WAITING_FILE_HEADER

    def _on_skipped_data(self, ev: EntryData) -> UpdaterState:
        return UpdaterState.SKIPPING_DATA

    def _on_skipped_end(self, ev: EntryEnd) -> UpdaterState:
        return UpdaterState.WAITING_FILE_HEADER

    def _on_archive_end(self, ev: ArchiveEnd) -> UpdaterState:
        assert self.manifest is not None
        for part in self.manifest.parts.values():
            kind = part_target(part)
            if kind is not None and part.src and kind not in self._done:
                raise UpdaterError("Incomplete update package")
        self.status_message = "progress"
        return UpdaterState.WRITE_FINISHED
