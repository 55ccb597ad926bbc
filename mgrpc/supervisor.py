"""The supervisor of a Linux program updated by OTA: ``mgrpc supervise --slots DIR -- CMD ARGS...``.

It plays the boot loader and the hardware commit timer of a Mongoose OS device for a program in
slot directories (:mod:`updater.fsslots`):

1. **Boot**: :meth:`updater.fsslots.FsSlots.boot` picks the slot (a first boot consumes its one-shot
   permit before the program runs; a start after an uncommitted run falls back), merges the data
   directory on a first boot, and the program is started in that slot's ``app/`` directory with::

       MGRPC_SLOTS        the slots directory          MGRPC_SLOT        0 or 1
       MGRPC_SLOT_DIR     the slot's app directory     MGRPC_DATA_DIR    the slot's data directory
       MGRPC_SUPERVISOR   the supervisor's socket      MGRPC_BOOT_ID     this start's id
       MGRPC_HEARTBEAT_S  send a heartbeat at least this often (absent: no heartbeat needed)
       MGRPC_RPC_URL      the URLs to serve RPC on (space separated, from --rpc-url)

2. **Watch**: the program must send a heartbeat on the socket at least every ``heartbeat_timeout_s``
   (it gets a quarter of that as ``MGRPC_HEARTBEAT_S``; the first one may take ``start_timeout_s``).
   A program that exits or crashes, that stops sending heartbeats (a hang: it is killed) or that has
   not committed within the slot's commit timeout (then the supervisor reverts first) is started again
   after a new boot decision, so an uncommitted slot falls back to the previous one. With a commit
   timeout of 0 the slot is committed by its first heartbeat (the program came up), as a device
   commits after a successful init. A committed program that keeps crashing is restarted with a
   growing delay.
3. **Serve** the program's requests (``commit``, ``revert``, ``finalize``, ``set_boot_state``,
   ``snapshot``, ``reboot``, ``heartbeat``): the supervisor is the only writer of the state record.

``kill -9`` of the supervisor is a power cut: the program is killed with it (``PR_SET_PDEATHSIG``;
a program left over anyway is refused as stale), and the next start decides from the record alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgrpc.errors import AppError
from updater.errors import BootError, UpdaterError
from updater.fsslots import (
    ENV_BOOT_ID,
    ENV_DATA_DIR,
    ENV_HEARTBEAT_S,
    ENV_RPC_URL,
    ENV_SLOT,
    ENV_SLOT_DIR,
    ENV_SLOTS,
    ENV_SUPERVISOR,
    FsSlots,
    error_reply,
)  # fmt: skip
from updater.storage import BootInfo

__all__ = ["Supervisor", "SupervisorError"]

log = logging.getLogger("mgrpc.supervisor")

PR_SET_PDEATHSIG = 1
try:
    _LIBC: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux: no parent-death signal, the stale-boot check still stops leftovers
    _LIBC = None


def _child_setup(parent: int) -> Callable[[], None]:
    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the signal was armed
            os._exit(1)

    return setup


class SupervisorError(AppError, RuntimeError):
    """The supervisor cannot run (slots directory unprovisioned or in use, nothing bootable)."""


@dataclass
class _Run:
    """One start of the program."""

    info: BootInfo
    boot_id: str
    started: float
    last_heartbeat: float | None = None
    outcome: str = ""


class Supervisor:
    """Boot, start, watch and restart the program of a slots directory (see the module doc).

    ``on_event(text)`` hears every boot, start, end and decision (the CLI prints them).
    """

    def __init__(
        self, slots_dir: str | os.PathLike[str], argv: Sequence[str], *, heartbeat_timeout_s: float = 10.0,
        start_timeout_s: float = 30.0, restart_delay_s: float = 1.0, max_restart_delay_s: float = 30.0,
        term_grace_s: float = 5.0, rpc_urls: Sequence[str] = (), env: dict[str, str] | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        if not argv:
            raise SupervisorError("no program to run (give it after --)")
        self.root = Path(slots_dir)
        self.argv = list(argv)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.start_timeout_s = max(start_timeout_s, heartbeat_timeout_s)
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.term_grace_s = term_grace_s
        self.rpc_urls = list(rpc_urls)
        self.env = dict(os.environ if env is None else env)
        self.on_event = on_event
        self.slots = FsSlots(self.root)
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        self.address = f"@mgrpc-supervisor-{digest}-{os.getpid()}-{secrets.token_hex(4)}"
        self.run_: _Run | None = None
        self.boots = 0
        self._wake = asyncio.Event()
        self._stop = False
        self._reboot = False
        self._lock_fd: int | None = None

    def _event(self, text: str) -> None:
        log.info("%s", text)
        if self.on_event is not None:
            self.on_event(text)

    def stop(self) -> None:
        """Stop the program and return from :meth:`run`."""
        self._stop = True
        self._wake.set()

    # -- main loop --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop`; :class:`SupervisorError` when the slots cannot be booted at all."""
        self._lock()
        if self.slots.config is None:
            raise SupervisorError(f"{self.root} holds no slots yet (give --factory DIR to install the first one)")
        server = await asyncio.start_unix_server(self._serve, path="\0" + self.address[1:])
        delay = self.restart_delay_s
        try:
            while not self._stop:
                try:
                    info = self.slots.boot()
                except BootError as exc:
                    raise SupervisorError(f"nothing to start: {exc.message}") from None
                self.boots += 1
                await self._run_once(info)
                if self._stop:
                    break
                if self._reboot or info.first_boot:
                    delay = self.restart_delay_s  # asked-for restarts, and falling back, wait for nothing
                    continue
                self._event(f"restarting in {delay:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                delay = min(delay * 2, self.max_restart_delay_s)
        finally:
            server.close()
            self._unlock()

    def _lock(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SupervisorError(f"another supervisor runs on {self.root}") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _program_env(self, info: BootInfo, boot_id: str) -> dict[str, str]:
        env = dict(self.env)
        env.update({
            ENV_SLOTS: str(self.root), ENV_SLOT: str(info.slot), ENV_SLOT_DIR: str(self.slots.app_dir(info.slot)),
            ENV_DATA_DIR: str(self.slots.data_dir(info.slot)), ENV_SUPERVISOR: self.address, ENV_BOOT_ID: boot_id,
        })  # fmt: skip
        if self.heartbeat_timeout_s > 0:
            env[ENV_HEARTBEAT_S] = f"{self.heartbeat_timeout_s / 4:g}"
        else:
            env.pop(ENV_HEARTBEAT_S, None)
        if self.rpc_urls:
            env[ENV_RPC_URL] = " ".join(self.rpc_urls)
        return env

    async def _run_once(self, info: BootInfo) -> str:
        boot_id = secrets.token_hex(8)
        run = _Run(info, boot_id, time.monotonic())
        self._reboot = False
        self.run_ = run
        how = "first boot, uncommitted" if info.first_boot else "committed"
        if info.reverted:
            how += f"; {info.reason}"
        self._event(f"boot slot {info.slot} version {info.version} ({how})")
        app_dir = self.slots.app_dir(info.slot)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=app_dir, env=self._program_env(info, boot_id),
                preexec_fn=_child_setup(os.getpid()), start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            self._event(f"cannot start {self.argv[0]}: {exc}")
            run.outcome = "crashed"
            self._revert_if_uncommitted("it could not start")
            return run.outcome
        self._event(f"started pid {proc.pid} in {app_dir}")
        if info.first_boot and info.commit_timeout_s <= 0 and self.heartbeat_timeout_s <= 0:
            self._commit("started (no commit timeout, no heartbeat)")
        waiter = asyncio.ensure_future(proc.wait())
        try:
            outcome = await self._watch(proc, run, waiter)
        finally:
            if proc.returncode is None:
                await self._end(proc, waiter, kill=not self._stop and outcome_is_fault(run.outcome))
            waiter.cancel()
            self.run_ = None
        self._event(f"program {outcome}")
        return outcome

    async def _watch(self, proc: asyncio.subprocess.Process, run: _Run, waiter: asyncio.Future[Any]) -> str:
        while True:
            now = time.monotonic()
            deadlines = []
            if self.heartbeat_timeout_s > 0:
                if run.last_heartbeat is None:
                    deadlines.append(run.started + self.start_timeout_s)
                else:
                    deadlines.append(run.last_heartbeat + self.heartbeat_timeout_s)
            commit_at = self._commit_deadline(run)
            if commit_at is not None:
                deadlines.append(commit_at)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            self._wake.clear()
            wake: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter, wake}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wake.cancel()
            now = time.monotonic()
            if waiter.done():
                rc = waiter.result()
                run.outcome = f"exited {rc}" if rc >= 0 else f"crashed (signal {-rc})"
                if run.info.first_boot:
                    self._revert_if_uncommitted(f"it {run.outcome} before committing")
                return run.outcome
            if self._stop:
                run.outcome = "stopped"
                return run.outcome
            if self._reboot:
                run.outcome = "reboot"
                return run.outcome
            if self.heartbeat_timeout_s > 0:
                last = run.last_heartbeat
                limit = self.start_timeout_s if last is None else self.heartbeat_timeout_s
                if now - (run.started if last is None else last) >= limit:
                    run.outcome = "hung (no heartbeat)"
                    self._revert_if_uncommitted("it hung before committing")
                    return run.outcome
            if commit_at is not None and now >= commit_at and self._uncommitted(run):
                run.outcome = "not committed in time"
                self._revert_if_uncommitted(f"no commit within {run.info.commit_timeout_s} s")
                return run.outcome

    def _commit_deadline(self, run: _Run) -> float | None:
        if not run.info.first_boot or run.info.commit_timeout_s <= 0:
            return None
        return run.started + run.info.commit_timeout_s

    def _uncommitted(self, run: _Run) -> bool:
        cfg = self.slots.config
        return cfg is not None and not cfg.committed and cfg.active_slot == run.info.slot

    def _revert_if_uncommitted(self, why: str) -> None:
        run = self.run_
        if run is not None and not self._uncommitted(run):
            return
        if self.slots.loader.revert():
            self._event(f"reverted: {why}")

    def _commit(self, why: str) -> None:
        if self.slots.loader.commit():
            self._event(f"committed: {why}")

    async def _end(self, proc: asyncio.subprocess.Process, waiter: asyncio.Future[Any], *, kill: bool) -> None:
        """SIGTERM and a grace period (SIGKILL at once for a fault), to the program's whole session."""
        sig = signal.SIGKILL if kill else signal.SIGTERM
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.term_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await waiter

    # -- the program's requests -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            reply = self._handle(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError:
            return {"ok": False, "error": "malformed request", "code": -1, "kind": "updater"}
        run = self.run_
        if run is None or req.get("boot") != run.boot_id:
            return {"ok": False, "error": "stale boot id: this program is not the one running", "code": -1,
                    "kind": "stale"}  # fmt: skip
        op = str(req.get("op", ""))
        try:
            if op == "heartbeat":
                first = run.last_heartbeat is None
                run.last_heartbeat = time.monotonic()
                if first:
                    if run.info.first_boot and run.info.commit_timeout_s <= 0:
                        self._commit("came up (no commit timeout)")
                    self._wake.set()  # the watch now times heartbeats, not the start
                return {"ok": True, "result": None}
            if op == "reboot":
                self._reboot = True
                self._wake.set()
                return {"ok": True, "result": None}
            params = {k: v for k, v in req.items() if k not in ("op", "boot")}
            result = self.slots.handle(op, params, running=run.info.slot)
            if op == "commit" and result:
                self._event(f"committed slot {run.info.slot} (by the program)")
            elif op == "revert" and result:
                self._event("reverted (by the program)")
            elif op == "finalize":
                self._event(f"update installed in slot {params.get('slot')} (uncommitted until it runs and commits)")
            return {"ok": True, "result": result}
        except (UpdaterError, OSError, KeyError, TypeError, ValueError) as exc:
            return error_reply(exc)


def outcome_is_fault(outcome: str) -> bool:
    """Whether the program is ended for a fault (killed at once) rather than asked to stop."""
    return outcome.startswith(("hung", "not committed"))
