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

__all__ = ["build_parser", "main"]

# Command modules, each with ``register(subparsers)``.
COMMANDS = (
    "mgrpc.cli.call",
    "mgrpc.cli.device",
    "mgrpc.cli.fw",
    "mgrpc.cli.ota",
    "mgrpc.cli.files",
    "mgrpc.cli.dashboard",
    "mgrpc.cli.console",
    "mgrpc.cli.demo",
    "mgrpc.cli.bridge",
    "mgrpc.cli.conformance",
)


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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered command."""
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
    for modname in COMMANDS:
        importlib.import_module(modname).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mgrpc`` console script."""
    parser = build_parser()
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
