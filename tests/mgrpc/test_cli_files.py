"""``mgrpc ls/get/put/rm/config-get/config-set/commit/revert/boot-state`` against the virtual device.

The device runs on its own event loop in a thread, listening on ws://127.0.0.1 (the CLI runs its own
``asyncio.run`` in the test's thread, as it does from a shell).
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

import transports
from mgrpc.cli import main


class DeviceThread:
    """A :class:`services.device.VirtualDevice` on a private loop in a background thread."""

    def __init__(self, state_dir: Path, *, device_id: str = "esp32_CLI") -> None:
        from services.device import VirtualDevice

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.dev = VirtualDevice(
            id=device_id, state_dir=state_dir, listen=["ws://127.0.0.1:0/rpc"], listen_fn=transports.listen
        )
        self.run(self.dev.start())
        self.url = self.dev.urls[0]

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, method: str, params: Any = None) -> Any:
        async def go() -> Any:
            c = await transports.connect(self.url, timeout_s=5.0)
            try:
                return await c.call(method, params)
            finally:
                await c.close()

        return self.run(go())

    def stop(self) -> None:
        try:
            self.run(self.dev.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture
def device(tmp_path):
    d = DeviceThread(tmp_path / "dev")
    yield d
    d.stop()


def cli(device: DeviceThread, *argv: str) -> int:
    return main(["--port", device.url, "--timeout", "5s", *argv])


def test_ls_plain_and_long(device, capsys):
    assert cli(device, "ls") == 0
    assert capsys.readouterr().out == "conf0.json\r\n"
    device.call("FS.Put", {"filename": "a.txt", "data": "aGk=", "append": False})
    assert cli(device, "ls", "-l") == 0
    conf_size = len(base64.b64decode(device.call("FS.Get", {"filename": "conf0.json"})["data"]))
    assert capsys.readouterr().out == f"a.txt 2\r\nconf0.json {conf_size}\r\n"


def test_put_get_rm_roundtrip(device, tmp_path, capsysbinary):
    src = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9 + b"\x00tail"
    src.write_bytes(data)
    assert cli(device, "put", "--chunk-size", "300", str(src)) == 0
    assert cli(device, "put", str(src), "copy.bin") == 0
    capsysbinary.readouterr()
    assert cli(device, "get", "--chunk-size", "700", "blob.bin") == 0
    assert capsysbinary.readouterr().out == data
    assert cli(device, "get", "copy.bin") == 0
    assert capsysbinary.readouterr().out == data
    assert cli(device, "rm", "blob.bin") == 0
    assert cli(device, "ls") == 0
    assert capsysbinary.readouterr().out == b"conf0.json\r\ncopy.bin\r\n"


def test_file_errors(device, capsys, tmp_path):
    assert cli(device, "get") == 2
    assert capsys.readouterr().err == "Error: filename is required; see 'mgrpc get --help'\n"
    assert cli(device, "get", "a", "b") == 2
    assert capsys.readouterr().err == "Error: extra arguments: b; see 'mgrpc get --help'\n"
    assert cli(device, "get", "missing.txt") == 1
    assert 'remote error 400: failed to open file "missing.txt"' in capsys.readouterr().err
    assert cli(device, "put", str(tmp_path / "nope.bin")) == 1
    assert "Error: unable to read" in capsys.readouterr().err


def test_config_get(device, capsys):
    assert cli(device, "config-get", "device.id") == 0
    assert capsys.readouterr().out == "esp32_CLI\n"
    assert cli(device, "config-get", "debug.level") == 0
    assert capsys.readouterr().out == "2\n"
    assert cli(device, "config-get", "wifi.sta.enable") == 0
    assert capsys.readouterr().out == "false\n"
    assert cli(device, "config-get", "wifi.sta") == 0
    assert capsys.readouterr().out == '{\n  "enable": false,\n  "pass": "",\n  "ssid": ""\n}\n'
    assert cli(device, "config-get", "wifi.nope") == 1
    assert capsys.readouterr().err == 'Error: no config value at path "wifi.nope"; \'mgrpc config-get\' prints the whole config\n'
    assert cli(device, "config-get", "a", "b") == 2
    assert capsys.readouterr().err == "Error: only one path to value is allowed; see 'mgrpc config-get --help'\n"


def test_config_set(device, capsys):
    rc = cli(device, "config-set", "--no-reboot", "debug.level=3", "wifi.sta.ssid=home", "wifi.sta.enable=true")
    assert rc == 0
    err = capsys.readouterr().err
    assert err.startswith("Getting configuration...\nSetting new configuration...\n")
    conf = device.call("Config.Get")
    assert conf["debug"]["level"] == 3 and conf["wifi"]["sta"] == {"enable": True, "ssid": "home", "pass": ""}
    assert cli(device, "config-set", "debug.level=high") == 1
    assert 'invalid number "high" for debug.level' in capsys.readouterr().err
    assert cli(device, "config-set", "debug.level") == 2
    assert "expected path.to.value=value" in capsys.readouterr().err
    assert cli(device, "config-set") == 2
    assert "at least one path.to.value=value pair should be given" in capsys.readouterr().err


def test_boot_state_commit_revert(device, capsys):
    assert cli(device, "boot-state") == 0
    out = capsys.readouterr().out
    assert out.startswith("slot 0: active running committed\n  version:  1.0\n") and out.endswith("slot 1: empty\n")
    assert cli(device, "commit") == 1
    assert "nothing to commit" in capsys.readouterr().err
    assert cli(device, "revert") == 1
    assert "nothing to revert" in capsys.readouterr().err


def test_connection_failure_goes_to_stderr(capsys):
    rc = main(["--port", "ws://127.0.0.1:1/rpc", "--timeout", "2s", "ls"])
    assert rc == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("Error: cannot connect to ws://127.0.0.1:1/rpc: ")
