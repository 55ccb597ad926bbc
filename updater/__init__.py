"""Layer-1 OTA updater: flash model, layout, boot config, boot loader, filesystems, fw.zip updater.

No RPC in here. A device uses :class:`DeviceStorage` (flash + boot + fs) and :class:`UpdaterContext`
(apply a fw.zip stream to the inactive slot); everything else is reachable from the submodules.
"""

from __future__ import annotations

from .bootcfg import BootConfig, BootConfigStore, BootFlags, SlotState
from .bootloader import BootDecision, BootLoader
from .context import UpdaterContext, UpdaterState
from .errors import BootError, BootStateError, FlashError, PowerCut, SnapshotError, UpdaterError
from .flash import Flash, FlashStats
from .fs import FlashFS, FSError, make_fs_image, merge_fs
from .partitions import Layout, Partition, default_layout, make_layout
from .storage import BootInfo, DeviceStorage

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
    "FSError",
    "Flash",
    "FlashError",
    "FlashFS",
    "FlashStats",
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
