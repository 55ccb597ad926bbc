"""``mgrpc demo``: the main job, end to end, with the real command line and a real transport.

It runs the very commands a user would type, each as its own process: ``mgrpc fw build`` makes two
bundles, ``mgrpc device`` starts a virtual device listening on WebSocket, ``mgrpc ota`` pushes the first
bundle (progress bar), ``mgrpc call`` shows the device back on the new version uncommitted and commits
it, then a bundle whose firmware hangs on boot is pushed and the device's commit timer rolls it back.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]

HANG_COMMIT_TIMEOUT_S = 5


def register(sub: Any) -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser(
        "demo",
        help="end-to-end demo: update a virtual device over WebSocket, commit, then watch a rollback",
        description="Builds two bundles, starts a virtual device on ws://127.0.0.1, updates it with "
        "`mgrpc ota`, commits the new firmware, then pushes firmware that hangs on boot and shows the "
        "automatic rollback. Every step is a real `mgrpc` command, printed before it runs.",
    )
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    p.set_defaults(func=cmd_demo)


class _Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.url = ""
        self.device: subprocess.Popen[str] | None = None
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"\n[{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)

    def mgrpc(self, *args: str, check: bool = True, quiet: bool = False, timeout_s: float = 120) -> str:
        cmd = [sys.executable, "-m", "mgrpc", *args]
        shown = " ".join(shlex.quote(a) for a in ["mgrpc", *args])
        if not quiet:
            print(f"$ {shown}", flush=True)
        res = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=None if not quiet else subprocess.PIPE,
                             timeout=timeout_s, check=False)  # fmt: skip
        if not quiet and res.stdout:
            print(res.stdout, end="", flush=True)
        if check and res.returncode != 0:
            raise RuntimeError(f"`{shown}` failed with exit status {res.returncode}")
        return res.stdout

    def call(self, method: str, params: str = "", *, quiet: bool = False, timeout: str = "5s") -> Any:
        out = self.mgrpc("--port", self.url, "--timeout", timeout, "call", method, *([params] if params else []),
                         quiet=quiet)  # fmt: skip
        return json.loads(out)

    def start_device(self) -> None:
        cmd = [
            sys.executable, "-m", "mgrpc", "device", "--id", "demo-esp32", "--state", str(self.work / "state"),
            "--arch", "esp32", "--listen", "ws://127.0.0.1:0/rpc",
        ]  # fmt: skip
        print(
            "$ mgrpc device --id demo-esp32 --state",
            self.work / "state",
            "--arch esp32 --listen ws://127.0.0.1:0/rpc &",
        )
        self.device = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.device.stdout is not None
        line = self.device.stdout.readline().strip()
        if not line.startswith("ws://"):
            raise RuntimeError("the virtual device did not start")
        self.url = line
        print(f"device listening on {self.url}")

    def wait_version(self, version: str, *, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                info = self.call("Sys.GetInfo", quiet=True, timeout="1s")
            except (RuntimeError, ValueError):
                time.sleep(0.3)
                continue
            if info.get("fw_version") == version:
                return dict(info)
            time.sleep(0.3)
        raise RuntimeError(f"the device did not come back on version {version} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.device is not None and self.device.poll() is None:
            self.device.terminate()
            try:
                self.device.wait(5)
            except subprocess.TimeoutExpired:
                self.device.kill()

    def run(self) -> None:
        w = self.work
        self.say("1. Build two firmware bundles for the virtual ESP32: 1.1 (works) and 1.2 (hangs on boot).")
        self.mgrpc("fw", "build", "--virtual", "--arch", "esp32", "--fw-version", "1.1", "-o", str(w / "fw-1.1.zip"))
        self.mgrpc("fw", "build", "--virtual", "--arch", "esp32", "--fw-version", "1.2", "--behavior", "hang",
                   "-o", str(w / "fw-1.2-hang.zip"))  # fmt: skip
        self.mgrpc("fw", "inspect", str(w / "fw-1.1.zip"))

        self.say("2. Start a virtual device (emulated NOR flash, A/B slots, boot loader) serving RPC on WebSocket.")
        self.start_device()
        info = self.call("Sys.GetInfo")
        print(f"running firmware {info['fw_version']} ({info['fw_id']})")

        self.say("3. Push firmware 1.1 over WebSocket, exactly as `mos ota` does (pipelined writes).")
        self.mgrpc("--port", self.url, "ota", str(w / "fw-1.1.zip"), "--commit-timeout", "120s")

        self.say("4. The device rebooted into the new slot. It runs 1.1 but is not committed yet:")
        self.wait_version("1.1", timeout_s=20)
        self.call("Sys.GetInfo")
        state = self.call("OTA.GetBootState")
        assert state["is_committed"] is False, state

        self.say("5. Commit it (within the commit timeout), so it stays.")
        self.call("OTA.Commit")
        state = self.call("OTA.GetBootState")
        assert state["is_committed"] is True, state

        self.say(f"6. Push firmware 1.2, which hangs on boot, with a {HANG_COMMIT_TIMEOUT_S} s commit timeout.")
        self.mgrpc("--port", self.url, "ota", str(w / "fw-1.2-hang.zip"), "--commit-timeout",
                   f"{HANG_COMMIT_TIMEOUT_S}s")  # fmt: skip

        self.say("7. 1.2 hangs: nothing answers. The device's commit timer is armed by the boot loader, not by")
        print("   the firmware, so it fires anyway: revert and reboot into 1.1.")
        try:
            self.call("Sys.GetInfo", timeout="2s")
            print("(the device still answered)")
        except RuntimeError:
            print("(no answer, as expected)")
        info = self.wait_version("1.1", timeout_s=HANG_COMMIT_TIMEOUT_S + 20)
        print(f"back on firmware {info['fw_version']}: rolled back automatically")
        state = self.call("OTA.GetBootState")
        assert state["is_committed"] is True and info["fw_version"] == "1.1", state

        self.say("Done: updated, committed, and a bad update rolled back by itself.")


# What the demo's virtual device needs beyond a plain install: the WebSocket server and LittleFS.
DEVICE_MODULES = (("aiohttp", "aiohttp"), ("littlefs", "littlefs-python"))


def _check_device_extras() -> None:
    """Fail before the first step, in one line, when the virtual device could not start."""
    from importlib.util import find_spec

    from mgrpc.cli._common import CliError

    missing = [package for module, package in DEVICE_MODULES if find_spec(module) is None]
    if missing:
        names = " and ".join(f"'{p}'" for p in missing)
        raise CliError(f"the demo runs a virtual device, which needs {names}", "pip install 'mgrpc[device]'")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo."""
    _check_device_extras()
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
        return _run(work)
    with tempfile.TemporaryDirectory(prefix="mgrpc-demo-") as tmp:
        return _run(Path(tmp))


def _run(work: Path) -> int:
    os.environ.pop("MGRPC_PORT", None)
    os.environ.pop("MOS_PORT", None)
    demo = _Demo(work)
    try:
        demo.run()
    except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as e:
        print(f"Error: demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        demo.stop()
    return 0
