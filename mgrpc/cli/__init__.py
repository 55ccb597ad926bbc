"""The ``mgrpc`` command line: the composition root (the only place that prints).

``mgrpc [--port URL] [--timeout 20s] [--rpc-creds user:pass|@file] COMMAND ...``; flags may appear
before or after the command, and every flag (an option, not a positional argument) can come from the
environment as ``MGRPC_<FLAG>`` or ``MOS_<FLAG>`` (``MGRPC_PORT``, ``MOS_PORT``, ``MGRPC_VERBOSE=2``,
``MOS_WINDOW=1``, ...), as ``mos`` allows; the command line wins over the environment.

Errors: one line on stderr (:func:`mgrpc.cli._common.report_error`), exit status 1, or 2 for a usage
error. Results: stdout only.
"""


from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from mgrpc import __version__
from mgrpc.cli._common import EXIT_USAGE, configure_logging, duration_arg, err, report_error

__all__ = [
    "COMMANDS", "COMMAND_TABLE", "GROUPS", "MgrpcArgumentParser", "build_parser", "command_in", "env_flag_names",
    "main",
]

# Every command: its module (which has ``register(subparsers)``) and the one-line help that
# ``mgrpc --help`` shows. A run imports only the module of the command it runs, so the help line is
# kept here too (tests/mgrpc check that it equals what the module registers).
COMMAND_TABLE: dict[str, tuple[str, str]] = {
    "call": ("mgrpc.cli.call", "call an RPC method and print its result"),
    "device": ("mgrpc.cli.device", "run a virtual device (flash file, boot loader, OTA) serving RPC"),
    "fw": ("mgrpc.cli.fw", "build, inspect and sign fw.zip bundles"),
    "ota": ("mgrpc.cli.ota", "update the device firmware (OTA.Begin/Write/End), as `mos ota`"),
    "ls": ("mgrpc.cli.files", "list files on the device (FS.List)"),
    "get": ("mgrpc.cli.files", "print a device file on stdout (FS.Get)"),
    "put": ("mgrpc.cli.files", "upload a file to the device (FS.Put)"),
    "rm": ("mgrpc.cli.files", "remove a device file (FS.Remove)"),
    "config-get": ("mgrpc.cli.files", "print device config (Config.Get)"),
    "config-set": ("mgrpc.cli.files", "change device config (Config.Set; saves and reboots by default)"),
    "commit": ("mgrpc.cli.files", "commit the running firmware (OTA.Commit)"),
    "revert": ("mgrpc.cli.files", "revert to the previous firmware (OTA.Revert; the device reboots)"),
    "boot-state": ("mgrpc.cli.files", "print the boot state (OTA.GetBootState)"),
    "supervise": (
        "mgrpc.cli.supervise",
        "run a program from A/B slot directories; roll back updates that crash, hang or never commit",
    ),
    "dashboard": (
        "mgrpc.cli.dashboard",
        "fleet web dashboard: devices over MQTT or by URL, staged OTA rollouts with live progress",
    ),
    "console": ("mgrpc.cli.console", "print the device's serial output (like `mos console`)"),
    "demo": (
        "mgrpc.cli.demo",
        "end-to-end demo: update a virtual device over WebSocket, commit, then watch a rollback",
    ),
    "bridge": ("mgrpc.cli.bridge", "expose a device reachable on one transport (--to) on others (--listen)"),
    "conformance": ("mgrpc.cli.conformance", "check a device or a client against the mgRPC wire protocol"),
    "completion": ("mgrpc.cli.completion", "print a shell completion script (bash or zsh)"),
}

# Command modules, each with ``register(subparsers)``, in help order.
COMMANDS = tuple(dict.fromkeys(module for module, _ in COMMAND_TABLE.values()))

# Global options that take a value (the command word is the first token that is neither one of
# these, nor their value, nor another option).
_VALUE_OPTIONS = ("--port", "--timeout", "--rpc-creds", "--baud-rate", "--ca-cert-file", "--cert-file", "--key-file")


