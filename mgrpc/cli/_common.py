"""Helpers shared by the CLI commands: durations, port selection, client set-up, and the one error path.

Every error a command meets ends in :func:`report_error`: one line on stderr, ``Error: <what went
wrong>; <what to do next>``, exit status 1, or 2 for a usage error (bad arguments, a flag missing).
Commands raise (:class:`CliError`, :class:`rpc.errors.UsageError`, any :class:`rpc.errors.MgrpcError`
or ``OSError``); :func:`mgrpc.cli.main` catches and reports. Results go to stdout, nothing else does.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from mgrpc.errors import AppError
from rpc.errors import AuthError, ChannelClosed, MgrpcError, RemoteError, RpcTimeout, TransportError, UsageError

__all__ = [
    "EXIT_ERROR", "EXIT_USAGE", "EXTRAS", "CannotConnect", "CliError", "configure_logging", "connect_from_args",
    "describe_error", "device_url", "err", "error_line", "missing_extra_message", "parse_duration", "port_from_args",
    "report_error", "run_with_client", "usage",
]

EXIT_ERROR = 1
EXIT_USAGE = 2


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
        raise UsageError("no device port given: pass --port URL (or set MGRPC_PORT / MOS_PORT)")
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


# mos's TLS flags -> the URL options of the schemes that use TLS (other schemes ignore them, as mos).
TLS_FLAGS = (("ca_cert_file", "ca"), ("cert_file", "cert"), ("key_file", "key"))
TLS_SCHEMES = ("wss://", "https://", "mqtts://")


def tls_options(port: str, args: Any) -> str:
    """Fold mos's ``--ca-cert-file``, ``--cert-file``, ``--key-file`` into a wss/https/mqtts URL."""
    if not port.startswith(TLS_SCHEMES):
        return port
    opts = [f"{opt}={quote(str(value), safe='/')}" for flag, opt in TLS_FLAGS if (value := getattr(args, flag, None))]
    if not opts:
        return port
    return port + ("&" if "?" in port else "?") + "&".join(opts)


def device_url(args: Any) -> str:
    """The device URL of ``--port`` with the serial and TLS flags folded in."""
    return tls_options(serial_options(port_from_args(args), args), args)


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
    logging.getLogger("asyncio").setLevel(logging.WARNING)  # "Using selector: ..." is not ours
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
    """Open an :class:`rpc.client.AsyncClient` for ``--port``, ``--timeout``, ``--rpc-creds``.

    A link that cannot be opened raises :class:`CannotConnect` (a ``TransportError``) in plain words.
    """
    from rpc.auth import parse_creds
    from transports import connect

    creds = getattr(args, "rpc_creds", None) or os.environ.get("MOS_RPC_CREDS") or None
    port = port_from_args(args)
    parsed = parse_creds(creds) if creds else None
    try:
        return await connect(
            device_url(args),
            timeout_s=args.timeout,
            creds=parsed,
            compat_args=bool(getattr(args, "mgrpc_compat_args", False)),
            **opts,
        )
    except (UsageError, AuthError):
        raise
    except (TransportError, OSError) as e:
        if _needs_install(str(e)):
            raise
        raise CannotConnect(port, e) from e


def describe_error(e: BaseException) -> str:
    """One-line text for an error, in mos's words where mos has them (no advice; see :func:`error_line`)."""
    if isinstance(e, RemoteError):
        return f"remote error {e.code}: {e.message}"
    if isinstance(e, RpcTimeout):
        return "context deadline exceeded"
    if isinstance(e, TransportError | MgrpcError):
        return str(e)
    return f"{type(e).__name__}: {e}"


class CliError(AppError):
    """An error already phrased for the user: ``message`` and ``hint`` (what to do next).

    ``exit_status`` is 1 for an error, 2 for a usage error.
    """

    def __init__(self, message: str, hint: str = "", *, exit_status: int = EXIT_ERROR) -> None:
        super().__init__(f"{message}; {hint}" if hint else message)
        self.message = message
        self.hint = hint
        self.exit_status = exit_status


class CannotConnect(AppError, TransportError):
    """The link to ``--port`` could not be opened; the text names the cause in plain words."""

    def __init__(self, port: str, cause: BaseException) -> None:
        reason, hint = _connect_reason(port, cause)
        super().__init__(f"cannot connect to {port}: {reason}; {hint}")
        self.port = port
        self.reason = reason


