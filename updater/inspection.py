"""Checking a fw.zip on the host (``mgrpc fw inspect``): what a device would find, as a report object.

:func:`inspect_bundle` streams the file through the same zip parser a device uses
(:class:`updater.zipstream.ZipStreamParser`, so a bad CRC or a truncated archive fails the same
way), parses the manifest with the device's rules (:meth:`updater.manifest.Manifest.parse`), and
checks every part's size and checksums, missing part files, the platform, and the signatures.
Faults that make the file unreadable as a bundle raise :class:`UpdaterError` (or ``OSError``); the
others are collected in :attr:`BundleReport.problems`, in the order they were found.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from updater.errors import UpdaterError
from updater.manifest import MANIFEST_FILE_NAME, Manifest

__all__ = ["BundleReport", "EntryReport", "inspect_bundle"]

_READ_CHUNK = 1 << 20


@dataclass
class EntryReport:
    """One zip entry: its header facts, what it is for, and the checks made on it.

    ``role`` is ``"manifest"``, ``"part"`` (then ``part`` names it) or ``"ignored"`` (no part takes
    the file: devices skip it). ``checks`` are short verdicts such as ``"size ok"``,
    ``"sha1 MISMATCH"``, ``"crc ok"``.
    """

    name: str
    full_name: str
    size: int
    crc32: int
    method: int
    extra: bytes
    sha1: Any = field(default_factory=hashlib.sha1, repr=False)
    sha256: Any = field(default_factory=hashlib.sha256, repr=False)
    got: int = 0
    data: bytearray | None = field(default=None, repr=False)  # kept only for the manifest
    role: str = "ignored"
    part: str | None = None
    checks: list[str] = field(default_factory=list)

    @property
    def method_name(self) -> str:
        """``stored``, ``deflated`` or ``method N``."""
        return {0: "stored", 8: "deflated"}.get(self.method, f"method {self.method}")


@dataclass
class BundleReport:
    """What :func:`inspect_bundle` found. ``ok`` when there are no ``problems``.

    ``signatures`` lists the signature slots present (``sig0``..``sig7``); ``key_results`` maps each
    key slot checked to whether its signature verifies (None when no keys were given or the
    signatures could not be checked at all: see ``problems``).
    """

    path: str
    file_size: int
    entries: list[EntryReport]
    manifest: Manifest
    signatures: list[str] = field(default_factory=list)
    key_results: dict[int, bool] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def manifest_raw(self) -> bytes:
        """The manifest.json bytes, as stored."""
        return self.manifest.raw

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


def _scan(path: str, *, allow_deflate: bool) -> list[EntryReport]:
    from updater.zipstream import ArchiveEnd, EntryData, EntryEnd, EntryStart, ZipStreamParser

    parser = ZipStreamParser(allow_deflate=allow_deflate)
    entries: list[EntryReport] = []
    cur: EntryReport | None = None
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            if chunk:
                parser.feed(chunk)
            for ev in parser.events():
                if isinstance(ev, EntryStart):
                    cur = EntryReport(ev.name, ev.full_name, ev.size, ev.crc32, ev.method, ev.extra)
                    if not entries:
                        cur.data = bytearray()
                    entries.append(cur)
                elif isinstance(ev, EntryData):
                    assert cur is not None
                    cur.sha1.update(ev.data)
                    cur.sha256.update(ev.data)
                    cur.got += len(ev.data)
                    if cur.data is not None:
                        cur.data += ev.data
                elif isinstance(ev, EntryEnd):
                    cur = None
                elif isinstance(ev, ArchiveEnd):
                    return entries
            if not chunk:
                parser.close()  # raises: the archive ended early
                return entries


def inspect_bundle(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    keys: Mapping[int, str] | None = None,
    sig_req_mask: int | None = None,
    allow_deflate: bool = False,
    require_build_id: bool = False,
) -> BundleReport:
    """Check the fw.zip at ``path`` as a device would; see the module doc.

    ``arch``: the platform the bundle must be for. ``keys``: public keys by slot (base64, as
    :func:`updater.signing.load_public_key_b64` returns them); each slot's signature is checked, and
    ``sig_req_mask`` (default: every given slot) says which must verify. Raises
    :class:`UpdaterError` when the file is not a readable bundle (``manifest.json must be the first
    entry of the bundle``, a zip or manifest fault) and ``OSError`` when it cannot be read.
    """
    from updater.signing import parse_sig_extra, verify_signatures

    path = os.fspath(path)
    entries = _scan(path, allow_deflate=allow_deflate)
    if not entries or entries[0].name != MANIFEST_FILE_NAME:
        raise UpdaterError("manifest.json must be the first entry of the bundle")
    first = entries[0]
    assert first.data is not None
    raw = bytes(first.data)
    manifest = Manifest.parse(raw, require_build_id=require_build_id)
    report = BundleReport(path, os.path.getsize(path), entries, manifest)
    problems = report.problems
    if arch:
        try:
            manifest.check_platform(arch)
        except UpdaterError as exc:
            problems.append(f"{exc.message}: bundle is for {manifest.platform!r}, not {arch!r}")

    first.role = "manifest"
    seen: set[str] = set()
    for e in entries[1:]:
        part = manifest.part_for_file(e.name)
        if part is None:
            continue
        e.role, e.part = "part", part.name
        seen.add(part.name)
        if part.size is not None:
            ok = part.size == e.got
            e.checks.append(f"size {'ok' if ok else 'MISMATCH'}")
            if not ok:
                problems.append(f"part {part.name}: size {e.got} != manifest size {part.size}")
        for label, want, got in (("sha1", part.cs_sha1, e.sha1), ("sha256", part.cs_sha256, e.sha256)):
            if want is None:
                continue
            ok = got.hexdigest() == want
            e.checks.append(f"{label} {'ok' if ok else 'MISMATCH'}")
            if not ok:
                problems.append(f"part {part.name}: {label} {got.hexdigest()} != manifest {want}")
        if e.crc32:
            e.checks.append("crc ok")  # the parser raised Invalid CRC otherwise
    for part in manifest.parts.values():
        if part.src and part.name not in seen:
            problems.append(f"part {part.name}: file {part.src_basename} is missing from the bundle")

    try:
        sigs = parse_sig_extra(first.extra)
    except UpdaterError as exc:
        problems.append(exc.message)
        sigs = {}
    report.signatures = sorted(k for k in sigs if re.fullmatch(r"sig[0-7]", k))
    if keys:
        mask = sig_req_mask if sig_req_mask is not None else sum(1 << i for i in keys)
        try:
            result = verify_signatures(raw, first.extra, dict(keys), -1)
            report.key_results = {i: bool(result >> i & 1) for i in sorted(keys)}
            verify_signatures(raw, first.extra, dict(keys), mask)
        except UpdaterError as exc:
            problems.append(exc.message)
    return report
