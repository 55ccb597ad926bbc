"""What the device services see of the running firmware: identity, storage, FS, config, reboot.

:class:`Firmware` is the seam between the services (Sys.*, Config.*, FS.*, OTA.*) and whatever runs
them: the virtual device (:mod:`services.device`) or an embedder with its own platform. Services only
call the methods here, so they run on any platform that provides them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["DeviceFS", "Firmware", "MemoryFS", "mac_for"]


class DeviceFS(Protocol):
    """The device filesystem as the services use it (flat root directory, like SPIFFS/LittleFS root)."""

    def listdir(self, path: str = "/") -> list[str]:
        """Names in ``path``."""

    def exists(self, name: str) -> bool:
        """True if the file exists."""

    def size(self, name: str) -> int:
        """File size in bytes."""

    def read(self, name: str) -> bytes:
        """Whole file contents (``OSError`` subclass if missing)."""

    def write(self, name: str, data: bytes) -> None:
        """Create or replace a file."""

    def remove(self, name: str) -> None:
        """Delete a file (``OSError`` subclass if missing)."""

    def stat_fs(self) -> tuple[int, int]:
        """(used bytes, total bytes)."""


class MemoryFS:
    """A :class:`DeviceFS` in RAM, for embedders without flash and for tests."""

    def __init__(self, files: dict[str, bytes] | None = None, *, size: int = 256 * 1024) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.capacity = size

    def listdir(self, path: str = "/") -> list[str]:
        """Names in the root."""
        return sorted(self.files)

    def exists(self, name: str) -> bool:
        """True if the file exists."""
        return name.lstrip("/") in self.files

    def size(self, name: str) -> int:
        """File size."""
        return len(self.read(name))

    def read(self, name: str) -> bytes:
        """File contents."""
        try:
            return self.files[name.lstrip("/")]
        except KeyError:
            raise FileNotFoundError(name) from None

    def write(self, name: str, data: bytes) -> None:
        """Create or replace a file."""
        used = sum(len(v) for k, v in self.files.items() if k != name.lstrip("/"))
        if used + len(data) > self.capacity:
            raise OSError(28, "No space left on device")
        self.files[name.lstrip("/")] = bytes(data)

    def remove(self, name: str) -> None:
        """Delete a file."""
        try:
            del self.files[name.lstrip("/")]
        except KeyError:
            raise FileNotFoundError(name) from None

    def stat_fs(self) -> tuple[int, int]:
        """(used, capacity)."""
        return sum(len(v) for v in self.files.values()), self.capacity


def mac_for(device_id: str) -> str:
    """A stable, locally administered MAC address derived from the device id (``0AXXXXXXXXXX``)."""
    h = hashlib.sha1(device_id.encode()).digest()
    return "%02X%02X%02X%02X%02X%02X" % ((h[0] & 0xFC) | 0x02, h[1], h[2], h[3], h[4], h[5])


@dataclass
class Firmware:
    """The running firmware as services see it.

    ``storage`` is an :class:`updater.storage.DeviceStorage` (or None on a platform without OTA);
    ``fs`` the mounted filesystem of the running slot; ``reboot(delay_s)`` schedules a restart.
    """

    id: str
    arch: str
    app: str = "mgrpc-virtual"
    version: str = "1.0"
    build_id: str = ""
    mg_version: str = "2.20.0"
    mg_id: str = "mgrpc"
    fs: DeviceFS = field(default_factory=MemoryFS)
    storage: Any = None
    reboot: Callable[[float], None] = lambda delay_s: None
    ram_size: int = 327680
    ram_free: int = 204800
    boot_time: float = field(default_factory=time.monotonic)
    config: Any = None  # services.config.DeviceConfig, set by the device
    extra_info: dict[str, Any] = field(default_factory=dict)

    @property
    def mac(self) -> str:
        """The device MAC address (12 hex digits)."""
        return mac_for(self.id)

    @property
    def uptime_s(self) -> int:
        """Seconds since this firmware booted."""
        return int(time.monotonic() - self.boot_time)
