"""manifest.json of a fw.zip: parsing and checks (spec/updater.md §2) and mos-style serialisation.

Decisions where the spec leaves a choice (each is tested):

* ``build_id``: ``mos create-fw-bundle`` without ``--build-info`` writes no ``build_id`` and the 2018
  device refuses such a manifest. We **accept** a missing ``build_id`` by default and treat it as
  ``""`` (so bundles made by the stock tool can be installed); ``Manifest.parse(data,
  require_build_id=True)`` restores the device's strict rule (``Required manifest field missing``).
* platform: compared **exactly, case-insensitively** with the device arch. The 2018 device compared
  only over the length of its own arch string (device ``esp32`` accepted ``esp32c3``); we do not keep
  that quirk, since installing another chip's firmware bricks a real device.
* part <-> file matching: a zip entry belongs to the part whose ``src`` *basename* equals the entry's
  (stripped) name exactly; the device's prefix comparison is not reproduced.
* checksums: ``cs_sha1`` must be 40 and ``cs_sha256`` 64 hex digits (any case; stored lowercase),
  otherwise ``Invalid checksum format``. ``size`` must be a non-negative integer when present.
* a required field of the wrong JSON type (e.g. ``"platform": 5``) is ``Failed to parse manifest``.

:func:`dumps_manifest` writes a manifest object the way mos does (Go ``json.MarshalIndent`` with a
one-space indent, fixed member order, ``omitempty`` fields dropped, Go's HTML-safe string escaping).
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from updater.errors import UpdaterError

__all__ = [
    "MANIFEST_FILE_NAME",
    "PART_FIELD_ORDER",
    "TOP_FIELD_ORDER",
    "Manifest",
    "Part",
    "dumps_manifest",
    "go_json",
    "manifest_object",
    "manifest_version",
    "read_manifest",
]

log = logging.getLogger("mgrpc.updater.manifest")

MANIFEST_FILE_NAME = "manifest.json"

# Member order of mos' Go structs (fwbundle.FirmwareManifest / firmwarePart); extras follow, sorted.
TOP_FIELD_ORDER = ("name", "platform", "description", "version", "build_id", "build_timestamp", "parts")
PART_FIELD_ORDER = (
    "type", "src", "addr", "size", "fill", "flash", "cs_sha1", "cs_sha256",
    "fs_size", "fs_block_size", "fs_erase_size", "fs_page_size",
    "encrypt", "ptn", "falloc", "sig", "sig_cert", "sign",
)  # fmt: skip
# Go pointer fields: present whenever set, even when zero/false (other known fields are omitempty).
_PART_POINTER_FIELDS = frozenset({"fill", "flash"})

_HEX = re.compile(r"[0-9a-fA-F]*")
_CHECKSUM_LEN = {"cs_sha1": 40, "cs_sha256": 64}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Part:
    """One entry of ``manifest.parts``. ``attrs`` is the whole part object as parsed (so HAL keys
    such as ``ptn``, ``addr``, ``fs_size`` are at hand); the typed fields are None when absent.
    """

    name: str
    type: str
    src: str | None
    size: int | None
    cs_sha1: str | None
    cs_sha256: str | None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def src_basename(self) -> str | None:
        """``src`` without directories (what the zip entry is called)."""
        return posixpath.basename(self.src) if self.src else None

    def get(self, key: str, default: Any = None) -> Any:
        """A raw attribute of the part object (``ptn``, ``addr``, ``fs_size``, ...)."""
        return self.attrs.get(key, default)

    @classmethod
    def from_json(cls, name: str, obj: object) -> Part:
        """Validate one part object (raises UpdaterError with the device's messages)."""
        if not isinstance(obj, dict):
            raise UpdaterError("Failed to parse manifest")
        ptype = obj.get("type", "")
        src = obj.get("src")
        size = obj.get("size")
        if not isinstance(ptype, str) or (src is not None and not isinstance(src, str)):
            raise UpdaterError("Failed to parse manifest")
        if size is not None and (not _is_int(size) or size < 0):
            raise UpdaterError("Failed to parse manifest")
        sums: dict[str, str | None] = {}
        for key, want_len in _CHECKSUM_LEN.items():
            value = obj.get(key)
            if value is None:
                sums[key] = None
                continue
            if not isinstance(value, str) or len(value) != want_len or not _HEX.fullmatch(value):
                raise UpdaterError("Invalid checksum format")
            sums[key] = value.lower()
        return cls(
            name=name,
            type=ptype,
            src=src,
            size=size,
            cs_sha1=sums["cs_sha1"],
            cs_sha256=sums["cs_sha256"],
            attrs=dict(obj),
        )


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest.json. ``raw`` keeps the exact bytes (signatures cover them), ``obj`` the
    decoded object with every key (unknown keys included).
    """

    name: str
    platform: str
    version: str
    build_id: str
    parts: dict[str, Part]
    raw: bytes
    obj: dict[str, Any]

    @classmethod
    def parse(cls, data: bytes | str, *, require_build_id: bool = False) -> Manifest:
        """Parse manifest.json bytes.

        Raises UpdaterError: ``Failed to parse manifest`` (bad JSON / not an object / wrong types),
        ``Required manifest field missing`` (platform, version, parts; build_id only when
        ``require_build_id``), ``Invalid checksum format``.
        """
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise UpdaterError("Failed to parse manifest") from None
        if not isinstance(obj, dict):
            raise UpdaterError("Failed to parse manifest")
        required = ["platform", "version", "parts"] + (["build_id"] if require_build_id else [])
        if any(obj.get(k) is None for k in required):
            raise UpdaterError("Required manifest field missing")
        name = obj.get("name", "")
        build_id = obj.get("build_id", "")
        strings = (obj["platform"], obj["version"], name, build_id)
        if not all(isinstance(v, str) for v in strings) or not isinstance(obj["parts"], dict):
            raise UpdaterError("Failed to parse manifest")
        parts = {pname: Part.from_json(pname, pobj) for pname, pobj in obj["parts"].items()}
        return cls(
            name=name,
            platform=obj["platform"],
            version=obj["version"],
            build_id=build_id,
            parts=parts,
            raw=raw,
            obj=obj,
        )

    def check_platform(self, arch: str) -> None:
        """Raise ``Wrong platform`` unless the manifest is for ``arch`` (exact, case-insensitive)."""
        if self.platform.casefold() != arch.casefold():
            raise UpdaterError("Wrong platform")

    def is_same_version(self, version: str, build_id: str) -> bool:
        """True if this manifest's version and build_id equal the running firmware's."""
        return self.version == version and self.build_id == build_id

    def part_for_file(self, filename: str) -> Part | None:
        """The part whose ``src`` basename equals ``filename`` (a stripped zip entry name)."""
        base = posixpath.basename(filename)
        for part in self.parts.values():
            if part.src and part.src_basename == base:
                return part
        return None

    def to_bytes(self) -> bytes:
        """The manifest serialised the way mos writes it (see :func:`dumps_manifest`)."""
        return dumps_manifest(self.obj)


# -- reading a bundle's manifest (host side: no field checks, every key kept) ------------------


def manifest_object(data: bytes, what: str = MANIFEST_FILE_NAME) -> dict[str, Any]:
    """manifest.json bytes as a JSON object, unchecked (the device's checks are :meth:`Manifest.parse`).

    Raises :class:`UpdaterError` ``failed to parse <what>: ...`` for bad JSON or a non-object.
    """
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise UpdaterError(f"failed to parse {what}: {exc}") from None
    if not isinstance(obj, dict):
        raise UpdaterError(f"failed to parse {what}: not a JSON object")
    return obj


def read_manifest(bundle: bytes | zipfile.ZipFile) -> dict[str, Any]:
    """The ``manifest.json`` object of a fw.zip (bytes or an open zip), via :func:`manifest_object`.

    The entry is found by name, at the top level or in a directory (the shallowest wins), so a
    bundle zipped with its folder is read too. Raises :class:`UpdaterError`: ``not a zip archive``,
    ``no manifest.json in the zip``, ``failed to parse manifest.json``.
    """
    try:
        zf = bundle if isinstance(bundle, zipfile.ZipFile) else zipfile.ZipFile(io.BytesIO(bundle))
        names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == MANIFEST_FILE_NAME]
        if not names:
            raise UpdaterError(f"no {MANIFEST_FILE_NAME} in the zip")
        data = zf.read(min(names, key=lambda n: n.count("/")))
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UpdaterError(f"not a zip archive: {exc}") from None
    return manifest_object(data)


def manifest_version(bundle: bytes | zipfile.ZipFile) -> str | None:
    """The bundle's ``version`` (None if it is not a readable bundle or has no string version)."""
    try:
        v = read_manifest(bundle).get("version")
    except UpdaterError:
        return None
    return v if isinstance(v, str) else None


# -- mos-style serialisation ------------------------------------------------------------------

_GO_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_ESCAPE_RE = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029]')


def _go_string(s: str) -> str:
    def repl(m: re.Match[str]) -> str:
        ch = m.group(0)
        return _GO_ESCAPES.get(ch) or f"\\u{ord(ch):04x}"

    return '"' + _GO_ESCAPE_RE.sub(repl, s) + '"'


def _go_float(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError(f"cannot encode {x!r} in JSON")
    if x == int(x) and abs(x) < 1e21:
        return str(int(x))
    return repr(x)  # Go's shortest form; the exponent spellings agree for the usual ranges


def go_json(value: Any, *, indent: str | None = " ", _level: int = 0) -> str:
    """Encode like Go's ``encoding/json`` (``MarshalIndent(v, "", indent)``, or ``Marshal`` when
    ``indent`` is None): HTML-safe escaping, non-ASCII kept, dict order as given.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, Mapping):
        items = [(_go_string(str(k)), v) for k, v in value.items()]
        if not items:
            return "{}"
        if indent is None:
            return "{" + ",".join(f"{k}:{go_json(v, indent=None)}" for k, v in items) + "}"
        inner = indent * (_level + 1)
        body = ",\n".join(f"{inner}{k}: {go_json(v, indent=indent, _level=_level + 1)}" for k, v in items)
        return "{\n" + body + "\n" + indent * _level + "}"
    if isinstance(value, list | tuple):
        if not value:
            return "[]"
        if indent is None:
            return "[" + ",".join(go_json(v, indent=None) for v in value) + "]"
        inner = indent * (_level + 1)
        body = ",\n".join(inner + go_json(v, indent=indent, _level=_level + 1) for v in value)
        return "[\n" + body + "\n" + indent * _level + "]"
    raise TypeError(f"cannot encode {type(value).__name__} in JSON")


def _is_empty(v: Any) -> bool:
    # Go omitempty: false, 0, "" (and nil) are dropped.
    return v is None or v is False or v == "" or (_is_int(v) and v == 0)


def _ordered_part(part: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in PART_FIELD_ORDER:
        if key not in part:
            continue
        v = part[key]
        if (key in _PART_POINTER_FIELDS and v is not None) or not _is_empty(v):
            out[key] = v
    for key in sorted(k for k in part if k not in PART_FIELD_ORDER):
        out[key] = part[key]
    return out


def _ordered_manifest(obj: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in TOP_FIELD_ORDER:
        if key == "parts":
            parts = obj.get("parts") or {}
            out["parts"] = {n: _ordered_part(parts[n]) for n in sorted(parts)}
        elif not _is_empty(obj.get(key)):
            out[key] = obj[key]
    for key in sorted(k for k in obj if k not in TOP_FIELD_ORDER):
        out[key] = obj[key]
    return out


def dumps_manifest(obj: Mapping[str, Any]) -> bytes:
    """Serialise a manifest object as ``mos create-fw-bundle`` does (UTF-8, no trailing newline):
    one-space indent, members in Go struct order (omitempty ones dropped), then extra keys sorted;
    parts sorted by name.
    """
    return go_json(_ordered_manifest(obj), indent=" ").encode("utf-8")
