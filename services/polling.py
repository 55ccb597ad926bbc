"""ota-http-client polling (spec/ota.md §4): every ``update.interval`` seconds the device GETs
``update.url`` and applies what it gets.

Each tick starts an update with ``ignore_same_version = true`` and commit timeout
``update.commit_timeout``; a tick does nothing while an update runs or while the firmware is
uncommitted. The request carries ``X-MGOS-Device-ID: <device.id> <mac>`` and
``X-MGOS-FW-Version: <arch> <fw_version> <build_id>`` (plus ``User-Agent``); ``304`` means
nothing to do, ``200`` streams the body into the updater, success reboots (through
:func:`services.ota_http.fetch_update`). ``update.interval = 0`` or an empty ``update.url``
disables polling. The first poll happens one interval after boot, as the device's timer does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from rpc.errors import HandlerError
from services.firmware import Firmware
from services.ota import OtaService, OtaState
from services.ota_http import fetch_update

__all__ = ["PollResult", "UpdatePoller", "attach_polling", "poll_headers"]

log = logging.getLogger("mgrpc.services.polling")

PollResult = tuple[int, str]
Fetch = Callable[..., Awaitable[PollResult]]


def poll_headers(fw: Firmware) -> dict[str, str]:
    """The headers ota-http-client sends with every poll."""
    return {
        "X-MGOS-Device-ID": f"{fw.id} {fw.mac}",
        "X-MGOS-FW-Version": f"{fw.arch} {fw.version} {fw.build_id}",
        "User-Agent": f"{fw.app}/{fw.version} (MongooseOS/{fw.mg_version}; {fw.arch})",
    }


class UpdatePoller:
    """The polling timer of one booted firmware (``start()`` after boot, ``stop()`` when it stops)."""

    def __init__(self, fw: Firmware, ota: OtaService, *, fetch: Fetch = fetch_update) -> None:
        self.fw = fw
        self.ota = ota
        self.fetch = fetch
        self.polls = 0
        self.last: PollResult | None = None
        self._task: asyncio.Task[None] | None = None

    def _cfg(self, key: str, default: Any) -> Any:
        try:
            return self.fw.config.get(key) if self.fw.config is not None else default
        except HandlerError:
            return default

    @property
    def url(self) -> str:
        """``update.url``."""
        return str(self._cfg("update.url", "") or "")

    @property
    def interval_s(self) -> int:
        """``update.interval`` (0 = no polling)."""
        try:
            return int(self._cfg("update.interval", 0) or 0)
        except (TypeError, ValueError):
            return 0

    async def poll_once(self) -> PollResult | None:
        """One tick: None when skipped (no URL, update running, uncommitted), else (code, message).

        Codes as :func:`services.ota_http.fetch_update`: 0 applied (reboot scheduled), 1 nothing to
        do (``304 Not Modified`` or same version), < 0 failed.
        """
        url = self.url
        if not url:
            return None
        if self.ota.state == OtaState.PROGRESS:
            log.debug("poll skipped: an update is in progress")
            return None
        if not self.ota.storage.is_committed:
            log.debug("poll skipped: the running firmware is not committed")
            return None
        try:
            commit_timeout = int(self._cfg("update.commit_timeout", 0) or 0)
        except (TypeError, ValueError):
            commit_timeout = 0
        try:
            # ota-http-client polls with ignore_same_version=true: skip an update to the running version.
            u = self.ota.begin(size=None, commit_timeout_s=commit_timeout, timeout_s=None, source="poll",
                               ignore_same_version=True)  # fmt: skip
        except HandlerError as e:
            log.info("poll skipped: %s", e.message)
            return None
        self.polls += 1
        res = await self.fetch(self.ota, u, url, headers=poll_headers(self.fw))
        self.last = res
        code, message = res
        level = logging.INFO if code >= 0 else logging.WARNING
        log.log(level, "%s: poll %s: %d %s", self.fw.id, url, code, message)
        return res

    async def _run(self) -> None:
        while True:
            interval = self.interval_s
            if interval <= 0 or not self.url:
                return
            await asyncio.sleep(interval)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: poll failed", self.fw.id)

    def start(self) -> bool:
        """Start the timer (False when polling is disabled by the config)."""
        if self.interval_s <= 0 or not self.url:
            return False
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return True

    def stop(self) -> None:
        """Cancel the timer (and a poll in flight)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None


def attach_polling(dev: Any, *, fetch: Fetch = fetch_update) -> list[UpdatePoller]:
    """Run an :class:`UpdatePoller` on every boot of ``dev`` (a :class:`services.device.VirtualDevice`).

    Returns the list the pollers are appended to (one per boot, the last one is current).
    """
    pollers: list[UpdatePoller] = []

    def setup(node: Any, fw: Firmware) -> None:
        if dev.ota is None:
            return
        p = UpdatePoller(fw, dev.ota, fetch=fetch)
        pollers.append(p)
        p.start()
        dev.on_stop.append(_stopper(dev, p))

    dev.setup.append(setup)
    return pollers


def _stopper(dev: Any, p: UpdatePoller) -> Callable[[], None]:
    def stop() -> None:
        p.stop()
        if stop in dev.on_stop:
            dev.on_stop.remove(stop)

    return stop
