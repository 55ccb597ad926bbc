"""``mgrpc ls/get/put/rm``, ``config-get/config-set`` and ``commit/revert/boot-state``.

Output as ``mos`` prints it: ``ls`` one name per line (``name size`` with ``-l``) sorted, lines ended
by ``\\r\\n``; ``get`` the raw file bytes on stdout; ``config-get`` a string raw, a number plain, an
object as Go-indented JSON with sorted keys; progress and stage messages on stderr. ``ls`` and
``config-get`` take ``--json`` (plain JSON on stdout). ``boot-state`` (mos has no such command) shows
both slots, like ``mcumgr image list``; ``--json`` gives ``OTA.GetBootState`` with a ``slots`` list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from mgrpc.cli._common import CliError, describe_error, err, run_with_client, usage
from rpc.errors import RemoteError
from rpc.host import DEFAULT_CHUNK_SIZE, OtaError
from rpc.host.config import config_get, config_get_path, config_set, format_config_value, parse_assignments
from rpc.host.files import fs_get, fs_list, fs_put, fs_remove

__all__ = ["fetch_url", "register"]


def fetch_url(url: str, *, timeout_s: float = 60.0) -> bytes:
    """HTTP(S) GET ``url`` (mos ``ReadOrFetchFile``); non-200 is an :class:`OtaError`."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status != 200:
                raise OtaError(f"failed to fetch {url}: HTTP {resp.status}")
            return bytes(resp.read())
    except urllib.error.HTTPError as e:
        raise OtaError(f"failed to fetch {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise OtaError(f"failed to fetch {url}: {getattr(e, 'reason', e)}") from e


def read_or_fetch(name: str, *, timeout_s: float = 60.0) -> bytes:
    """A local file's bytes, or an ``http(s)://`` URL's body (with mos's stderr messages)."""
    if name.startswith(("http://", "https://")):
        err(f"Fetching {name}...")
        data = fetch_url(name, timeout_s=timeout_s)
        err(f"  done, {len(data)} bytes.")
        return data
    try:
        with open(name, "rb") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"unable to read {name}: {e.strerror or e}", "check the file name and its permissions") from e


def _fs_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes per FS chunk (default 512)")
    p.add_argument("--fs-op-attempts", type=int, default=3, help="attempts per FS chunk (default 3)")


def _args_count(args: argparse.Namespace, lo: int, hi: int, missing: str) -> list[str]:
    rest: list[str] = list(args.rest)
    if len(rest) < lo:
        raise usage(missing)
    if len(rest) > hi:
        raise usage(f"extra arguments: {' '.join(rest[hi:])}")
    return rest


# -- commands -------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """``mgrpc ls [-l] [path]``."""
    path = args.rest[0] if args.rest else "/"  # mos ignores anything after the path

    async def run(client: Any) -> int:
        files = await fs_list(client, path, long=args.long, timeout_s=args.timeout)
        out = sys.stdout
        if args.json:
            items = [{"name": n, **({"size": s} if s is not None else {})} for n, s in files]
            out.write(json.dumps(items, indent=2, ensure_ascii=False) + "\n")
            return 0
        for name, size in files:
            out.write(name + (f" {size}" if size is not None else "") + "\r\n")
        out.flush()
        return 0

    return run_with_client(args, run)


def cmd_get(args: argparse.Namespace) -> int:
    """``mgrpc get FILENAME``: the file's bytes on stdout."""
    rest = _args_count(args, 1, 1, "filename is required")

    async def run(client: Any) -> int:
        with _file_errors(rest[0]):
            data = await fs_get(
                client, rest[0], chunk_size=args.chunk_size, attempts=args.fs_op_attempts, timeout_s=args.timeout
            )
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0

    return run_with_client(args, run)


def cmd_put(args: argparse.Namespace) -> int:
    """``mgrpc put HOST_FILE [DEVICE_FILE]`` (device name defaults to the host file's base name)."""
    rest = _args_count(args, 1, 2, "filename is required")
    data = read_or_fetch(rest[0])
    dev_name = rest[1] if len(rest) > 1 else os.path.basename(rest[0].rstrip("/"))

    async def run(client: Any) -> int:
        with _file_errors(dev_name):
            await fs_put(
                client, data, dev_name, chunk_size=args.chunk_size, attempts=args.fs_op_attempts,
                timeout_s=args.timeout,
            )  # fmt: skip
        return 0

    return run_with_client(args, run)


