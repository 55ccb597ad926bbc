"""``mgrpc call METHOD [JSON]`` — output exactly like ``mos call`` (spec/tool.md §3)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from mgrpc.cli._common import run_with_client, usage
from rpc.errors import RemoteError
from rpc.frame import ABSENT, Frame, RawJSON
from rpc.jsonfmt import compact, go_indent, member_text

__all__ = ["format_result", "register"]


def register(sub: Any) -> None:
    """Add the ``call`` command."""
    p = sub.add_parser(
        "call",
        help="call an RPC method and print its result",
        description="Call METHOD with optional JSON params and print the result as `mos call` does: "
        "two-space indented JSON on stdout, `null` for no result; a remote error goes to stderr "
        "as `Error: remote error <code>: <message>` with exit status 1.",
    )
    p.add_argument("method", help="method name, e.g. Sys.GetInfo")
    p.add_argument("params", nargs="?", default="", help='JSON params, e.g. \'{"key": "device.id"}\'')
    p.set_defaults(func=cmd_call)


def format_result(frame: Frame) -> str:
    """The stdout text for a successful response frame (result re-indented as Go does)."""
    if frame.error is not None or frame.result is ABSENT or frame.result is None:
        return "null"
    if frame.raw is not None:
        text = member_text(frame.raw.decode("utf-8", "surrogateescape"), "result")
        if text is not None:
            return go_indent(text)
    return go_indent(json.dumps(frame.result, ensure_ascii=False))


def cmd_call(args: argparse.Namespace) -> int:
    """Run ``mgrpc call``."""
    params: Any = ABSENT
    if args.params.strip():
        try:
            json.loads(args.params)
        except ValueError:
            raise usage(f"Args [{args.params}] is not a valid JSON string") from None
        # As mos (json.RawMessage): sent compacted, numbers and escapes exactly as typed.
        params = RawJSON(compact(args.params))

    async def call(client: Any) -> int:
        frame: Frame = await client.call_frame(args.method, params, timeout_s=args.timeout)
        if args.method.lower() == "sys.reboot":
            await asyncio.sleep(0.2)  # as mos does, let the reply leave before the link drops
        if frame.error is not None and frame.error.code != 0:
            raise RemoteError(frame.error.code, frame.error.message or "")
        sys.stdout.write(format_result(frame) + "\n")
        return 0

    return run_with_client(args, call)
