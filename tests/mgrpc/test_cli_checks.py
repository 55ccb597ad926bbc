"""Issue #12, run as a subprocess: host-side checks before ``OTA.Begin`` (bundle, platform, frame
limit), the device's own error text for ``put``/``rm`` without retries, ``--json`` output, and
``boot-state`` showing both slots."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import transports
from rpc.frame import RawJSON
from rpc.node import Node
from tests.device_helpers import bundle
from tests.mgrpc.cli_proc import DeviceProc, run_cli


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DeviceProc]:
    with DeviceProc.device(tmp_path / "dev1", "tcp://127.0.0.1:0") as d:
        yield d


def _fw(tmp_path: Path, version: str = "2.0", arch: str = "esp32") -> Path:
    path = tmp_path / f"fw-{arch}-{version}.zip"
    path.write_bytes(bundle(version, arch=arch))
    return path


def _ota_state(url: str) -> int:
    r = run_cli("--port", url, "call", "OTA.Status")
    assert r.rc == 0, r.err
    return int(json.loads(r.out)["state"])


def test_unusable_bundle_refused_before_connecting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip at all")
    # the port is unreachable: the bundle check comes first, so that is what the user hears about
    line = run_cli("--port", "tcp://127.0.0.1:1", "ota", str(bad)).error_line()
    assert line.startswith(f"Error: {bad} is not a usable firmware bundle: not a zip archive")
    assert "mgrpc fw inspect" in line
    import zipfile

    nomanifest = tmp_path / "nomanifest.zip"
    with zipfile.ZipFile(nomanifest, "w") as z:
        z.writestr("app.bin", b"x")
    line = run_cli("--port", "tcp://127.0.0.1:1", "ota", str(nomanifest)).error_line()
    assert "no manifest.json in the zip" in line
    badmanifest = tmp_path / "badmanifest.zip"
    with zipfile.ZipFile(badmanifest, "w") as z:
        z.writestr("manifest.json", '{"name": "x"}')
    line = run_cli("--port", "tcp://127.0.0.1:1", "ota", str(badmanifest)).error_line()
    assert "Required manifest field missing" in line


def test_wrong_platform_refused_before_begin(dev: DeviceProc, tmp_path: Path) -> None:
    line = run_cli("--port", dev.urls[0], "ota", str(_fw(tmp_path, arch="esp8266"))).error_line()
    assert line == (
        "Error: the bundle is for platform esp8266, but the device is esp32 (Sys.GetInfo); use a bundle built for esp32"
    )
    assert _ota_state(dev.urls[0]) == 0  # OTA.Begin never sent


def test_a_chunk_size_too_big_for_the_device_is_shrunk_and_said(dev: DeviceProc, tmp_path: Path) -> None:
    """--chunk-size 4096 against rpc.max_frame_size 4096: every frame would be dropped (mos fails after
    60 s); mgrpc shrinks the chunk to the largest that fits, says so, and goes on (issue #13, point 7)."""
    fw = _fw(tmp_path)
    r = run_cli("--port", dev.urls[0], "ota", "--chunk-size", "4096", "--json", str(fw))
    assert r.rc == 0, r.err
    said = [line for line in r.err.splitlines() if line.startswith("Chunk size 4096 makes frames too big")]
    assert said and "(rpc.max_frame_size 4096); using " in said[0], r.err
    used = int(said[0].rsplit("using ", 1)[1].rstrip("."))
    summary = json.loads(r.out)
    assert 2048 <= used < 4096 and summary["chunk_size"] == used
    assert summary["bytes_sent"] == fw.stat().st_size and summary["retries"] == 0


def test_put_and_rm_show_the_device_error_once(dev: DeviceProc, tmp_path: Path) -> None:
    src = tmp_path / "r.bin"
    src.write_bytes(b"payload")
    line = run_cli("--port", dev.urls[0], "put", str(src), "data/r.bin").error_line()  # one line: no retries
    assert line == (
        "Error: remote error 500: failed to write data: no such file: data/r.bin; "
        "check the device file name 'data/r.bin' ('mgrpc ls' lists the files)"
    )
    line = run_cli("--port", dev.urls[0], "rm", "nope.txt").error_line()
    assert line == (
        "Error: remote error 500: remove failed: no such file: nope.txt; "
        "check the device file name 'nope.txt' ('mgrpc ls' lists the files)"
    )
    line = run_cli("--port", dev.urls[0], "get", "nope.txt").error_line()
    assert 'failed to open file "nope.txt"' in line and "'mgrpc ls'" in line


def test_json_output(dev: DeviceProc, tmp_path: Path) -> None:
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello")
    assert run_cli("--port", dev.urls[0], "put", str(src)).rc == 0
    r = run_cli("--port", dev.urls[0], "ls", "-l", "--json")
    assert r.rc == 0 and r.err == ""
    assert {"name": "hello.txt", "size": 5} in json.loads(r.out)
    r = run_cli("--port", dev.urls[0], "ls", "--json")
    assert {"name": "hello.txt"} in json.loads(r.out)
    r = run_cli("--port", dev.urls[0], "config-get", "--json", "device.id")
    assert (r.rc, json.loads(r.out)) == (0, "dev1")
    r = run_cli("--port", dev.urls[0], "config-get", "--json", "rpc")
    assert json.loads(r.out)["max_frame_size"] == 4096
    r = run_cli("--port", dev.urls[0], "config-get", "device.id")  # mos's format without --json
    assert r.out == "dev1\n"


def test_boot_state_shows_both_slots(dev: DeviceProc, tmp_path: Path) -> None:
    r = run_cli("--port", dev.urls[0], "boot-state")
    assert r.rc == 0 and r.err == ""
    assert r.out.startswith("slot 0: active running committed\n  version:  1.0\n  build id: factory/1.0\n")
    assert r.out.endswith("slot 1: empty\n")
    fw = _fw(tmp_path)
    r = run_cli("--port", dev.urls[0], "ota", "--json", str(fw))
    assert r.rc == 0, r.err
    assert json.loads(r.out)["fw_version"] == "2.0"
    dev.next_line()  # the device rebooted into the update and printed its URL again
    r = run_cli("--port", dev.urls[0], "boot-state", "--json")
    state = json.loads(r.out)
    assert (state["active_slot"], state["is_committed"], state["revert_slot"]) == (1, False, 0)
    s0, s1 = state["slots"]
    assert (s0["version"], s0["active"], s0["committed"], s0["valid"]) == ("1.0", False, True, True)
    assert (s1["version"], s1["active"], s1["running"], s1["committed"]) == ("2.0", True, True, False)
    assert len(s1["sha256"]) == 64 and s1["build_id"].endswith("virtual-2.0")
    r = run_cli("--port", dev.urls[0], "boot-state")
    assert "slot 0: committed\n  version:  1.0\n" in r.out
    assert "slot 1: active running uncommitted\n  version:  2.0\n" in r.out
    assert "commit timeout: 300 s" in r.out
    # mos's own view is untouched: the device answers OTA.GetBootState as a real one does
    r = run_cli("--port", dev.urls[0], "call", "OTA.GetBootState")
    assert json.loads(r.out) == {"active_slot": 1, "is_committed": False, "revert_slot": 0, "commit_timeout": 300}


@pytest.fixture
def plain_device() -> Iterator[str]:
    """A device without mgrpc's slot extension (answers OTA.GetBootState as mos's devices do)."""
    node = Node(id="plain1")
    node.add_handler(
        "OTA.GetBootState",
        lambda ctx, p: RawJSON('{"active_slot": 1, "is_committed": true, "revert_slot": 0, "commit_timeout": 0}'),
    )
    node.add_handler("Sys.GetInfo", lambda ctx, p: {"id": "plain1", "fw_version": "3.1", "fw_id": "b-31", "arch": "esp32"})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    lst = asyncio.run_coroutine_threadsafe(transports.listen("tcp://127.0.0.1:0", node), loop).result(10)
    yield lst.url
    asyncio.run_coroutine_threadsafe(lst.close(), loop).result(10)
    asyncio.run_coroutine_threadsafe(node.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_boot_state_of_a_device_without_slot_details(plain_device: str) -> None:
    r = run_cli("--port", plain_device, "boot-state")
    assert r.rc == 0, r.err
    assert r.out.startswith("slot 0: committed\n  version:  ?\n")
    assert "slot 1: active running committed\n  version:  3.1\n  build id: b-31\n" in r.out
    state = json.loads(run_cli("--port", plain_device, "boot-state", "--json").out)
    assert state["slots"][1]["version"] == "3.1" and state["slots"][0]["version"] is None
