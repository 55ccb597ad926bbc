"""Host-side OTA: the library behind ``mgrpc ota`` (push a fw.zip, wait for the reboot, commit).

:func:`ota_update` follows ``mos ota`` (spec/ota.md §2) by default, byte for byte on the wire:
``OTA.Status`` (state must be 0 or 2) → ``OTA.Begin {"timeout":600,"commit_timeout":300,"size":N}``
→ ``OTA.Write {"offset":o,"data":"<b64>"}`` for each chunk → ``OTA.End``; each write gets up to three
attempts with a new id and, after the last failure, ``OTA.End`` aborts the update and the error is
``write failed at offset <o>``. (One deliberate difference: the first ``OTA.Status`` is bounded by
``timeout_s`` too, where mos would wait forever for a silent device.) Two things go beyond mos:

* **Pipelining.** ``window`` writes are kept in flight on the one connection. The device processes
  writes in arrival order and insists on contiguous offsets, so this is safe; on a failure the
  window is drained and ``OTA.Status`` says where the device stands (``bytes_written``), and writing
  continues from there. ``window=1`` is mos's stop-and-wait and retries the same offset, as mos does.
  The rules are the sans-I/O :class:`rpc.host.window.WriteWindow`; this module does the calls.
* **Resume.** If ``OTA.Status`` reports an update in progress (state 1) for a file of our size,
  ``OTA.Begin`` is skipped and writing continues at ``bytes_written`` (a client restart). A dropped
  connection during the writes is repaired with the ``reconnect`` callable (a fresh client), then
  the same ``OTA.Status`` question.

:func:`wait_and_commit` waits for the device to come back after ``OTA.End`` rebooted it, checks it
runs the bundle's version uncommitted, and calls ``OTA.Commit``.

This module imports only :mod:`rpc` (and the standard library): it must work against any device.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rpc.client import AsyncClient
from rpc.errors import MgrpcError, RemoteError, TransportError, UsageError
from rpc.frame import RawJSON
from rpc.host._common import DEFAULT_CHUNK_SIZE, MessageFn, OtaError, ProgressFn, chunk_data, why
from rpc.host.limits import max_chunk_size
from rpc.host.window import GiveUp, WriteWindow

__all__ = [
    "ASK_DEVICE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "CommitResult",
    "OtaError",
    "OtaResult",
    "boot_state",
    "default_begin_args",
    "device_frame_limit",
    "fitted_chunk_size",
    "link_message_limit",
    "load_firmware",
    "ota_commit",
    "ota_revert",
    "ota_update",
    "wait_and_commit",
]

log = logging.getLogger("mgrpc.ota")

# Writes kept in flight by default, chosen with bench/ota.py over a 20 ms round trip (512 B chunks):
# window 8 ~6x the stop-and-wait bound (512 B / RTT), 16 ~10-12x, 20 ~13-15x; more than 20 is not
# allowed, so a device's 25-entry request queue is never exceeded (mos sends one at a time).
DEFAULT_WINDOW = 20
MAX_WINDOW = 20

# Chunk sizing when the caller leaves it to us (chunk_size=None):
DEVICE_FRAME_DEFAULT = 4096  # rpc.max_frame_size of a stock Mongoose OS device (rpc-common's default)
# Mongoose OS's rpc-ws stops answering a connection after a WebSocket frame over 3072 bytes on the
# wire (measured on the real firmware in ../shared/mgos-ubuntu: a 3064-byte message with its 8-byte
# masked-frame header passes, one byte more and nothing is answered again), whatever max_frame_size says.
LINK_MESSAGE_LIMITS = {"WS": 3064, "UDP": 1400}
CHUNK_STEP = 256  # chunk sizes are multiples of this
MIN_CHUNK_SIZE = 256  # shrinking stops here
MAX_AUTO_CHUNK_SIZE = 16384
PROBE_TIMEOUT_S = 5.0  # the first write at a new chunk size waits at most this long for its answer
ASK_DEVICE = -1  # ota_update(device_frame_size=...) default: ask the device

ConnectFn = Callable[[], Awaitable[AsyncClient]]

# OTA.Status "state" values (enum mgos_ota_state).
STATE_IDLE, STATE_PROGRESS, STATE_ERROR, STATE_SUCCESS = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class OtaResult:
    """What :func:`ota_update` did.

    ``resumed_from`` is the offset the device already had (0 for a fresh update); ``bytes_sent``
    counts firmware bytes acknowledged in this run (retransmissions not counted); ``client`` is the
    client in use at the end (a new one if the connection was re-opened; the caller closes it).
    """

    size: int
    resumed_from: int
    bytes_sent: int
    elapsed_s: float
    writes: int
    retries: int
    reconnects: int
    client: AsyncClient = field(repr=False, compare=False)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # the chunk size the writes ended with
    window: int = DEFAULT_WINDOW


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :func:`wait_and_commit` found: the version now running (and committed)."""

    fw_version: str | None
    fw_id: str | None
    waited_s: float
    already_committed: bool = False


