"""``mgrpc console`` — print what a device writes on its serial port, as ``mos console`` does.

The port is opened raw (no RPC framing, so frames show up as text too), with the same line
settings as for RPC (``--baud-rate``, ``--hw-flow-control``, DTR/RTS false unless told otherwise).
Every line is prefixed with a timestamp (``--timestamp``, default Go's ``StampMilli``:
``[Jan _2 15:04:05.000] ``); stdin is forwarded to the device unless ``--no-input``;
``--duration`` stops after that long (otherwise Ctrl-C).
"""

from __future__ import annotations

import argparse
import codecs
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from mgrpc.cli._common import CliError, duration_arg, port_from_args
from rpc.errors import UsageError

__all__ = ["ConsoleFormatter", "register", "timestamp_formatter"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "")

# Go layout names mos accepts, as Python formatters of a datetime.
_GO_LAYOUTS: dict[str, Callable[[datetime], str]] = {
    "stamp": lambda t: f"{t:%b} {t.day:>2} {t:%H:%M:%S}",
    "stampmilli": lambda t: f"{t:%b} {t.day:>2} {t:%H:%M:%S}.{t.microsecond // 1000:03d}",
    "stampmicro": lambda t: f"{t:%b} {t.day:>2} {t:%H:%M:%S}.{t.microsecond:06d}",
    "kitchen": lambda t: t.strftime("%I:%M%p").lstrip("0"),
    "rfc3339": lambda t: t.astimezone().isoformat(timespec="seconds"),
    "rfc3339nano": lambda t: t.astimezone().isoformat(timespec="microseconds"),
    "datetime": lambda t: f"{t:%Y-%m-%d %H:%M:%S}",
    "timeonly": lambda t: f"{t:%H:%M:%S}",
}


def timestamp_formatter(spec: str | None) -> Callable[[float], str] | None:
    """The line-prefix text for a ``--timestamp`` value, as a function of the epoch time; None = off.

    ``true``/``yes``/``on``: epoch ``sec.usec``; ``false``/``no``/``off``/empty: no prefix; a Go
    layout name (``StampMilli``, ``RFC3339``, ...); or a strftime format (anything with ``%``).
    """
    if spec is None:
        spec = "StampMilli"
    low = spec.strip().lower()
    if low in _FALSE:
        return None
    if low in _TRUE:
        return lambda now: f"[{now:.6f}] "
    layout = _GO_LAYOUTS.get(low)
    if layout is not None:
        return lambda now: f"[{layout(datetime.fromtimestamp(now))}] "
    if "%" in spec:
        return lambda now: f"[{datetime.fromtimestamp(now).strftime(spec)}] "
    raise UsageError(
        f"unknown --timestamp {spec!r}: use true, false, a layout name ({', '.join(sorted(_GO_LAYOUTS))}) "
        "or a strftime format"
    )


class ConsoleFormatter:
    """Turns device bytes into printable text with a timestamp at the start of every line (sans-I/O).

    UTF-8 split across reads is reassembled; invalid bytes print as U+FFFD.
    """

    def __init__(self, stamp: Callable[[float], str] | None) -> None:
        self._stamp = stamp
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_line_start = True

    def feed(self, data: bytes, now: float) -> str:
        """Text for ``data`` received at epoch time ``now``."""
        text = self._decoder.decode(data)
        if self._stamp is None or not text:
            return text
        out: list[str] = []
        for line in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self._stamp(now))
            out.append(line)
            self._at_line_start = line.endswith("\n")
        return "".join(out)


def register(sub: Any) -> None:
    """Add the ``console`` command."""
    p = sub.add_parser(
        "console",
        help="print the device's serial output (like `mos console`)",
        description="Open the serial port raw and print everything the device writes, each line "
        "prefixed with a timestamp; forward stdin to the device unless --no-input.",
    )
    p.add_argument(
        "--set-control-lines", default="true", choices=["true", "false"],
        help="drive DTR/RTS false on open (default true; keeps ESP boards out of reset)",
    )  # fmt: skip
    p.add_argument("--inverted-control-lines", action="store_true", help="drive DTR/RTS true instead")
    p.add_argument(
        "--timestamp", default="StampMilli",
        help="line prefix: true (epoch sec.usec), false (none), a Go layout name "
        "(StampMilli, Stamp, StampMicro, RFC3339, Kitchen, DateTime, TimeOnly) or a strftime format",
    )  # fmt: skip
    p.add_argument("--no-input", action="store_true", help="do not forward stdin to the device")
    p.add_argument("--duration", type=duration_arg, default=None, help="stop after this long (e.g. 10s)")
    p.set_defaults(func=cmd_console)


def cmd_console(args: argparse.Namespace) -> int:
    """Run ``mgrpc console``."""
    stamp = timestamp_formatter(args.timestamp)
    port = port_from_args(args)
    ser = _open(port, args)
    try:
        _run(ser, ConsoleFormatter(stamp), sys.stdout, duration_s=args.duration, forward_stdin=not args.no_input)
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the adapter went away (pyserial's SerialException is an OSError)
        raise CliError(f"{port}: {e}", "check the cable and the adapter, then run the command again") from e
    finally:
        ser.close()
    return 0


def _open(port: str, args: argparse.Namespace) -> Any:
    from transports.registry import parse_url
    from transports.serial import SerialOptions, open_port

    url = parse_url(port)
    if url.scheme != "serial":
        raise UsageError(f"console needs a serial port, not {url.scheme}://")
    options = SerialOptions(
        baud=getattr(args, "baud_rate", None) or 115200,  # --baud-rate is a global flag
        hw_flow_control=bool(getattr(args, "hw_flow_control", False)),
        set_control_lines=args.set_control_lines == "true",
        inverted_control_lines=args.inverted_control_lines,
    )
    ser = open_port(url.path or url.host, options)
    ser.timeout = 0.1
    return ser


def _run(ser: Any, fmt: ConsoleFormatter, out: TextIO, *, duration_s: float | None, forward_stdin: bool) -> None:
    stop = threading.Event()
    if forward_stdin:
        threading.Thread(target=_forward_stdin, args=(ser, stop), name="mgrpc-console-stdin", daemon=True).start()
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        while deadline is None or time.monotonic() < deadline:
            data = ser.read(max(1, ser.in_waiting))
            if data:
                out.write(fmt.feed(bytes(data), time.time()))
                out.flush()
    finally:
        stop.set()


def _forward_stdin(ser: Any, stop: threading.Event) -> None:
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:
        return
    while not stop.is_set():
        chunk = stdin.read1(256) if hasattr(stdin, "read1") else stdin.read(1)
        if not chunk:
            return
        try:
            ser.write(chunk)
        except Exception:
            return
