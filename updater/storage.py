"""DeviceStorage: the one object a (virtual) device needs from Layer 1.

It bundles the flash, the layout, the boot config, the boot loader and the filesystems::

    st = DeviceStorage.open("dev.flash")            # or DeviceStorage.in_memory()
    if st.config is None:                           # fresh flash: provision slot 0
        st.factory_init(app_image, {"conf0.json": b"{}"})
    info = st.boot()                                # boot-loader decision + first-boot FS merge
    # ... the firmware runs st.fs() (FS.*, Config.*) ...
    # first boot (info.first_boot): after a successful init, commit at once when
    # info.commit_timeout_s == 0, else arm a timer; when it fires call
    # st.commit_timeout_expired() (reverts if still uncommitted) and reboot. Init failed: st.revert().
    ctx = UpdaterContext(st, arch="esp32", commit_timeout_s=300)   # OTA: feed fw.zip
    ...
    st.commit() / st.revert() / st.get_boot_state() / st.set_boot_state(...) / st.create_snapshot(...)

A "reboot" is simply a new :meth:`boot` call (or a new ``DeviceStorage`` on the same file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .bootcfg import BootConfig, BootConfigStore, BootFlags, SlotState
from .bootloader import BootLoader
from .errors import BootError, UpdaterError
from .flash import Flash
from .fs import FlashFS, FSError, make_fs_image, merge_fs
from .manifest import Part
from .partitions import Layout, default_layout
from .slotstorage import FlashPartWriter

__all__ = ["BootInfo", "DeviceStorage"]

log = logging.getLogger("mgrpc.updater.storage")


@dataclass(frozen=True)
class BootInfo:
    """Result of :meth:`DeviceStorage.boot`.

    ``first_boot``: the slot runs uncommitted (arm ``commit_timeout_s`` or commit after init);
    ``reverted``: the boot loader fell back to the other slot (``reason`` says why);
    ``merged_files``: files the first-boot FS merge copied from the old slot.
    """

    slot: int
    first_boot: bool
    commit_timeout_s: int
    reverted: bool
    reason: str = ""
    merged_files: tuple[str, ...] = ()
    version: str = ""
    build_id: str = ""


def image_identity(app_image: bytes) -> tuple[str, str]:
    """``(version, build_id)`` from a virtual-device firmware header, ``("", "")`` if it has none."""
    try:
        from .firmware import FirmwareImage  # the image format is optional for raw images

        fw: Any = FirmwareImage.parse(app_image)
    except (ImportError, UpdaterError, ValueError):
        return "", ""
    return str(getattr(fw, "version", "")), str(getattr(fw, "build_id", ""))


class DeviceStorage:
    """Flash + layout + boot config + boot loader + filesystems of one device."""

    def __init__(self, flash: Flash, layout: Layout) -> None:
        if flash.sector_size != layout.sector_size or flash.size < layout.total_size:
            raise ValueError(
                f"flash ({flash.size} bytes, sector {flash.sector_size}) does not fit the layout "
                f"({layout.total_size} bytes, sector {layout.sector_size})"
            )
        self.flash = flash
        self.layout = layout
        self.bootcfg = BootConfigStore(flash, layout)
        self.loader = BootLoader(self.bootcfg)
        self._running: int | None = None
        self._running_fs: FlashFS | None = None
        self.boot_info: BootInfo | None = None

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, layout: Layout | None = None, create: bool = True
    ) -> DeviceStorage:
        """Open (or create, erased) the flash file at ``path`` with ``layout`` (default layout)."""
        layout = layout or default_layout()
        flash = Flash(path, size=layout.total_size, sector_size=layout.sector_size, create=create)
        return cls(flash, layout)

    @classmethod
    def in_memory(cls, *, layout: Layout | None = None) -> DeviceStorage:
        """A device whose flash lives in RAM (tests)."""
        layout = layout or default_layout()
        return cls(Flash(None, size=layout.total_size, sector_size=layout.sector_size), layout)

    def close(self) -> None:
        """Close the flash file."""
        self.flash.close()

    def __enter__(self) -> DeviceStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state ------------------------------------------------------------------------------------

    @property
    def config(self) -> BootConfig | None:
        """The current boot config record (None on an unprovisioned flash)."""
        return self.bootcfg.load()

    @property
    def running_slot(self) -> int:
        """The slot the firmware runs from (the booted one; before :meth:`boot`, the active one)."""
        if self._running is not None:
            return self._running
        return self.loader.load().active_slot

    @property
    def inactive_slot(self) -> int:
        """The slot updates and snapshots are written to."""
        return 1 - self.running_slot

    @property
    def reboot_pending(self) -> bool:
        """The boot config now selects another slot than the running one (revert/switch done, not rebooted)."""
        return self._running is not None and self._running != self.loader.load().active_slot

    @property
    def is_committed(self) -> bool:
        """Whether the running firmware is committed."""
        return self.loader.load().committed

    def slot_state(self, slot: int) -> SlotState:
        """What the boot config records about ``slot``'s app image."""
        return self.loader.load().slots[slot]

    @property
    def running_version(self) -> str:
        """Manifest version of the running firmware."""
        return self.slot_state(self.running_slot).version

    @property
    def running_build_id(self) -> str:
        """Manifest build_id of the running firmware."""
        return self.slot_state(self.running_slot).build_id

    # -- provisioning, boot ------------------------------------------------------------------------

    def factory_init(
        self,
        app_image: bytes,
        fs_files: Mapping[str, bytes],
        *,
        version: str | None = None,
        build_id: str | None = None,
    ) -> None:
        """Provision a fresh device: chip erase, app + fs in slot 0, slot 0 committed.

        ``version``/``build_id`` default to the ones in the firmware image header (if any).
        """
        app_part, fs_part = self.layout.app[0], self.layout.fs[0]
        if len(app_image) > app_part.size:
            raise UpdaterError("Image too big")
        if version is None or build_id is None:
            v, b = image_identity(app_image)
            version = v if version is None else version
            build_id = b if build_id is None else build_id
        self.flash.erase(0, self.layout.total_size)
        self._write(app_part.offset, app_image)
        fs_image = make_fs_image(
            fs_files, block_size=self.layout.sector_size, block_count=self.layout.fs_block_count
        )
        self._write(fs_part.offset, fs_image)
        state = SlotState(
            len(app_image), zlib.crc32(app_image), hashlib.sha256(app_image).digest(), version, build_id
        )
        cfg = BootConfig(active_slot=0, revert_slot=1, flags=BootFlags.COMMITTED).with_slot(0, state)
        self.bootcfg.save(cfg)
        self._running = None
        self._running_fs = None
        self.boot_info = None

    def _write(self, addr: int, data: bytes) -> None:
        sector = self.layout.sector_size
        for off in range(0, len(data), sector):
            piece = data[off : off + sector]
            if piece.count(0xFF) != len(piece):
                self.flash.write(addr + off, piece)

    def boot(self) -> BootInfo:
        """Power-on: boot-loader decision, then (first boot with MERGE_FS) the FS merge.

        The merge runs before the MERGE_FS flag is cleared, so a cut during it is just a reboot
        without commit (the boot loader falls back to the old slot, whose FS was only read). A new
        FS that cannot be mounted counts as a failed init: revert, and boot again.
        """
        self._running = None
        self._running_fs = None
        decision = self.loader.boot()
        cfg = decision.config
        merged: tuple[str, ...] = ()
        if decision.first_boot and cfg.flags & BootFlags.MERGE_FS:
            try:
                new_fs = self.fs(decision.slot)
            except FSError as exc:
                return self._init_failed(decision.slot, f"fs of slot {decision.slot} does not mount", exc)
            try:
                old_fs: FlashFS | None = self.fs(cfg.revert_slot)
            except FSError as exc:
                log.warning("old fs of slot %d does not mount (%s); nothing to merge", cfg.revert_slot, exc)
                old_fs = None
            if old_fs is not None:
                try:
                    merged = tuple(merge_fs(old_fs, new_fs))
                except FSError as exc:  # e.g. the old files do not fit the new fs
                    return self._init_failed(decision.slot, f"fs merge into slot {decision.slot} failed", exc)
            cfg = self.loader.clear_merge_flag()
        state = cfg.slots[decision.slot]
        self._running = decision.slot
        self.boot_info = BootInfo(
            slot=decision.slot,
            first_boot=decision.first_boot,
            commit_timeout_s=cfg.commit_timeout_s if decision.first_boot else 0,
            reverted=decision.reverted,
            reason=decision.reason,
            merged_files=merged,
            version=state.version,
            build_id=state.build_id,
        )
        return self.boot_info

    def _init_failed(self, slot: int, why: str, exc: Exception) -> BootInfo:
        """A first boot that cannot finish its init: revert and boot again (the old slot)."""
        log.error("first boot of slot %d: %s (%s); reverting", slot, why, exc)
        self.loader.revert()
        info = self.boot()
        self.boot_info = replace(info, reverted=True, reason=f"{why}: reverted")
        return self.boot_info

    # -- running firmware's operations ---------------------------------------------------------------

    def commit(self) -> bool:
        """Commit the running firmware (False if already committed).

        Also False while a switch waits for its reboot (an update applied, not yet booted): the
        running firmware is the old, committed one, and committing the new one before it ever ran
        would take away its fallback.
        """
        if self.reboot_pending:
            return False
        return self.loader.commit()

    def revert(self) -> bool:
        """Switch back to the revert slot; the caller reboots (:meth:`boot`). False if committed."""
        return self.loader.revert()

    def commit_timeout_expired(self) -> bool:
        """The device's commit timer fired: revert if still uncommitted (then reboot with :meth:`boot`)."""
        if self.is_committed:
            return False
        log.warning("Update commit timeout expired")
        return self.revert()

    def get_boot_state(self) -> dict[str, Any]:
        """OTA.GetBootState result (see :meth:`BootLoader.get_boot_state`)."""
        return self.loader.get_boot_state()

    def set_boot_state(self, **changes: Any) -> None:
        """OTA.SetBootState (see :meth:`BootLoader.set_boot_state`)."""
        self.loader.set_boot_state(**changes)

    def create_snapshot(self, *, set_as_revert: bool = False, commit_timeout: int = -1) -> int:
        """OTA.CreateSnapshot (see :meth:`BootLoader.create_snapshot`)."""
        if self._running is not None and self._running != self.loader.load().active_slot:
            raise BootError("running slot is not the active slot")
        return self.loader.create_snapshot(set_as_revert=set_as_revert, commit_timeout=commit_timeout)

    def fs(self, slot: int | None = None) -> FlashFS:
        """The filesystem of ``slot`` (default: the running slot). :class:`FSError` if it won't mount.

        The running slot's FS is mounted once per boot and shared: two independent LittleFS mounts
        writing the same partition would each trust their own allocator state and corrupt it.
        Other slots get a fresh mount per call (they are only read, or written by the boot merge).
        """
        running = self.running_slot
        if slot is not None and slot != running:
            return FlashFS(self.flash, self.layout.fs[slot])
        if self._running_fs is None or self._running_fs.part != self.layout.fs[running]:
            self._running_fs = FlashFS(self.flash, self.layout.fs[running], grow=True)
        return self._running_fs

    def read_app(self, slot: int | None = None) -> bytes:
        """The app image of ``slot`` as written (length from the boot config)."""
        slot = self.running_slot if slot is None else slot
        state = self.slot_state(slot)
        return self.flash.read(self.layout.app[slot].offset, state.app_len)

    # -- the storage seam (updater.slotstorage.SlotStorage), used by UpdaterContext -------------------

    def begin_slot(self, slot: int) -> None:
        """Nothing to prepare: each sector is erased when the write first enters it."""

    def part_capacity(self, slot: int, kind: str) -> int:
        """The size of ``slot``'s ``app`` or ``fs`` partition."""
        return (self.layout.app if kind == "app" else self.layout.fs)[slot].size

    def open_part(self, slot: int, kind: str, part: Part) -> FlashPartWriter:
        """A writer streaming the part into ``slot``'s ``app`` or ``fs`` partition."""
        partition = (self.layout.app if kind == "app" else self.layout.fs)[slot]
        return FlashPartWriter(self.flash, partition, part, kind=kind)

    def copy_fs(self, src_slot: int, dst_slot: int) -> None:
        """Copy the whole fs partition of ``src_slot`` over ``dst_slot``'s (app-only updates)."""
        if dst_slot == self.running_slot:
            raise UpdaterError("Failed to write data")
        src, dst = self.layout.fs[src_slot], self.layout.fs[dst_slot]
        self.loader.copy_partition(src.offset, dst.offset, src.size)

    def finalize_update(
        self, slot: int, state: SlotState, *, fs_updated: bool, commit_timeout_s: int
    ) -> BootConfig:
        """Switch the boot config to the freshly written ``slot`` (uncommitted, first boot pending)."""
        return self.loader.finalize_update(
            slot, state, running=self.running_slot, fs_updated=fs_updated, commit_timeout_s=commit_timeout_s
        )
