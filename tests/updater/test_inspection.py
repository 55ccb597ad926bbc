"""updater.inspection: the fw.zip check behind ``mgrpc fw inspect``, as a report object."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from updater.bundle import make_virtual_bundle
from updater.errors import UpdaterError
from updater.inspection import inspect_bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    p = tmp_path / "fw.zip"
    p.write_bytes(make_virtual_bundle("esp32", "1.2.3", app_size=4096))
    return p


def test_good_bundle_reports_every_entry(bundle: Path) -> None:
    r = inspect_bundle(bundle, arch="ESP32")
    assert r.ok and r.problems == []
    assert r.manifest.version == "1.2.3" and r.file_size == bundle.stat().st_size
    assert r.entries[0].role == "manifest" and r.manifest_raw.startswith(b"{")
    parts = [e for e in r.entries if e.role == "part"]
    assert parts and all(e.part for e in parts)
    assert all("MISMATCH" not in c for e in parts for c in e.checks)
    assert r.signatures == [] and r.key_results is None


def test_problems_are_collected_not_raised(bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(bad, "w") as zout:
        names = [i.filename for i in zin.infolist()]
        victim = names[1]
        for info in zin.infolist():
            zout.writestr(info, b"\x00" * 7 if info.filename == victim else zin.read(info))
    r = inspect_bundle(bad, arch="esp8266")
    assert not r.ok
    assert r.problems[0] == "Wrong platform: bundle is for 'esp32', not 'esp8266'"
    assert any("size 7 != manifest size" in p for p in r.problems)
    entry = next(e for e in r.entries if e.full_name == victim)
    assert entry.role == "part" and "size MISMATCH" in entry.checks


def test_unreadable_bundles_raise(tmp_path: Path, bundle: Path) -> None:
    notzip = tmp_path / "x.zip"
    notzip.write_bytes(b"not a zip at all")
    with pytest.raises(UpdaterError):
        inspect_bundle(notzip)
    reordered = tmp_path / "r.zip"
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(reordered, "w") as zout:
        infos = zin.infolist()
        for info in infos[1:] + infos[:1]:
            zout.writestr(info, zin.read(info))
    with pytest.raises(UpdaterError, match="manifest.json must be the first entry"):
        inspect_bundle(reordered)
    with pytest.raises(OSError):
        inspect_bundle(tmp_path / "missing.zip")
