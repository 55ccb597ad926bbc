"""``mgrpc conformance``: table on stdout, JUnit/JSON files, exit status; and the pytest plugin."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

import transports
from conformance.faults import make_faulty_node
from conformance.refdevice import make_node
from mgrpc.cli import conformance as cli

pytestmark = pytest.mark.timeout(120)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mgrpc")
    parser.add_argument("--port")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--rpc-creds")
    sub = parser.add_subparsers()
    cli.register(sub)
    return parser.parse_args(argv)


async def _serve_tcp(node: Any) -> tuple[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    return url, await transports.listen(url, node)


async def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    args = _parse(argv)
    # The command runs its own event loop; the device keeps serving on ours meanwhile.
    rc = await asyncio.to_thread(args.func, args)
    return rc, capsys.readouterr().out


async def test_good_device_table_reports_and_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, lst = await _serve_tcp(make_node())
    try:
        junit, js = tmp_path / "r.xml", tmp_path / "r.json"
        rc, out = await _cli(
            [
                "--port",
                url,
                "conformance",
                "--ota-generate",
                "--junit",
                str(junit),
                "--json",
                str(js),
                "--quiet-time",
                "0.1",
            ],
            capsys,
        )
    finally:
        await lst.close()
    assert rc == 0, out
    assert "frame.id_numeric_bare" in out and "frames.md §1.2" in out and "PASS" in out
    assert "spec: sections of docs/protocol/" in out
    doc = json.loads(js.read_text())
    assert doc["ok"] is True and doc["summary"]["fail"] == 0
    names = {r["name"] for r in doc["results"]}
    assert {"ota.update", "ota.revert", "tcp.mos_style", "sys.getinfo"} <= names
    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(doc["results"])
    assert not root.findall(".//failure")


async def test_broken_device_exit_1_names_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, lst = await _serve_tcp(make_faulty_node(["tag_dropped"]))
    try:
        junit = tmp_path / "r.xml"
        rc, out = await _cli(["--port", url, "conformance", "--only", "frame", "--junit", str(junit)], capsys)
    finally:
        await lst.close()
    assert rc == 1
    assert "frame.tag_copied" in out and "FAIL" in out and "tag must be copied verbatim" in out
    failures = ET.parse(junit).getroot().findall(".//testcase[failure]")
    assert [c.get("name") for c in failures] == ["frame.tag_copied"]


async def test_destructive_checks_skipped_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    node = make_node()
    url, lst = await _serve_tcp(node)
    try:
        rc, out = await _cli(["--port", url, "conformance", "--only", "ota"], capsys)
    finally:
        await lst.close()
    assert rc == 0
    assert "destructive" in out and "ota.status" in out
    assert node.ota.begin_args == {} and node.ota.reboots == 0  # no update was started


async def test_unknown_group_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["--port", "loop://nothing", "conformance", "--only", "nosuchgroup"])
    rc = await asyncio.to_thread(args.func, args)
    err = capsys.readouterr().err
    assert rc == 2 and "unknown check group" in err and "frame" in err


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["conformance", "--list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "ota.write_gap" in out and "serial.handshake" in out


async def test_pytest_plugin_runs_the_checks(tmp_path: Path) -> None:
    url, lst = await _serve_tcp(make_faulty_node(["case_sensitive"]))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "conformance",
            "--rpc-url",
            url,
            "--rpc-only",
            "frame,rpc",
            "--rootdir",
            str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=str(Path(__file__).parents[2]),
        )
        out = (await asyncio.wait_for(proc.communicate(), 90))[0].decode()
    finally:
        await lst.close()
    assert proc.returncode == 1, out
    assert "test_check[frame.method_case_insensitive]" in out
    assert "1 failed" in out and "passed" in out


async def test_client_mode_prints_names_verbatim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmd = f"{sys.executable} -m mgrpc --port {{url}} call RPC.List"
    js = tmp_path / "c.json"
    rc, out = await _cli(["conformance", "--client", cmd, "--client-transport", "tcp", "--json", str(js)], capsys)
    assert rc == 0, out
    assert "client.exit_status[tcp]" in out  # brackets are text, not rich markup
    doc = json.loads(js.read_text())
    assert doc["kind"] == "client" and doc["ok"] is True


async def test_unreachable_device_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = await _cli(["--port", "loop://nobody-listens-here", "conformance"], capsys)
    assert rc == 1
    assert "connect" in out and "cannot open loop://nobody-listens-here" in out
    assert "frame.tag_copied" not in out


def test_plugin_runner_with_a_bad_url_leaks_no_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from conformance.plugin import _options, _Runner
    from rpc.errors import MgrpcError

    created: list[asyncio.AbstractEventLoop] = []
    real_new_event_loop = asyncio.new_event_loop

    def spy() -> asyncio.AbstractEventLoop:
        loop = real_new_event_loop()
        created.append(loop)
        return loop

    monkeypatch.setattr(asyncio, "new_event_loop", spy)
    with pytest.raises(MgrpcError, match="unknown scheme"):
        _Runner("bogus://x", _options(None))
    left_open = [loop for loop in created if not loop.is_closed()]
    for loop in left_open:
        loop.close()
    assert not left_open
