"""examples/linux-device under ``mgrpc supervise``, as a user runs it: updated with ``mgrpc ota`` over
WebSocket and with ``POST /update``, reached over MQTT too, its config kept across updates, and
rolled back when a release crashes on start."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from tests.mgrpc.cli_proc import ROOT, cli_env, run_cli
from tests.mosquitto import free_port, mosquitto_broker  # noqa: F401  (fixture)

EXAMPLE = ROOT / "examples" / "linux-device"
DEVICE_ID = "linux-demo-1"


class Supervised:
    """``mgrpc supervise`` running the example; its output lines are collected."""

    def __init__(self, slots: Path, urls: list[str]) -> None:
        argv = [
            sys.executable, "-m", "mgrpc", "supervise", "--slots", str(slots), "--factory", str(EXAMPLE / "app"),
            "--factory-data", str(EXAMPLE / "data"), "--heartbeat-timeout", "5s", "--restart-delay", "0.2s",
            *[a for u in urls for a in ("--rpc-url", u)], "--", sys.executable, "main.py",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env=cli_env({"MGRPC_DEVICE_ID": DEVICE_ID}),
        )  # fmt: skip
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._q.put(line.rstrip("\n"))

    def wait_for(self, text: str, *, timeout_s: float = 30.0) -> str:
        """The next output line containing ``text``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line with {text!r} in {timeout_s} s; output:\n" + "\n".join(self.lines))
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if text in line:
                return line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def _build(tmp_path: Path, version: str, *, greeting: str = "", crash: bool = False, data: bool = False) -> Path:
    app = tmp_path / f"app-{version}"
    shutil.copytree(EXAMPLE / "app", app)
    main = app / "main.py"
    text = main.read_text()
    if greeting:
        text = text.replace('GREETING = "hello from the Linux device"', f"GREETING = {greeting!r}")
    if crash:
        text = text.replace("async def main() -> int:\n", "async def main() -> int:\n    raise SystemExit('bad release')\n")
    main.write_text(text)
    out = tmp_path / f"demo-{version}.zip"
    extra = ["--data-dir", str(EXAMPLE / "data")] if data else []
    r = run_cli("fw", "build", "-o", str(out), "--name", "linux-demo", "--version", version, "--app-dir", str(app), *extra)
    assert r.rc == 0, r.err
    return out


def _call(port: str, method: str, params: dict[str, object] | None = None) -> object:
    args = ["--port", port, "call", method] + ([json.dumps(params)] if params is not None else [])
    r = run_cli(*args, timeout_s=60)
    assert r.rc == 0, (method, r.err)
    return json.loads(r.out)


async def test_linux_device_updates_and_rollback(tmp_path: Path, mosquitto_broker) -> None:  # noqa: F811
    broker = mosquitto_broker()
    ws_port, http_port = free_port(), free_port()
    ws = f"ws://127.0.0.1:{ws_port}/rpc"
    http = f"http://127.0.0.1:{http_port}"
    mqtt = broker.url(DEVICE_ID)
    slots = tmp_path / "slots"
    sup = Supervised(slots, [ws, f"{http}/rpc", mqtt])
    try:
        sup.wait_for("linux-demo 1.0 serving")
        info = _call(ws, "Sys.GetInfo")
        assert isinstance(info, dict) and (info["id"], info["fw_version"], info["arch"]) == (DEVICE_ID, "1.0", "linux")
        assert _call(mqtt, "Demo.Hello") == {"greeting": "hello from the Linux device", "slot": 0}
        # The user's settings live in the data directory (conf9.json) and must survive updates.
        _call(ws, "Config.Set", {"config": {"device": {"location": "lab"}}, "save": True})

        # 1. The mos-compatible push over WebSocket, committed by the client once the new version runs.
        r = run_cli("--port", ws, "ota", "--commit", str(_build(tmp_path, "1.1", greeting="hi 1.1")), timeout_s=120)
        assert r.rc == 0, r.err
        assert "Committed: device runs 1.1." in r.err
        assert _call(mqtt, "Demo.Hello") == {"greeting": "hi 1.1", "slot": 1}
        assert _call(ws, "OTA.GetBootState") == {"active_slot": 1, "is_committed": True, "revert_slot": 0,
                                                 "commit_timeout": 0}  # fmt: skip
        assert _call(ws, "Config.Get", {"key": "device.location"}) == "lab"

        # 2. POST /update (ota-http-server) with a data directory; the new slot starts uncommitted.
        bundle = _build(tmp_path, "1.2", greeting="hi 1.2", data=True).read_bytes()
        form = aiohttp.FormData()
        form.add_field("commit_timeout", "60")
        form.add_field("file", bundle, filename="fw.zip", content_type="application/zip")
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{http}/update", data=form) as resp:
                assert (resp.status, await resp.text()) == (200, "Update applied, finalizing\r\n")
            sup.wait_for("linux-demo 1.2 serving")
            state = _call(ws, "OTA.GetBootState")
            assert state == {"active_slot": 0, "is_committed": False, "revert_slot": 1, "commit_timeout": 60}
            async with s.get(f"{http}/update/commit") as resp:
                assert resp.status == 200
        assert _call(ws, "Demo.Hello") == {"greeting": "hi 1.2", "slot": 0}
        assert _call(ws, "Config.Get", {"key": "device.location"}) == "lab"  # merged from the old slot
        assert _call(ws, "Config.Get", {"key": "update.commit_timeout"}) == 60  # the shipped conf0.json

        # 3. A release that crashes on start: pushed, started once, rolled back to 1.2.
        r = run_cli("--port", ws, "ota", str(_build(tmp_path, "1.3", crash=True)), timeout_s=120)
        assert r.rc == 0, r.err
        sup.wait_for("reverted")
        sup.wait_for("linux-demo 1.2 serving")
        assert _call(ws, "Demo.Hello") == {"greeting": "hi 1.2", "slot": 0}
        assert _call(ws, "OTA.GetBootState") == {"active_slot": 0, "is_committed": True, "revert_slot": 1,
                                                 "commit_timeout": 0}  # fmt: skip
        assert _call(mqtt, "Sys.GetInfo")["fw_version"] == "1.2"  # type: ignore[index]
        out = "\n".join(sup.lines)
        assert "boot slot 1 version 1.3 (first boot, uncommitted)" in out
        assert "bad release" in out
    finally:
        rc = sup.stop()
    assert rc == 0, "\n".join(sup.lines)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_demo(p, slots)], "the program outlived the supervisor"


def _is_demo(pid: str, slots: Path) -> bool:
    try:
        return str(slots) in os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False


@pytest.mark.parametrize("what", ["unprovisioned", "no command"])
def test_supervise_usage_errors(tmp_path: Path, what: str) -> None:
    argv = ["supervise", "--slots", str(tmp_path / "s")]
    if what == "unprovisioned":
        argv += ["--", sys.executable, "-c", "pass"]
    line = run_cli(*argv, timeout_s=30).error_line()
    assert ("holds no slots yet" if what == "unprovisioned" else "no program given") in line
