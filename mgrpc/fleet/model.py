"""The fleet model: devices, uploaded bundles and rollouts, persisted in one SQLite file.

Bundles are stored as files beside the database (``<db>.bundles/<sha256>.zip``), named by their
SHA-256 so an upload of the same file is the same bundle.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mgrpc.errors import AppError
from mgrpc.fleet.rollout import Rollout
from updater.errors import UpdaterError
from updater.manifest import read_manifest

__all__ = ["BundleInfo", "DeviceRecord", "FleetDB", "FleetError", "bundle_info"]


class FleetError(AppError, ValueError):
    """Bad input to the fleet (a bundle that is not a fw.zip, an unknown device or bundle, ...)."""


@dataclass
class DeviceRecord:
    """What the dashboard knows of a device (seen over MQTT, or added by URL)."""

    id: str
    arch: str = ""
    app: str = ""
    version: str = ""
    build_id: str = ""
    committed: bool = True
    online: bool = False
    source: str = "mqtt"  # "mqtt" or "url"
    presence: str = ""  # "status": <id>/status with a last will; "shadow": seen only by its shadow requests
    url: str = ""  # RPC URL (mqtt://broker/<id>, ws://..., ...)
    last_seen: float = 0.0
    reverted: bool = False
    reason: str = ""  # the boot loader's word on the last boot (why it fell back, after a rollback)
    boots: int = 0  # the device's boot counter (MQTT status), tells a new boot from an old message
    reboot_pending: bool = False  # URL devices: the boot config already names another slot
    progress: dict[str, Any] = field(default_factory=dict)
    ota: dict[str, Any] = field(default_factory=dict)  # the shadow's reported.ota

    def to_json(self) -> dict[str, Any]:
        """For the dashboard and the database."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeviceRecord:
        """Inverse of :meth:`to_json` (unknown keys ignored)."""
        known = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class BundleInfo:
    """An uploaded fw.zip."""

    sha: str
    size: int
    name: str
    version: str
    arch: str
    build_id: str
    uploaded_at: float

    def to_json(self) -> dict[str, Any]:
        """For the dashboard and the database."""
        return asdict(self)


def bundle_info(data: bytes, *, filename: str = "fw.zip") -> BundleInfo:
    """Read a fw.zip's manifest; :class:`FleetError` if it is not a firmware bundle."""
    try:
        manifest = read_manifest(data)
    except UpdaterError as e:
        raise FleetError(f"not a firmware bundle: {e}") from None
    if not isinstance(manifest.get("version"), str):
        raise FleetError("not a firmware bundle: the manifest has no version")
    return BundleInfo(
        sha=hashlib.sha256(data).hexdigest(), size=len(data), name=filename,
        version=manifest["version"], arch=str(manifest.get("platform", "")),
        build_id=str(manifest.get("build_id", "")), uploaded_at=time.time(),
    )  # fmt: skip


class FleetDB:
    """Devices, bundles and rollouts in SQLite (``path`` may be ``":memory:"``; bundles then in RAM)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS bundles (sha TEXT PRIMARY KEY, doc TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
            """
        )
        self.db.commit()
        self._mem_bundles: dict[str, bytes] = {}
        self.bundle_dir = None if self.path == ":memory:" else Path(self.path + ".bundles")

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def _put(self, table: str, key: str, doc: dict[str, Any]) -> None:
        col = "sha" if table == "bundles" else "id"
        self.db.execute(f"INSERT OR REPLACE INTO {table} ({col}, doc) VALUES (?, ?)", (key, json.dumps(doc)))
        self.db.commit()

    def _all(self, table: str) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self.db.execute(f"SELECT doc FROM {table}")]

    # devices
    def save_device(self, dev: DeviceRecord) -> None:
        """Insert or update a device."""
        self._put("devices", dev.id, dev.to_json())

    def devices(self) -> list[DeviceRecord]:
        """Every stored device."""
        return [DeviceRecord.from_json(d) for d in self._all("devices")]

    # bundles
    def add_bundle(self, data: bytes, *, filename: str = "fw.zip") -> BundleInfo:
        """Store an uploaded bundle (validated); returns its info."""
        info = bundle_info(data, filename=filename)
        if self.bundle_dir is None:
            self._mem_bundles[info.sha] = data
        else:
            self.bundle_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.bundle_dir / f".{info.sha}.tmp"
            tmp.write_bytes(data)
            tmp.replace(self.bundle_dir / f"{info.sha}.zip")
        self._put("bundles", info.sha, info.to_json())
        return info

    def bundles(self) -> list[BundleInfo]:
        """Every stored bundle, newest first."""
        out = [BundleInfo(**b) for b in self._all("bundles")]
        return sorted(out, key=lambda b: -b.uploaded_at)

    def bundle(self, sha: str) -> BundleInfo | None:
        """A bundle's info by SHA-256 (hex)."""
        row = self.db.execute("SELECT doc FROM bundles WHERE sha = ?", (sha,)).fetchone()
        return BundleInfo(**json.loads(row[0])) if row else None

    def bundle_data(self, sha: str) -> bytes:
        """A bundle's bytes (:class:`FleetError` if unknown)."""
        if self.bundle(sha) is None:
            raise FleetError(f"unknown bundle {sha}")
        if self.bundle_dir is None:
            return self._mem_bundles[sha]
        return (self.bundle_dir / f"{sha}.zip").read_bytes()

    # rollouts
    def save_rollout(self, r: Rollout) -> None:
        """Insert or update a rollout with its jobs."""
        self._put("rollouts", r.id, r.to_json())

    def rollouts(self) -> list[Rollout]:
        """Every stored rollout, oldest first."""
        return sorted((Rollout.from_json(r) for r in self._all("rollouts")), key=lambda r: r.created_at)
