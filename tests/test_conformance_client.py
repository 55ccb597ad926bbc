"""Client checks: our own CLI passes on every transport; a client that breaks the rules fails them."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from conformance.clientcheck import run_client
from conformance.model import Outcome
from tests.mosquitto import find_mosquitto

pytestmark = pytest.mark.timeout(240)

MGRPC = f"{shlex.quote(sys.executable)} -m rpc.cli"
SCHEMES = ["tcp", "serial", "ws", "http"] + (["mqtt"] if find_mosquitto() else [])


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
