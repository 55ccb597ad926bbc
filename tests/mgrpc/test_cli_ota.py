"""``mgrpc ota`` end to end against the virtual device over ws:// (device on its own loop in a thread)."""

from __future__ import annotations

import http.server
import re
import threading

import pytest

from mgrpc.cli import main
from mgrpc.cli.ota import MosProgress
from tests.mgrpc.test_cli_files import DeviceThread
from updater.bundle import make_virtual_bundle


@pytest.fixture
def device(tmp_path):
    d = DeviceThread(tmp_path / "dev", device_id="esp32_OTA")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def bundle2() -> bytes:
    return make_virtual_bundle("esp32", "2.0", app_size=16384)


@pytest.fixture
def fw_path(tmp_path, bundle2):
    p = tmp_path / "fw.zip"
    p.write_bytes(bundle2)
    return p


def cli(device: DeviceThread, *argv: str) -> int:
    return main(["--port", device.url, "--timeout", "5s", *argv])


def wait_boots(device: DeviceThread, n: int) -> None:
    device.run(device.dev.wait_booted(boots=n, timeout_s=10))


def test_ota_then_commit_command(device, fw_path, bundle2, capsys):
    assert cli(device, "ota", str(fw_path)) == 0
    err = capsys.readouterr().err.splitlines()
    n = len(bundle2)
    assert err[:4] == [
        "Getting current OTA status...",
        f'Starting an update (args: {{"timeout":600,"commit_timeout":300,"size":{n}}})...',
        # the chunk size comes from the device's rpc.max_frame_size and the link (see rpc.host.ota)
        "Device limits: rpc.max_frame_size 4096, 3064-byte messages on WS; writing 2048-byte chunks, 20 in flight.",
        "Writing data...",
    ]
    assert err[-1] == "Finalizing update..."
    expected = [f"  {k * 65536} of {n} ({k * 65536 * 100 / n:.2f}%)" for k in range(1, n // 65536 + 1)]
    expected.append(f"  {n} of {n} (100.00%)")
    assert [line for line in err if re.match(r"  \d+ of \d+ \(", line)] == expected
    wait_boots(device, 2)
    assert device.dev.boot_info.version == "2.0"
    assert cli(device, "boot-state") == 0
    assert "active running uncommitted\n  version:  2.0\n" in capsys.readouterr().out
    assert cli(device, "commit") == 0
    assert capsys.readouterr().err == "Committed.\n"
    assert device.dev.storage.is_committed


def test_ota_commit_flag_and_timeouts(device, fw_path, bundle2, capsys):
    rc = cli(device, "ota", "--window", "1", "--chunk-size", "1024", "--update-timeout", "2m",
             "--commit-timeout", "1m", "--commit", str(fw_path))  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err.splitlines()
    assert f'Starting an update (args: {{"timeout":120,"commit_timeout":60,"size":{len(bundle2)}}})...' in err
    assert err[-2:] == ["Device is back running 2.0, committing...", "Committed: device runs 2.0."]
    assert device.dev.storage.is_committed and device.dev.boot_info.version == "2.0"


def test_ota_revert_command(device, fw_path, capsys):
    assert cli(device, "ota", str(fw_path)) == 0
    wait_boots(device, 2)
    assert cli(device, "revert") == 0
    wait_boots(device, 3)
    assert device.dev.boot_info.version == "1.0" and device.dev.storage.is_committed


def test_ota_custom_begin_args(device, fw_path, bundle2, capsys):
    args = '{"commit_timeout": 30, "size": %d}' % len(bundle2)
    assert cli(device, "ota", str(fw_path), args) == 0
    assert f"Starting an update (args: {args})..." in capsys.readouterr().err
    wait_boots(device, 2)
    assert device.call("OTA.GetBootState")["commit_timeout"] == 30


def test_ota_resumes_an_interrupted_update(device, fw_path, bundle2, capsys):
    import base64

    n = len(bundle2)
    device.call("OTA.Begin", {"timeout": 600, "commit_timeout": 300, "size": n})
    for off in range(0, 4096, 512):
        device.call("OTA.Write", {"offset": off, "data": base64.b64encode(bundle2[off : off + 512]).decode()})
    assert cli(device, "ota", "--no-resume", str(fw_path)) == 1
    assert capsys.readouterr().err.endswith(
        "Error: update is already in progress (1), call OTA.End; run without --no-resume to continue it\n"
    )
    assert cli(device, "ota", str(fw_path)) == 0
    err = capsys.readouterr().err
    assert f"Resuming the update in progress at offset 4096 of {n}..." in err and "Starting an update" not in err
    wait_boots(device, 2)
    assert device.dev.boot_info.version == "2.0"


def test_ota_from_url(device, bundle2, tmp_path, capsys):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "fw.zip").write_bytes(bundle2)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path / "www"), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert cli(device, "ota", f"{base}/missing.zip") == 1
        err = capsys.readouterr().err
        assert err.startswith(f"Fetching {base}/missing.zip...\n") and "HTTP 404" in err
        assert cli(device, "ota", f"{base}/fw.zip") == 0
        err = capsys.readouterr().err.splitlines()
        assert err[:3] == [f"Fetching {base}/fw.zip...", f"  done, {len(bundle2)} bytes.", "Getting current OTA status..."]
    finally:
        srv.shutdown()
        srv.server_close()
    wait_boots(device, 2)