def command_in(argv: Sequence[str]) -> str | None:
    """The command word of a command line (None when there is none, e.g. ``mgrpc --help``)."""
    it = iter(argv)
    for token in it:
        if token == "--":
            return next(it, None)
        if token in _VALUE_OPTIONS:
            next(it, None)
        elif not token.startswith("-") or token == "-":
            return token
    return None


# How `mgrpc --help` lists the commands; every command is in exactly one group (a test checks).
GROUPS: dict[str, tuple[str, ...]] = {
    "device": ("call", "config-get", "config-set", "console"),
    "files": ("ls", "get", "put", "rm"),
    "firmware": ("ota", "commit", "revert", "boot-state", "fw", "supervise"),
    "tools": ("device", "bridge", "dashboard", "conformance", "demo", "completion"),
}

_GROUP_TITLES = {
    "device": "talk to a device",
    "files": "files on the device",
    "firmware": "firmware updates and boot slots",
    "tools": "virtual device, bridge, fleet and test tools",
}

_FALSE = {"", "0", "false", "no", "off"}


class MgrpcArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Report a usage error in one line (``Error: ...; see 'mgrpc CMD --help'``) and exit 2."""
        message = " ".join(message.splitlines())
        err(f"Error: {message}; see '{self.prog} --help'")
        sys.exit(EXIT_USAGE)


def _add_global(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On sub-parsers the defaults are suppressed so a flag given before the command is kept.
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument(
        "--port",
        default=d(None),
        help="device URL (see README: serial path, tcp://, udp://, "
        "ws://, http://, mqtt://broker/ID, ble://ADDR, loop://NAME); env MGRPC_PORT or MOS_PORT",
    )
    p.add_argument(
        "--timeout",
        type=duration_arg,
        default=d("20s"),
        help="per-call timeout, Go duration syntax (default 20s)",
    )
    p.add_argument("--rpc-creds", default=d(None), help="user:pass or @file for digest auth")
    p.add_argument("--mgrpc-compat-args", action="store_true", default=d(False), help="send `args` instead of `params`")
    p.add_argument("--baud-rate", type=int, default=d(None), help="serial speed (default 115200)")
    p.add_argument("--hw-flow-control", action="store_true", default=d(False), help="serial RTS/CTS flow control")
    p.add_argument("--ca-cert-file", default=d(None), help="wss/https/mqtts: verify the server with this CA")
    p.add_argument("--cert-file", default=d(None), help="wss/https/mqtts: client certificate")
    p.add_argument("--key-file", default=d(None), help="wss/https/mqtts: client certificate's key")
    p.add_argument("-v", "--verbose", action="count", default=d(0), help="more logging (-vv: every frame)")


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():
                if id(sub) not in seen:  # aliases map to the same parser
                    seen.add(id(sub))
                    yield from _walk(sub)


def _env_lookup(dest: str) -> tuple[str, str] | None:
    key = dest.upper().replace("-", "_")
    for prefix in ("MGRPC_", "MOS_"):
        value = os.environ.get(prefix + key)
        if value is not None and value != "":
            return prefix + key, value
    return None


def env_flag_names(action: argparse.Action) -> tuple[str, str]:
    """The two environment variables that can give ``action``'s flag (``MGRPC_X``, ``MOS_X``)."""
    key = action.dest.upper()
    return f"MGRPC_{key}", f"MOS_{key}"


def _typed_from_env(action: argparse.Action, name: str, raw: str) -> Callable[[str], Any]:
    """``action.type`` that names the environment variable when the value came from there."""
    convert = action.type

    def typed(text: str) -> Any:
        try:
            return convert(text) if callable(convert) else text
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            if text == raw:
                raise argparse.ArgumentTypeError(f"invalid value {raw!r} from the environment ({name}): {e}") from None
            raise

    typed.__name__ = getattr(convert, "__name__", "value")
    return typed


