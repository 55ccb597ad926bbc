"""Client checks: our own CLI passes on every transport; a client that breaks the rules fails them."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from conformance.clientcheck import run_client
from conformance.model import Outcome
from conformance.refdevice import DEVICE_ID
from tests.mosquitto import find_mosquitto

pytestmark = pytest.mark.timeout(240)

MGRPC = f"{shlex.quote(sys.executable)} -m mgrpc"
SCHEMES = ["tcp", "serial", "ws", "http", "ble"] + (["mqtt"] if find_mosquitto() else [])


def _failed(report) -> list[tuple[str, str, str]]:
    return [(r.name, r.message, r.seen) for r in report.failed()]


async def test_our_cli_call_passes_on_every_transport() -> None:
    report = await run_client(f"{MGRPC} --port {{url}} call RPC.List", schemes=SCHEMES, timeout_s=60)
    assert report.ok, _failed(report)
    passed = {r.name for r in report.results if r.outcome is Outcome.PASS}
    for scheme in SCHEMES:
        assert f"client.exit_status[{scheme}]" in passed
        assert f"client.member_order[{scheme}]" in passed
    assert "client.stream_framing[serial]" in passed  # handshake + CRC seen on the pty
    assert "client.ble_framing[ble]" in passed  # the CLI ran bumble's host on the HCI-over-TCP controller
    if "mqtt" in SCHEMES:
        assert "client.mqtt_topics[mqtt]" in passed


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_our_cli_ota_sequence_passes(scheme: str) -> None:
    report = await run_client(f"{MGRPC} --port {{url}} ota {{bundle}}", schemes=[scheme], timeout_s=90)
    assert report.ok, _failed(report)
    assert report.by_name()[f"client.ota_sequence[{scheme}]"].outcome is Outcome.PASS


async def test_a_wrong_client_fails_the_checks(tmp_path: Path) -> None:
    # A client written by hand: newline framing without the handshake or CRC, a string id, src first
    # but method before id, params with spaces. The device still answers, so the command succeeds.
    script = tmp_path / "bad_client.py"
    script.write_text(
        "import socket, sys\n"
        "host, port = sys.argv[1].split('://')[1].rsplit(':', 1)\n"
        "s = socket.create_connection((host, int(port)))\n"
        's.sendall(b\'{"method":"RPC.Describe","src":"me","id":"7","params": {"name": "RPC.List"}}\\n\')\n'
        "buf = b''\n"
        "while b'\"id\"' not in buf:\n"
        "    buf += s.recv(4096)\n"
    )
    report = await run_client(f"{shlex.quote(sys.executable)} {script} {{url}}", schemes=["tcp"], timeout_s=30)
    results = report.by_name()
    assert results["client.exit_status[tcp]"].outcome is Outcome.PASS
    for name in ("member_order", "compact", "id_range", "src", "stream_framing"):
        assert results[f"client.{name}[tcp]"].outcome is Outcome.FAIL, name
    assert not report.ok


async def test_a_failing_command_is_reported() -> None:
    report = await run_client(f"{shlex.quote(sys.executable)} -c 'raise SystemExit(3)'", schemes=["tcp"], timeout_s=30)
    results = report.by_name()
    assert results["client.exit_status[tcp]"].outcome is Outcome.FAIL
    assert "exit 3" in results["client.exit_status[tcp]"].seen
    assert results["client.requests_seen[tcp]"].outcome is Outcome.FAIL


async def test_our_cli_digest_auth_retry_passes() -> None:
    from rpc.auth import Credentials

    schemes = ["tcp", "http"] + (["mqtt"] if "mqtt" in SCHEMES else [])
    cmd = f"{MGRPC} --port {{url}} --rpc-creds {{creds}} call RPC.List"
    report = await run_client(cmd, schemes=schemes, timeout_s=60, creds=Credentials("admin", "pw"))
    assert report.ok, _failed(report)
    results = report.by_name()
    assert results["client.auth_retry[tcp]"].outcome is Outcome.PASS
    assert results["client.unique_ids[http]"].outcome is Outcome.PASS  # the header retry repeats the frame


async def test_client_without_credentials_fails_against_an_auth_device() -> None:
    from rpc.auth import Credentials

    report = await run_client(
        f"{MGRPC} --port {{url}} call RPC.List", schemes=["tcp"], timeout_s=60, creds=Credentials("admin", "pw")
    )
    results = report.by_name()
    assert results["client.exit_status[tcp]"].outcome is Outcome.FAIL
    assert results["client.auth_retry[tcp]"].outcome is Outcome.FAIL


async def test_a_wrong_ble_client_fails_the_length_check(tmp_path: Path) -> None:
    # A BLE client written by hand on the same bumble host stack as ours, through {hci}: it writes
    # the length little-endian (as the rpc-gatts README wrongly says), so the device refuses it.
    script = tmp_path / "bad_ble_client.py"
    script.write_text(
        "import asyncio, struct, sys\n"
        "from bleak import BleakClient, BleakScanner\n"
        "from transports.ble_bumble import HciHost\n"
        "from transports.ble_proto import DATA_UUID, TX_CTL_UUID\n"
        "async def main():\n"
        "    client_be, scanner_be = HciHost(sys.argv[1]).backends()\n"
        "    dev = await BleakScanner.find_device_by_name(sys.argv[2], timeout=10, backend=scanner_be)\n"
        "    async with BleakClient(dev, backend=client_be, timeout=10) as c:\n"
        '        frame = b\'{"id":1099511627777,"src":"mos","method":"RPC.List"}\'\n'
        "        for char, value in ((TX_CTL_UUID, struct.pack('<I', len(frame))), (DATA_UUID, frame)):\n"
        "            try:\n"
        "                await c.write_gatt_char(char, value, response=True)\n"
        "            except Exception as e:\n"
        "                print('refused:', e)\n"
        "asyncio.run(main())\n"
    )
    cmd = f"{shlex.quote(sys.executable)} {script} {{hci}} {DEVICE_ID}"
    report = await run_client(cmd, schemes=["ble"], timeout_s=60)
    results = report.by_name()
    assert results["client.exit_status[ble]"].outcome is Outcome.PASS, results["client.exit_status[ble]"].seen
    failed = results["client.ble_framing[ble]"]
    assert failed.outcome is Outcome.FAIL
    assert "little-endian" in failed.message
    assert results["client.requests_seen[ble]"].outcome is Outcome.FAIL  # the device got no frame


@pytest.mark.parametrize(
    ("writes", "frames", "message"),
    [
        ([("tx_ctl", b"\x00\x00\x00\x02"), ("data", b"{}")], 1, None),
        ([("tx_ctl", b"\x00\x00\x00\x04"), ("data", b"{}"), ("data", b"{}")], 1, None),  # chunks
        ([("tx_ctl", b"\x02"), ("data", b"{}")], 0, "exactly 4 bytes"),
        ([("data", b"{}")], 0, "without a length"),
        ([("tx_ctl", b"\x00\x00\x00\x02"), ("data", b"{}x")], 0, "more data written than announced"),
        ([("tx_ctl", b"\x00\x00\x00\x04"), ("data", b"{}"), ("tx_ctl", b"\x00\x00\x00\x02")], 0, "new length"),
        ([("tx_ctl", b"\x02\x00\x00\x00"), ("data", b"{}")], 0, "little-endian"),
        ([("tx_ctl", b"\x00\x00\x00\x02"), ("data", b"{}")], 2, "one frame the device accepted"),
        ([], 0, "no GATT write"),
    ],
)
async def test_ble_framing_check(writes: list[tuple[str, bytes]], frames: int, message: str | None) -> None:
    from conformance.clientcheck import CLIENT_CHECKS, ClientRun
    from conformance.model import CheckFailed
    from rpc.frame import parse_frame

    (check,) = [c.func for c in CLIENT_CHECKS if c.name == "ble_framing"]
    run = ClientRun("ble", "ble://x", "", gatt=[(1, char, value) for char, value in writes])
    run.frames = [parse_frame(b'{"id":1,"method":"M"}')] * frames
    if message is None:
        assert await check(run)
    else:
        with pytest.raises(CheckFailed) as ei:
            await check(run)
        assert message in ei.value.message
