"""The device filesystem: LittleFS images in the ``fs_N`` partitions, and the first-boot FS merge.

A :class:`FlashFS` is a LittleFS (littlefs-python) mounted over one flash partition: block size = flash
sector size, block count = partition size / sector size. Every LittleFS read/program/erase goes to the
emulated flash, so FS writes are counted and can be cut like any other flash operation. LittleFS is
copy-on-write; a cut in the middle of a file write leaves the previous state of the FS.

littlefs-python calls our block callbacks from C and swallows exceptions raised there, so a
:class:`~updater.errors.PowerCut` inside a callback is remembered, reported to LittleFS as an I/O error,
and re-raised once the LittleFS call returns.

The merge (spec/updater.md §5.3): every regular file in the *root* of the old slot's FS that the new FS
lacks is copied into the new FS; files shipped in the new image win (so ``conf9.json`` survives an update
unless the new image ships one). Copying only missing files makes it idempotent: re-running it after an
interruption copies what is still missing and nothing else.
"""

from __future__ import annotations

import builtins
import importlib
import logging
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import FlashError, MissingExtra, PowerCut, UpdaterError
from .flash import Flash
from .partitions import Partition

if TYPE_CHECKING:
    import littlefs

__all__ = ["FSError", "FlashFS", "make_fs_image", "merge_fs"]

log = logging.getLogger("mgrpc.updater.fs")

# LittleFS geometry knobs besides block size/count. Images built by make_fs_image() use the same ones.
READ_SIZE = 16
PROG_SIZE = 16
CACHE_SIZE = 512  # bigger caches mean fewer, larger flash programs (fewer ops to cut in tests)
LOOKAHEAD_SIZE = 32
NAME_MAX = 255
TMP_SUFFIX = ".~tmp"  # suffix of a file being written (see FlashFS.write)

T = TypeVar("T")


class FSError(UpdaterError, OSError):
    """A filesystem operation failed (not mountable, missing file, no space, ...)."""

    def __init__(self, message: str, *, code: int = -1) -> None:
        super().__init__(message, code=code)


def _littlefs() -> tuple[ModuleType, ModuleType]:
    """``littlefs`` and ``littlefs.lfs``, imported on first use; a missing package names the extra."""
    try:
        return importlib.import_module("littlefs"), importlib.import_module("littlefs.lfs")
    except ImportError:
        raise MissingExtra("Device filesystems (LittleFS)", "littlefs-python", "fs") from None


_context_class: type | None = None


def _new_context(flash: Flash, part: Partition) -> _FlashCallbacks:
    """A :class:`_FlashCallbacks` that is also the ``littlefs.UserContext`` LittleFS requires."""
    global _context_class
    if _context_class is None:
        littlefs, _ = _littlefs()
        _context_class = type("_FlashContext", (_FlashCallbacks, littlefs.UserContext), {})
    ctx: _FlashCallbacks = _context_class(flash, part)
    return ctx


class _FlashCallbacks:
    """LittleFS block device callbacks over a flash partition (made a ``UserContext`` by _new_context)."""

    def __init__(self, flash: Flash, part: Partition) -> None:
        # Deliberately not calling UserContext.__init__: it would allocate a RAM buffer.
        self.flash = flash
        self.part = part
        self.in_size = part.size
        self.cut: PowerCut | None = None
        self.error: Exception | None = None

    def _guard(self, fn: Callable[[], T], fail: T) -> T:
        try:
            return fn()
        except PowerCut as exc:
            self.cut = exc
        except FlashError as exc:
            self.error = exc
        return fail

    def read(self, cfg: Any, block: int, off: int, size: int) -> bytearray:
        addr = self.part.offset + block * cfg.block_size + off
        return self._guard(lambda: bytearray(self.flash.read(addr, size)), bytearray(b"\xff" * size))

    def prog(self, cfg: Any, block: int, off: int, data: bytes) -> int:
        addr = self.part.offset + block * cfg.block_size + off

        def do() -> int:
            self.flash.write(addr, data)
            return 0

        return self._guard(do, -5)  # LFS_ERR_IO

    def erase(self, cfg: Any, block: int) -> int:
        def do() -> int:
            self.flash.erase(self.part.offset + block * cfg.block_size, cfg.block_size)
            return 0

        return self._guard(do, -5)

    def sync(self, cfg: Any) -> int:
        return 0