# ---------------------------------------------------------------------------------------------
# firmware input
# ---------------------------------------------------------------------------------------------


def load_firmware(source: bytes | str | os.PathLike[str]) -> bytes:
    """The firmware bytes: ``bytes`` as is, else the contents of a local file path."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise OtaError(f"unable to read firmware file {os.fspath(source)!r}: {e.strerror or e}") from e


def default_begin_args(size: int, *, update_timeout_s: float = 600, commit_timeout_s: float = 300) -> dict[str, int]:
    """``OTA.Begin`` args as mos builds them (Go struct order: timeout, commit_timeout, size)."""
    return {"timeout": int(update_timeout_s), "commit_timeout": int(commit_timeout_s), "size": size}


def _begin_params(begin_args: Any, size: int, update_timeout_s: float, commit_timeout_s: float) -> Any:
    if begin_args is None:
        return default_begin_args(size, update_timeout_s=update_timeout_s, commit_timeout_s=commit_timeout_s)
    if isinstance(begin_args, str):
        try:
            json.loads(begin_args)
        except ValueError:
            raise UsageError(f"OTA.Begin args [{begin_args}] is not a valid JSON string") from None
        return RawJSON(begin_args)  # mos sends the user's text verbatim
    return begin_args


def _begin_text(params: Any) -> str:
    return str(params) if isinstance(params, RawJSON) else json.dumps(params, separators=(",", ":"))


def _is_link_error(e: BaseException, client: AsyncClient) -> bool:
    # RpcTimeout is a TimeoutError, hence an OSError, but says nothing about the link itself.
    return (isinstance(e, TransportError | OSError) and not isinstance(e, TimeoutError)) or client.channel.closed


# ---------------------------------------------------------------------------------------------
# OTA update
# ---------------------------------------------------------------------------------------------


async def device_frame_limit(client: AsyncClient, *, timeout_s: float = 5.0) -> int | None:
    """The device's ``rpc.max_frame_size`` (``Config.Get``), or None when it does not say."""
    try:
        value = await client.call("Config.Get", {"key": "rpc.max_frame_size"}, timeout_s=timeout_s)
    except (MgrpcError, OSError) as e:
        log.info("Config.Get rpc.max_frame_size: %s", why(e))
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def link_message_limit(client: AsyncClient) -> int | None:
    """The most bytes one message may have on this client's link to a stock device, if limited."""
    kind = client.channel.type.upper()
    for prefix, limit in LINK_MESSAGE_LIMITS.items():
        if kind.startswith(prefix):
            return limit
    return None


