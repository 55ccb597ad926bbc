"""The reliability soak (bench/soak.py) at 5 % scale, and proof that its checks can fail."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_soak_at_five_percent() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--scale", "0.05"],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    m = re.search(r"power cuts: tried (\d+) \(goal 500\), recovered (\d+), lost 0", out)
    assert m and int(m.group(1)) == int(m.group(2)) >= 500, out
    for target in ("serial", "tcp", "http", "mqtt", "ble", "msgpack", "router"):
        assert re.search(rf"fuzz {target}\s*: inputs 50000 \(goal 50000\), uncaught 0, hangs 0", out), out
    assert re.search(r"malformed bundles: tried 5000 .* uncaught 0, hangs 0, running slot or boot config written 0", out)
    assert re.search(r"kill -9: runs (\d+) \(goal 5\), .* bricked 0", out), out
    assert "soak passed" in out


def test_power_cut_check_catches_a_non_atomic_file_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FlashFS.write that writes in place (no temp file + rename) must show up as lost cuts."""
    import littlefs.lfs as lfs

    from bench.soaklib import powercut
    from updater import fs as fs_mod

    def in_place(self: Any, name: str, data: bytes) -> None:
        fs = self._fs.fs

        def do() -> None:
            fh = lfs.file_open(fs, name, "wb")
            try:
                half = len(data) // 2
                lfs.file_write(fs, fh, bytes(data[:half]))
                lfs.file_sync(fs, fh)  # half the file is committed: a cut now leaves it half written
                lfs.file_write(fs, fh, bytes(data[half:]))
            finally:
                lfs.file_close(fs, fh)

        self._call(do, name=name)

    monkeypatch.setattr(fs_mod.FlashFS, "write", in_place)
    res = powercut.run_cuts(7, 400)
    assert res.lost > 0, res
    assert any("files" in f for f in res.failures), res.failures[:3]


def test_fuzz_reports_an_exception_that_is_not_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.soaklib import fuzz

    real = fuzz.parse_frame

    def fragile(raw: bytes, **kw: Any) -> Any:
        if b"method" not in raw:
            raise KeyError("method")  # a decoder bug: a builtin exception escapes
        return real(raw, **kw)

    monkeypatch.setattr(fuzz, "parse_frame", fragile)
    res = fuzz.run_target("http", 3, 300)
    assert res.uncaught > 0 and "KeyError" in res.failures[0]
