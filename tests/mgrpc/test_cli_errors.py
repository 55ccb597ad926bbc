"""The CLI as a new user meets it (issue #12), run as a subprocess: errors are one line on stderr
that says what to do next, exit status 1 (2 for usage errors), nothing on stdout; auth errors read
the same on every transport; ``--help`` groups the commands; every flag can come from the
environment; ``mgrpc completion`` completes."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rpc.auth import htdigest_line
from tests.mgrpc.cli_proc import DeviceProc, cli_env, run_cli


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceProc]:
    state = tmp_path_factory.mktemp("clierr")
    with DeviceProc.device(state / "dev1", "tcp://127.0.0.1:0", "ws://127.0.0.1:0/rpc", "http://127.0.0.1:0/rpc") as d:
        yield d


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("scheme", ["tcp://127.0.0.1:{p}", "ws://127.0.0.1:{p}/rpc", "http://127.0.0.1:{p}/rpc"])
def test_unreachable_device_is_one_line_on_stderr(scheme: str) -> None:
    url = scheme.format(p=_closed_port())
    line = run_cli("--port", url, "call", "Sys.GetInfo").error_line()
    assert line == (
        f"Error: cannot connect to {url}: connection refused; check that the device is running and that --port is right"
    )


def test_wrong_ws_path_says_what_to_fix(dev: DeviceProc) -> None:
    http = dev.urls[2]  # an HTTP server with no WebSocket at /nope
    ws = http.replace("http://", "ws://").replace("/rpc", "/nope")
    line = run_cli("--port", ws, "call", "Sys.GetInfo").error_line()
    assert "does not accept WebSocket RPC" in line and "check the path in --port" in line
    assert "Missing rpc-ws library" not in line


@pytest.mark.parametrize(
    "argv, words",
    [
        ([], "no command given; run 'mgrpc --help'"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["call"], "the following arguments are required: method; see 'mgrpc call --help'"),
        (["--timeout", "xx", "call", "X"], "invalid duration 'xx'"),
        (["--port", "tcp://127.0.0.1:1", "call", "X", "{bad"], "Args [{bad] is not a valid JSON string"),
        (["call", "Sys.GetInfo"], "no device port given: pass --port URL"),
        (["--port", "foo://x", "call", "X"], "unknown scheme 'foo'"),
        (["--port", "tcp://127.0.0.1:1", "ota"], "firmware file is required; see 'mgrpc ota --help'"),
        (["--port", "tcp://127.0.0.1:1", "rm"], "filename is required"),
        (["--port", "tcp://127.0.0.1:1", "config-set"], "at least one path.to.value=value pair"),
        (["completion", "fish"], "invalid choice: 'fish'"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], words: str) -> None:
    line = run_cli(*argv).error_line(rc=2)
    assert words in line, line
    assert "--help" in line


def test_remote_error_and_missing_file(dev: DeviceProc) -> None:
    line = run_cli("--port", dev.urls[0], "call", "Nope.Method").error_line()
    assert line.startswith("Error: remote error 404: No handler for Nope.Method; ")
    assert "RPC.List" in line
    line = run_cli("--port", dev.urls[0], "ota", "/nonexistent/fw.zip").error_line()
    assert line == "Error: unable to read /nonexistent/fw.zip: No such file or directory; check the file name and its permissions"


def test_result_on_stdout_only(dev: DeviceProc) -> None:
    r = run_cli("--port", dev.urls[0], "call", "Sys.GetInfo")
    assert r.rc == 0 and r.err == "" and '"id": "dev1"' in r.out


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield int(srv.getsockname()[1])
    srv.close()


def test_timeouts_say_what_to_check(silent_port: int) -> None:
    url = f"tcp://127.0.0.1:{silent_port}"
    line = run_cli("--port", url, "--timeout", "500ms", "call", "Sys.GetInfo").error_line()
    assert line == (
        "Error: no reply from the device within 0.5 s (context deadline exceeded); "
        "check --port and that the device is running, or raise --timeout"
    )
    line = run_cli("--port", url + "?codec=msgpack", "--timeout", "500ms", "call", "Sys.GetInfo").error_line()
    assert "the device may not speak msgpack: drop ?codec=msgpack from --port" in line


def test_msgpack_against_a_json_device_is_diagnosed(dev: DeviceProc) -> None:
    line = run_cli("--port", dev.urls[0] + "?codec=msgpack", "--timeout", "1s", "call", "Sys.GetInfo").error_line()
    assert "drop ?codec=msgpack" in line


@pytest.fixture(scope="module")
def auth_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceProc]:
    state = tmp_path_factory.mktemp("cliauth")
    pw = state / "rpc_auth.txt"
    pw.write_text(htdigest_line("admin", "RPC", "secret") + "\n")
    with DeviceProc.device(
        state / "dev2", "tcp://127.0.0.1:0", "ws://127.0.0.1:0/rpc", "http://127.0.0.1:0/rpc", id="dev2",
        extra=["--auth-file", str(pw), "--acl", '[{"method":"*","acl":"+admin"}]'],
    ) as d:  # fmt: skip
        yield d


def test_auth_errors_read_the_same_on_every_transport(auth_dev: DeviceProc) -> None:
    missing, wrong = set(), set()
    for url in auth_dev.urls:
        missing.add(run_cli("--port", url, "call", "Sys.GetInfo").error_line())
        wrong.add(run_cli("--port", url, "--rpc-creds", "admin:nope", "call", "Sys.GetInfo").error_line())
        ok = run_cli("--port", url, "--rpc-creds", "admin:secret", "call", "Sys.GetInfo")
        assert ok.rc == 0 and '"id": "dev2"' in ok.out, (url, ok)
    assert missing == {"Error: the device requires authentication; pass --rpc-creds user:pass (or @file)"}
    assert wrong == {
        "Error: the device rejected the credentials; check the user and password given with --rpc-creds"
    }


def test_help_lists_commands_in_groups() -> None:
    from mgrpc.cli import GROUPS, build_parser

    r = run_cli("--help")
    assert r.rc == 0 and r.err == ""
    heads = [f"{g} commands" for g in ("device", "files", "firmware", "tools")]
    pos = [r.out.index(h) for h in heads]
    assert pos == sorted(pos), r.out
    sections = r.out.split(" commands (")
    for group, names in GROUPS.items():
        section = next(s for s in sections[1:] if sections[sections.index(s) - 1].rstrip().endswith(group))
        for name in names:
            assert f"\n  {name} " in section, (group, name)
    # every command is in exactly one group
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    grouped = [n for names in GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(sub.choices)  # type: ignore[attr-defined]


def test_flags_from_the_environment(dev: DeviceProc, tmp_path: Path) -> None:
    # the port and verbosity (MGRPC_VERBOSE=2 is -vv: frames with their bodies on stderr)
    r = run_cli("call", "Sys.GetInfo", env={"MOS_PORT": dev.urls[0], "MGRPC_VERBOSE": "2"})
    assert r.rc == 0 and '"id": "dev1"' in r.out
    assert '"method":"Sys.GetInfo"' in r.err
    # command options too: MOS_WINDOW / MGRPC_CHUNK_SIZE reach `mgrpc ota` (checked before any I/O)
    fw = tmp_path / "fw.zip"
    fw.write_bytes(b"x")
    line = run_cli("ota", str(fw), env={"MGRPC_PORT": dev.urls[0], "MOS_WINDOW": "99"}).error_line(rc=2)
    assert "--window must be between 1 and 20" in line
    line = run_cli("ota", str(fw), env={"MGRPC_PORT": dev.urls[0], "MGRPC_CHUNK_SIZE": "0"}).error_line(rc=2)
    assert "--chunk-size must be positive" in line
    # the command line wins over the environment
    r = run_cli("--port", dev.urls[0], "call", "Sys.GetInfo", env={"MGRPC_PORT": "tcp://127.0.0.1:1"})
    assert r.rc == 0
    # a bad value names the variable
    line = run_cli("call", "X", env={"MGRPC_TIMEOUT": "soon"}).error_line(rc=2)
    assert "invalid value 'soon' from the environment (MGRPC_TIMEOUT)" in line


def test_bash_completion() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    r = run_cli("completion", "bash")
    assert r.rc == 0 and r.err == "" and "complete -o default -F _mgrpc mgrpc" in r.out

    def complete(*words: str) -> list[str]:
        arr = " ".join(f"'{w}'" for w in ("mgrpc", *words))
        script = f'{r.out}\nCOMP_WORDS=({arr}); COMP_CWORD={len(words)}; _mgrpc; printf "%s\\n" "${{COMPREPLY[@]}}"'
        p = subprocess.run([bash, "-c", script], capture_output=True, text=True, timeout=30, env=cli_env())
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert sorted(complete("co")) == ["commit", "completion", "config-get", "config-set", "conformance", "console"]
    assert complete("--port", "tcp://x", "bo") == ["boot-state"]
    assert "--chunk-size" in complete("ota", "--ch")
    assert {"build", "inspect", "keygen"} <= set(complete("fw", ""))
    assert complete("--po") == ["--port"]


def test_zsh_completion_script() -> None:
    r = run_cli("completion", "zsh")
    assert r.rc == 0 and r.out.startswith("#compdef mgrpc")
    assert "'boot-state:" in r.out and "compdef _mgrpc mgrpc" in r.out
    zsh = shutil.which("zsh")
    if zsh is not None:  # syntax check where zsh is installed
        p = subprocess.run([zsh, "-n"], input=r.out, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr


def test_udp_timeout_is_one_line() -> None:
    line = run_cli("--port", f"udp://127.0.0.1:{_closed_port()}", "--timeout", "500ms", "call", "X").error_line()
    assert line.startswith("Error: no reply from the device within 0.5 s")  # no asyncio traceback before it


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["config-get", "wifi.nope"], "Error: no config value at path \"wifi.nope\"; 'mgrpc config-get' prints the whole config"),
        (["revert"], "Error: remote error -1 (nothing to revert: the running firmware is committed); see 'mgrpc boot-state'"),
        (["commit"], "Error: remote error -1 (nothing to commit: the running firmware is already committed); "
                     "see 'mgrpc boot-state'"),
    ],
)
def test_device_command_errors_say_what_to_do(dev: DeviceProc, argv: list[str], expected: str) -> None:
    assert run_cli("--port", dev.urls[0], *argv).error_line() == expected


def test_other_commands_report_one_line(tmp_path: Path) -> None:
    closed = f"tcp://127.0.0.1:{_closed_port()}"
    line = run_cli("bridge", "--to", closed, "--listen", "tcp://127.0.0.1:0").error_line()
    assert line == f"Error: cannot connect to {closed}: connection refused; check that the device is running and that --to is right"
    broker = f"mqtt://127.0.0.1:{_closed_port()}"
    line = run_cli("dashboard", "--broker", broker, "--db", str(tmp_path / "f.sqlite")).error_line()
    assert line == (
        f"Error: cannot connect to {broker}: connection refused; check that the MQTT broker is running and that --broker is right"
    )
    assert run_cli("fw", "inspect", str(tmp_path / "none.zip")).error_line() == f"Error: {tmp_path / 'none.zip'}: No such file or directory"
    # conformance prints its report on stdout, and the one-line error when no check could run
    r = run_cli("--port", closed, "conformance")
    assert r.rc == 1 and "connect" in r.out
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no check ran: ") and lines[0].endswith("check --port (and --rpc-creds)")


def test_retried_timeouts_end_in_one_line(silent_port: int) -> None:
    # `get` retries a timeout (--fs-op-attempts); the retries are logged only with -v
    url = f"tcp://127.0.0.1:{silent_port}"
    line = run_cli("--port", url, "--timeout", "300ms", "get", "x.txt", "--fs-op-attempts", "2").error_line()
    assert line.startswith("Error: no reply from the device within 0.3 s")
    r = run_cli("--port", url, "--timeout", "300ms", "-v", "get", "x.txt", "--fs-op-attempts", "2")
    assert r.rc == 1 and "FS.Get x.txt @ 0 failed (attempt 1 of 2)" in r.err


def test_required_and_repeatable_flags_from_the_environment(tmp_path: Path) -> None:
    env = {
        "MGRPC_ID": "envdev", "MGRPC_STATE": str(tmp_path / "st"),
        "MGRPC_LISTEN": "tcp://127.0.0.1:0 http://127.0.0.1:0/rpc",  # a repeatable flag: space-separated
    }  # fmt: skip
    with DeviceProc(["device"], n_urls=2, env=env) as d:
        assert d.urls[0].startswith("tcp://127.0.0.1:") and d.urls[1].startswith("http://127.0.0.1:")
        r = run_cli("call", "Sys.GetInfo", env={"MOS_PORT": d.urls[1]})
        assert r.rc == 0 and '"id": "envdev"' in r.out
