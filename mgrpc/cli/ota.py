"""``mgrpc ota FILE|URL [BEGIN-ARGS-JSON]`` — ``mos ota`` with pipelined writes, resume and ``--commit``.

stderr gets mos's lines (``Getting current OTA status...``, ``Starting an update (args: ...)...``,
``Writing data...``, ``Finalizing update...``) and, while writing, a progress bar with rate and ETA
when stderr is a terminal, else mos's ``  <sent> of <total> (<pct>%)`` lines (each 64 KiB, or after
5 s). Exit status 0 on success, 1 with ``Error: <message>`` on stderr otherwise.

A lost connection is re-opened and the update continues where the device stands (``OTA.Status``
``bytes_written``); running the same command again after an interruption resumes too, unless
``--no-resume``. ``--commit`` waits for the device to reboot into the new firmware and commits it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from mgrpc.cli._common import CliError, connect_from_args, duration_arg, err, usage
from mgrpc.cli.files import read_or_fetch
from rpc.errors import MgrpcError
from rpc.host.ota import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_WINDOW,
    MAX_WINDOW,
    OtaError,
    ota_update,
    wait_and_commit,
)
from updater.manifest import manifest_version

__all__ = ["MosProgress", "check_bundle", "check_device", "format_rate", "register"]

PROGRESS_STEP = 65536
PROGRESS_EVERY_S = 5.0


class MosProgress:
    """mos's progress lines: ``  <sent> of <total> (<pct>%)`` at each 64 KiB boundary or after 5 s,
    and (beyond mos, which stops at the last 64 KiB boundary) once more when the last byte is acknowledged."""

    def __init__(self, write: Any = err) -> None:
        self._write = write
        self._last_step = -1
        self._last_t = time.monotonic()
        self._finished = False

    def __call__(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` bytes acknowledged."""
        now = time.monotonic()
        step = done // PROGRESS_STEP
        if self._last_step < 0 and done < total:  # the first report is the start (0, or the resume offset)
            self._last_step = step
            return
        if self._finished:
            return
        if done >= total:
            self._finished = True
            self._write(f"  {done} of {total} (100.00%)")
            return
        if step != self._last_step or now - self._last_t > PROGRESS_EVERY_S:
            self._last_step = step
            self._last_t = now
            pct = done * 100.0 / total if total else 100.0
            self._write(f"  {done} of {total} ({pct:.2f}%)")


def format_rate(bytes_per_s: float) -> str:
    """A transfer rate in the unit the bar and the summary share: ``KiB/s`` (``MiB/s`` from 1 MiB/s)."""
    if bytes_per_s >= 1024 * 1024:
        return f"{bytes_per_s / (1024 * 1024):.1f} MiB/s"
    return f"{bytes_per_s / 1024:.1f} KiB/s"