def _shrunk(chunk_size: int) -> int | None:
    smaller = max(MIN_CHUNK_SIZE, chunk_size // 2 // CHUNK_STEP * CHUNK_STEP)
    return smaller if smaller < chunk_size else None


class _Updater:
    """One run of :func:`ota_update` (state shared by the write loop and its recovery)."""

    def __init__(
        self,
        client: AsyncClient,
        data: bytes,
        *,
        chunk_size: int,
        window: int,
        timeout_s: float,
        attempts: int,
        on_progress: ProgressFn | None,
        on_message: MessageFn | None,
        reconnect: ConnectFn | None,
        reconnect_attempts: int,
    ) -> None:
        self.client = client
        self.data = data
        self.size = len(data)
        self.chunk_size = chunk_size
        self.window = window
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.on_progress = on_progress
        self.on_message = on_message
        self.reconnect = reconnect
        self.reconnect_attempts = reconnect_attempts
        self.writes = 0
        self.retries = 0
        self.reconnects = 0
        self.gone = ""
        self.confirmed = False  # a write at the current chunk size has been answered
        self.refused: tuple[int, BaseException] | None = None  # the lone first write was refused

    def say(self, text: str) -> None:
        if self.on_message is not None:
            self.on_message(text)
        else:  # logged only when nobody shows it, so `mgrpc ota -v` prints each stage once
            log.info("%s", text)

    def progress(self, done: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, self.size)

    async def status(self) -> dict[str, Any]:
        res = await self.client.call("OTA.Status", timeout_s=self.timeout_s)
        return res if isinstance(res, dict) else {}

    async def write(self, offset: int, length: int, timeout_s: float | None = None) -> None:
        chunk = self.data[offset : offset + length]
        self.writes += 1
        params = {"offset": offset, "data": chunk_data(self.client, chunk)}
        await self.client.call("OTA.Write", params, timeout_s=timeout_s or self.timeout_s)

    async def probe(self, offset: int) -> bool:
        """The first write at the current chunk size, alone and with a short deadline.

        True when it was answered (the size works). False when the device did not answer or the link
        dropped: what a device does with a frame too big for it (rpc-uart drops it, rpc-ws stops
        answering). A refused write (an error answer) is raised: that is not about the size.
        """
        length = min(self.chunk_size, self.size - offset)
        try:
            await self.write(offset, length, timeout_s=min(self.timeout_s, PROBE_TIMEOUT_S))
            return True
        except RemoteError as e:
            # Answered, so the size is fine; the window retries the write with mos's rules.
            log.info("OTA.Write of %d bytes at %d refused: %s", length, offset, why(e))
            self.confirmed = True
            self.refused = (offset, e)
            return False
        except (MgrpcError, OSError) as e:
            log.info("OTA.Write of %d bytes at %d: no answer (%s)", length, offset, why(e))
            return False

    async def reopen(self) -> None:
        """Replace a dead client with a fresh one from ``reconnect`` (a few tries, backing off)."""
        assert self.reconnect is not None
        try:
            await self.client.close()
        except Exception:
            log.debug("closing the old client failed", exc_info=True)
        delay_s = 0.5
        last: BaseException | None = None
        for i in range(self.reconnect_attempts):
            try:
                self.client = await self.reconnect()
                self.reconnects += 1
                self.say("Reconnected.")
                return
            except (MgrpcError, OSError) as e:
                last = e
                log.info("reconnect attempt %d failed: %s", i + 1, e)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)
        raise OtaError(f"connection lost and could not be re-opened: {why(last) if last else 'no attempt'}")

    async def ask_position(self, fallback: int) -> int | None:
        """Where the device stands after a failed window (``bytes_written`` from OTA.Status).

        None when the device is no longer updating (it failed the update, or timed it out).
        """
        try:
            st = await self.status()
        except (MgrpcError, OSError) as e:
            log.info("OTA.Status after a write failure failed: %s", e)
            if _is_link_error(e, self.client) and self.reconnect is not None:
                raise _LinkDown() from e
            return fallback
        state = st.get("state", STATE_IDLE)
        if state != STATE_PROGRESS:
            msg = st.get("msg")
            self.gone = f"the device is no longer updating (state {state}{': ' + str(msg) if msg else ''})"
            log.info("%s", self.gone)
            return None
        bw = st.get("bytes_written")
        if isinstance(bw, int) and not isinstance(bw, bool) and 0 <= bw <= self.size:
            return bw
        return fallback

    async def run_writes(self, start: int) -> None:
        """Write ``data[start:]``: first one write alone at the chosen chunk size (halving it while the
        device does not answer), then the pipelined window."""
        while start < self.size and not self.confirmed:
            if await self.probe(start):
                self.confirmed = True
                start = min(self.size, start + self.chunk_size)
                self.progress(start)
                break
            if self.confirmed:  # refused, not dropped
                break
            smaller = _shrunk(self.chunk_size)
            if smaller is None:
                raise _WriteFailed(start, OtaError(f"the device does not answer {self.chunk_size}-byte writes"))
            self.say(
                f"The device did not answer a {self.chunk_size}-byte write (a frame too big for it?); "
                f"going on with {smaller}-byte chunks."
            )
            self.chunk_size = smaller
            self.retries += 1
            if self.reconnect is not None:
                await self.reopen()  # a device may stop answering a connection after a frame too big
            try:
                where = await self.ask_position(start)
            except _LinkDown:
                where = start
            if where is None:
                raise _WriteFailed(start, OtaError(self.gone))
            start = where
        await self.run_window(start)

    async def run_window(self, start: int) -> None:
        """Write ``data[start:]``, sending what the :class:`WriteWindow` allows and reporting the answers.

        Answers are awaited in send order; after a failure every write already sent is awaited too
        (each will be answered or time out anyway) before the device is asked where it stands.
        """
        w = WriteWindow(self.size, chunk_size=self.chunk_size, window=self.window, attempts=self.attempts, start=start)
        if self.refused is not None:
            w.note_failure(*self.refused)  # that was the first attempt at this offset
            self.retries += 1
            self.refused = None
        inflight: deque[tuple[int, asyncio.Task[None]]] = deque()
        self.progress(w.acked)
        try:
            while not w.done:
                while (nxt := w.next_write()) is not None:
                    inflight.append((nxt[0], asyncio.ensure_future(self.write(*nxt))))
                off, task = inflight.popleft()
                try:
                    await task
                except (MgrpcError, OSError) as e:
                    rest = list(inflight)
                    inflight.clear()
                    results = await asyncio.gather(*(t for _, t in rest), return_exceptions=True)
                    step = w.failed(off, e)
                    for (o2, _), r in zip(rest, results, strict=True):
                        step = w.ack(o2) if r is None else w.failed(o2, r)
                    assert step is not None  # nothing is in flight: the round is over
                    self.retries += 1
                    log.info("OTA.Write at %d failed (attempt %d): %s", off, step.attempt, why(e))
                    if isinstance(step, GiveUp):
                        raise _WriteFailed(step.offset, step.cause) from e
                    w.device_position(await self.recover(step.offset, step.fallback, step.cause))
                    self.progress(w.acked)
                    continue
                w.ack(off)
                self.progress(w.acked)
        finally:
            for _, t in inflight:
                t.cancel()
            if inflight:
                await asyncio.gather(*(t for _, t in inflight), return_exceptions=True)

    async def recover(self, failed_at: int, fallback: int, exc: BaseException) -> int:
        """The offset to continue from after a failed write (``fallback`` if the device cannot say)."""
        link_down = _is_link_error(exc, self.client)
        if link_down and self.reconnect is None:
            raise _WriteFailed(failed_at, exc) from exc
        for _ in range(self.reconnect_attempts + 1):
            if link_down:
                await self.reopen()
            if self.window == 1 and not link_down:
                return failed_at  # mos: the same offset again, with a new id
            try:
                where = await self.ask_position(fallback)
            except _LinkDown:
                link_down = True
                continue
            if where is None:
                # After a lost link the device's own word says more; a refused write says it best.
                raise _WriteFailed(failed_at, OtaError(self.gone) if link_down else exc)
            return where
        raise _WriteFailed(failed_at, exc)


