"""fw.zip builder, writing bundles the way ``mos create-fw-bundle`` does (spec/updater.md §4.1).

::

    data = build_bundle(platform="esp32", version="1.1", build_id="20260101-000000/ci",
                        parts=[BundlePart("app", b"...", {"type": "app", "ptn": "app_0"}),
                               BundlePart("fs", Path("fs.img"), {"type": "fs", "ptn": "fs_0",
                                                                 "fs_size": 262144})])
    with open("fw.zip", "wb") as f:                 # streaming: parts are never held in memory
        write_bundle(f, platform=..., version=..., parts=[BundlePart("app", Path("big.bin"), ...)])

What is written:

* ``manifest.json`` first, serialised like mos (:func:`updater.manifest.dumps_manifest`: one-space
  indent, Go member order), with ``size``, ``cs_sha1`` and ``cs_sha256`` computed for every part that
  has data and ``src`` reduced to its basename; then one entry per part with data, **in the order the
  parts are given** (mos uses Go map order, i.e. random; a fixed order makes builds reproducible).
* Entries are stored (method 0) unless ``compress=True`` (raw deflate, level 9 - devices cannot read
  those; our parser can with ``allow_deflate=True``). Version needed 20, flags 0 (0x800 for non-ASCII
  names), time/date 0, CRC and sizes in the local header, no data descriptor; a normal central
  directory (version made by 20, no attributes) and end record. No ZIP64: > 4 GiB is refused.
* With ``sign_keys``, the manifest's local header (and central directory record) carries the 0x293A
  extra field with ``sigN`` = signature by ``sign_keys[N]`` (None = slot skipped), see
  :mod:`updater.signing`.
* ``dir_prefix="name-1.0"`` puts every entry under that directory (like ``mgos_fw_meta.py``); devices
  strip the first path component.
* ``build_id=None`` writes no ``build_id`` (what mos does without ``--build-info``).

Part data can be ``bytes``, a path, a callable returning an iterable of chunks (called twice), or an
iterable of chunks (read once and spooled to a temporary file, so it is not held in memory either).
The data is read twice - once for the checksums that go into the manifest, once to write it - and a
source that changes in between is an error.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from updater.errors import MissingExtra, UpdaterError
from updater.firmware import firmware_chunks
from updater.manifest import MANIFEST_FILE_NAME, Manifest, dumps_manifest

__all__ = [
    "DEFAULT_APP_SIZE",
    "DEFAULT_FS_SIZE",
    "FS_BLOCK_SIZE",
    "BundlePart",
    "SupportsWrite",
    "build_bundle",
    "make_fs_image",
    "make_virtual_bundle",
    "virtual_build_id",
    "write_bundle",
    "write_virtual_bundle",
]

log = logging.getLogger("mgrpc.updater.bundle")

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_END = struct.Struct("<4sHHHHIIH")
_VERSION = 20
_FLAG_UTF8 = 0x800
_STORED, _DEFLATED = 0, 8
_MAX32 = 0xFFFFFFFF
_READ_CHUNK = 1 << 20
_SPOOL_MEMORY = 8 << 20  # one-shot iterables larger than this spill to disk

FS_BLOCK_SIZE = 4096
DEFAULT_FS_SIZE = 64 << 10  # an fs image smaller than the partition is grown to it on first boot
DEFAULT_APP_SIZE = 32 << 10

PartData = bytes | bytearray | memoryview | str | os.PathLike[str] | Iterable[bytes] | Callable[[], Iterable[bytes]]


class SupportsWrite(Protocol):
    """Where a bundle is written: anything with ``write(bytes)`` (need not be seekable)."""

    def write(self, data: bytes, /) -> object:
        """Append ``data``."""


@dataclass(frozen=True)
class BundlePart:
    """One manifest part: its name, its data (None for ``fill`` parts), and its manifest attributes
    (``type``, ``src``, ``ptn``, ``addr``, ``fs_size``, ... anything else is kept as an extra key).
    """

    name: str
    data: PartData | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Prepared:
    part: BundlePart
    attrs: dict[str, Any]
    entry: str = ""
    size: int = 0
    csize: int = 0
    crc: int = 0
    spool: IO[bytes] | None = None  # compressed data, or a one-shot iterable's raw data


def _chunks_of(data: PartData) -> Iterator[bytes]:
    """Chunks of a re-readable data source."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for pos in range(0, len(view), _READ_CHUNK):
            yield bytes(view[pos : pos + _READ_CHUNK])
    elif isinstance(data, str | os.PathLike):
        try:
            with open(data, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    yield chunk
        except OSError as exc:
            raise UpdaterError(f"Cannot read {os.fspath(data)}: {exc.strerror}") from None
    elif callable(data):
        for chunk in data():
            yield bytes(chunk)
    else:
        raise TypeError("one-shot iterables are spooled first")


def _spool_chunks(spool: IO[bytes]) -> Iterator[bytes]:
    spool.seek(0)
    while chunk := spool.read(_READ_CHUNK):
        yield chunk


def _normalise_parts(parts: Sequence[BundlePart] | Mapping[str, Mapping[str, Any]]) -> list[BundlePart]:
    if isinstance(parts, Mapping):
        out = []
        for name, spec in parts.items():
            attrs = dict(spec)
            data = attrs.pop("data", None)
            out.append(BundlePart(name, data, attrs))
        return out
    return list(parts)


def _is_reusable(data: PartData) -> bool:
    return isinstance(data, bytes | bytearray | memoryview | str | os.PathLike) or callable(data)


def _prepare(part: BundlePart, *, compress: bool) -> _Prepared:
    """First pass over a part's data: size, digests, CRC (and the compressed form)."""
    attrs = dict(part.attrs)
    prep = _Prepared(part, attrs)
    if part.data is None:
        if attrs.get("src"):
            raise UpdaterError(f"{part.name}: src {attrs['src']!r} given but no data")
        return prep
    src = attrs.get("src")
    if not src:
        src = os.fspath(part.data) if isinstance(part.data, str | os.PathLike) else part.name
    attrs["src"] = posixpath.basename(str(src).replace("\\", "/"))
    if not attrs["src"]:
        raise UpdaterError(f"{part.name}: empty src")
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    crc = size = 0
    raw_spool: IO[bytes] | None = None
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15) if compress else None
    # The spools outlive this function (read back in the second pass); write_bundle closes them.
    comp_spool: IO[bytes] | None = tempfile.SpooledTemporaryFile(_SPOOL_MEMORY) if compress else None  # noqa: SIM115
    if _is_reusable(part.data):
        source: Iterable[bytes] = _chunks_of(part.data)
    else:
        raw_spool = tempfile.SpooledTemporaryFile(_SPOOL_MEMORY)  # noqa: SIM115
        source = part.data  # type: ignore[assignment]
    try:
        for chunk in source:
            chunk = bytes(chunk)
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
            sha1.update(chunk)
            sha256.update(chunk)
            if raw_spool is not None:
                raw_spool.write(chunk)
            if deflater is not None and comp_spool is not None:
                comp_spool.write(deflater.compress(chunk))
    except BaseException:
        for spool in (raw_spool, comp_spool):
            if spool is not None:
                spool.close()
        raise
    if deflater is not None and comp_spool is not None:
        comp_spool.write(deflater.flush())
        prep.csize = comp_spool.tell()
        prep.spool = comp_spool
        if raw_spool is not None:
            raw_spool.close()
    else:
        prep.csize = size
        prep.spool = raw_spool
    for key, digest in (("cs_sha1", sha1.hexdigest()), ("cs_sha256", sha256.hexdigest())):
        want = attrs.get(key)
        if want and str(want).lower() != digest:
            raise UpdaterError(f"{part.name}: checksum does not match (want {want}, got {digest})")
        attrs[key] = digest
    if size > _MAX32 or prep.csize > _MAX32:
        raise UpdaterError(f"{part.name}: too big for a zip without ZIP64 ({size} bytes)")
    attrs["size"] = size
    prep.size, prep.crc = size, crc
    return prep