def test_ota_argument_and_device_errors(device, fw_path, tmp_path, capsys):
    assert cli(device, "ota") == 2
    assert capsys.readouterr().err == "Error: firmware file is required; see 'mgrpc ota --help'\n"
    assert cli(device, "ota", "a", "b", "c") == 2
    assert capsys.readouterr().err == "Error: extra arguments: c; see 'mgrpc ota --help'\n"
    assert cli(device, "ota", str(fw_path), "{nope") == 2
    assert capsys.readouterr().err == (
        "Error: OTA.Begin args [{nope] is not a valid JSON string; see 'mgrpc ota --help'\n"
    )
    assert cli(device, "ota", "--window", "21", str(fw_path)) == 2
    assert "--window must be between 1 and 20" in capsys.readouterr().err
    assert cli(device, "ota", str(tmp_path / "nope.zip")) == 1
    assert capsys.readouterr().err.startswith("Error: unable to read")
    # a bundle for another platform: refused before OTA.Begin (the device's arch from Sys.GetInfo)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(make_virtual_bundle("esp8266", "2.0", app_size=4096))
    assert cli(device, "ota", str(bad)) == 1
    err = capsys.readouterr().err
    assert err == "Error: the bundle is for platform esp8266, but the device is esp32 (Sys.GetInfo); use a bundle built for esp32\n"
    assert device.call("OTA.Status")["state"] != 1 and device.dev.boots == 1
    # after an update the running firmware is uncommitted: a new one is refused
    assert cli(device, "ota", str(fw_path)) == 0
    wait_boots(device, 2)
    capsys.readouterr()
    assert cli(device, "ota", str(fw_path)) == 1
    assert capsys.readouterr().err.endswith(
        "Error: unable to start an update: remote error -1: Previous update has not been committed yet; "
        "commit or revert the running firmware first ('mgrpc commit' or 'mgrpc revert')\n"
    )


def test_mos_progress_lines():
    lines: list[str] = []
    p = MosProgress(lines.append)
    total = 200000
    for done in [0, *range(512, total, 512), total]:
        p(done, total)
    assert lines == [
        "  65536 of 200000 (32.77%)", "  131072 of 200000 (65.54%)", "  196608 of 200000 (98.30%)",
        "  200000 of 200000 (100.00%)",
    ]  # fmt: skip
    lines.clear()
    p = MosProgress(lines.append)
    p(70000, total)  # a resumed update starts past the first boundary: no line for the start itself
    p(70512, total)
    assert lines == []


def test_ota_progress_bar_on_a_terminal(device, fw_path, bundle2, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli(device, "ota", str(fw_path)) == 0
    err = capsys.readouterr().err
    assert "Writing data..." in err and "Finalizing update..." in err
    assert f"Update sent: {len(bundle2)} bytes in " in err
    assert not re.search(r"^  \d+ of \d+ \(", err, re.M)  # the bar replaces mos's lines
    wait_boots(device, 2)


def test_ota_commit_resumes_an_update_cut_off_before_its_commit(device, fw_path, capsys):
    """`ota --commit` again on a device already running that firmware uncommitted just commits it
    (the kill -9 soak found the retry refused with "Previous update has not been committed yet")."""
    assert cli(device, "ota", str(fw_path)) == 0  # applied; the commit step never ran
    wait_boots(device, 2)
    assert device.dev.boot_info.version == "2.0" and not device.dev.storage.is_committed
    capsys.readouterr()
    assert cli(device, "ota", "--commit", str(fw_path)) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Device already runs 2.0 uncommitted; committing it."
    assert err[-1] == "Committed: device runs 2.0."
    assert device.dev.storage.is_committed and device.dev.boot_info.version == "2.0"