class _LinkDown(Exception):
    """Internal: the connection died while recovering."""


class _WriteFailed(Exception):
    """Internal: a write failed for good at ``offset``."""

    def __init__(self, offset: int, cause: BaseException) -> None:
        super().__init__(offset)
        self.offset = offset
        self.cause = cause


async def ota_update(
    client: AsyncClient,
    data: bytes | str | os.PathLike[str],
    *,
    chunk_size: int | None = None,
    window: int | None = None,
    timeout_s: float = 20.0,
    commit_timeout_s: float = 300,
    update_timeout_s: float = 600,
    begin_args: Mapping[str, Any] | str | None = None,
    on_progress: ProgressFn | None = None,
    on_message: MessageFn | None = None,
    resume: bool = True,
    attempts: int = 3,
    reconnect: ConnectFn | None = None,
    reconnect_attempts: int = 5,
    fit_to_device: bool = True,
    device_frame_size: int | None = ASK_DEVICE,
) -> OtaResult:
    """Push ``data`` (fw.zip bytes or a path) to the device as ``mos ota`` does; see the module doc.

    ``timeout_s`` bounds each call (mos ``--timeout``); ``commit_timeout_s`` / ``update_timeout_s``
    go into OTA.Begin unless ``begin_args`` (a mapping, or JSON text sent verbatim) replaces them.
    ``on_message(text)`` gets mos's stage lines (``Getting current OTA status...``), and
    ``on_progress(done, total)`` the acknowledged byte count. ``resume=False`` refuses to continue
    an update in progress, as mos does. ``reconnect()`` returns a fresh client after a lost
    connection (without it, a lost connection fails the update but leaves it resumable).
    Raises :class:`OtaError` with mos's messages.

    Chunk size: ``chunk_size=None`` takes the largest whose frame fits the device's
    ``rpc.max_frame_size`` (``Config.Get``; 4096, the stock default, when it does not say) and the
    link's message limit on a stock device (WebSocket: 3064 bytes). A given ``chunk_size`` too big for
    those is shrunk to fit, and said so. Either way the first write goes alone, and while the device
    does not answer it the chunk is halved (a device drops a frame too big for it without a word):
    :data:`PROBE_TIMEOUT_S` per try instead of three full timeouts and a failed update.
    ``fit_to_device=False`` skips all of that (``chunk_size`` as given: mos's behaviour, for baselines).
    ``device_frame_size``: the device's ``rpc.max_frame_size`` if the caller asked already (None: the
    device did not say); the default (:data:`ASK_DEVICE`) asks ``Config.Get``.
    ``window=None`` is :data:`DEFAULT_WINDOW`.
    """
    explicit_chunk = chunk_size is not None
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    window = DEFAULT_WINDOW if window is None else window
    if chunk_size <= 0:
        raise UsageError("chunk size must be positive")
    if not 1 <= window <= MAX_WINDOW:
        raise UsageError(f"window must be between 1 and {MAX_WINDOW} (a device queues at most 25 requests)")
    if attempts < 1:
        raise UsageError("attempts must be at least 1")
    fw = load_firmware(data)
    if not fw:
        raise OtaError("firmware file is empty")
    params = _begin_params(begin_args, len(fw), update_timeout_s, commit_timeout_s)  # bad JSON: fail first
    up = _Updater(
        client, fw, chunk_size=chunk_size, window=window, timeout_s=timeout_s, attempts=attempts,
        on_progress=on_progress, on_message=on_message, reconnect=reconnect,
        reconnect_attempts=reconnect_attempts,
    )  # fmt: skip
    t0 = time.monotonic()

    up.say("Getting current OTA status...")
    try:
        st = await up.status()
    except (MgrpcError, OSError) as e:
        raise OtaError(f"unable to get current OTA status: {why(e)}") from e
    state = st.get("state", STATE_IDLE)
    start = 0
    bw = st.get("bytes_written")
    resumable = (
        resume
        and state == STATE_PROGRESS
        and st.get("size") == up.size
        and isinstance(bw, int)
        and not isinstance(bw, bool)
        and 0 <= bw <= up.size
    )
    if resumable:
        assert isinstance(bw, int)
        start = bw
        up.say(f"Resuming the update in progress at offset {start} of {up.size}...")
    elif state not in (STATE_IDLE, STATE_ERROR):
        raise OtaError(f"update is already in progress ({state}), call OTA.End")
    else:
        up.say(f"Starting an update (args: {_begin_text(params)})...")
        try:
            await up.client.call("OTA.Begin", params, timeout_s=timeout_s)
        except (MgrpcError, OSError) as e:
            raise OtaError(f"unable to start an update: {why(e)}") from e

    if fit_to_device:
        await _fit_chunk(up, explicit=explicit_chunk, timeout_s=timeout_s, device_limit=device_frame_size)
    # mos's chunk size is known to fit every device: no need to try it first.
    up.confirmed = not fit_to_device or up.chunk_size <= DEFAULT_CHUNK_SIZE
    try:
        await _write_and_end(up, start, timeout_s)
    except BaseException:
        if up.client is not client:  # opened by reconnect(): the caller never got it, so close it here
            with contextlib.suppress(Exception):
                await up.client.close()
        raise
    return OtaResult(
        size=up.size, resumed_from=start, bytes_sent=up.size - start, elapsed_s=time.monotonic() - t0,
        writes=up.writes, retries=up.retries, reconnects=up.reconnects, client=up.client,
        chunk_size=up.chunk_size, window=up.window,
    )  # fmt: skip