class FlashFS:
    """A LittleFS over a flash partition. Raises :class:`FSError` when it cannot be mounted."""

    def __init__(self, flash: Flash, part: Partition, *, format_if_blank: bool = False, grow: bool = False) -> None:
        self.flash = flash
        self.part = part
        self._ctx = _new_context(flash, part)
        blocks = part.size // flash.sector_size
        # Mount with the block count the image's superblock records: a bundle's fs image may be
        # smaller than the partition (its manifest fs_size); ``grow`` then extends it to the whole
        # partition (one atomic metadata commit), which is done only for the running slot.
        self._fs = self._lfs(0)
        try:
            self._call(self._fs.mount)
        except FSError:
            if not format_if_blank:
                raise
            self._fs = self._lfs(blocks)
            self._call(self._fs.format)
            self._call(self._fs.mount)
        have = int(self._fs.block_count)
        if have > blocks:
            self._call(self._fs.unmount)
            raise FSError(f"{part.name}: fs image of {have} blocks does not fit the {blocks}-block partition")
        if grow and have < blocks:
            self._call(self._fs.fs_grow, blocks)

    def _lfs(self, block_count: int) -> littlefs.LittleFS:
        littlefs, _ = _littlefs()
        return littlefs.LittleFS(
            self._ctx,
            mount=False,
            block_size=self.flash.sector_size,
            block_count=block_count,
            read_size=READ_SIZE,
            prog_size=PROG_SIZE,
            cache_size=min(CACHE_SIZE, self.flash.sector_size),
            lookahead_size=LOOKAHEAD_SIZE,
            name_max=NAME_MAX,
        )

    def _call(self, fn: Callable[..., T], *args: Any, name: str = "") -> T:
        """Run one LittleFS call; re-raise a power cut or flash error seen inside a callback."""
        littlefs, _ = _littlefs()
        self._ctx.cut = self._ctx.error = None
        try:
            result = fn(*args)
        except littlefs.LittleFSError as exc:
            if self._ctx.cut is not None:
                raise self._ctx.cut from None
            if self._ctx.error is not None:
                raise FSError(f"{self.part.name}: {self._ctx.error}") from None
            if exc.code == littlefs.LittleFSError.Error.LFS_ERR_NOENT:
                raise FSError(f"{self.part.name}: no such file: {name or (args[0] if args else '')}") from None
            raise FSError(f"{self.part.name}: {exc}") from None
        except FileNotFoundError as exc:
            raise FSError(f"{self.part.name}: no such file: {name or (args[0] if args else exc)}") from None
        if self._ctx.cut is not None:
            raise self._ctx.cut
        return result

    def list(self, path: str = "/") -> list[str]:
        """Names of the files (not directories) in directory ``path``, sorted."""
        littlefs, _ = _littlefs()
        entries = self._call(self._fs.scandir, path)
        return sorted(
            e.name for e in entries if e.type == littlefs.LFSStat.TYPE_REG and not e.name.endswith(TMP_SUFFIX)
        )

    def listdir(self, path: str = "/") -> builtins.list[str]:
        """Names of every entry (files and directories) in ``path``, sorted (temp files hidden)."""
        return sorted(n for n in self._call(self._fs.listdir, path) if not n.endswith(TMP_SUFFIX))

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists."""
        try:
            self._call(self._fs.stat, name)
        except FSError:
            return False
        return True

    def size(self, name: str) -> int:
        """Size of file ``name`` in bytes."""
        return int(self._call(self._fs.stat, name).size)

    def read(self, name: str) -> bytes:
        """Whole content of file ``name``."""
        _, lfs = _littlefs()
        fs = self._fs.fs

        def do() -> bytes:
            fh = lfs.file_open(fs, name, "rb")
            try:
                return bytes(lfs.file_read(fs, fh, lfs.file_size(fs, fh)))
            finally:
                lfs.file_close(fs, fh)

        return self._call(do, name=name)

    def write(self, name: str, data: bytes) -> None:
        """Create or replace file ``name`` atomically.

        LittleFS creates a file's directory entry at open and commits its data at close, so a cut in
        between would leave an empty file under the real name (and a merge re-run would then think
        the file is there). The data therefore goes to ``name + TMP_SUFFIX`` first and is renamed over
        ``name`` (an atomic LittleFS commit) once complete. Leftover temp files are hidden by
        :meth:`list` and overwritten by the next write of that name.
        """
        _, lfs = _littlefs()
        fs = self._fs.fs
        tmp = name + TMP_SUFFIX

        def do() -> None:
            # The raw lfs calls, not LittleFS.open(): its FileHandle retries a failed close when it is
            # garbage-collected, which trips an assertion in littlefs after a power cut. Here the
            # handle is closed exactly once, whatever happens.
            fh = lfs.file_open(fs, tmp, "wb")
            try:
                lfs.file_write(fs, fh, bytes(data))
            finally:
                lfs.file_close(fs, fh)
            lfs.rename(fs, tmp, name)

        self._call(do, name=name)

    def remove(self, name: str) -> None:
        """Delete file ``name``."""
        self._call(self._fs.remove, name)

    def files(self) -> dict[str, bytes]:
        """All root files with their content (small filesystems; tests and merges)."""
        return {n: self.read(n) for n in self.list()}

    def stat_fs(self) -> tuple[int, int]:
        """``(used_bytes, total_bytes)``."""
        used_blocks = int(self._call(lambda: self._fs.used_block_count))
        return used_blocks * self.flash.sector_size, self.part.size

    def unmount(self) -> None:
        """Unmount (LittleFS keeps no dirty state between calls; this is for symmetry)."""
        try:
            self._call(self._fs.unmount)
        except FSError:
            pass


def merge_fs(old: Any, new: Any, *, should_copy: Callable[[str], bool] | None = None) -> list[str]:
    """Copy every root file of ``old`` that ``new`` lacks into ``new``; returns the copied names.

    Any filesystem with ``list``/``listdir``/``read``/``write`` will do: a :class:`FlashFS` or a
    data directory (:class:`updater.fsslots.DirFS`).
    """
    present: set[str] = set(new.listdir())
    copied = []
    for name in old.list():
        if name in present or (should_copy is not None and not should_copy(name)):
            continue
        new.write(name, old.read(name))
        copied.append(name)
    if copied:
        log.info("FS merge: copied %s from %s to %s", ", ".join(copied), _label(old), _label(new))
    return copied


def _label(fs: Any) -> str:
    """A filesystem's name for logs: its partition's, or its own ``name`` (a directory)."""
    part = getattr(fs, "part", None)
    return str(part.name if part is not None else getattr(fs, "name", fs))


def make_fs_image(files: Mapping[str, bytes], *, block_size: int, block_count: int) -> bytes:
    """A LittleFS image (``block_size * block_count`` bytes) holding ``files`` in its root."""
    size = block_size * block_count
    flash = Flash(None, size=size, sector_size=block_size)
    fs = FlashFS(flash, Partition("fs", 0, size), format_if_blank=True)
    for name, data in files.items():
        fs.write(name, data)
    return flash.snapshot()
