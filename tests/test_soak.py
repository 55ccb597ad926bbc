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
    m = re.search(r"listeners: abusive connections and inputs (\d+) \(goal 2000\) .* calls failed 0", out)
    assert m and int(m.group(1)) >= 2000, out
    for listener in ("tcp", "udp", "ws", "http", "serial", "mqtt", "ble"):
        assert re.search(rf"  {listener}\s*: applied \d+; client median .* failed 0;", out), out
    assert re.search(r"held \d+ sockets \(max_conns 16\)", out) and re.search(r"the repeated round: [-+]\d", out), out
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


async def test_listener_abusers_catch_listeners_without_their_limits() -> None:
    """The abusers' checks fail against listeners that do not enforce the limits they were told of."""
    import transports
    from bench.soaklib import listeners
    from rpc.node import Node

    node = Node(id="esp32_SOAK")
    tcp = await transports.listen("tcp://127.0.0.1:0?max_conns=1000", node)  # the abuser expects 16
    ws = await transports.listen("ws://127.0.0.1:0/rpc?header_timeout=60", node)  # the abuser expects 0.5 s
    try:
        tcp_port = int(tcp.url.rsplit(":", 1)[1].split("?")[0])
        report = listeners.Report()
        n = {"idle": 40, "slow": 4, "junk": 0, "flood": 20, "nonreader": 0}
        await listeners.abuse_tcp({"host": "127.0.0.1", "port": tcp_port, "limit": 16}, n, report)
        assert any("idle/half-sent connections kept" in f for f in report.failures), report.failures
        assert report.notes["tcp flood answered"] == 20
        report = listeners.Report()
        n = {"idle": 0, "slow": 3, "silent": 0, "junk": 0, "flood": 20, "nonreader": 0}
        target = {"host": "127.0.0.1", "port": ws.port, "limit": 1000, "header_timeout": 0.5}
        await listeners.abuse_ws(target, n, report)
        assert any("slowloris heads kept" in f for f in report.failures), report.failures
    finally:
        await ws.close()
        await tcp.close()
        await node.close()


def test_listener_verdicts() -> None:
    from bench.soaklib.listeners import ListenerFigures, ListenersResult

    fig = ListenerFigures("tcp", base_s=[0.001] * 20, abused_s=[0.002] * 20, held_max=16, limit=16)
    assert fig.ok
    fig.abused_s = [0.006] * 20  # over 3 x 1 ms + 2 ms
    assert not fig.latency_ok and not fig.ok
    fig.abused_s = [0.002] * 20
    fig.held_max = 17
    assert not fig.ok
    fig.held_max = 16
    fig.calls_failed.append("ChannelClosed")
    assert not fig.ok
    res = ListenersResult(listeners={}, rss_mib=[60.0, 65.0, 68.0, 68.5])
    assert res.mem_ok
    res.rss_mib[-1] = 75.0  # the repeated round grew it by 7 MiB
    assert not res.mem_ok and not res.ok