def _data_for_write(prep: _Prepared) -> Iterator[bytes]:
    if prep.spool is not None:
        yield from _spool_chunks(prep.spool)
        return
    assert prep.part.data is not None
    crc = size = 0
    for chunk in _chunks_of(prep.part.data):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
        yield chunk
    if crc != prep.crc or size != prep.size:
        raise UpdaterError(f"{prep.part.name}: data changed while the bundle was being written")


class _ZipWriter:
    """Minimal streaming zip writer: local header (sizes known up front), data, central directory."""

    def __init__(self, out: SupportsWrite) -> None:
        self._out = out
        self._offset = 0
        self._central: list[bytes] = []

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    def add(self, name: str, chunks: Iterable[bytes], *, crc: int, csize: int, usize: int, method: int,
            extra: bytes = b"") -> None:  # fmt: skip
        """Write one entry; ``chunks`` must add up to ``csize`` bytes."""
        raw_name = name.encode("utf-8")
        flags = 0 if raw_name.isascii() else _FLAG_UTF8
        if self._offset > _MAX32:
            raise UpdaterError("Bundle too big for a zip without ZIP64")
        offset = self._offset
        self._write(
            _LOCAL.pack(b"PK\x03\x04", _VERSION, flags, method, 0, 0, crc, csize, usize, len(raw_name), len(extra))
            + raw_name
            + extra
        )
        written = 0
        for chunk in chunks:
            self._write(chunk)
            written += len(chunk)
        if written != csize:
            raise UpdaterError(f"{name}: wrote {written} bytes, expected {csize}")
        self._central.append(
            _CENTRAL.pack(
                b"PK\x01\x02",
                _VERSION,
                _VERSION,
                flags,
                method,
                0,
                0,
                crc,
                csize,
                usize,
                len(raw_name),
                len(extra),
                0,
                0,
                0,
                0,
                offset,
            )
            + raw_name
            + extra
        )

    def close(self) -> None:
        """Write the central directory and the end record."""
        if len(self._central) > 0xFFFF:
            raise UpdaterError("Too many entries for a zip without ZIP64")
        start = self._offset
        for record in self._central:
            self._write(record)
        cd_size = self._offset - start
        if start > _MAX32:
            raise UpdaterError("Bundle too big for a zip without ZIP64")
        n = len(self._central)
        self._write(_END.pack(b"PK\x05\x06", 0, 0, n, n, cd_size, start, 0))


