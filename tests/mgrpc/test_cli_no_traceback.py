"""No traceback ever reaches a user (issue #14 §6): every command, with bad arguments, bad environment
values, unreachable ports on every scheme, ends in one line on stderr and exit 1 (2 for usage errors,
as README says), run in-process through ``mgrpc.cli.main`` so the whole matrix stays fast."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mgrpc.cli import COMMAND_TABLE, main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PORT = _closed_port()
SCHEMES = [
    f"tcp://127.0.0.1:{PORT}", f"udp://127.0.0.1:{PORT}", f"ws://127.0.0.1:{PORT}/rpc",
    f"wss://127.0.0.1:{PORT}/rpc", f"http://127.0.0.1:{PORT}/rpc", f"https://127.0.0.1:{PORT}/rpc",
    f"mqtt://127.0.0.1:{PORT}/dev1", f"mqtts://127.0.0.1:{PORT}/dev1", "serial:///dev/mgrpc-no-such-tty",
    "/dev/mgrpc-no-such-tty", "loop://mgrpc-no-such-device", "foo://x", "tcp://", "ws://[::1",
]  # fmt: skip

# Commands that talk to a device, with arguments that are otherwise fine.
DEVICE_COMMANDS: dict[str, list[str]] = {
    "call": ["call", "Sys.GetInfo"],
    "ota": ["ota", "{fw}"],
    "ls": ["ls"],
    "get": ["get", "conf0.json"],
    "put": ["put", "{fw}", "x.bin"],
    "rm": ["rm", "x.bin"],
    "config-get": ["config-get"],
    "config-set": ["config-set", "debug.level=3"],
    "commit": ["commit"],
    "revert": ["revert"],
    "boot-state": ["boot-state"],
}


@pytest.fixture(scope="module")
def fw(tmp_path_factory: pytest.TempPathFactory) -> str:
    from updater.bundle import make_virtual_bundle

    p = tmp_path_factory.mktemp("fw") / "fw.zip"
    p.write_bytes(make_virtual_bundle("esp32", "2.0", app_size=4096))
    return str(p)


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc: int, out: str, err: str, *, codes: tuple[int, ...] = (1, 2)) -> None:
    assert "Traceback" not in err + out, err
    assert rc in codes, (rc, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    # mos's progress lines ("Getting configuration...") may come first; then exactly one error line.
    problems = [line for line in lines if not line.endswith("...")]
    assert len(problems) == 1 and problems[0] == lines[-1], err
    assert lines[-1].startswith("Error"), err


@pytest.mark.parametrize("command", sorted(COMMAND_TABLE))
def test_an_unknown_flag_is_one_usage_line(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, [command, "--mgrpc-no-such-flag"])
    assert_one_line(rc, out, err, codes=(2,))


@pytest.mark.parametrize("var", ["MOS_TIMEOUT", "MGRPC_TIMEOUT", "MOS_BAUD_RATE"])
@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_bad_environment_values_are_one_usage_line(
    command: str, var: str, fw: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, "bogus")
    argv = ["--port", f"tcp://127.0.0.1:{PORT}", *(a.format(fw=fw) for a in DEVICE_COMMANDS[command])]
    rc, out, err = run(capsys, argv)
    assert_one_line(rc, out, err, codes=(2,))
    assert "bogus" in err


@pytest.mark.parametrize("url", SCHEMES)
@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_unreachable_ports_on_every_scheme_are_one_line(
    command: str, url: str, fw: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--port", url, "--timeout", "1s", *(a.format(fw=fw) for a in DEVICE_COMMANDS[command])]
    rc, out, err = run(capsys, argv)
    assert_one_line(rc, out, err)


@pytest.mark.parametrize(
    "argv",
    [
        ["call"], ["call", "X", "{{not json"], ["ota"], ["ota", "{missing}"], ["ota", "{notzip}"],
        ["put", "{missing}", "x"], ["config-set", "no-equals-sign"], ["get"], ["rm"],
        ["fw", "build"], ["fw", "inspect", "{notzip}"], ["fw", "inspect", "{missing}"],
        ["device", "--id", "x"], ["device", "--id", "x", "--state", "{tmp}", "--listen", "bogus://x"],
        ["bridge", "--to", "foo://x", "--listen", "tcp://127.0.0.1:0"], ["conformance", "--port", "foo://x"],
        ["completion", "fish"], ["--timeout", "-5s", "call", "X"], ["--port", "tcp://127.0.0.1:1", "ota", "{fw}", "[1,"],
    ],
)  # fmt: skip
def test_bad_arguments_are_one_line(
    argv: list[str], fw: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notzip = tmp_path / "not.zip"
    notzip.write_bytes(b"hello")
    subs = {"fw": fw, "missing": str(tmp_path / "missing.zip"), "notzip": str(notzip), "tmp": str(tmp_path / "st")}
    rc, out, err = run(capsys, ["--port", f"tcp://127.0.0.1:{PORT}", *(a.format(**subs) for a in argv)])
    assert_one_line(rc, out, err)
