"""``mgrpc conformance`` — check a device (``--port URL``) or a host tool (``--client CMD``) against the spec.

Prints a table (check, spec section, result, what was seen vs expected); ``--junit``/``--json`` also
write reports. Exit status 0 only if every selected check passed (skips are not failures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from mgrpc.cli._common import device_url
from rpc.errors import MgrpcError, UsageError

__all__ = ["cmd_conformance", "register"]

# The same list as conformance.clientcheck.CLIENT_SCHEMES (checked by a test); spelled out here so
# building the parser does not import the client-check machinery.
CLIENT_TRANSPORTS = ("tcp", "serial", "ws", "http", "mqtt", "ble")


def register(sub: Any) -> None:
    """Add the ``conformance`` command."""
    p = sub.add_parser(
        "conformance",
        help="check a device or a client against the mgRPC wire protocol",
        description="Run the conformance checks against the device at --port (any transport URL), "
        "or, with --client CMD, start a reference device and check what the host tool CMD sends "
        "({url} in CMD is replaced by the reference device's URL). Destructive checks (OTA, reboot) "
        "run only with --ota BUNDLE or --ota-generate.",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GROUP",
        help="run only these groups or checks (repeatable, or comma-separated)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ota", metavar="BUNDLE", help="fw.zip to install in the OTA checks (destructive)")
    g.add_argument(
        "--ota-generate",
        action="store_true",
        help="generate a bundle for the device's arch with the parts it requires "
        "(app and fs for esp32/esp8266; mgrpc virtual-device firmware)",
    )
    p.add_argument(
        "--destructive",
        action="store_true",
        help="also run checks that reboot the device (implied by --ota/--ota-generate)",
    )
    p.add_argument("--ota-chunk-size", type=int, default=512, help="bytes per OTA.Write (default 512, as mos)")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    p.add_argument("--json", metavar="FILE", help="write a JSON report")
    p.add_argument("--reply-timeout", type=float, default=5.0, help="seconds to wait for each expected reply")
    p.add_argument(
        "--quiet-time",
        type=float,
        default=0.3,
        help="seconds to keep listening for a reply that must not come (after a barrier)",
    )
    p.add_argument(
        "--max-frame-size",
        type=int,
        default=4096,
        help="rpc.max_frame_size to assume when the device does not report it (Config.Get)",
    )
    p.add_argument(
        "--check-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="each check's own deadline (default: 3 x --reply-timeout)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deadline of the whole run; checks not reached by then are reported as not run",
    )
    p.add_argument(
        "--show-skips",
        action="store_true",
        help="list every skipped check (default: skips for other transports are folded per group)",
    )
    p.add_argument("--device-id", help="the device's id (default: learned from its replies)")
    p.add_argument("--auth-method", default="Sys.GetInfo", help="method that needs auth (with --rpc-creds)")
    p.add_argument(
        "--ota-serve-host",
        metavar="ADDR",
        help="address the device can download firmware from us at (pull checks; default: from --port)",
    )
    p.add_argument(
        "--denied-method",
        metavar="METHOD",
        help="a method of the device that no rpc.acl entry matches (auth.acl_denied expects 403 unauthorized)",
    )
    p.add_argument("--client", metavar="CMD", help="check a host tool: CMD with {url} for the device URL")
    p.add_argument(
        "--client-transport",
        action="append",
        default=[],
        metavar="SCHEME",
        help=f"transport(s) for --client: {', '.join(CLIENT_TRANSPORTS)} (default tcp)",
    )
    p.add_argument(
        "--client-creds",
        metavar="USER:PASS",
        help="with --client: the reference device demands digest auth ({creds} in CMD = USER:PASS)",
    )
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.set_defaults(func=cmd_conformance)


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def cmd_conformance(args: argparse.Namespace) -> int:
    """Run ``mgrpc conformance``."""
    from rich.console import Console

    console = Console(file=sys.stdout, soft_wrap=False, width=max(100, _terminal_width()))
    try:
        if args.list:
            return _list(console)
        report = asyncio.run(_run(args))
    except (UsageError, MgrpcError, OSError, ValueError) as e:
        from mgrpc.cli._common import CliError, report_error

        return report_error(CliError(str(e)) if type(e) is ValueError else e, args)
    _print(console, report, show_skips=bool(getattr(args, "show_skips", False)))
    from conformance.runner import to_json, to_junit_xml

    if args.junit:
        Path(args.junit).write_text(to_junit_xml(report))
    if args.json:
        Path(args.json).write_text(to_json(report))
    first = report.results[0] if report.results else None
    if len(report.results) == 1 and first is not None and not first.ok and first.name in ("connect", "preflight"):
        # Nothing was checked: besides the report, the one-line error every command gives.
        from mgrpc.cli._common import CliError, report_error

        return report_error(CliError(f"no check ran: {first.message}", "check --port (and --rpc-creds)"), args)
    return 0 if report.ok else 1


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 160


async def _run(args: argparse.Namespace) -> Any:
    from conformance.model import ConformanceError
    from conformance.session import Options
    from rpc.auth import parse_creds

    creds_spec = getattr(args, "rpc_creds", None) or os.environ.get("MOS_RPC_CREDS")
    bundle = Path(args.ota).read_bytes() if args.ota else None
    options = Options(
        timeout_s=args.reply_timeout,
        quiet_s=args.quiet_time,
        max_frame_size=args.max_frame_size,
        check_timeout_s=args.check_timeout,
        deadline_s=args.deadline,
        creds=parse_creds(creds_spec) if creds_spec else None,
        auth_method=args.auth_method,
        denied_method=args.denied_method,
        ota_serve_host=args.ota_serve_host,
        destructive=bool(args.destructive or args.ota or args.ota_generate),
        ota_bundle=bundle,
        ota_generate=bool(args.ota_generate),
        ota_chunk_size=args.ota_chunk_size,
        device_id=args.device_id,
    )
    only = _split(args.only) or None
    try:
        if args.client:
            from conformance.clientcheck import run_client

            schemes = _split(args.client_transport) or ["tcp"]
            bad = [x for x in schemes if x not in CLIENT_TRANSPORTS]
            if bad:
                raise UsageError(f"unknown client transport(s) {bad}; valid: {', '.join(CLIENT_TRANSPORTS)}")
            ccreds = parse_creds(args.client_creds) if args.client_creds else None
            return await run_client(args.client, schemes=schemes, timeout_s=max(args.timeout, 10.0), creds=ccreds)
        from conformance.runner import run

        return await run(device_url(args), options=options, only=only)
    except ConformanceError as e:
        raise UsageError(str(e)) from None


_STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow", "error": "bold magenta"}


_FOLDS = {
    "not applicable over": "for another transport",
    "not offered": "of methods the device does not offer (not in its RPC.List)",
}


def _fold_kind(r: Any) -> str | None:
    if r.outcome.value != "skip":
        return None
    return next((k for k in _FOLDS if r.message.startswith(k)), None)


def _rows(results: list[Any], show_skips: bool) -> list[tuple[Any, str, list[str]]]:
    """Rows to print: ``(result, "", [])`` per result, except that skips for another transport and
    skips of methods not offered become one ``(None, "<group>|<kind>", [names])`` row per group and
    kind, unless ``show_skips``."""
    rows: list[tuple[Any, str, list[str]]] = []
    folded: dict[str, list[str]] = {}
    for r in results:
        kind = None if show_skips else _fold_kind(r)
        if kind is not None:
            key = f"{r.group}|{kind}"
            if key not in folded:
                folded[key] = []
                rows.append((None, key, folded[key]))
            folded[key].append(r.name)
            continue
        rows.append((r, "", []))
    return rows


def _print(console: Any, report: Any, *, show_skips: bool = False) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=Text(f"mgRPC conformance: {report.target}"),
        caption=Text("spec: sections of docs/protocol/"),
        show_lines=False,
        expand=False,
    )
    table.add_column("check", no_wrap=True)
    # A check may cite several sections: wrap them in a narrow column so the verdicts keep the room.
    table.add_column("spec", max_width=32, overflow="fold")
    table.add_column("result", no_wrap=True)
    table.add_column("seen / expected", overflow="fold", min_width=30, ratio=1)
    for r, group, names in _rows(list(report.results), show_skips):
        if r is None:
            grp, kind = group.split("|", 1)
            what = f"{len(names)} check(s) {_FOLDS[kind]}: " + ", ".join(n.split(".", 1)[-1] for n in names)
            table.add_row(Text(f"{grp}.*"), Text(""), Text("SKIP", style=_STYLE["skip"]), Text(what))
            continue
        detail = r.message
        if r.outcome.value in ("fail", "error"):
            if r.sent:
                detail += f"\n  sent:     {r.sent}"
            if r.seen or r.expected:
                detail += f"\n  seen:     {r.seen}\n  expected: {r.expected}"
            detail += f"\n  spec:     {_cite(r.section)}"
        style = _STYLE.get(r.outcome.value, "")
        # Text, not markup: names like client.src[tcp] and JSON like ["a"] must print as they are.
        table.add_row(Text(r.name), Text(r.section), Text(r.outcome.value.upper(), style=style), Text(detail))
    console.print(table)
    counts = (
        ", ".join(f"{report.count(o)} {o.value}" for o in type(report.results[0].outcome)) if report.results else ""
    )
    verdict = "[green]PASS[/]" if report.ok else "[bold red]FAIL[/]"
    slowest = max(report.results, key=lambda r: r.duration_s, default=None)
    longest = f", longest check {slowest.name} {slowest.duration_s:.1f} s" if slowest is not None else ""
    console.print(f"{verdict}  {counts}  ({report.duration_s:.1f} s{longest})")
    if not show_skips and any(_fold_kind(r) for r in report.results):
        console.print("(skips folded per group; --show-skips lists them)")


def _cite(section: str) -> str:
    """``frames.md §1.2`` -> ``docs/protocol/frames.md §1.2`` (where the cited section is)."""
    from conformance.model import cite

    return cite(section)


def _list(console: Any) -> int:
    from rich.table import Table
    from rich.text import Text

    import conformance.checks  # noqa: F401
    from conformance.model import checks_for

    table = Table(title="mgRPC conformance checks")
    for col in ("check", "spec", "what", "destructive"):
        table.add_column(col)
    for spec in checks_for(None):
        table.add_row(Text(spec.name), Text(_cite(spec.section)), Text(spec.title), "yes" if spec.destructive else "")
    console.print(table)
    return 0
