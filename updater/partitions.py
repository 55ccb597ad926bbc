"""Flash layout of the virtual device: boot config copies, then two app+fs slot pairs.

::

    offset                          size           name
    0                               1 sector       bootcfg0   (boot config copy 0)
    sector                          1 sector       bootcfg1   (boot config copy 1)
    2*sector                        app_size       app_0
    ..                              fs_size        fs_0
    ..                              app_size       app_1
    ..                              fs_size        fs_1

Slot ``n`` is the pair ``app_n`` + ``fs_n`` (like the ESP32 partition table: ``app_0``/``fs_0``,
``app_1``/``fs_1``). Every partition is sector-aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flash import DEFAULT_SECTOR_SIZE

__all__ = ["SLOT_COUNT", "Layout", "Partition", "default_layout", "make_layout"]

SLOT_COUNT = 2


@dataclass(frozen=True)
class Partition:
    """A named, sector-aligned byte range of the flash."""

    name: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        """First byte after the partition."""
        return self.offset + self.size


@dataclass(frozen=True)
class Layout:
    """The partition table: boot config copies and the per-slot app and fs partitions."""

    sector_size: int
    bootcfg: tuple[Partition, Partition]
    app: tuple[Partition, Partition]
    fs: tuple[Partition, Partition]

    @property
    def total_size(self) -> int:
        """Flash size this layout needs."""
        return max(p.end for p in self.partitions)

    @property
    def partitions(self) -> tuple[Partition, ...]:
        """All partitions in flash order."""
        return tuple(sorted((*self.bootcfg, *self.app, *self.fs), key=lambda p: p.offset))

    def by_name(self, name: str) -> Partition:
        """The partition called ``name`` (``app_0``, ``fs_1``, ``bootcfg0``, ...)."""
        for p in self.partitions:
            if p.name == name:
                return p
        raise KeyError(f"no partition {name!r} (have {', '.join(p.name for p in self.partitions)})")

    @property
    def fs_block_count(self) -> int:
        """LittleFS block count of one fs partition (block size = sector size)."""
        return self.fs[0].size // self.sector_size


def make_layout(*, sector_size: int = DEFAULT_SECTOR_SIZE, app_size: int, fs_size: int) -> Layout:
    """Build a layout; sizes are rounded up to whole sectors."""
    if sector_size <= 0 or sector_size & (sector_size - 1):
        raise ValueError(f"sector_size must be a power of two, got {sector_size}")

    def up(n: int) -> int:
        return -(-n // sector_size) * sector_size

    app_size, fs_size = up(app_size), up(fs_size)
    if app_size <= 0 or fs_size < 2 * sector_size:
        raise ValueError("app_size must be > 0 and fs_size at least two sectors (LittleFS minimum)")
    cfg = (Partition("bootcfg0", 0, sector_size), Partition("bootcfg1", sector_size, sector_size))
    off = 2 * sector_size
    apps: list[Partition] = []
    fss: list[Partition] = []
    for slot in range(SLOT_COUNT):
        apps.append(Partition(f"app_{slot}", off, app_size))
        off += app_size
        fss.append(Partition(f"fs_{slot}", off, fs_size))
        off += fs_size
    return Layout(sector_size, cfg, (apps[0], apps[1]), (fss[0], fss[1]))


def default_layout() -> Layout:
    """The virtual device's layout: 4 KiB sectors, 1 MiB app slots, 256 KiB fs (a 2.5 MiB flash file)."""
    return make_layout(sector_size=DEFAULT_SECTOR_SIZE, app_size=1 << 20, fs_size=256 << 10)
