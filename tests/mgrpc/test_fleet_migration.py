"""The fleet database's schema: a SQLite file written by the first schema (mgrpc before the
SQLAlchemy tables) is migrated when opened; a file written by a newer schema is refused with a clear
error, by the library and by ``mgrpc dashboard``."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mgrpc.fleet import FleetDB, FleetError, Rollout, bundle_info
from mgrpc.fleet.sql import SCHEMA_VERSION
from mgrpc.shadow_server import ShadowStore
from tests.device_helpers import bundle


def _old_device(dev_id: str, version: str) -> dict[str, Any]:
    # the fields DeviceRecord had in schema 1 (no presence, boots)
    return {"id": dev_id, "arch": "esp32", "app": "demo", "version": version, "build_id": "b" + version,
            "committed": True, "online": True, "source": "mqtt", "url": "", "last_seen": 1.0, "reverted": False,
            "reason": "", "reboot_pending": False, "progress": {}, "ota": {}}  # fmt: skip


def _old_rollout(sha: str) -> dict[str, Any]:
    r = Rollout(id="r-old", bundle=sha, version="1.1", method="push", devices=["a", "b"], created_at=100.0)
    for event in ("start", "applied", "online_new", "committed"):
        r.jobs["a"].fire(event, now=101.0)
    r.jobs["b"].fire("start", now=101.0)
    r.jobs["b"].fire("error", now=102.0)
    r.jobs["b"].error = "write failed at offset 0"
    r.state = "finished"
    doc = r.to_json()  # schema 1 kept the whole document, jobs inside, and jobs had no owner
    for j in doc["jobs"].values():
        del j["owner"]
    return doc


def _write_schema_1(path: Path) -> dict[str, bytes]:
    """A fleet.sqlite as the first schema wrote it (its CREATE statements and documents), with one
    bundle's bytes in <file>.bundles/ and another's missing."""
    kept, lost = bundle("1.1"), bundle("1.2")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS bundles (sha TEXT PRIMARY KEY, doc TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS shadows (thing TEXT PRIMARY KEY, doc TEXT NOT NULL);
    """)
    for dev in (_old_device("a", "1.1"), _old_device("b", "1.0")):
        db.execute("INSERT INTO devices (id, doc) VALUES (?, ?)", (dev["id"], json.dumps(dev)))
    bundle_dir = Path(str(path) + ".bundles")
    bundle_dir.mkdir()
    for data in (kept, lost):
        info = bundle_info(data)
        db.execute("INSERT INTO bundles (sha, doc) VALUES (?, ?)", (info.sha, json.dumps(info.to_json())))
    (bundle_dir / f"{hashlib.sha256(kept).hexdigest()}.zip").write_bytes(kept)
    db.execute("INSERT INTO rollouts (id, doc) VALUES (?, ?)",
               ("r-old", json.dumps(_old_rollout(hashlib.sha256(kept).hexdigest()))))  # fmt: skip
    shadow = {"state": {"desired": {"led": 1}, "reported": {"led": 0}}, "metadata": {}, "version": 3}
    db.execute("INSERT INTO shadows (thing, doc) VALUES (?, ?)", ("a", json.dumps(shadow)))
    db.commit()
    db.close()
    return {"kept": kept, "lost": lost}


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_schema_1_file_is_migrated_on_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "fleet.sqlite"
    data = _write_schema_1(path)
    caplog.set_level(logging.WARNING, "mgrpc.fleet")
    db = FleetDB(path)
    try:
        devices = {d.id: d for d in db.devices()}
        assert {k: (d.version, d.build_id, d.boots) for k, d in devices.items()} == {"a": ("1.1", "b1.1", 0),
                                                                                      "b": ("1.0", "b1.0", 0)}
        sha = hashlib.sha256(data["kept"]).hexdigest()
        assert [b.sha for b in db.bundles()] == [sha] and db.bundle_data(sha) == data["kept"]
        [r] = db.rollouts()
        assert (r.id, r.state, r.method, r.devices, r.created_at) == ("r-old", "finished", "push", ["a", "b"], 100.0)
        assert {d: (j.state, j.error, j.owner) for d, j in r.jobs.items()} == {
            "a": ("done", "", ""), "b": ("failed", "write failed at offset 0", "")}
    finally:
        db.close()
    # the missing bundle is named, not silently lost; the old tables are gone, the shadows stay
    text = caplog.text
    assert "migrated from the first fleet schema: 2 devices, 1 bundles, 1 rollouts" in text
    assert hashlib.sha256(data["lost"]).hexdigest() in text and "may be deleted" in text
    assert not {"devices", "bundles", "rollouts"} & _tables(path)
    store = ShadowStore(path)
    try:
        doc = store.get("a")
        assert doc is not None and doc.version == 3 and doc.desired == {"led": 1}
    finally:
        store.close()
    # opening again changes nothing
    caplog.clear()
    db = FleetDB(path)
    try:
        assert [r.id for r in db.rollouts()] == ["r-old"] and len(db.devices()) == 2
    finally:
        db.close()
    assert "migrated" not in caplog.text
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT value FROM fleet_meta WHERE key = 'schema'").fetchall() == [(str(SCHEMA_VERSION),)]


def test_a_newer_schema_is_refused_with_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fleet.sqlite"
    FleetDB(path).close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE fleet_meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(FleetError, match=f"schema {SCHEMA_VERSION + 1}, written by a newer mgrpc.*upgrade mgrpc"):
        FleetDB(path)
    from mgrpc.cli import main

    rc = main(["dashboard", "--db", str(path), "--listen", "http://127.0.0.1:0"])
    err = capsys.readouterr().err
    assert rc == 1 and f"Error: {path}: this fleet database has schema {SCHEMA_VERSION + 1}" in err, err
    assert "Traceback" not in err and "internal error" not in err