def cmd_rm(args: argparse.Namespace) -> int:
    """``mgrpc rm FILENAME``."""
    rest = _args_count(args, 1, 1, "filename is required")

    async def run(client: Any) -> int:
        with _file_errors(rest[0]):
            await fs_remove(client, rest[0], timeout_s=args.timeout)
        return 0

    return run_with_client(args, run)


def cmd_config_get(args: argparse.Namespace) -> int:
    """``mgrpc config-get [path.to.value]``."""
    if len(args.rest) > 1:
        raise usage("only one path to value is allowed")
    path = args.rest[0] if args.rest else ""

    async def run(client: Any) -> int:
        conf = await config_get(client, level=args.level, timeout_s=args.timeout)
        try:
            value = config_get_path(conf, path)
        except OtaError as e:
            raise CliError(str(e), "'mgrpc config-get' prints the whole config") from e
        if args.json:
            sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(format_config_value(value) + "\n")
        return 0

    return run_with_client(args, run)


def cmd_config_set(args: argparse.Namespace) -> int:
    """``mgrpc config-set path.to.value=value ...``."""
    pairs = parse_assignments(args.rest)
    if not pairs:
        raise usage("at least one path.to.value=value pair should be given")

    async def run(client: Any) -> int:
        try:
            await config_set(
                client, pairs, level=args.level, save=not args.no_save, reboot=not args.no_reboot,
                try_once=args.try_once, timeout_s=args.timeout, on_message=err,
            )  # fmt: skip
        except OtaError as e:
            raise CliError(str(e), "check the value ('mgrpc config-get KEY' shows it and its type)") from e
        return 0

    return run_with_client(args, run)


_BOOT_HINTS = {
    "OTA.Commit": "nothing to commit: the running firmware is already committed",
    "OTA.Revert": "nothing to revert: the running firmware is committed",
}