class _RichProgress:
    """A rich progress bar on stderr: percentage, bytes done/total (KiB), rate (KiB/s), ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            TaskID,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):  # rich's own speed column counts in kB (1000), ours in KiB
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text("?" if speed is None else format_rate(speed), style="progress.data.speed")

        self.progress = Progress(
            TextColumn("  writing"), BarColumn(), TaskProgressColumn(), DownloadColumn(binary_units=True),
            RateColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )  # fmt: skip
        self.task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("ota", total=total, completed=done)
            return
        self.progress.update(self.task, completed=done)

    def message(self, text: str) -> None:
        """Stage lines: stop the bar before ``Finalizing update...`` so lines do not interleave."""
        if self.task is not None and text.startswith("Finalizing"):
            self.stop()
        if self.task is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            err(text)

    def stop(self) -> None:
        """Leave the bar as it is on the screen."""
        if self.task is not None:
            self.progress.stop()


def check_bundle(fw: bytes, source: str) -> Any:
    """Host-side checks before any I/O: ``fw`` is a zip with a valid manifest.json; returns the
    :class:`updater.manifest.Manifest` (raises :class:`CliError` saying what to do)."""
    from updater.errors import UpdaterError
    from updater.manifest import Manifest, read_manifest

    try:
        return Manifest.parse(json.dumps(read_manifest(fw)))
    except UpdaterError as e:
        raise CliError(
            f"{source} is not a usable firmware bundle: {e.message}",
            "build one with 'mgrpc fw build' (or mos) and check it with 'mgrpc fw inspect FILE'",
        ) from e


async def check_device(client: Any, manifest: Any, *, timeout_s: float) -> Any:
    """Checks against what the device says, before ``OTA.Begin``: the bundle's platform is the device's
    ``arch`` (``Sys.GetInfo``). Returns the :class:`rpc.host.limits.DeviceLimits`. (The chunk size is
    not refused here: :func:`rpc.host.ota.ota_update` fits it to ``rpc.max_frame_size`` and says so.)"""
    from rpc.host.limits import device_limits

    limits = await device_limits(client, timeout_s=timeout_s)
    if limits.arch and manifest.platform.casefold() != limits.arch.casefold():
        raise CliError(
            f"the bundle is for platform {manifest.platform}, but the device is {limits.arch} (Sys.GetInfo)",
            f"use a bundle built for {limits.arch}",
        )
    return limits


def _ota_hint(e: OtaError) -> str:
    text = str(e)
    if "not been committed" in text:
        return "commit or revert the running firmware first ('mgrpc commit' or 'mgrpc revert')"
    if "in progress" in text:
        return "run without --no-resume to continue it"
    return "run the same command again: the update resumes where the device stands"


def _commit_timeout_from(begin_args: str | None, default_s: float) -> float:
    if begin_args:
        try:
            obj = json.loads(begin_args)
        except ValueError:
            return default_s
        if isinstance(obj, dict) and isinstance(obj.get("commit_timeout"), int | float):
            return float(obj["commit_timeout"])
    return default_s


async def _applied_uncommitted(client: Any, version: str | None) -> bool:
    """Whether the device already runs ``version`` of the bundle, uncommitted (first boot)."""
    if not version:
        return False
    try:
        info = await client.call("Sys.GetInfo")
        state = await client.call("OTA.GetBootState")
    except MgrpcError:
        return False  # let the update itself report what is wrong
    return (
        isinstance(info, dict) and isinstance(state, dict)
        and info.get("fw_version") == version and state.get("is_committed") is False
    )  # fmt: skip


def cmd_ota(args: argparse.Namespace) -> int:
    """Run ``mgrpc ota``."""
    rest: list[str] = list(args.rest)
    if not rest:
        raise usage("firmware file is required")
    if len(rest) > 2:
        raise usage(f"extra arguments: {' '.join(rest[2:])}")
    source = rest[0]
    begin_args = rest[1] if len(rest) > 1 and rest[1].strip() else None
    if begin_args is not None:
        try:
            json.loads(begin_args)
        except ValueError:
            raise usage(f"OTA.Begin args [{begin_args}] is not a valid JSON string") from None
    if args.window is not None and not 1 <= args.window <= MAX_WINDOW:
        raise usage(f"--window must be between 1 and {MAX_WINDOW}")
    if args.chunk_size is not None and args.chunk_size <= 0:
        raise usage("--chunk-size must be positive")
    fw = read_or_fetch(source)
    manifest = check_bundle(fw, source)

    tty = sys.stderr.isatty() and not args.no_progress_bar
    bar = _RichProgress() if tty else None
    on_progress = bar if bar is not None else MosProgress()
    on_message = bar.message if bar is not None else err

    async def connect() -> Any:
        return await connect_from_args(args)

    async def run() -> int:
        client = await connect()
        try:
            if args.commit and await _applied_uncommitted(client, manifest.version):
                # An earlier `ota --commit` got as far as the reboot into this very firmware and was
                # cut off before the commit (the link or the device went away): resume with the commit.
                err(f"Device already runs {manifest.version} uncommitted; committing it.")
                return await commit_step({"file": source, "fw_version": manifest.version, "resumed_commit": True})
            limits = await check_device(client, manifest, timeout_s=args.timeout)
            try:
                res = await ota_update(
                    client, fw, chunk_size=args.chunk_size, window=args.window, timeout_s=args.timeout,
                    commit_timeout_s=args.commit_timeout, update_timeout_s=args.update_timeout,
                    begin_args=begin_args, on_progress=on_progress, on_message=on_message,
                    resume=not args.no_resume, reconnect=connect, device_frame_size=limits.max_frame_size,
                )  # fmt: skip
            except OtaError as e:
                raise CliError(str(e), _ota_hint(e)) from e
            client = res.client
        finally:
            if bar is not None:
                bar.stop()
            await client.close()
        rate = res.bytes_sent / res.elapsed_s if res.elapsed_s > 0 else 0.0
        log_line = f"Update sent: {res.bytes_sent} bytes in {res.elapsed_s:.1f} s ({format_rate(rate)})"
        if res.resumed_from:
            log_line += f", resumed at {res.resumed_from}"
        if args.verbose or tty:
            err(log_line)
        summary: dict[str, Any] = {
            "file": source, "size": res.size, "fw_version": manifest.version, "resumed_from": res.resumed_from,
            "bytes_sent": res.bytes_sent, "elapsed_s": round(res.elapsed_s, 3), "rate_bytes_per_s": round(rate),
            "chunk_size": res.chunk_size, "window": res.window, "writes": res.writes, "retries": res.retries,
            "reconnects": res.reconnects, "committed": False,
        }  # fmt: skip
        if not args.commit:
            if args.json:
                print(json.dumps(summary, indent=2))
            return 0
        return await commit_step(summary)

    async def commit_step(summary: dict[str, Any]) -> int:
        version = manifest_version(fw)
        wait_s = _commit_timeout_from(begin_args, args.commit_timeout)
        cr = await wait_and_commit(
            connect, timeout_s=wait_s if wait_s > 0 else 60.0, expected_version=version, on_message=err,
            call_timeout_s=min(args.timeout, 10.0),
        )  # fmt: skip
        if cr.already_committed:
            err(f"Device runs {cr.fw_version}, already committed.")
        else:
            err(f"Committed: device runs {cr.fw_version}.")
        if args.json:
            print(json.dumps({**summary, "committed": True, "running": cr.fw_version}, indent=2))
        return 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        err("Interrupted. Run the same command again to resume the update.")
        return 130


def register(sub: Any) -> None:
    """Add the ``ota`` command."""
    p = sub.add_parser(
        "ota",
        help="update the device firmware (OTA.Begin/Write/End), as `mos ota`",
        description="Push a fw.zip (path or http(s) URL) with OTA.Status → OTA.Begin → OTA.Write… → "
        "OTA.End. BEGIN-ARGS-JSON replaces the default OTA.Begin args verbatim. Writes are "
        "pipelined (--window); an interrupted update resumes where the device stands.",
    )
    p.add_argument("rest", nargs="*", metavar="FILE|URL [BEGIN-ARGS-JSON]")
    p.add_argument(
        "--chunk-size", type=int, default=None,
        help="bytes per OTA.Write (default: the largest that fits the device's rpc.max_frame_size and the "
        f"link, e.g. 2048 over WebSocket; mos sends {DEFAULT_CHUNK_SIZE}); shrunk when too big for the device",
    )  # fmt: skip
    p.add_argument(
        "--commit-timeout", type=duration_arg, default=300.0,
        help="commit_timeout in OTA.Begin: the device reverts unless committed in time (default 5m)",
    )  # fmt: skip
    p.add_argument(
        "--update-timeout", type=duration_arg, default=600.0,
        help="timeout in OTA.Begin: the device aborts an update idle that long (default 10m)",
    )  # fmt: skip
    p.add_argument(
        "--window", type=int, default=None,
        help=f"OTA.Write calls in flight (default {DEFAULT_WINDOW}; 1 = stop-and-wait as mos; max {MAX_WINDOW})",
    )  # fmt: skip
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an update already in progress")
    p.add_argument("--commit", action="store_true", help="wait for the device to reboot into the update, then commit")
    p.add_argument("--no-progress-bar", action="store_true", help="mos-style progress lines even on a terminal")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the update on stdout")
    p.set_defaults(func=cmd_ota)
