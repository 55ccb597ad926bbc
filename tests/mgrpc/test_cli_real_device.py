"""Issue #12 against the real Mongoose OS device (mgos-ubuntu), the CLI run as a subprocess: the same
one-line auth errors on WebSocket, HTTP and serial; the device's own file errors, not retried; the
bundle's platform checked against the device's before ``OTA.Begin``; ``boot-state`` on a device
whose OTA service differs from ours. Skipped when the device folder is absent (see tests/real_device.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.device_helpers import bundle
from tests.mgrpc.cli_proc import run_cli
from tests.real_device import real_device  # noqa: F401  (a pytest fixture)

ACL = '[{"method":"*","acl":"+user"}]'


def test_auth_errors_read_the_same_on_every_transport(real_device) -> None:  # noqa: F811
    dev = real_device(auth=("user", "s3cret"), acl=ACL)
    missing, wrong = set(), set()
    for url in (dev.ws_url, dev.http_url, dev.serial_url):
        missing.add(run_cli("--port", url, "--timeout", "5s", "call", "Sys.GetInfo").error_line())
        wrong.add(run_cli("--port", url, "--timeout", "5s", "--rpc-creds", "user:nope", "call", "Sys.GetInfo").error_line())
    assert missing == {"Error: the device requires authentication; pass --rpc-creds user:pass (or @file)"}
    assert wrong == {"Error: the device rejected the credentials; check the user and password given with --rpc-creds"}


def test_files_platform_and_boot_state(real_device, tmp_path: Path) -> None:  # noqa: F811
    dev = real_device()
    url = dev.ws_url
    line = run_cli("--port", url, "rm", "nope.txt").error_line()
    assert line == "Error: remote error 500: remove failed; check the device file name 'nope.txt' ('mgrpc ls' lists the files)"
    src = tmp_path / "r.bin"
    src.write_bytes(b"x")
    line = run_cli("--port", url, "put", str(src), "data/r.bin").error_line()  # one line: not retried
    assert line.startswith('Error: remote error 400: failed to open file "data/r.bin"; ')
    fw = tmp_path / "fw.zip"
    fw.write_bytes(bundle("2.0", arch="esp32"))
    line = run_cli("--port", url, "ota", str(fw)).error_line()
    assert line == "Error: the bundle is for platform esp32, but the device is ubuntu (Sys.GetInfo); use a bundle built for ubuntu"
    # mgos-ubuntu has no OTA service: boot-state says so in one line
    line = run_cli("--port", url, "boot-state").error_line()
    assert line.startswith("Error: remote error 404: No handler for OTA.GetBootState; ")
    r = run_cli("--port", url, "ls", "--json")
    assert r.rc == 0 and {"name": "conf0.json"} in json.loads(r.out)