def _ota_simple(method: str, done: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        async def run(client: Any) -> int:
            try:
                await client.call(method, timeout_s=args.timeout)
            except RemoteError as e:
                if e.code == -1 and not e.message:
                    raise CliError(f"remote error -1 ({_BOOT_HINTS[method]})", "see 'mgrpc boot-state'") from e
                raise
            if method == "OTA.Revert":
                await asyncio.sleep(0.2)  # the device reboots; let the reply's link close cleanly
            err(done)
            return 0

        return run_with_client(args, run)

    cmd.__doc__ = f"Call {method}."
    return cmd


async def boot_slots(client: Any, *, timeout_s: float | None = None) -> dict[str, Any]:
    """``OTA.GetBootState`` with a ``slots`` list. A device with mgrpc's extension reports both slots
    (``{"slots": true}``); for any other, the running slot comes from ``Sys.GetInfo`` (``fw_version``,
    ``fw_id``) and what the device does not say is ``null``."""
    state = await client.call("OTA.GetBootState", {"slots": True}, timeout_s=timeout_s)
    if not isinstance(state, dict):
        raise CliError(
            f"OTA.GetBootState returned {json.dumps(state)}", "the device's OTA service is not one mgrpc knows"
        )
    if isinstance(state.get("slots"), list):
        return state
    info = await client.call("Sys.GetInfo", timeout_s=timeout_s)
    info = info if isinstance(info, dict) else {}
    active = state.get("active_slot")
    slots = []
    for i in (0, 1):
        mine = i == active
        slots.append({
            "slot": i, "version": info.get("fw_version") if mine else None,
            "build_id": info.get("fw_id") if mine else None,
            "size": None, "sha256": None, "valid": True if mine else None, "active": mine, "running": mine,
            "committed": state.get("is_committed") if mine else (True if i == state.get("revert_slot") else None),
        })  # fmt: skip
    return {**state, "slots": slots}


def format_slots(state: dict[str, Any]) -> str:
    """The ``boot-state`` text: one block per slot (like ``mcumgr image list``), then the commit timer."""

    def val(v: Any) -> str:
        return "?" if v is None else (v or "-") if isinstance(v, str) else str(v)

    lines = []
    for s in state.get("slots", []):
        flags = [f for f in ("active", "running") if s.get(f)]
        if s.get("committed"):
            flags.append("committed")
        elif s.get("active") and s.get("committed") is False:
            flags.append("uncommitted")
        if s.get("valid") is False:
            flags = ["empty"] if not s.get("size") else ["invalid", *flags]
        lines.append(f"slot {s.get('slot')}: {' '.join(flags) or '-'}")
        if s.get("valid") is False and not s.get("size"):
            continue
        lines.append(f"  version:  {val(s.get('version'))}")
        lines.append(f"  build id: {val(s.get('build_id'))}")
        lines.append(f"  size:     {val(s.get('size'))}")
        lines.append(f"  sha256:   {val(s.get('sha256'))}")
    ct = state.get("commit_timeout")
    if not state.get("is_committed") and ct:
        lines.append(f"commit timeout: {ct} s (the device reverts unless committed in time)")
    return "\n".join(lines) + "\n"


def cmd_boot_state(args: argparse.Namespace) -> int:
    """``mgrpc boot-state``: both slots (version, build id, committed, hash); ``--json`` for the data."""

    async def run(client: Any) -> int:
        state = await boot_slots(client, timeout_s=args.timeout)
        if args.json:
            sys.stdout.write(json.dumps(state, indent=2, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(format_slots(state))
        return 0

    return run_with_client(args, run)


@contextlib.contextmanager
def _file_errors(name: str) -> Iterator[None]:
    """An error the device answered about a file becomes one line that says what to check."""
    try:
        yield
    except RemoteError as e:
        if e.code in (401, 403, 404):  # auth, ACL, no FS service: the common advice fits better
            raise
        raise CliError(describe_error(e), f"check the device file name {name!r} ('mgrpc ls' lists the files)") from e


def register(sub: Any) -> None:
    """Add the file, config and boot-state commands."""
    p = sub.add_parser("ls", help="list files on the device (FS.List)", description="List device files, sorted.")
    p.add_argument("-l", "--long", action="store_true", help="with sizes (FS.ListExt)")
    p.add_argument("--json", action="store_true", help="a JSON list of {name, size} on stdout")
    p.add_argument("rest", nargs="*", metavar="PATH", help="directory (default /)")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("get", help="print a device file on stdout (FS.Get)")
    _fs_opts(p)
    p.add_argument("rest", nargs="*", metavar="FILENAME")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("put", help="upload a file to the device (FS.Put)")
    _fs_opts(p)
    p.add_argument("rest", nargs="*", metavar="FILE", help="HOST_FILE (path or http(s) URL) [DEVICE_FILE]")
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("rm", help="remove a device file (FS.Remove)")
    p.add_argument("rest", nargs="*", metavar="FILENAME")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("config-get", help="print device config (Config.Get)")
    p.add_argument("--level", type=int, default=0, help="config level (0: the merged config)")
    p.add_argument("--json", action="store_true", help="the value as JSON (strings quoted) on stdout")
    p.add_argument("rest", nargs="*", metavar="PATH", help="e.g. wifi.sta.ssid (default: everything)")
    p.set_defaults(func=cmd_config_get)

    p = sub.add_parser("config-set", help="change device config (Config.Set; saves and reboots by default)")
    p.add_argument("--level", type=int, default=0, help="config level to write")
    p.add_argument("--no-save", action="store_true", help="do not save the config")
    p.add_argument("--no-reboot", action="store_true", help="do not reboot after saving")
    p.add_argument("--try-once", action="store_true", help="the new config is valid for one reboot only")
    p.add_argument("rest", nargs="*", metavar="PATH=VALUE")
    p.set_defaults(func=cmd_config_set)

    p = sub.add_parser("commit", help="commit the running firmware (OTA.Commit)")
    p.set_defaults(func=_ota_simple("OTA.Commit", "Committed."))
    p = sub.add_parser("revert", help="revert to the previous firmware (OTA.Revert; the device reboots)")
    p.set_defaults(func=_ota_simple("OTA.Revert", "Reverting; the device reboots into the previous firmware."))
    p = sub.add_parser(
        "boot-state", help="print the boot state (OTA.GetBootState)",
        description="Show both firmware slots: version, build id, size, sha256, and which is active, running "
        "and committed (like `mcumgr image list`). Devices that do not report slots (mgrpc's "
        "OTA.GetBootState {\"slots\": true} extension) show the running slot from Sys.GetInfo. "
        "`mgrpc call OTA.GetBootState` prints the device's own answer as mos does.",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="OTA.GetBootState with a slots list, as JSON on stdout")
    p.set_defaults(func=cmd_boot_state)