def write_bundle(
    out: SupportsWrite,
    *,
    platform: str,
    version: str,
    parts: Sequence[BundlePart] | Mapping[str, Mapping[str, Any]],
    name: str = "",
    build_id: str | None = None,
    build_timestamp: str | None = None,
    description: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    sign_keys: Sequence[Any] = (),
    sig_attrs: Mapping[str, Any] | None = None,
    compress: bool = False,
    dir_prefix: str | None = None,
) -> Manifest:
    """Stream a fw.zip into ``out`` (only ``write`` is used). Returns the manifest written.

    ``attrs`` are extra top-level manifest keys (mos ``--attr``); ``sig_attrs`` extra keys of the
    signature record (mos ``--extra-attr``); ``sign_keys[N]`` (key object, PEM/DER bytes or path;
    None = skip) makes ``sigN``.
    """
    plist = _normalise_parts(parts)
    names = [p.name for p in plist]
    if len(set(names)) != len(names):
        raise UpdaterError(f"Duplicate part names: {names}")
    prepared: list[_Prepared] = []
    try:
        for part in plist:
            prepared.append(_prepare(part, compress=compress))
        srcs = [p.attrs["src"] for p in prepared if p.part.data is not None]
        if len(set(srcs)) != len(srcs) or MANIFEST_FILE_NAME in srcs:
            raise UpdaterError(f"Part file names must be unique and not {MANIFEST_FILE_NAME}: {srcs}")
        obj: dict[str, Any] = dict(attrs or {})
        obj.update(
            {
                "name": name,
                "platform": platform,
                "description": description or "",
                "version": version,
                "build_id": build_id or "",
                "build_timestamp": build_timestamp or "",
                "parts": {p.part.name: p.attrs for p in prepared},
            }
        )
        manifest_bytes = dumps_manifest(obj)
        manifest = Manifest.parse(manifest_bytes)
        extra = _signature_extra(manifest_bytes, sign_keys, sig_attrs)
        prefix = (dir_prefix.strip("/") + "/") if dir_prefix else ""
        zw = _ZipWriter(out)
        if compress:
            comp = zlib.compressobj(9, zlib.DEFLATED, -15)
            body = comp.compress(manifest_bytes) + comp.flush()
            method = _DEFLATED
        else:
            body, method = manifest_bytes, _STORED
        zw.add(
            prefix + MANIFEST_FILE_NAME, [body], crc=zlib.crc32(manifest_bytes), csize=len(body),
            usize=len(manifest_bytes), method=method, extra=extra,
        )  # fmt: skip
        for prep in prepared:
            if prep.part.data is None:
                continue
            zw.add(
                prefix + prep.attrs["src"], _data_for_write(prep), crc=prep.crc, csize=prep.csize,
                usize=prep.size, method=_DEFLATED if compress else _STORED,
            )  # fmt: skip
        zw.close()
    finally:
        for prep in prepared:
            if prep.spool is not None:
                prep.spool.close()
    log.debug("bundle written: %s %s for %s, %d parts", manifest.name, manifest.version, platform, len(plist))
    return manifest


def _signature_extra(manifest_bytes: bytes, sign_keys: Sequence[Any], sig_attrs: Mapping[str, Any] | None) -> bytes:
    if not any(k is not None for k in sign_keys) and not sig_attrs:
        return b""
    from updater import signing  # needs `cryptography` only when signing

    if len(sign_keys) > signing.MAX_KEYS:
        raise UpdaterError(f"At most {signing.MAX_KEYS} signing keys")
    sigs = [signing.sign_manifest(manifest_bytes, k) if k is not None else None for k in sign_keys]
    return signing.make_sig_extra(sigs, attrs=sig_attrs)


