"""The CLI imports only what the command it runs needs (lazy command registration)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mgrpc.cli import COMMAND_TABLE, COMMANDS, build_parser, command_in

REPO = Path(__file__).resolve().parents[2]


def _subparsers(parser: object) -> object:
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")  # type: ignore[attr-defined]


def test_table_help_lines_equal_what_the_modules_register() -> None:
    full = _subparsers(build_parser())
    registered = {a.dest: a.help for a in full._choices_actions}  # type: ignore[attr-defined]
    assert registered == {name: help_text for name, (_, help_text) in COMMAND_TABLE.items()}
    assert set(COMMANDS) == {module for module, _ in COMMAND_TABLE.values()}


def test_lazy_help_lists_the_same_commands_in_the_same_order() -> None:
    assert build_parser([]).format_help() == build_parser().format_help()


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["--port", "ws://x/rpc", "call", "RPC.Ping"], "call"),
        (["--port=ws://x", "-v", "ls"], "ls"),
        (["--timeout", "5s", "--rpc-creds", "a:b", "--baud-rate", "9600", "ota", "fw.zip"], "ota"),
        (["--help"], None),
        ([], None),
        (["--", "fw"], "fw"),
    ],
)
def test_command_word(argv: list[str], command: str | None) -> None:
    assert command_in(argv) == command


def test_a_command_parses_the_same_with_the_lazy_parser() -> None:
    argv = ["--port", "tcp://127.0.0.1:1", "config-set", "a.b=1", "--no-reboot"]
    assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_help_and_a_call_import_no_heavy_module() -> None:
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from mgrpc.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
        heavy = {"asyncio", "aiohttp", "structlog", "rich", "updater.context", "rpc.node"}
        print(sorted(heavy & set(sys.modules)))
        main(["--port", "tcp://127.0.0.1:1", "--timeout", "1s", "call", "RPC.Ping"])
        main(["--port", "ws://127.0.0.1:1/rpc", "--timeout", "1s", "call", "RPC.Ping"])  # our own ws client
        print(sorted({"aiohttp", "structlog", "rich", "updater.context", "mgrpc.cli.fw"} & set(sys.modules)))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "[]", r.stdout + r.stderr
    assert lines[-1] == "[]", r.stdout + r.stderr
