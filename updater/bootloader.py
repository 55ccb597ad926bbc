"""Boot loader model and the running firmware's boot-state operations (OTA.Commit/Revert/...).

Scheme (the STM32/RS14100 mgos boot loader's FIRST_BOOT_A/FIRST_BOOT_B, spec/updater.md §6.2, on top
of the CC3200-style two-copy boot config of :mod:`updater.bootcfg`):

* ``finalize`` of an update writes: ``active = new slot``, ``revert = old slot``, COMMITTED cleared,
  FIRST_BOOT (the app's "dirty" flag, STM32's FIRST_BOOT_A) and BOOT_ATTEMPT (the boot loader's
  one-shot permit, STM32's FIRST_BOOT_B) set, MERGE_FS when the fs was updated, the commit timeout.
* At every boot (:meth:`BootLoader.boot`) the action comes from a table keyed by
  ``(committed, boot_attempt)``:

  ============================ ============================================================
  committed, BOOT_ATTEMPT      action
  ============================ ============================================================
  yes, any                     boot ``active_slot``
  no, set                      **first boot**: clear BOOT_ATTEMPT in the boot config
                               (written *before* the app runs), boot ``active_slot`` dirty
  no, clear                    **reboot without commit** (crash, hang, watchdog, power loss
                               during the first boot): fall back to ``revert_slot``, committed
  ============================ ============================================================

  So any reset between the first boot and the commit returns to the previous firmware: the
  consumed permit plays the role of the CC3200 tombstone.
* Before booting a slot the loader checks its app image against the length and CRC-32 stored in
  the boot config; a slot whose image is incomplete or damaged is never booted (the other slot
  is booted instead, if valid).
* The commit timeout is stored in the boot config and reported in the boot decision; the device
  arms a timer and calls :meth:`BootLoader.revert` if it expires while uncommitted.
* :meth:`commit`: COMMITTED set, FIRST_BOOT/BOOT_ATTEMPT/MERGE_FS cleared, timeout 0 (updater.dat
  deleted); ``revert_slot`` keeps the previous slot, as ``OTA.GetBootState`` shows it.
  :meth:`revert`: active and revert slots swap, committed.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .bootcfg import MAX_COMMIT_TIMEOUT_S, BootConfig, BootConfigStore, BootFlags, SlotState
from .errors import BootError, BootStateError, SnapshotError, UpdaterError
from .flash import Flash
from .partitions import SLOT_COUNT, Layout

__all__ = ["BOOT_STATE_KEYS", "BootDecision", "BootLoader", "image_digest"]

log = logging.getLogger("mgrpc.updater.bootloader")

BOOT_STATE_KEYS = ("active_slot", "is_committed", "revert_slot", "commit_timeout")
_CLEAR_ON_COMMIT = BootFlags.FIRST_BOOT | BootFlags.BOOT_ATTEMPT | BootFlags.MERGE_FS
_COPY_CHUNK = 64 * 1024


@dataclass(frozen=True)
class BootDecision:
    """What the boot loader did: the slot it boots and why."""

    slot: int
    first_boot: bool
    reverted: bool
    reason: str
    config: BootConfig

    @property
    def commit_timeout_s(self) -> int:
        """Commit timeout to arm (0 = none) when booting uncommitted."""
        return self.config.commit_timeout_s if self.first_boot else 0


def image_digest(flash: Flash, addr: int, length: int) -> tuple[int, bytes]:
    """CRC-32 and SHA-256 of ``length`` flash bytes at ``addr``, read in bounded pieces."""
    crc = 0
    sha = hashlib.sha256()
    for off in range(0, length, _COPY_CHUNK):
        data = flash.read(addr + off, min(_COPY_CHUNK, length - off))
        crc = zlib.crc32(data, crc)
        sha.update(data)
    return crc, sha.digest()


class BootLoader:
    """The boot decision and the boot-state operations over a :class:`BootConfigStore`."""

    def __init__(self, store: BootConfigStore) -> None:
        self.store = store
        self.flash: Flash = store.flash
        self.layout: Layout = store.layout
        self._actions = self._action_table()

    def _action_table(self) -> dict[tuple[bool, bool], Callable[[BootConfig], BootDecision]]:
        """The boot action per ``(committed, BOOT_ATTEMPT)`` (the table in the module doc)."""
        return {
            (True, False): self._boot_active,
            (True, True): self._boot_active,
            (False, True): self._first_boot,
            (False, False): self._reboot_without_commit,
        }

    # -- helpers -----------------------------------------------------------------------------------

    def load(self) -> BootConfig:
        """The current boot config; :class:`BootError` when the flash holds none."""
        cfg = self.store.load()
        if cfg is None:
            raise BootError("No valid boot config (unprovisioned flash)")
        return cfg

    def slot_valid(self, cfg: BootConfig, slot: int) -> bool:
        """Whether ``slot``'s app partition holds exactly the image the boot config describes."""
        state = cfg.slots[slot]
        part = self.layout.app[slot]
        if not 0 < state.app_len <= part.size:
            return False
        crc, _ = image_digest(self.flash, part.offset, state.app_len)
        return crc == state.app_crc32

    # -- boot --------------------------------------------------------------------------------------

    def boot(self) -> BootDecision:
        """Decide which slot to boot, writing the boot config first when the decision needs it."""
        cfg = self.load()
        action = self._actions[(cfg.committed, bool(cfg.flags & BootFlags.BOOT_ATTEMPT))]
        decision = action(cfg)
        log.info("boot: slot %d (%s)", decision.slot, decision.reason)
        return decision

    def _boot_active(self, cfg: BootConfig) -> BootDecision:
        if self.slot_valid(cfg, cfg.active_slot):
            return BootDecision(cfg.active_slot, not cfg.committed, False, "committed", cfg)
        return self._fall_back(cfg, f"slot {cfg.active_slot} image invalid")

    def _first_boot(self, cfg: BootConfig) -> BootDecision:
        if not self.slot_valid(cfg, cfg.active_slot):
            return self._fall_back(cfg, f"new slot {cfg.active_slot} image invalid")
        # Consume the one-shot permit before the new firmware runs: any reset from now on until
        # the commit falls back.
        cfg = self.store.save(cfg.with_flags(clear=BootFlags.BOOT_ATTEMPT))
        return BootDecision(cfg.active_slot, True, False, f"first boot of slot {cfg.active_slot}", cfg)

    def _reboot_without_commit(self, cfg: BootConfig) -> BootDecision:
        return self._fall_back(cfg, "reboot without commit")

    def _fall_back(self, cfg: BootConfig, why: str) -> BootDecision:
        target = cfg.revert_slot if cfg.revert_slot != cfg.active_slot else 1 - cfg.active_slot
        if self.slot_valid(cfg, target):
            new = replace(
                cfg, active_slot=target, revert_slot=cfg.active_slot, commit_timeout_s=0
            ).with_flags(set_=BootFlags.COMMITTED, clear=_CLEAR_ON_COMMIT)
            new = self.store.save(new)
            log.warning("boot: %s, reverting to slot %d", why, target)
            return BootDecision(target, False, True, f"{why}: reverted to slot {target}", new)
        if self.slot_valid(cfg, cfg.active_slot):
            # Nothing to go back to: keep running what we have rather than brick the device.
            log.warning("boot: %s, but slot %d is not bootable either; staying", why, target)
            return BootDecision(cfg.active_slot, not cfg.committed, False, f"{why}; no valid revert slot", cfg)
        raise BootError(f"No bootable slot ({why}; slot {target} invalid too)")

    # -- running firmware's operations ---------------------------------------------------------------

    def commit(self) -> bool:
        """Commit the running firmware. False if it already was committed (OTA.Commit -> -1)."""
        cfg = self.load()
        if cfg.committed:
            return False
        self.store.save(
            replace(cfg, commit_timeout_s=0).with_flags(set_=BootFlags.COMMITTED, clear=_CLEAR_ON_COMMIT)
        )
        log.info("slot %d committed", cfg.active_slot)
        return True

    def revert(self) -> bool:
        """Switch back to the revert slot (the caller then reboots). False if committed."""
        cfg = self.load()
        if cfg.committed:
            return False
        new = replace(cfg, active_slot=cfg.revert_slot, revert_slot=cfg.active_slot, commit_timeout_s=0)
        self.store.save(new.with_flags(set_=BootFlags.COMMITTED, clear=_CLEAR_ON_COMMIT))
        log.info("reverting from slot %d to slot %d", cfg.active_slot, cfg.revert_slot)
        return True

    def clear_merge_flag(self) -> BootConfig:
        """Record that the first-boot FS merge is done."""
        return self.store.save(self.load().with_flags(clear=BootFlags.MERGE_FS))

    def get_boot_state(self) -> dict[str, Any]:
        """OTA.GetBootState: ``active_slot, is_committed, revert_slot, commit_timeout`` in that order."""
        cfg = self.store.load()
        if cfg is None:
            raise BootStateError("Failed to get boot state", code=-1)
        return cfg.boot_state()

    def set_boot_state(self, **changes: Any) -> None:
        """OTA.SetBootState: apply any subset of the :data:`BOOT_STATE_KEYS`.

        Codes (ota.md §1.10): -1 no boot state, -2 no recognised field, -3 refused (slot not 0/1,
        wrong type, or a slot without a valid image made active), -4 bad commit timeout type.
        ``is_committed: false`` arms a one-shot first boot of ``active_slot`` (a reboot after it
        without a commit falls back to ``revert_slot``). ``commit_timeout < 0`` is ignored.
        """
        cfg = self.store.load()
        if cfg is None:
            raise BootStateError("Failed to get boot state", code=-1)
        known = {k: v for k, v in changes.items() if k in BOOT_STATE_KEYS and v is not None}
        if not known:
            raise BootStateError("No recognised field", code=-2)
        new = cfg
        for key in ("active_slot", "revert_slot"):
            if key in known:
                v = known[key]
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < SLOT_COUNT:
                    raise BootStateError(f"Invalid {key}", code=-3)
                new = replace(new, active_slot=v) if key == "active_slot" else replace(new, revert_slot=v)
        if "is_committed" in known:
            if not isinstance(known["is_committed"], bool):
                raise BootStateError("Invalid is_committed", code=-3)
            if known["is_committed"]:
                new = new.with_flags(set_=BootFlags.COMMITTED, clear=_CLEAR_ON_COMMIT)
            else:
                new = new.with_flags(set_=BootFlags.FIRST_BOOT | BootFlags.BOOT_ATTEMPT, clear=BootFlags.COMMITTED)
        if "commit_timeout" in known:
            t = known["commit_timeout"]
            if not isinstance(t, int) or isinstance(t, bool) or t > MAX_COMMIT_TIMEOUT_S:
                raise BootStateError("Failed to set commit timeout", code=-4)
            if t >= 0:
                new = replace(new, commit_timeout_s=t)
        if new.active_slot != cfg.active_slot and not self.slot_valid(new, new.active_slot):
            raise BootStateError(f"Slot {new.active_slot} has no valid image", code=-3)
        if new != cfg:
            self.store.save(new)

    def create_snapshot(self, *, set_as_revert: bool = False, commit_timeout: int = -1) -> int:
        """OTA.CreateSnapshot: copy the running app+fs into the other slot; returns that slot.

        With ``set_as_revert`` the running firmware becomes uncommitted with the snapshot as its
        revert slot (a reboot without commit boots the snapshot), and ``commit_timeout >= 0`` is
        stored. Errors carry the codes and messages of ota.md §1.8.
        """
        cfg = self.store.load()
        if cfg is None:
            raise SnapshotError("Failed to get boot state", code=-2)
        if not cfg.committed:
            raise SnapshotError("Cannot create snapshots in uncommitted state", code=-1)
        if commit_timeout > MAX_COMMIT_TIMEOUT_S:
            raise SnapshotError("Failed to set commit timeout", code=-4)
        src, dst = cfg.active_slot, 1 - cfg.active_slot
        state = cfg.slots[src]
        try:
            self._copy_slot(src, dst, state.app_len)
        except OSError as exc:  # FlashError is one too
            raise SnapshotError("Failed to create snapshot", code=-1) from exc
        new = cfg.with_slot(dst, state)
        if set_as_revert:
            new = replace(new, revert_slot=dst).with_flags(set_=BootFlags.FIRST_BOOT, clear=BootFlags.COMMITTED)
            if commit_timeout >= 0:
                new = replace(new, commit_timeout_s=commit_timeout)
        try:
            self.store.save(new)
        except OSError as exc:
            raise SnapshotError("Failed to set boot state", code=-3) from exc
        log.info("snapshot of slot %d written to slot %d", src, dst)
        return dst

    def _copy_slot(self, src: int, dst: int, app_len: int) -> None:
        """Copy slot ``src``'s app image (``app_len`` bytes) and whole fs over slot ``dst``'s."""
        self.copy_partition(self.layout.app[src].offset, self.layout.app[dst].offset, app_len)
        fs_src, fs_dst = self.layout.fs[src], self.layout.fs[dst]
        self.copy_partition(fs_src.offset, fs_dst.offset, fs_src.size)

    def finalize_update(
        self, slot: int, state: SlotState, *, running: int, fs_updated: bool, commit_timeout_s: int
    ) -> BootConfig:
        """Switch to the freshly written ``slot``: active, uncommitted, first boot pending (the
        one-shot BOOT_ATTEMPT permit), ``running`` as the revert slot, MERGE_FS when the fs was updated."""
        cfg = self.load()
        if slot == running:
            raise UpdaterError("Failed to set boot config")
        flags = BootFlags.FIRST_BOOT | BootFlags.BOOT_ATTEMPT | (BootFlags.MERGE_FS if fs_updated else 0)
        new = replace(
            cfg.with_slot(slot, state),
            active_slot=slot,
            revert_slot=running,
            commit_timeout_s=max(0, commit_timeout_s),
        ).with_flags(clear=BootFlags.COMMITTED | BootFlags.MERGE_FS)
        return self.store.save(new.with_flags(set_=BootFlags(flags)))

    def copy_partition(self, src: int, dst: int, length: int) -> None:
        """Erase the sectors covering ``[dst, dst+length)`` and copy ``length`` bytes from ``src``."""
        sector = self.flash.sector_size
        span = -(-length // sector) * sector
        for off in range(0, span, sector):
            self.flash.erase_sector((dst + off) // sector)
            n = min(sector, length - off)
            data = self.flash.read(src + off, n)
            if data.count(0xFF) != n:  # programming all-0xFF is a no-op; skip it
                self.flash.write(dst + off, data)
