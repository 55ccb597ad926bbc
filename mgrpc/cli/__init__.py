"""The ``mgrpc`` command line: the composition root (the only place that prints).

``mgrpc [--port URL] [--timeout 20s] [--rpc-creds user:pass|@file] COMMAND ...``; flags may appear
before or after the command, and every flag can come from the environment as ``MGRPC_<FLAG>`` or
``MOS_<FLAG>`` (``MGRPC_PORT``, ``MOS_PORT``, ...), as ``mos`` allows.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from mgrpc import __version__
from mgrpc.cli._common import configure_logging, duration_arg

__all__ = ["COMMANDS", "COMMAND_TABLE", "build_parser", "command_in", "main"]

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
}

# Command modules, each with ``register(subparsers)``, in help order.
COMMANDS = tuple(dict.fromkeys(module for module, _ in COMMAND_TABLE.values()))

# Global options that take a value (the command word is the first token that is neither one of
# these, nor their value, nor another option).
_VALUE_OPTIONS = ("--port", "--timeout", "--rpc-creds", "--baud-rate")


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


def _env(name: str, default: str | None = None) -> str | None:
    key = name.upper().replace("-", "_")
    return os.environ.get(f"MGRPC_{key}") or os.environ.get(f"MOS_{key}") or default


def _add_global(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On sub-parsers the defaults are suppressed so a flag given before the command is kept.
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument(
        "--port",
        default=d(_env("port")),
        help="device URL (see README: serial path, tcp://, udp://, "
        "ws://, http://, mqtt://broker/ID, ble://ADDR, loop://NAME); env MGRPC_PORT or MOS_PORT",
    )
    p.add_argument(
        "--timeout",
        type=duration_arg,
        default=d(duration_arg(_env("timeout", "20s") or "20s")),
        help="per-call timeout, Go duration syntax (default 20s)",
    )
    p.add_argument("--rpc-creds", default=d(_env("rpc-creds")), help="user:pass or @file for digest auth")
    p.add_argument("--mgrpc-compat-args", action="store_true", default=d(False), help="send `args` instead of `params`")
    p.add_argument("--baud-rate", type=int, default=d(None), help="serial speed (default 115200)")
    p.add_argument("--hw-flow-control", action="store_true", default=d(False), help="serial RTS/CTS flow control")
    p.add_argument("-v", "--verbose", action="count", default=d(0), help="more logging (-vv: every frame)")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``argv``, only the module of the command ``argv`` runs is imported
    (the other commands get a placeholder that carries their help line). Without, every command."""
    parser = argparse.ArgumentParser(
        prog="mgrpc",
        description="Mongoose OS RPC (mgRPC) client, virtual device, OTA and conformance tool, "
        "wire-compatible with `mos`.",
    )
    _add_global(parser, top=True)
    parser.add_argument("--version", action="version", version=f"mgrpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    real_add = sub.add_parser

    def add_parser(name: str, **kw: object) -> argparse.ArgumentParser:
        p = real_add(name, **kw)  # type: ignore[arg-type]
        _add_global(p, top=False)
        return p

    sub.add_parser = add_parser  # type: ignore[method-assign]
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mgrpc`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 1
    configure_logging(args.verbose)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)
