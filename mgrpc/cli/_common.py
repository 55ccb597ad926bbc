"""Helpers shared by the CLI commands: durations, port selection, client set-up, error output."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from rpc.errors import MgrpcError, RemoteError, RpcTimeout, TransportError, UsageError

__all__ = [
    "configure_logging", "connect_from_args", "err", "parse_duration", "port_from_args",
    "run_with_client",
]

T = TypeVar("T")

_DUR_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse a Go duration (``20s``, ``2m``, ``1m30s``, ``500ms``) or plain seconds; returns seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for m in _DUR_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise UsageError(f"invalid duration {text!r} (use e.g. 20s, 2m, 1m30s, 500ms)")
    return total


def duration_arg(text: str) -> float:
    """argparse ``type=`` for durations."""
    try:
        return parse_duration(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def port_from_args(args: Any) -> str:
    """``--port``, else ``MGRPC_PORT``, else ``MOS_PORT``; error if none."""
    port = getattr(args, "port", None) or os.environ.get("MGRPC_PORT") or os.environ.get("MOS_PORT")
    if not port or port == "auto":
        if port == "auto":
            from glob import glob

            found = sorted(glob("/dev/ttyUSB*") + glob("/dev/ttyACM*") + glob("/dev/cu.usb*"))
            if found:
                err(f"Using port {found[0]}")
                return found[0]
        raise UsageError("no device port: use --port URL (or set MGRPC_PORT / MOS_PORT)")
    return str(port)


def serial_options(port: str, args: Any) -> str:
    """Fold mos's serial flags (``--baud-rate``, ``--hw-flow-control``) into a serial port URL."""
    opts = []
    if getattr(args, "baud_rate", None):
        opts.append(f"baud={int(args.baud_rate)}")
    if getattr(args, "hw_flow_control", False):
        opts.append("hw_flow_control=1")
    if not opts or ("://" in port and not port.startswith("serial://")):
        return port
    url = port if port.startswith("serial://") else f"serial://{port}"
    return url + ("&" if "?" in url else "?") + "&".join(opts)


def err(*parts: object) -> None:
    """Informational and progress text goes to stderr, as mos does."""
    print(*parts, file=sys.stderr, flush=True)


def configure_logging(verbosity: int) -> None:
    """stdlib logging at WARNING/INFO/DEBUG, with structlog rendering through it.

    structlog only renders the per-frame debug lines, so at the default level it is not even imported
    (it costs a CLI run more time than the call itself).
    """
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if level > logging.DEBUG:
        return
    import structlog

    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer(key_order=["event"])],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,  # the CLI and embedders may reconfigure
    )


async def connect_from_args(args: Any, **opts: Any) -> Any:
    """Open an :class:`rpc.client.AsyncClient` for ``--port``, ``--timeout``, ``--rpc-creds``."""
    from rpc.auth import parse_creds
    from transports import connect

    creds = getattr(args, "rpc_creds", None) or os.environ.get("MOS_RPC_CREDS") or None
    return await connect(
        serial_options(port_from_args(args), args),
        timeout_s=args.timeout,
        creds=parse_creds(creds) if creds else None,
        compat_args=bool(getattr(args, "mgrpc_compat_args", False)),
        **opts,
    )


def describe_error(e: BaseException) -> str:
    """One-line text for an error, in mos's words where mos has them."""
    if isinstance(e, RemoteError):
        return f"remote error {e.code}: {e.message}"
    if isinstance(e, RpcTimeout):
        return "context deadline exceeded"
    if isinstance(e, TransportError | MgrpcError):
        return str(e)
    return f"{type(e).__name__}: {e}"


class _Reported(Exception):
    """The error was already printed."""


def run_with_client(args: argparse.Namespace, fn: Callable[[Any], Awaitable[int | None]]) -> int:
    """Connect with ``--port``, run ``fn(client)``, close; print errors the way mos does.

    A connection that cannot be opened is printed on stdout (mos uses a plain Println there);
    every other error goes to stderr as ``Error: <message>``. Returns the exit status.
    """

    async def main() -> int | None:
        try:
            client = await connect_from_args(args)
        except (TransportError, OSError) as e:
            print(describe_error(e))
            raise _Reported() from e
        try:
            return await fn(client)
        finally:
            await client.close()

    import asyncio

    try:
        rc = asyncio.run(main())
    except _Reported:
        return 1
    except (MgrpcError, OSError) as e:
        err(f"Error: {describe_error(e)}")
        return 1
    return int(rc or 0)
