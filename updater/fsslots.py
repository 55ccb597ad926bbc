"""Filesystem slots: A/B updates of a program on a Linux device, with the boot config's guarantees.

A *slots directory* holds two slots and a state record::

    DIR/state.0, DIR/state.1   two copies of the state record (the boot config record of
                               updater.bootcfg: 512 bytes, sequence counting down, CRC-checked;
                               a missing or torn copy is the oldest/invalid one)
    DIR/slot0/, DIR/slot1/     app/ (the program's files), data/ (its data directory: config, FS.*),
                               slot.json (what was installed: image digest, length, the file list)
    DIR/staging/               the slot an update or a snapshot is building; becomes slotN at finish
    DIR/trash/                 a replaced slot on its way out

Each record copy is written atomically: temp file, ``fsync``, ``rename`` over the copy, ``fsync`` of
the directory; the older copy is the one replaced, so a failure at any step leaves the previous record
winning (:class:`StateStore`). The boot decision, commit, revert, SetBootState and snapshots are those
of :class:`updater.bootloader.BootLoader` (:class:`FsBootLoader` only changes what a valid slot is
and how a slot is copied).

Two sides, as on a device with a boot loader:

* :class:`FsSlots` is the boot loader: it decides which slot to start, merges the data directory on a
  first boot, and **is the only writer of the state record**. The supervisor
  (``mgrpc supervise``, :mod:`mgrpc.supervisor`) owns it.
* :class:`FsSlotStorage` is what the running program uses (the :class:`~updater.slotstorage.SlotStorage`
  seam for :class:`~updater.context.UpdaterContext` and the OTA service). It writes the inactive slot's
  files (``staging/``, then swapped in) and asks the boot loader for every record change through a
  :class:`SlotControl`: :class:`SupervisorClient` (the supervisor's UNIX socket) or :class:`LocalControl`
  (an in-process :class:`FsSlots`, for tests and programs run without a supervisor).

Bundles: the **app part is a tar archive** of the program's files, extracted as it streams in
(:class:`TarExtractor`): the part's size and SHA-1/SHA-256 are checked as on flash, every header's
checksum too; absolute paths, ``..``, links that leave the slot, hard links to anything but an earlier
member, special files and entries bigger than ``max_file_bytes`` are refused (``Unsafe archive: ...``),
and so is more than the slot's capacity (``Image too big``). The **fs part is a tar of the data
directory**, extracted the same way; after a first boot with an fs part the old slot's root data files
the new one lacks are copied in (:func:`updater.fs.merge_fs`, the device's config merge). Without an fs
part the new slot gets a copy of the running data directory.

A slot is valid when its ``slot.json`` names the image length and SHA-256 the record has for it and
every file it lists is there with its size; an update therefore replaces the inactive slot's
directory only by renames, and a half-installed slot is simply invalid.

The supervisor protocol (:class:`SupervisorClient`): one JSON object per line over a UNIX stream
socket (``MGRPC_SUPERVISOR``; a name starting with ``@`` is in the abstract namespace), one request
per connection: ``{"op": OP, "boot": MGRPC_BOOT_ID, ...}`` answered by ``{"ok": true, "result": R}`` or
``{"ok": false, "error": TEXT, "code": N, "kind": K}``. Ops: ``heartbeat``, ``commit``, ``revert``,
``finalize``, ``set_boot_state``, ``snapshot``, ``reboot``. A request with another boot's id is
refused with kind ``stale`` (a program left over from an earlier start must stop). The boot id is
also the credential: it reaches the program only through its environment, which other users cannot
read, so nobody else on the machine can commit, revert or switch slots through the socket.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from .bootcfg import BootConfig, BootFlags, SlotState, decode_record, encode_record, newest, next_record
from .bootloader import BootLoader
from .errors import BootError, BootStateError, SnapshotError, UpdaterError
from .fs import merge_fs
from .manifest import Part
from .slotstorage import verify_digests
from .storage import BootInfo
from .tarstream import (
    DIRECTORY,
    HARDLINK,
    REGULAR,
    SYMLINK,
    TarData,
    TarMember,
    TarMemberEnd,
    TarStreamParser,
)

__all__ = [
    "DEFAULT_APP_CAPACITY",
    "DEFAULT_DATA_CAPACITY",
    "DEFAULT_MAX_FILE_BYTES",
    "ENV_BOOT_ID",
    "ENV_DATA_DIR",
    "ENV_RPC_URL",
    "ENV_SLOT",
    "ENV_SLOTS",
    "ENV_SLOT_DIR",
    "ENV_SUPERVISOR",
    "DirFS",
    "FsBootLoader",
    "FsSlotStorage",
    "FsSlots",
    "LocalControl",
    "SlotControl",
    "StaleBoot",
    "StateError",
    "StateStore",
    "SupervisorClient",
    "TarExtractor",
    "commit",
    "fsync_dir",
    "pack_files",
    "pack_tree",
    "tree_digest",
]

log = logging.getLogger("mgrpc.updater.fsslots")

ENV_SLOTS = "MGRPC_SLOTS"  # the slots directory
ENV_SLOT = "MGRPC_SLOT"  # the slot the program runs from (0 or 1)
ENV_SLOT_DIR = "MGRPC_SLOT_DIR"  # that slot's app directory (also the program's working directory)
ENV_DATA_DIR = "MGRPC_DATA_DIR"  # that slot's data directory
ENV_SUPERVISOR = "MGRPC_SUPERVISOR"  # the supervisor's socket
ENV_BOOT_ID = "MGRPC_BOOT_ID"  # this start of the program (requests name it)
ENV_RPC_URL = "MGRPC_RPC_URL"  # where the program should serve RPC (space-separated URLs)
ENV_HEARTBEAT_S = "MGRPC_HEARTBEAT_S"  # the program must send a heartbeat at least this often

DEFAULT_APP_CAPACITY = 256 * 1024 * 1024
DEFAULT_DATA_CAPACITY = 64 * 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_FILES = 10_000
MARKER = "slot.json"
TMP_SUFFIX = ".~tmp"
_COPY_CHUNK = 64 * 1024


class StateError(UpdaterError, OSError):
    """The state record could not be written (the previous record still holds)."""


class StaleBoot(UpdaterError):
    """The supervisor no longer knows this program's start (it restarted): the program must exit."""