def _apply_environment(parser: argparse.ArgumentParser) -> None:
    """Every option's default from ``MGRPC_<DEST>`` / ``MOS_<DEST>``, when set (the command line wins)."""
    for p in _walk(parser):
        for action in p._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            found = _env_lookup(action.dest)
            if found is None:
                continue
            name, raw = found
            value: Any
            if isinstance(action, argparse._StoreTrueAction):
                value = raw.strip().lower() not in _FALSE
            elif isinstance(action, argparse._StoreFalseAction):
                value = raw.strip().lower() in _FALSE
            elif isinstance(action, argparse._CountAction):
                value = int(raw) if raw.strip().isdigit() else int(raw.strip().lower() not in _FALSE)
            elif isinstance(action, argparse._AppendAction):
                value = raw.split()  # e.g. MGRPC_LISTEN="tcp://127.0.0.1:0 ws://127.0.0.1:0/rpc"
            elif isinstance(action, argparse._StoreAction) and action.nargs in (None, "?"):
                # A string default is converted by argparse only when the flag is absent, and only
                # for the command being run: a bad value elsewhere does not break other commands.
                value = raw
                if action.type is not None:
                    action.type = _typed_from_env(action, name, raw)
            else:
                continue
            action.default = value
            action.required = False


def _command_list(sub: argparse._SubParsersAction) -> str:
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    width = 18
    lines: list[str] = []
    for group, names in GROUPS.items():
        lines.append(f"{group} commands ({_GROUP_TITLES[group]}):")
        for name in names:
            text = textwrap.wrap(helps.get(name, ""), 100 - width - 2) or [""]
            lines.append(f"  {name:<{width}}{text[0]}")
            lines.extend(" " * (width + 2) + t for t in text[1:])
        lines.append("")
    return "\n".join(lines)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``argv``, only the module of the command ``argv`` runs is imported
    (the other commands get a placeholder that carries their help line). Without, every command."""
    parser = MgrpcArgumentParser(prog="mgrpc", formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global(parser, top=True)
    parser.add_argument("--version", action="version", version=f"mgrpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)
    real_add = sub.add_parser

    def add_parser(name: str, **kw: object) -> argparse.ArgumentParser:
        p = real_add(name, **kw)  # type: ignore[arg-type]
        _add_global(p, top=False)
        return p

    sub.add_parser = add_parser  # type: ignore[method-assign,assignment]
    if argv is None:
        wanted = set(COMMANDS)
    else:
        command = command_in(argv)
        wanted = {COMMAND_TABLE[command][0]} if command in COMMAND_TABLE else set()
    done: set[str] = set()
    for name, (modname, help_text) in COMMAND_TABLE.items():
        if modname in wanted:
            if modname not in done:
                importlib.import_module(modname).register(sub)
                done.add(modname)
        else:
            real_add(name, help=help_text)
    # Modules listed in COMMANDS but not (yet) in the table (plug-ins, tests) register in full.
    for modname in COMMANDS:
        if modname not in done and (argv is None or modname not in {m for m, _ in COMMAND_TABLE.values()}):
            importlib.import_module(modname).register(sub)
            done.add(modname)
    parser.description = (
        "Mongoose OS RPC (mgRPC) client, virtual device, OTA and conformance tool, wire-compatible\n"
        "with `mos`. Results go to stdout; progress and errors to stderr (exit status 1 on an error,\n"
        "2 on a usage error). Every flag can also come from the environment as MGRPC_<FLAG> or\n"
        "MOS_<FLAG> (MGRPC_PORT, MOS_TIMEOUT, MGRPC_VERBOSE=2, ...).\n\n"
        + _command_list(sub)
        + "Run 'mgrpc COMMAND --help' for a command's options."
    )
    _apply_environment(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mgrpc`` console script: parse, run the command, report any error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
    except ImportError as e:  # a command module that needs an optional dependency at import
        return report_error(e)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error already reported (2)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    if not getattr(args, "func", None):
        err("Error: no command given; run 'mgrpc --help' for the list of commands")
        return EXIT_USAGE
    configure_logging(args.verbose)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except Exception as e:  # the one place errors are reported: one line, exit 1 (2 for usage)
        return report_error(e, args)
    return int(rc or 0)
