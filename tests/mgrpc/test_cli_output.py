"""What the CLI shows while it works (issue #12), run as a subprocess: OTA progress on a terminal and
in a log, ``-v`` and ``-vv``, the URLs the virtual device and the bridge print, the bridge's HTTP
endpoints, and the conformance pytest plugin as the README loads it."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.device_helpers import bundle
from tests.mgrpc.cli_proc import ROOT, DeviceProc, cli_env, run_cli
from tests.mosquitto import mosquitto_broker  # noqa: F401  (a pytest fixture)

STAGES = ["Getting current OTA status...", "Writing data...", "Finalizing update..."]


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DeviceProc]:
    with DeviceProc.device(tmp_path / "dev1", "tcp://127.0.0.1:0", "http://127.0.0.1:0/rpc") as d:
        yield d


@pytest.fixture
def fw(tmp_path: Path) -> Path:
    path = tmp_path / "fw.zip"
    path.write_bytes(bundle("2.0"))
    return path


def test_progress_lines_reach_100_percent_and_v_prints_each_line_once(dev: DeviceProc, fw: Path) -> None:
    r = run_cli("--port", dev.urls[0], "-v", "ota", str(fw))
    assert r.rc == 0, r.err
    assert r.out == ""
    lines = r.err.splitlines()
    n = fw.stat().st_size
    progress = [line for line in lines if re.fullmatch(r"  \d+ of \d+ \(\d+\.\d\d%\)", line)]
    assert progress[-1] == f"  {n} of {n} (100.00%)"
    assert len(progress) == len(set(progress))
    for stage in STAGES:
        assert sum(stage in line for line in lines) == 1, (stage, r.err)
    summary = [line for line in lines if line.startswith("Update sent:")]
    assert len(summary) == 1 and re.search(r"\(\d+\.\d (KiB|MiB)/s\)$", summary[0]), summary


def _run_on_pty(argv: list[str], timeout_s: float = 60.0) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe); returns (rc, stdout, terminal text)."""
    import pty

    master, slave = pty.openpty()
    env = cli_env({"TERM": "xterm-256color", "COLUMNS": "160"})
    env.pop("NO_COLOR", None)
    p = subprocess.Popen([sys.executable, "-m", "mgrpc", *argv], stdout=subprocess.PIPE, stderr=slave,
                         stdin=subprocess.DEVNULL, env=env, cwd=ROOT)  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    os.close(master)
    out = p.stdout.read().decode() if p.stdout else ""
    rc = p.wait(10)
    return rc, out, b"".join(chunks).decode("utf-8", "replace")


def test_terminal_bar_shows_percent_and_binary_units(dev: DeviceProc, fw: Path) -> None:
    rc, out, tty = _run_on_pty(["--port", dev.urls[0], "ota", str(fw)])
    assert rc == 0, tty
    assert out == ""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", tty)
    assert "100%" in text, text
    assert re.search(r"\d+\.\d/\d+\.\d KiB", text), text  # done/total in KiB
    assert re.search(r"\d+\.\d (KiB|MiB)/s", text), text  # the rate in the same units
    assert " kB" not in text and " MB" not in text and "kB/s" not in text, text
    summary = re.search(r"Update sent: \d+ bytes in [\d.]+ s \([\d.]+ (KiB|MiB)/s\)", text)
    assert summary, text


def test_vv_shows_frame_bodies_without_newline_junk(dev: DeviceProc) -> None:
    r = run_cli("--port", dev.urls[0], "-vv", "call", "Sys.GetInfo")
    assert r.rc == 0
    assert '"id": "dev1"' in r.out
    tx = [line for line in r.err.splitlines() if "event='tx'" in line]
    rx = [line for line in r.err.splitlines() if "event='rx'" in line]
    assert tx and '"method":"Sys.GetInfo"' in tx[0]
    assert rx and '"fw_version"' in rx[0]
    assert "junk" not in r.err and "Using selector" not in r.err


def test_bridge_http_full_frame_and_rest(dev: DeviceProc) -> None:
    with DeviceProc(["bridge", "--to", dev.urls[0], "--listen", "http://127.0.0.1:0/rpc"], n_urls=1) as br:
        url = br.urls[0]
        req = urllib.request.Request(url, data=b'{"id":7,"src":"me","method":"Sys.GetInfo"}', method="POST")
        with urllib.request.urlopen(req, timeout=20) as resp:
            assert resp.status == 200
            frame = json.loads(resp.read())
        assert frame["id"] == 7 and frame["result"]["id"] == "dev1"
        req = urllib.request.Request(url + "/Sys.GetInfo", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=20) as resp:
            assert json.loads(resp.read())["id"] == "dev1"
        r = run_cli("--port", url, "call", "Sys.GetInfo")
        assert r.rc == 0 and '"id": "dev1"' in r.out, r.err


def test_device_prints_the_mqtt_url_a_client_uses(tmp_path: Path, mosquitto_broker) -> None:  # noqa: F811
    broker = mosquitto_broker()
    listen = broker.url("")  # mqtt://127.0.0.1:<port>/  (the device side: no id in the URL)
    listen = listen.rstrip("/")
    with DeviceProc.device(tmp_path / "mq", listen, id="esp32_mq1") as d:
        assert d.urls[0] == f"{listen}/esp32_mq1"
        r = run_cli("--port", d.urls[0], "call", "Sys.GetInfo")
        assert r.rc == 0 and '"id": "esp32_mq1"' in r.out, r.err
        line = run_cli("--port", f"{listen}/nobody", "--timeout", "1s", "call", "Sys.GetInfo").error_line()
        assert "check the device id at the end of --port (mqtt://BROKER/DEVICE_ID)" in line


def test_conformance_plugin_as_the_readme_loads_it(tmp_path: Path, dev: DeviceProc) -> None:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"load the plugin\s*\(`pytest (-p \S+)`", readme)
    assert m, "README no longer shows how to load the plugin"
    test = tmp_path / "test_board.py"
    test.write_text(textwrap.dedent(f"""
        import dataclasses
        from conformance.model import Outcome

        def test_my_board(mgrpc_conformance):
            report = mgrpc_conformance({dev.urls[0]!r}, only=["rpc"])
            assert report.ok, report.failed()

        def test_a_failure_reads_well(mgrpc_conformance):
            report = mgrpc_conformance({dev.urls[0]!r}, only=["rpc"])
            bad = dataclasses.replace(report.results[0], outcome=Outcome.FAIL, message="the id was changed",
                                      seen='{{"id": 2}}', expected='{{"id": 1}}')
            report = dataclasses.replace(report, results=(bad, *report.results[1:]))
            assert report.ok, report.failed()
    """))
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", m.group(1).split()[1], str(test), "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300, env=cli_env(), cwd=tmp_path,
    )  # fmt: skip
    assert "already registered" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert "1 failed, 1 passed" in p.stdout, p.stdout + p.stderr
    assert "AssertionError: 1 check failed:" in p.stdout, p.stdout
    assert "the id was changed" in p.stdout and "seen:     {\"id\": 2}" in p.stdout, p.stdout
    assert "CheckResult(" not in p.stdout and "<Report tcp://" in p.stdout, p.stdout