# -- durable file operations -------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """``fsync`` a directory, so the renames and creations in it are on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename over ``path``, fsync of the directory. Any failure: ``path`` as it was."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (after a copy)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _list_files(root: Path) -> dict[str, int]:
    """Every regular file under ``root`` (relative POSIX path -> size)."""
    out: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[Path(p).relative_to(root).as_posix()] = st.st_size
    return dict(sorted(out.items()))


def tree_digest(root: Path) -> tuple[int, int, bytes]:
    """``(length, crc32, sha256)`` over a directory's files (paths, sizes, contents, in path order):
    the identity of a slot provisioned from a directory rather than from a bundle."""
    sha = hashlib.sha256()
    crc = 0
    total = 0
    for rel, size in _list_files(root).items():
        head = f"{rel}\0{size}\0".encode()
        sha.update(head)
        crc = zlib.crc32(head, crc)
        with open(root / rel, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                sha.update(chunk)
                crc = zlib.crc32(chunk, crc)
        total += size
    return max(total, 1), crc, sha.digest()


# -- the state record --------------------------------------------------------------------------------


class StateStore:
    """The two copies of the state record in a slots directory (the boot config of a flash device)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, copy: int) -> Path:
        """The file of copy 0 or 1."""
        return self.root / f"state.{copy}"

    def read_copies(self) -> list[BootConfig | None]:
        """Both copies, decoded (``None`` = missing, torn or foreign)."""
        out: list[BootConfig | None] = []
        for i in (0, 1):
            try:
                data = self.path(i).read_bytes()
            except FileNotFoundError:
                out.append(None)
                continue
            out.append(decode_record(data))
        return out

    def load(self) -> BootConfig | None:
        """The newest valid record, or ``None`` (an unprovisioned slots directory)."""
        best = newest(self.read_copies())
        return None if best is None else best[1]

    def save(self, cfg: BootConfig) -> BootConfig:
        """Write ``cfg`` as the newest record over the older copy; returns it with its sequence number.

        :class:`StateError` when a step fails: the copy written is then either the old file or the
        complete new one, and the other copy (the current record) is untouched either way.
        """
        target, new = next_record(self.read_copies(), cfg)
        rec = encode_record(new)
        try:
            _atomic_write(self.path(target), rec)
        except OSError as exc:
            raise StateError(f"Failed to write the state record: {exc}") from exc
        log.debug("state record seq %#x written to copy %d: %s", new.seq, target, new)
        stored = decode_record(rec)
        assert stored is not None
        return stored


# -- slot directories ---------------------------------------------------------------------------------


def slot_dir(root: Path, slot: int) -> Path:
    """``DIR/slotN``."""
    return root / f"slot{slot}"


def _marker(app_len: int, crc32: int, sha256: bytes, version: str, build_id: str, files: dict[str, int]) -> bytes:
    return json.dumps(
        {"format": 1, "app_len": app_len, "app_crc32": crc32, "app_sha256": sha256.hex(), "version": version,
         "build_id": build_id, "files": files},
        indent=1,
    ).encode()  # fmt: skip


def read_marker(path: Path) -> dict[str, Any] | None:
    """A slot's ``slot.json`` (None when missing or unreadable)."""
    try:
        obj = json.loads((path / MARKER).read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def slot_matches(path: Path, state: SlotState) -> bool:
    """Whether the slot directory ``path`` holds exactly what ``state`` describes (see the module doc)."""
    if state.app_len <= 0:
        return False
    m = read_marker(path)
    if m is None or m.get("app_len") != state.app_len or m.get("app_sha256") != state.app_sha256.hex():
        return False
    if m.get("app_crc32") != state.app_crc32:
        return False
    files = m.get("files")
    if not isinstance(files, dict):
        return False
    app = path / "app"
    for rel, size in files.items():
        try:
            st = os.lstat(app / rel)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
    return True


def _install(root: Path, slot: int) -> None:
    """Swap ``staging`` in as slot ``slot`` by renames (the old slot goes to ``trash``, then away)."""
    staging, target, trash = root / "staging", slot_dir(root, slot), root / "trash"
    _rmtree(trash)
    if target.exists():
        os.rename(target, trash)
    os.rename(staging, target)
    fsync_dir(root)
    _rmtree(trash)


def _copy_dir(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


class FsBootLoader(BootLoader):
    """The boot loader over slot directories: a slot is valid when its directory matches the record."""

    def __init__(self, slots: FsSlots) -> None:
        self.store = slots.state  # type: ignore[assignment]
        self.slots = slots
        self._actions = self._action_table()

    def slot_valid(self, cfg: BootConfig, slot: int) -> bool:
        """Whether ``slot``'s directory holds the image the record describes."""
        return slot_matches(slot_dir(self.slots.root, slot), cfg.slots[slot])

    def _copy_slot(self, src: int, dst: int, app_len: int) -> None:
        """Snapshot: build ``staging`` from slot ``src`` and swap it in as ``dst``."""
        root = self.slots.root
        staging = root / "staging"
        _rmtree(staging)
        _copy_dir(slot_dir(root, src), staging)
        _fsync_tree(staging)
        _install(root, dst)


# -- data directories ------------------------------------------------------------------------------------


class DirFS:
    """A data directory as the device services see a filesystem (flat root, atomic writes).

    Names are root file names: a ``/`` inside, ``.``/``..`` or a hidden temp name is refused
    (:class:`~updater.fs.FSError`), so FS.* can never reach outside the directory.
    """

    def __init__(self, path: str | os.PathLike[str], *, capacity: int = DEFAULT_DATA_CAPACITY) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.capacity = capacity

    def _p(self, name: str) -> Path:
        from .fs import FSError

        n = name.lstrip("/")
        if not n or "/" in n or n in (".", "..") or n.endswith(TMP_SUFFIX) or "\0" in n:
            raise FSError(f"{self.name}: invalid file name {name!r}")
        return self.path / n

    def list(self, path: str = "/") -> list[str]:
        """Names of the regular files in the root, sorted."""
        with os.scandir(self.path) as it:
            return sorted(e.name for e in it if e.is_file(follow_symlinks=False) and not e.name.endswith(TMP_SUFFIX))

    def listdir(self, path: str = "/") -> builtins.list[str]:
        """Names of every entry in the root, sorted (temp files hidden)."""
        return sorted(n for n in os.listdir(self.path) if not n.endswith(TMP_SUFFIX))

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists."""
        try:
            return self._p(name).exists()
        except UpdaterError:
            return False

    def size(self, name: str) -> int:
        """Size of ``name`` in bytes."""
        return self._stat(name).st_size

    def _stat(self, name: str) -> os.stat_result:
        from .fs import FSError

        try:
            return os.stat(self._p(name))
        except FileNotFoundError:
            raise FSError(f"{self.name}: no such file: {name}") from None

    def read(self, name: str) -> bytes:
        """Whole content of ``name``."""
        from .fs import FSError

        try:
            return self._p(name).read_bytes()
        except FileNotFoundError:
            raise FSError(f"{self.name}: no such file: {name}") from None

    def write(self, name: str, data: bytes) -> None:
        """Create or replace ``name`` atomically (temp file, fsync, rename)."""
        from .fs import FSError

        p = self._p(name)
        used = self.stat_fs()[0] - (p.stat().st_size if p.is_file() else 0)
        if used + len(data) > self.capacity:
            raise FSError(f"{self.name}: no space for {name}")
        _atomic_write(p, bytes(data))

    def remove(self, name: str) -> None:
        """Delete ``name``."""
        from .fs import FSError

        try:
            self._p(name).unlink()
        except FileNotFoundError:
            raise FSError(f"{self.name}: no such file: {name}") from None

    def files(self) -> dict[str, bytes]:
        """All root files with their content."""
        return {n: self.read(n) for n in self.list()}

    def stat_fs(self) -> tuple[int, int]:
        """``(used_bytes, capacity)``."""
        used = sum(os.lstat(self.path / n).st_size for n in self.list())
        return used, self.capacity


# -- tar extraction ---------------------------------------------------------------------------------------


class TarExtractor:
    """A :class:`~updater.slotstorage.PartSink` that unpacks a tar part into a directory as it streams."""

    def __init__(
        self, dest: Path, part: Part, *, kind: str, capacity: int, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_files: int = DEFAULT_MAX_FILES,
    ) -> None:  # fmt: skip
        self.dest = dest
        self.part = part
        self.capacity = capacity
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.written = 0
        self.crc32 = 0
        self.sha1 = hashlib.sha1() if part.cs_sha1 is not None else None
        self.sha256 = hashlib.sha256() if kind == "app" or part.cs_sha256 is not None else None
        self._parser = TarStreamParser()
        self._fd: int | None = None
        self._current = ""
        self._files: set[str] = set()
        self._dirs: set[Path] = {dest}
        self._count = 0
        dest.mkdir(parents=True, exist_ok=True)
        self._real_root = os.path.realpath(dest)

    def feed(self, data: bytes) -> None:
        """Unpack the next bytes of the archive."""
        if self.written + len(data) > self.capacity:
            raise UpdaterError("Image too big")
        self.written += len(data)
        if self.sha1 is not None:
            self.sha1.update(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        try:
            self._parser.feed(data)
            for ev in self._parser.events():
                if isinstance(ev, TarData):
                    self._write(ev.data)
                elif isinstance(ev, TarMember):
                    self._member(ev)
                elif isinstance(ev, TarMemberEnd):
                    self._end_member()
        except OSError as exc:  # the disk refused (full, read-only, I/O error): as a flash write failure
            self._close_fd()
            log.error("writing %s failed: %s", self.dest, exc)
            raise UpdaterError("Write failed", code=-11) from exc
        except BaseException:
            self._close_fd()
            raise

    def close(self) -> None:
        """The archive must be complete; everything extracted is made durable."""
        try:
            self._parser.close()
            self._close_fd()
            for d in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)
        except OSError as exc:
            log.error("writing %s failed: %s", self.dest, exc)
            raise UpdaterError("Write failed", code=-11) from exc
        finally:
            self._close_fd()

    def set_crc32(self, crc32: int) -> None:
        """The part's CRC-32 (from the zip parser)."""
        self.crc32 = crc32

    def verify(self) -> None:
        """Size and digests of the archive bytes, as for a flash part."""
        verify_digests(self.part, self.written, self.sha1, self.sha256)

    # -- members

    def _refuse(self, why: str) -> UpdaterError:
        return UpdaterError(f"Unsafe archive: {why}")

    def _rel(self, name: str) -> str:
        if name.startswith("/"):
            raise self._refuse(f"absolute path {name!r}")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self._refuse(f"'..' in {name!r}")
        if any("\0" in p for p in parts):
            raise self._refuse(f"bad name {name!r}")
        return "/".join(parts)

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self._real_root or real.startswith(self._real_root + os.sep)

    def _target(self, rel: str) -> Path:
        path = self.dest / rel
        if not self._inside(str(path.parent)):
            raise self._refuse(f"{rel!r} goes through a link out of the slot")
        return path

    def _member(self, m: TarMember) -> None:
        rel = self._rel(m.name)
        if not rel:
            return  # the archive's root directory entry ("./")
        self._count += 1
        if self._count > self.max_files:
            raise self._refuse(f"more than {self.max_files} entries")
        if m.type == DIRECTORY:
            path = self._target(rel)
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise self._refuse(f"directory {rel!r} over another entry")
            path.mkdir(parents=True, exist_ok=True)
            self._dirs.add(path)
            self._check_parents(path)
            return
        if m.type not in (REGULAR, SYMLINK, HARDLINK):
            raise self._refuse(f"{rel!r} is a special file (type {m.type!r})")
        if m.size > self.max_file_bytes:
            raise self._refuse(f"{rel!r} is {m.size} bytes (at most {self.max_file_bytes})")
        path = self._target(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._check_parents(path)
        self._dirs.add(path.parent)
        if path.is_dir() and not path.is_symlink():
            raise self._refuse(f"{rel!r} over a directory")
        if path.is_symlink() or path.exists():
            path.unlink()
            self._files.discard(rel)
        if m.type == SYMLINK:
            link = m.linkname
            if not link or link.startswith("/"):
                raise self._refuse(f"link {rel!r} -> {link!r} leaves the slot")
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), link))
            if resolved == ".." or resolved.startswith("../") or not self._inside(str(self.dest / resolved)):
                raise self._refuse(f"link {rel!r} -> {link!r} leaves the slot")
            os.symlink(link, path)
            return
        if m.type == HARDLINK:
            src = self._rel(m.linkname)
            if src not in self._files:
                raise self._refuse(f"hard link {rel!r} -> {m.linkname!r} is not to an earlier file")
            os.link(self.dest / src, path)
            self._files.add(rel)
            return
        mode = (m.mode & 0o755) | 0o600
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        os.fchmod(self._fd, mode)
        self._current = rel

    def _check_parents(self, path: Path) -> None:
        if not self._inside(str(path.parent)):
            raise self._refuse(f"{path.relative_to(self.dest).as_posix()!r} goes through a link out of the slot")

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _end_member(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            self._close_fd()
            self._files.add(self._current)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- the boot loader side ------------------------------------------------------------------------------


class FsSlots:
    """The boot loader of a slots directory: boot decision, data merge, every state record change."""

    def __init__(self, root: str | os.PathLike[str], *, data_capacity: int = DEFAULT_DATA_CAPACITY) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = StateStore(self.root)
        self.loader = FsBootLoader(self)
        self.data_capacity = data_capacity
        self.running: int | None = None

    @property
    def config(self) -> BootConfig | None:
        """The current record (None: unprovisioned)."""
        return self.state.load()

    def app_dir(self, slot: int) -> Path:
        """Slot ``slot``'s program files."""
        return slot_dir(self.root, slot) / "app"

    def data_dir(self, slot: int) -> Path:
        """Slot ``slot``'s data directory."""
        return slot_dir(self.root, slot) / "data"

    def provision(
        self, app_src: str | os.PathLike[str], *, data_src: str | os.PathLike[str] | None = None,
        version: str = "0", build_id: str = "",
    ) -> SlotState:  # fmt: skip
        """Install a program directory as slot 0, committed (a fresh device's factory image)."""
        staging = self.root / "staging"
        _rmtree(staging)
        _copy_dir(Path(app_src), staging / "app")
        (staging / "data").mkdir(parents=True, exist_ok=True)
        if data_src is not None:
            _copy_dir(Path(data_src), staging / "data")
        length, crc, sha = tree_digest(staging / "app")
        state = SlotState(length, crc, sha, version, build_id)
        _write_marker(staging, state)
        _fsync_tree(staging)
        _install(self.root, 0)
        cfg = BootConfig(active_slot=0, revert_slot=1, flags=BootFlags.COMMITTED).with_slot(0, state)
        self.state.save(cfg)
        log.info("slots %s: provisioned slot 0 from %s (version %s)", self.root, app_src, version)
        return state

    def boot(self) -> BootInfo:
        """Power-on: the boot decision, then the first-boot data merge (see ``DeviceStorage.boot``)."""
        self.running = None
        decision = self.loader.boot()
        cfg = decision.config
        merged: tuple[str, ...] = ()
        if decision.first_boot and cfg.flags & BootFlags.MERGE_FS:
            new_dir, old_dir = self.data_dir(decision.slot), self.data_dir(cfg.revert_slot)
            try:
                new_dir.mkdir(parents=True, exist_ok=True)
                if old_dir.is_dir():
                    merged = tuple(merge_fs(DirFS(old_dir), DirFS(new_dir)))
                _fsync_tree(new_dir)
            except OSError as exc:
                log.error("first boot of slot %d: data merge failed (%s); reverting", decision.slot, exc)
                self.loader.revert()
                info = self.boot()
                return replace(info, reverted=True, reason=f"data merge into slot {decision.slot} failed: reverted")
            cfg = self.loader.clear_merge_flag()
        state = cfg.slots[decision.slot]
        self.running = decision.slot
        return BootInfo(
            slot=decision.slot, first_boot=decision.first_boot,
            commit_timeout_s=cfg.commit_timeout_s if decision.first_boot else 0, reverted=decision.reverted,
            reason=decision.reason, merged_files=merged, version=state.version, build_id=state.build_id,
        )  # fmt: skip

    def handle(self, op: str, params: Mapping[str, Any], *, running: int) -> Any:
        """One request of the running program (``running`` = the slot it runs from); see the module doc."""
        cfg = self.loader.load()
        if op == "commit":
            if cfg.active_slot != running:
                return False  # a switch waits for its reboot: never commit what has not run
            return self.loader.commit()
        if op == "revert":
            return self.loader.revert()
        if op == "finalize":
            slot = int(params["slot"])
            s = params["state"]
            state = SlotState(
                int(s["app_len"]), int(s["app_crc32"]), bytes.fromhex(s["app_sha256"]), str(s["version"]),
                str(s["build_id"]),
            )  # fmt: skip
            if slot == running or cfg.active_slot != running or not slot_matches(slot_dir(self.root, slot), state):
                raise UpdaterError("Failed to set boot config")
            self.loader.finalize_update(
                slot, state, running=running, fs_updated=bool(params.get("fs_updated")),
                commit_timeout_s=int(params.get("commit_timeout_s", 0)),
            )  # fmt: skip
            return None
        if op == "set_boot_state":
            self.loader.set_boot_state(**dict(params.get("changes", {})))
            return None
        if op == "snapshot":
            if cfg.active_slot != running:
                raise BootError("running slot is not the active slot")
            return self.loader.create_snapshot(
                set_as_revert=bool(params.get("set_as_revert", False)),
                commit_timeout=int(params.get("commit_timeout", -1)),
            )
        raise UpdaterError(f"unknown request {op!r}")


def pack_tree(src: str | os.PathLike[str], out: Any) -> None:
    """Write a tar (pax) of the directory ``src`` into the binary file ``out``: what a bundle's ``app``
    (or ``fs``) part holds. Entries are in path order with mtime 0, so the same tree packs the same."""
    import tarfile

    root = Path(src)
    if not root.is_dir():
        raise UpdaterError(f"{src} is not a directory")

    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.mtime = 0
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                p = Path(dirpath) / name
                tar.add(p, arcname=p.relative_to(root).as_posix(), recursive=False, filter=clean)


def pack_files(files: Mapping[str, bytes]) -> bytes:
    """A tar of ``files`` (relative path -> content), for tests and small programs."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o755 if name.endswith((".py", ".sh")) else 0o644
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _write_marker(staging: Path, state: SlotState) -> None:
    files = _list_files(staging / "app")
    data = _marker(state.app_len, state.app_crc32, state.app_sha256, state.version, state.build_id, files)
    _atomic_write(staging / MARKER, data)


# -- the program side -----------------------------------------------------------------------------------------


class SlotControl(Protocol):
    """How the program asks the boot loader for a state record change."""

    def request(self, op: str, **params: Any) -> Any:
        """Run ``op`` (see :meth:`FsSlots.handle`); raises the boot loader's error."""


@dataclass
class LocalControl:
    """The boot loader in this process (tests; a program run without a supervisor)."""

    slots: FsSlots
    running: int

    def request(self, op: str, **params: Any) -> Any:
        """Run ``op`` on :attr:`slots` directly."""
        if op in ("heartbeat", "reboot"):
            return None
        return self.slots.handle(op, params, running=self.running)


def _error_kind(exc: Exception) -> str:
    if isinstance(exc, BootStateError):
        return "boot_state"
    if isinstance(exc, SnapshotError):
        return "snapshot"
    if isinstance(exc, BootError):
        return "boot"
    return "updater"


_KINDS: dict[str, type[UpdaterError]] = {
    "boot_state": BootStateError, "snapshot": SnapshotError, "boot": BootError, "updater": UpdaterError,
    "stale": StaleBoot,
}  # fmt: skip


def error_reply(exc: Exception) -> dict[str, Any]:
    """The reply object for a failed request (the supervisor's side of the protocol)."""
    code = exc.code if isinstance(exc, UpdaterError) else -1
    message = exc.message if isinstance(exc, UpdaterError) else str(exc)
    return {"ok": False, "error": message, "code": code, "kind": _error_kind(exc)}


def _address(addr: str) -> str:
    return "\0" + addr[1:] if addr.startswith("@") else addr


class SupervisorClient:
    """The supervisor's socket (see the module doc); each request is one short connection."""

    def __init__(self, address: str, boot_id: str, *, timeout_s: float = 10.0) -> None:
        self.address = address
        self.boot_id = boot_id
        self.timeout_s = timeout_s

    def request(self, op: str, **params: Any) -> Any:
        """Send ``op``; returns the result or raises the supervisor's error (:class:`StaleBoot` too)."""
        msg = json.dumps({"op": op, "boot": self.boot_id, **params}).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout_s)
                s.connect(_address(self.address))
                s.sendall(msg)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as exc:
            raise UpdaterError(f"supervisor not reachable: {exc}") from exc
        try:
            reply = json.loads(buf)
        except ValueError:
            raise UpdaterError("supervisor gave no answer") from None
        if reply.get("ok"):
            return reply.get("result")
        cls = _KINDS.get(str(reply.get("kind")), UpdaterError)
        raise cls(str(reply.get("error", "failed")), code=int(reply.get("code", -1)))

    async def heartbeat(self) -> None:
        """One heartbeat without blocking the event loop."""
        import asyncio

        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(_address(self.address)), self.timeout_s)
        try:
            writer.write(json.dumps({"op": "heartbeat", "boot": self.boot_id}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), self.timeout_s)
        finally:
            writer.close()
        reply = json.loads(line) if line else {}
        if not reply.get("ok"):
            cls = _KINDS.get(str(reply.get("kind")), UpdaterError)
            raise cls(str(reply.get("error", "no answer")), code=int(reply.get("code", -1)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SupervisorClient:
        """The client of the supervisor that started this program."""
        env = os.environ if env is None else env
        if not env.get(ENV_SUPERVISOR):
            raise UpdaterError(f"not started by a supervisor ({ENV_SUPERVISOR} is not set)")
        return cls(env[ENV_SUPERVISOR], env.get(ENV_BOOT_ID, ""))


def commit(env: Mapping[str, str] | None = None) -> bool:
    """The one library call a supervised program needs: commit the running slot.

    True when this call committed it, False when it already was (or a switch waits for a restart).
    """
    return bool(SupervisorClient.from_env(env).request("commit"))


class FsSlotStorage:
    """The running program's storage: the :class:`~updater.slotstorage.SlotStorage` over slot directories."""

    def __init__(
        self, root: str | os.PathLike[str], *, running_slot: int, control: SlotControl,
        app_capacity: int = DEFAULT_APP_CAPACITY, data_capacity: int = DEFAULT_DATA_CAPACITY,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:  # fmt: skip
        self.root = Path(root)
        self.state = StateStore(self.root)
        self._running = running_slot
        self.control = control
        self.app_capacity = app_capacity
        self.data_capacity = data_capacity
        self.max_file_bytes = max_file_bytes
        self._fs: DirFS | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kw: Any) -> FsSlotStorage:
        """The storage of a program started by ``mgrpc supervise`` (reads the ``MGRPC_*`` variables)."""
        env = os.environ if env is None else env
        if not env.get(ENV_SLOTS) or not env.get(ENV_SLOT):
            raise UpdaterError(f"not started by a supervisor ({ENV_SLOTS}/{ENV_SLOT} are not set)")
        return cls(env[ENV_SLOTS], running_slot=int(env[ENV_SLOT]), control=SupervisorClient.from_env(env), **kw)

    def _cfg(self) -> BootConfig:
        cfg = self.state.load()
        if cfg is None:
            raise BootError("No valid state record (unprovisioned slots directory)")
        return cfg

    @property
    def running_slot(self) -> int:
        """The slot this program runs from."""
        return self._running

    @property
    def inactive_slot(self) -> int:
        """The slot an update writes."""
        return 1 - self._running

    @property
    def is_committed(self) -> bool:
        """Whether the running slot is committed."""
        return self._cfg().committed

    @property
    def reboot_pending(self) -> bool:
        """The record selects the other slot already (update finished, revert done): restart pending."""
        return self._cfg().active_slot != self._running

    @property
    def running_version(self) -> str:
        """Version of the running slot."""
        return self._cfg().slots[self._running].version

    @property
    def running_build_id(self) -> str:
        """build_id of the running slot."""
        return self._cfg().slots[self._running].build_id

    def app_dir(self, slot: int | None = None) -> Path:
        """A slot's program files (default: the running slot's)."""
        return slot_dir(self.root, self._running if slot is None else slot) / "app"

    def data_dir(self, slot: int | None = None) -> Path:
        """A slot's data directory (default: the running slot's)."""
        return slot_dir(self.root, self._running if slot is None else slot) / "data"

    def fs(self) -> DirFS:
        """The running slot's data directory as a filesystem (FS.*, Config.*)."""
        if self._fs is None:
            self.data_dir().mkdir(parents=True, exist_ok=True)
            self._fs = DirFS(self.data_dir(), capacity=self.data_capacity)
        return self._fs

    # -- the seam

    def begin_slot(self, slot: int) -> None:
        """Start a fresh ``staging`` directory for ``slot``."""
        if slot == self._running:
            raise UpdaterError("Failed to write data")
        staging = self.root / "staging"
        try:
            _rmtree(self.root / "trash")
            _rmtree(staging)
            (staging / "app").mkdir(parents=True)
            (staging / "data").mkdir()
        except OSError as exc:
            raise UpdaterError("Write failed", code=-11) from exc

    def part_capacity(self, slot: int, kind: str) -> int:
        """The archive size a part may have."""
        return self.app_capacity if kind == "app" else self.data_capacity

    def open_part(self, slot: int, kind: str, part: Part) -> TarExtractor:
        """Unpack the ``app`` part into the new slot's program files, the ``fs`` part into its data."""
        dest = self.root / "staging" / ("app" if kind == "app" else "data")
        return TarExtractor(
            dest, part, kind=kind, capacity=self.part_capacity(slot, kind), max_file_bytes=self.max_file_bytes
        )

    def copy_fs(self, src_slot: int, dst_slot: int) -> None:
        """An app-only update: the new slot's data directory starts as a copy of the running one's."""
        if dst_slot == self._running:
            raise UpdaterError("Failed to write data")
        src = self.data_dir(src_slot)
        try:
            if src.is_dir():
                _copy_dir(src, self.root / "staging" / "data")
        except OSError as exc:
            raise UpdaterError("Write failed", code=-11) from exc

    def finalize_update(self, slot: int, state: SlotState, *, fs_updated: bool, commit_timeout_s: int) -> Any:
        """Make the staged slot durable, swap it in as ``slot``, then ask the boot loader to switch."""
        if slot == self._running:
            raise UpdaterError("Failed to set boot config")
        staging = self.root / "staging"
        try:
            _write_marker(staging, state)
            _fsync_tree(staging)
            _install(self.root, slot)
        except OSError as exc:
            raise UpdaterError("Failed to set boot config", code=-1) from exc
        return self.control.request(
            "finalize", slot=slot, fs_updated=fs_updated, commit_timeout_s=commit_timeout_s,
            state={"app_len": state.app_len, "app_crc32": state.app_crc32, "app_sha256": state.app_sha256.hex(),
                   "version": state.version, "build_id": state.build_id},
        )  # fmt: skip

    def get_boot_state(self) -> dict[str, Any]:
        """OTA.GetBootState from the record (reading it needs no boot loader)."""
        cfg = self.state.load()
        if cfg is None:
            raise BootStateError("Failed to get boot state", code=-1)
        return cfg.boot_state()

    def set_boot_state(self, **changes: Any) -> None:
        """OTA.SetBootState through the boot loader."""
        self.control.request("set_boot_state", changes=changes)

    def commit(self) -> bool:
        """Commit the running slot (False if it already was, or a restart is pending)."""
        if self.reboot_pending:
            return False
        return bool(self.control.request("commit"))

    def revert(self) -> bool:
        """Switch back to the revert slot (the caller restarts); False if committed."""
        return bool(self.control.request("revert"))

    def create_snapshot(self, *, set_as_revert: bool = False, commit_timeout: int = -1) -> int:
        """OTA.CreateSnapshot through the boot loader."""
        return int(self.control.request("snapshot", set_as_revert=set_as_revert, commit_timeout=commit_timeout))