def fitted_chunk_size(client: AsyncClient, device_limit: int | None, *, total_size: int) -> int:
    """The chunk size :func:`ota_update` picks: the largest multiple of :data:`CHUNK_STEP` (up to
    :data:`MAX_AUTO_CHUNK_SIZE`) whose ``OTA.Write`` frames fit both ``device_limit`` (the device's
    ``rpc.max_frame_size``; None: :data:`DEVICE_FRAME_DEFAULT`) and the link's message limit."""
    frame_limit = device_limit or DEVICE_FRAME_DEFAULT
    link_limit = link_message_limit(client)
    if link_limit is not None:
        frame_limit = min(frame_limit, link_limit)
    largest = max_chunk_size(client, frame_limit, total_size=total_size)  # exact: codec, id, dst, auth
    fits = min(MAX_AUTO_CHUNK_SIZE, largest // CHUNK_STEP * CHUNK_STEP if largest >= MIN_CHUNK_SIZE else largest)
    if fits <= 0:
        raise OtaError(f"no OTA.Write frame fits in {frame_limit} bytes")
    return fits


async def _fit_chunk(up: _Updater, *, explicit: bool, timeout_s: float, device_limit: int | None) -> None:
    """Choose (or shrink) the chunk size for the device's frame limit and the link's message limit."""
    if device_limit == ASK_DEVICE:
        device_limit = await device_frame_limit(up.client, timeout_s=min(timeout_s, PROBE_TIMEOUT_S))
    fits = fitted_chunk_size(up.client, device_limit, total_size=up.size)
    link_limit = link_message_limit(up.client)
    said = f"rpc.max_frame_size {device_limit or DEVICE_FRAME_DEFAULT}{'' if device_limit else ' (assumed)'}"
    if link_limit is not None and link_limit < (device_limit or DEVICE_FRAME_DEFAULT):
        said += f", {link_limit}-byte messages on {up.client.channel.type}"
    if not explicit:
        up.chunk_size = fits
        up.say(f"Device limits: {said}; writing {fits}-byte chunks, {up.window} in flight.")
    elif up.chunk_size > fits:
        up.say(f"Chunk size {up.chunk_size} makes frames too big for the device ({said}); using {fits}.")
        up.chunk_size = fits


async def _write_and_end(up: _Updater, start: int, timeout_s: float) -> None:
    up.say("Writing data...")
    try:
        await up.run_writes(start)
    except _WriteFailed as wf:
        await _abort(up)
        raise OtaError(f"write failed at offset {wf.offset}: {why(wf.cause)}") from wf.cause
    except OtaError:
        await _abort(up)
        raise

    up.say("Finalizing update...")
    try:
        await up.client.call("OTA.End", timeout_s=timeout_s)
    except RemoteError as e:
        raise OtaError(str(e)) from e
    except (MgrpcError, OSError) as e:
        raise OtaError(f"OTA.End failed: {why(e)}") from e


async def _abort(up: _Updater) -> None:
    # mos calls OTA.End (no params) after the last failed write; its outcome does not matter.
    if up.client.channel.closed:
        return
    try:
        await up.client.call("OTA.End", timeout_s=up.timeout_s)
    except (MgrpcError, OSError) as e:
        log.info("OTA.End (abort) failed: %s", e)


# ---------------------------------------------------------------------------------------------
# after the update: commit / revert / boot state
# ---------------------------------------------------------------------------------------------


async def wait_and_commit(
    connect: ConnectFn,
    *,
    timeout_s: float = 300.0,
    expected_version: str | None = None,
    poll_interval_s: float = 1.0,
    call_timeout_s: float = 5.0,
    settle_s: float = 5.0,
    initial_delay_s: float = 1.0,
    on_message: MessageFn | None = None,
) -> CommitResult:
    """Wait until the rebooted device answers, runs ``expected_version`` uncommitted, then commit it.

    ``connect()`` opens a fresh client (called again for every poll). The device counts as back
    when ``Sys.GetInfo`` answers with ``fw_version == expected_version`` (when given) and
    ``OTA.GetBootState`` says ``is_committed: false``; then ``OTA.Commit`` is called. A device seen
    committed on the expected version for ``settle_s`` (so not just the old firmware answering
    before its reboot) is reported as ``already_committed``. Gives up after ``timeout_s`` with the
    last thing seen (e.g. the old version: the update was not applied, or was reverted).

    The first poll waits ``initial_delay_s``: right after ``OTA.End`` the old firmware still answers
    for a moment (a device reboots ~100 ms after the reply) and already reports the new slot as
    uncommitted, so without an ``expected_version`` an early poll could commit the wrong thing.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    last = "no answer"
    committed_since: float | None = None
    reverted_since: float | None = None
    if on_message is not None:
        on_message("Waiting for the device to come back...")
    await asyncio.sleep(max(0.0, min(initial_delay_s, timeout_s)))
    while True:
        client: AsyncClient | None = None
        try:
            remaining_s = max(0.1, min(call_timeout_s, deadline - time.monotonic()))
            client = await asyncio.wait_for(connect(), remaining_s)
            info = await client.call("Sys.GetInfo", timeout_s=call_timeout_s)
            info = info if isinstance(info, dict) else {}
            version = info.get("fw_version")
            bs = await client.call("OTA.GetBootState", timeout_s=call_timeout_s)
            committed = bool(bs.get("is_committed", True)) if isinstance(bs, dict) else True
            last = f"device runs {version} ({'committed' if committed else 'uncommitted'})"
            if expected_version is None or version == expected_version:
                if not committed:
                    if on_message is not None:
                        on_message(f"Device is back running {version}, committing...")
                    try:
                        await client.call("OTA.Commit", timeout_s=call_timeout_s)
                    except RemoteError as e:
                        raise OtaError(f"unable to commit: {e}") from e
                    return CommitResult(version, info.get("fw_id"), time.monotonic() - t0)
                now = time.monotonic()
                committed_since = committed_since if committed_since is not None else now
                if expected_version is not None and now - committed_since >= settle_s:
                    return CommitResult(version, info.get("fw_id"), now - t0, already_committed=True)
            else:
                committed_since = None
                # Another version, committed: the boot loader fell back (a reset during the first
                # boot, a crash, or the commit timer). Before its reboot the old firmware reports
                # itself uncommitted, so this is never the moment between OTA.End and the reboot;
                # settle_s guards against a device that shows it for an instant anyway.
                if committed and expected_version is not None:
                    now = time.monotonic()
                    reverted_since = reverted_since if reverted_since is not None else now
                    if now - reverted_since >= settle_s:
                        raise OtaError(f"the update was reverted: {last}")
                else:
                    reverted_since = None
        except OtaError:
            raise
        except (MgrpcError, OSError) as e:  # TimeoutError is an OSError
            last = f"no answer ({why(e)})"
        finally:
            if client is not None:
                try:
                    await client.close()
                except Exception:
                    log.debug("closing a poll client failed", exc_info=True)
        if time.monotonic() + poll_interval_s > deadline:
            want = f"{expected_version} uncommitted" if expected_version else "an uncommitted firmware"
            raise OtaError(f"the device did not come back with {want} within {timeout_s:g} s: {last}")
        await asyncio.sleep(poll_interval_s)


async def boot_state(client: AsyncClient, *, timeout_s: float | None = None) -> Any:
    """``OTA.GetBootState``: ``{"active_slot","is_committed","revert_slot","commit_timeout"}``."""
    return await client.call("OTA.GetBootState", timeout_s=timeout_s)


async def ota_commit(client: AsyncClient, *, timeout_s: float | None = None) -> None:
    """``OTA.Commit``: keep the running (uncommitted) firmware."""
    await client.call("OTA.Commit", timeout_s=timeout_s)


async def ota_revert(client: AsyncClient, *, timeout_s: float | None = None) -> None:
    """``OTA.Revert``: go back to the previous firmware (the device reboots)."""
    await client.call("OTA.Revert", timeout_s=timeout_s)