def build_bundle(
    *,
    platform: str,
    version: str,
    parts: Sequence[BundlePart] | Mapping[str, Mapping[str, Any]],
    name: str = "",
    build_id: str | None = None,
    build_timestamp: str | None = None,
    description: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    sign_keys: Sequence[Any] = (),
    sig_attrs: Mapping[str, Any] | None = None,
    compress: bool = False,
    dir_prefix: str | None = None,
) -> bytes:
    """Like :func:`write_bundle` (same arguments) but returns the fw.zip bytes."""
    buf = io.BytesIO()
    write_bundle(
        buf, platform=platform, version=version, parts=parts, name=name, build_id=build_id,
        build_timestamp=build_timestamp, description=description, attrs=attrs, sign_keys=sign_keys,
        sig_attrs=sig_attrs, compress=compress, dir_prefix=dir_prefix,
    )  # fmt: skip
    return buf.getvalue()


# -- virtual-device bundles ------------------------------------------------------------------------


def make_fs_image(
    files: Mapping[str, bytes], *, fs_size: int = DEFAULT_FS_SIZE, block_size: int = FS_BLOCK_SIZE
) -> bytes:
    """A LittleFS image of ``fs_size`` bytes (``block_size`` blocks) with ``files`` in its root."""
    try:
        import littlefs
    except ImportError:
        raise MissingExtra("FS images", "littlefs-python", "fs") from None
    if fs_size % block_size or fs_size < 2 * block_size:
        raise UpdaterError(f"fs_size must be a multiple of {block_size} and at least 2 blocks, got {fs_size}")
    fs = littlefs.LittleFS(block_size=block_size, block_count=fs_size // block_size, name_max=255)
    for fname, data in files.items():
        parent = posixpath.dirname(fname.strip("/"))
        if parent:
            fs.makedirs(parent, exist_ok=True)
        try:
            with fs.open(fname, "wb") as f:
                f.write(data)
        except littlefs.LittleFSError as exc:
            raise UpdaterError(f"Cannot put {fname} into the fs image: {exc}") from None
    return bytes(fs.context.buffer)


def virtual_build_id(version: str) -> str:
    """The build_id a virtual bundle gets when none is given (deterministic per version)."""
    return f"20260101-000000/virtual-{version}"


def write_virtual_bundle(
    out: SupportsWrite,
    arch: str,
    version: str,
    *,
    behavior: str = "ok",
    app_size: int = DEFAULT_APP_SIZE,
    fs_files: Mapping[str, bytes] | None = None,
    fs_size: int = DEFAULT_FS_SIZE,
    build_id: str | None = None,
    name: str = "mgrpc-virtual",
    seed: int | None = None,
    **bundle_kwargs: Any,
) -> Manifest:
    """Stream a bundle for the virtual device: part ``app`` (type app, ptn app_0) is a
    :class:`~updater.firmware.FirmwareImage` of ``app_size`` bytes that reports ``version``/``build_id``
    and behaves as ``behavior``; part ``fs`` (type fs, ptn fs_0, fs_size) is a LittleFS image holding
    ``fs_files`` (default: an empty ``conf0.json`` object). Other keywords go to :func:`write_bundle`.
    """
    build_id = virtual_build_id(version) if build_id is None else build_id
    if fs_files is None:
        fs_files = {"conf0.json": b"{}"}
    fs_image = make_fs_image(fs_files, fs_size=fs_size)
    app_seed = seed if seed is not None else zlib.crc32(f"{arch}/{version}/{build_id}".encode())

    def app_chunks() -> Iterator[bytes]:
        return firmware_chunks(name, version, build_id, arch, behavior, total_size=app_size, seed=app_seed)

    next(app_chunks())  # validates size and behavior now, before anything is written
    parts = [
        BundlePart("app", app_chunks, {"type": "app", "src": f"{name}.bin", "ptn": "app_0"}),
        BundlePart("fs", fs_image, {"type": "fs", "src": "fs.img", "fs_size": fs_size, "ptn": "fs_0"}),
    ]
    return write_bundle(out, platform=arch, version=version, build_id=build_id, name=name, parts=parts, **bundle_kwargs)


def make_virtual_bundle(
    arch: str,
    version: str,
    *,
    behavior: str = "ok",
    app_size: int = DEFAULT_APP_SIZE,
    fs_files: Mapping[str, bytes] | None = None,
    fs_size: int = DEFAULT_FS_SIZE,
    build_id: str | None = None,
    name: str = "mgrpc-virtual",
    seed: int | None = None,
    **bundle_kwargs: Any,
) -> bytes:
    """:func:`write_virtual_bundle` into memory; returns the fw.zip bytes."""
    buf = io.BytesIO()
    write_virtual_bundle(
        buf, arch, version, behavior=behavior, app_size=app_size, fs_files=fs_files, fs_size=fs_size,
        build_id=build_id, name=name, seed=seed, **bundle_kwargs,
    )  # fmt: skip
    return buf.getvalue()