def usage(message: str) -> UsageError:
    """A usage error to ``raise`` (exit status 2)."""
    return UsageError(message)


def _needs_install(text: str) -> bool:
    return "pip install" in text


def _root_os_error(e: BaseException) -> BaseException:
    """The innermost cause worth naming: the ``OSError`` under library wrappers."""
    seen: set[int] = set()
    best: BaseException = e
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        # aiohttp's ClientConnectorError keeps it in os_error, its certificate error in certificate_error
        inner = getattr(cur, "os_error", None) or getattr(cur, "certificate_error", None)
        if isinstance(inner, OSError):
            best = inner
        elif isinstance(cur, OSError) and not isinstance(cur, MgrpcError):
            best = cur
        cur = cur.__cause__ or cur.__context__
    return best


def _is_connect_failure(e: BaseException) -> bool:
    """A link error whose cause is that the peer could not be reached at all (refused, unknown host),
    or not trusted (its TLS certificate failed verification)."""
    import socket
    import ssl

    return isinstance(
        _root_os_error(e), ConnectionRefusedError | socket.gaierror | FileNotFoundError | ssl.SSLCertVerificationError
    )


def _connect_reason(port: str, cause: BaseException) -> tuple[str, str]:
    import socket
    import ssl

    root = _root_os_error(cause)
    text = str(cause)
    check = "check that the device is running and that --port is right"
    if "Missing rpc-ws library" in text or "handshake" in text:
        return ("the server there does not accept WebSocket RPC",
                "check the path in --port (devices serve ws://HOST:PORT/rpc)")  # fmt: skip
    if isinstance(root, ConnectionRefusedError):
        return "connection refused", check
    if isinstance(root, socket.gaierror):
        return "unknown host", "check the host name in --port"
    if isinstance(root, TimeoutError) or "timed out" in text:
        return "no answer (timed out)", "check the address in --port and the network, or raise --timeout"
    if isinstance(root, FileNotFoundError):
        return "no such port", "check the port name (ls /dev/tty*) or give a URL such as tcp://HOST:PORT"
    if isinstance(root, PermissionError):
        return "permission denied", "run as a user allowed to open the port (e.g. in the dialout group)"
    if isinstance(root, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "the connection was closed by the other end", check
    if isinstance(root, ssl.SSLCertVerificationError):
        return (f"the server's certificate is not trusted ({root.verify_message})",
                "pass --ca-cert-file FILE (its CA), or ?insecure=1 at the end of --port to verify nothing")  # fmt: skip
    words = getattr(root, "strerror", None) or str(root) or type(root).__name__
    if port in words:  # "tcp://h:p: Connect call failed" -> no need to say the URL twice
        words = words.split(": ", 1)[-1]
    return words, check


def _unreachable_line(e: BaseException, args: Any) -> str:
    """A peer that could not be reached, named by the flag that gave it (--port, --to, --broker)."""
    for flag, what in (("port", "the device"), ("to", "the device"), ("broker", "the MQTT broker")):
        target = getattr(args, flag, None)
        if target:
            reason, hint = _connect_reason(str(target), e)
            if flag != "port":
                hint = f"check that {what} is running and that --{flag} is right"
            return f"cannot connect to {target}: {reason}; {hint}"
    return str(CannotConnect("the device", e))


def _auth_line(args: Any) -> str:
    given = bool(getattr(args, "rpc_creds", None) or os.environ.get("MOS_RPC_CREDS"))
    if given:
        return "the device rejected the credentials; check the user and password given with --rpc-creds"
    return "the device requires authentication; pass --rpc-creds user:pass (or @file)"


def _timeout_line(args: Any) -> str:
    port = str(getattr(args, "port", None) or os.environ.get("MGRPC_PORT") or os.environ.get("MOS_PORT") or "")
    timeout = getattr(args, "timeout", None)
    within = f" within {timeout:g} s" if isinstance(timeout, int | float) else ""
    head = f"no reply from the device{within} (context deadline exceeded)"
    if "codec=msgpack" in port:
        return f"{head}; the device may not speak msgpack: drop ?codec=msgpack from --port"
    if port.startswith(("mqtt://", "mqtts://")):
        return (f"{head}; check the device id at the end of --port (mqtt://BROKER/DEVICE_ID) "
                "and that the device is connected to that broker")  # fmt: skip
    return f"{head}; check --port and that the device is running, or raise --timeout"


# Top-level module of each optional dependency -> (the pip package, the extra that installs it).
EXTRAS = {
    "littlefs": ("littlefs-python", "fs"),
    "aiohttp": ("aiohttp", "http"),
    "paho": ("paho-mqtt", "mqtt"),
    "serial": ("pyserial", "serial"),
    "bleak": ("bleak", "ble"),
    "bumble": ("bumble", "ble"),
    "msgpack": ("msgpack", "msgpack"),
    "cryptography": ("cryptography", "sign"),
    "sqlalchemy": ("sqlalchemy", "fleet"),
    "psycopg": ("psycopg", "postgres"),
}


def missing_extra_message(e: ImportError) -> str:
    """One line for a missing optional dependency: the library's own words when they name the
    extra, else the package and ``pip install 'mgrpc[EXTRA]'`` from :data:`EXTRAS`."""
    text = str(e)
    if _needs_install(text):
        return text
    top = (e.name or "").split(".")[0]
    if top in EXTRAS:
        package, extra = EXTRAS[top]
        return f"this command needs the '{package}' package: pip install 'mgrpc[{extra}]'"
    return f"missing module {e.name or text!r}: pip install 'mgrpc[all]'"


def error_line(e: BaseException, args: Any = None) -> tuple[str, int]:
    """The one line (without ``Error: ``) and the exit status for ``e``."""
    if isinstance(e, CliError):
        return str(e), e.exit_status
    if isinstance(e, ImportError):  # an optional dependency this command needs is not installed
        return missing_extra_message(e), EXIT_ERROR
    if isinstance(e, CannotConnect):
        return str(e), EXIT_ERROR
    if isinstance(e, AuthError) or (isinstance(e, RemoteError) and e.code == 401):
        return _auth_line(args), EXIT_ERROR
    if isinstance(e, UsageError):
        text = str(e)
        if _needs_install(text):
            return text, EXIT_ERROR
        cmd = getattr(args, "command", None)
        return f"{text}; see 'mgrpc {cmd + ' ' if cmd else ''}--help'", EXIT_USAGE
    if isinstance(e, RpcTimeout):
        return _timeout_line(args), EXIT_ERROR
    if isinstance(e, RemoteError):
        text = describe_error(e)
        if e.code == 404 and e.message.startswith("No handler"):
            text += "; the device does not have this method ('mgrpc call RPC.List' lists those it has)"
        elif e.code == 403:
            text += "; the device's ACL refuses this call: use --rpc-creds with a user the ACL allows"
        return text, EXIT_ERROR
    if isinstance(e, TransportError) and _is_connect_failure(e):
        return _unreachable_line(e, args), EXIT_ERROR
    if isinstance(e, ChannelClosed):
        return (f"the connection to the device was lost ({e}); check that it is still running, "
                "then run the command again"), EXIT_ERROR  # fmt: skip
    if isinstance(e, MgrpcError):
        return str(e), EXIT_ERROR
    if isinstance(e, OSError):
        name = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return f"{name}{e.strerror or e}", EXIT_ERROR
    return (f"internal error: {type(e).__name__}: {e}; please report it "
            "(run again with -vv to see where it happened)"), EXIT_ERROR  # fmt: skip


def report_error(e: BaseException, args: Any = None) -> int:
    """Print ``e`` as one ``Error: ...`` line on stderr; return the exit status (1, or 2 for usage)."""
    line, status = error_line(e, args)
    line = " ".join(line.splitlines())  # one line, whatever the message carried
    logging.getLogger("mgrpc.cli").debug("error detail", exc_info=e)
    err(f"Error: {line}")
    return status


def run_with_client(args: argparse.Namespace, fn: Callable[[Any], Awaitable[int | None]]) -> int:
    """Connect with ``--port``, run ``fn(client)``, close; returns the exit status.

    Errors propagate to :func:`mgrpc.cli.main`, which reports them with :func:`report_error`.
    """

    async def main() -> int | None:
        client = await connect_from_args(args)
        try:
            return await fn(client)
        finally:
            await client.close()

    import asyncio

    return int(asyncio.run(main()) or 0)
