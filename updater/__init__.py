"""Layer-1 OTA updater: flash model, layout, boot config, boot loader, filesystems, fw.zip updater.

No RPC in here. A device uses :class:`DeviceStorage` (flash + boot + fs) and :class:`UpdaterContext`
(apply a fw.zip stream to the inactive slot); a Linux program :class:`FsSlotStorage` (slot directories
kept by a supervisor, :class:`FsSlots`); everything else is reachable from the submodules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bootcfg import BootConfig, BootConfigStore, BootFlags, SlotState
    from .bootloader import BootDecision, BootLoader
    from .context import UpdaterContext, UpdaterState
    from .errors import BootError, BootStateError, FlashError, PowerCut, SnapshotError, UpdaterError
    from .flash import Flash, FlashStats
    from .fs import FlashFS, FSError, make_fs_image, merge_fs
    from .fsslots import DirFS, FsSlots, FsSlotStorage
    from .partitions import Layout, Partition, default_layout, make_layout
    from .storage import BootInfo, DeviceStorage

# Imported on first use: ``import updater.errors`` (the CLI, transports) loads nothing else.
_LAZY = {
    "BootConfig": "bootcfg",
    "BootConfigStore": "bootcfg",
    "BootFlags": "bootcfg",
    "SlotState": "bootcfg",
    "BootDecision": "bootloader",
    "BootLoader": "bootloader",
    "UpdaterContext": "context",
    "UpdaterState": "context",
    "BootError": "errors",
    "BootStateError": "errors",
    "FlashError": "errors",
    "PowerCut": "errors",
    "SnapshotError": "errors",
    "UpdaterError": "errors",
    "Flash": "flash",
    "FlashStats": "flash",
    "FlashFS": "fs",
    "FSError": "fs",
    "make_fs_image": "fs",
    "merge_fs": "fs",
    "DirFS": "fsslots",
    "FsSlots": "fsslots",
    "FsSlotStorage": "fsslots",
    "Layout": "partitions",
    "Partition": "partitions",
    "default_layout": "partitions",
    "make_layout": "partitions",
    "BootInfo": "storage",
    "DeviceStorage": "storage",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'updater' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "BootConfig",
    "BootConfigStore",
    "BootDecision",
    "BootError",
    "BootFlags",
    "BootInfo",
    "BootLoader",
    "BootStateError",
    "DeviceStorage",
    "DirFS",
    "FSError",
    "Flash",
    "FlashError",
    "FlashFS",
    "FlashStats",
    "FsSlotStorage",
    "FsSlots",
    "Layout",
    "Partition",
    "PowerCut",
    "SlotState",
    "SnapshotError",
    "UpdaterContext",
    "UpdaterError",
    "UpdaterState",
    "default_layout",
    "make_fs_image",
    "make_layout",
    "merge_fs",
]
