"""The virtual device: a Mongoose OS device in a process, on an emulated NOR flash.

It keeps its flash in ``<state_dir>/flash.bin``, boots through the boot-loader model
(:class:`updater.storage.DeviceStorage`), runs the firmware image of the booted slot and serves
Sys.*, Config.*, FS.*, OTA.* over the listeners it is given. A reboot stops the whole stack and starts
it again after a new boot-loader decision; listeners come back on the same addresses.

The firmware image header (:mod:`updater.firmware`) says how the firmware behaves once booted:
``ok`` serves RPC (and commits at once on a first boot without a commit timeout), ``no_commit``
serves RPC but never commits by itself, ``crash`` crashes during init (the device resets at once, and
the boot loader falls back), ``hang`` never comes up (no RPC at all).

The commit timeout is the seed's *hardware* timer: it is armed by the device when the boot loader
starts a dirty slot, independent of the firmware, so it fires even when the firmware hangs; if the
slot is still uncommitted then, the device reverts and reboots. A hung firmware with no commit
timeout is reset by the watchdog (``watchdog_s``), which the boot loader treats like any reboot
while dirty. Killing the process at any moment is a power loss: the flash file is what it was.

Layering: this module imports only :mod:`rpc`, :mod:`updater` and the other services. How it listens
is injected (``listen=`` a coroutine function such as :func:`transports.listen`), so the composition
root (the CLI, a test, an embedder) decides which transports exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from rpc.auth import Authenticator
from rpc.node import Node
from services.config import DeviceConfig, add_config_service, default_config
from services.firmware import Firmware
from services.fs import add_fs_service
from services.ota import OtaService, add_ota_service
from services.ota_http import fetch_update, register_http_endpoints
from services.sys import add_sys_service
from updater.errors import UpdaterError
from updater.firmware import FirmwareImage
from updater.storage import BootInfo, DeviceStorage

__all__ = ["ListenFunc", "VirtualDevice", "device_node"]


def device_node(fw: Firmware, *, device_id: str, auth: Authenticator | None = None) -> tuple[Node, OtaService]:
    """A router serving a device's built-in services (Sys, Config, FS, OTA and the ``/update`` HTTP
    endpoints) for ``fw``, sized by its ``rpc.*`` config; returns the router and the OTA service."""
    node = Node(
        id=device_id,
        max_frame_size=int(fw.config.get("rpc.max_frame_size")),
        max_queue_length=int(fw.config.get("rpc.max_queue_length")),
        auth=auth,
    )
    add_sys_service(node, fw)
    add_config_service(node, fw, fw.config)
    add_fs_service(node, fw)
    ota = add_ota_service(node, fw, http_fetch=fetch_update)
    register_http_endpoints(node, ota, commit_timeout_default=int(fw.config.get("update.commit_timeout")))
    return node, ota

log = logging.getLogger("mgrpc.device")

ListenFunc = Callable[[str, Node], Awaitable[Any]]

MAX_CRASH_LOOP = 8


class VirtualDevice:
    """One virtual device. ``listen`` URLs are served with ``listen_fn`` (e.g. ``transports.listen``).

    ``on_boot`` callbacks run after each boot with the :class:`BootInfo` (tests and the demo watch
    them); ``setup`` callbacks run on every fresh stack with ``(node, firmware)`` so embedders and
    other services (shadow, polling) can add handlers; ``on_stop`` callbacks run when that stack
    stops (reboot, power off), so such services can cancel their timers.
    """

    def __init__(
        self,
        *,
        id: str,
        state_dir: str | Path,
        arch: str = "esp32",
        listen: Sequence[str] = (),
        listen_fn: ListenFunc | None = None,
        app: str = "mgrpc-virtual",
        factory_version: str = "1.0",
        watchdog_s: float = 30.0,
        auth: Authenticator | None = None,
        storage: DeviceStorage | None = None,
    ) -> None:
        self.id = id
        self.arch = arch
        self.app = app
        self.factory_version = factory_version
        self.state_dir = Path(state_dir)
        self.listen_urls = list(listen)
        self.listen_fn = listen_fn
        self.watchdog_s = watchdog_s
        self.auth = auth
        self._storage = storage
        self.storage: DeviceStorage | None = None
        self.node: Node | None = None
        self.fw: Firmware | None = None
        self.ota: OtaService | None = None
        self.listeners: list[Any] = []
        self.urls: list[str] = []
        self.boot_info: BootInfo | None = None
        self.boots = 0
        self.behavior = "ok"
        self.running = False
        self.on_boot: list[Callable[[VirtualDevice, BootInfo], None]] = []
        self.setup: list[Callable[[Node, Firmware], None]] = []
        self.on_stop: list[Callable[[], None]] = []  # run when a stack stops (reboot, power off)
        self._timers: list[asyncio.TimerHandle] = []
        self._reboot_task: asyncio.Task[None] | None = None
        self._booted = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> BootInfo:
        """Power on: provision a blank flash, boot, start the stack."""
        if self.storage is None:
            if self._storage is not None:
                self.storage = self._storage
            else:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                self.storage = DeviceStorage.open(self.state_dir / "flash.bin")
            if self.storage.config is None:
                self._provision()
        self.running = True
        return await self._boot()

    def _provision(self) -> None:
        assert self.storage is not None
        image = FirmwareImage(app=self.app, version=self.factory_version,
                              build_id=f"factory/{self.factory_version}", arch=self.arch)  # fmt: skip
        conf0 = b'{"device": {"id": "%s"}}' % self.id.encode()
        self.storage.factory_init(image.to_bytes(), {"conf0.json": conf0})
        log.info("%s: provisioned a blank flash with factory firmware %s", self.id, self.factory_version)

    async def _boot(self) -> BootInfo:
        assert self.storage is not None
        for _ in range(MAX_CRASH_LOOP):
            info = self.storage.boot()
            self.boots += 1
            self.boot_info = info
            image = self._image(info.slot)
            self.behavior = image.behavior if image is not None else "ok"
            log.info(
                "%s: boot #%d slot %d version %s%s%s", self.id, self.boots, info.slot, info.version,
                " (first boot, uncommitted)" if info.first_boot else "",
                f" after fallback: {info.reason}" if info.reverted else "",
            )  # fmt: skip
            if info.first_boot and info.commit_timeout_s > 0:
                self._arm(info.commit_timeout_s, self._commit_timer_fired)
            if self.behavior == "crash":
                log.warning("%s: firmware crashed during init; resetting", self.id)
                self._cancel_timers()
                continue  # the reset happens at once; the boot loader sees a reboot while dirty
            break
        else:
            raise UpdaterError("crash loop: no firmware came up")
        if self.behavior == "hang":
            log.warning("%s: firmware hangs after boot; no RPC will be served", self.id)
            if not (info.first_boot and info.commit_timeout_s > 0):
                self._arm(self.watchdog_s, self._watchdog_fired)
        else:
            await self._start_stack(info, image)
            if info.first_boot and info.commit_timeout_s <= 0 and self.behavior == "ok":
                self.storage.commit()
                log.info("%s: first boot without a commit timeout: committed", self.id)
        for cb in list(self.on_boot):
            cb(self, info)
        self._booted.set()
        return info

    def _image(self, slot: int) -> FirmwareImage | None:
        assert self.storage is not None
        try:
            return FirmwareImage.parse(self.storage.read_app(slot))
        except (UpdaterError, ValueError):
            return None

    async def _start_stack(self, info: BootInfo, image: FirmwareImage | None) -> None:
        assert self.storage is not None
        fs = self.storage.fs(info.slot)
        fw = Firmware(
            id=self.id, arch=self.arch, app=image.app if image else self.app,
            version=info.version or (image.version if image else ""),
            build_id=info.build_id or (image.build_id if image else ""), fs=fs, storage=self.storage,
            reboot=self.schedule_reboot,
        )  # fmt: skip
        fw.config = DeviceConfig(fs, default_config(self.id, self.arch))
        node, self.ota = device_node(fw, device_id=self.id, auth=self.auth)
        for cb in list(self.setup):
            cb(node, fw)
        self.node, self.fw = node, fw
        if self.listen_fn is None:
            return
        urls = self.urls or self.listen_urls
        self.listeners = []
        for url in urls:
            self.listeners.append(await self.listen_fn(url, node))
        self.urls = [str(getattr(lst, "url", u)) for lst, u in zip(self.listeners, urls, strict=True)]

    async def _stop_stack(self) -> None:
        for stop_cb in list(self.on_stop):
            try:
                stop_cb()
            except Exception:
                log.exception("%s: stop callback failed", self.id)
        for lst in self.listeners:
            try:
                await lst.close()
            except Exception:
                log.debug("closing a listener failed", exc_info=True)
        self.listeners = []
        if self.node is not None:
            await self.node.close()
        if self.ota is not None:
            self.ota.abort("Update aborted")
        self.node = None
        self.fw = None
        self.ota = None

    async def stop(self) -> None:
        """Power off cleanly (listeners closed, timers cancelled, flash file closed)."""
        self.running = False
        self._cancel_timers()
        if self._reboot_task is not None and self._reboot_task is not asyncio.current_task():
            self._reboot_task.cancel()
        await self._stop_stack()
        if self.storage is not None and self._storage is None:
            self.storage.close()
            self.storage = None

    # -- reboots and timers -------------------------------------------------------------------------
    def schedule_reboot(self, delay_s: float = 0.1) -> None:
        """Reboot after ``delay_s`` (lets the reply that asked for it leave first)."""
        self._arm(delay_s, self._reboot_now)

    def _reboot_now(self) -> None:
        if self._reboot_task is None or self._reboot_task.done():
            self._reboot_task = asyncio.ensure_future(self._reboot_silently())

    async def _reboot_silently(self) -> None:
        try:
            await self.reboot()
        except Exception:
            log.exception("%s: reboot failed", self.id)

    async def reboot(self) -> BootInfo | None:
        """Reset: stop the stack, let the boot loader decide, start again."""
        if not self.running:
            return None
        self._cancel_timers()
        self._booted.clear()
        await self._stop_stack()
        return await self._boot()

    async def wait_booted(self, *, boots: int, timeout_s: float = 10.0) -> BootInfo:
        """Wait until the device has booted ``boots`` times in total (tests, demo)."""
        deadline = time.monotonic() + timeout_s
        while self.boots < boots or not self._booted.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"device did not reach boot #{boots} (at {self.boots})")
            await asyncio.sleep(0.02)
        assert self.boot_info is not None
        return self.boot_info

    def _arm(self, delay_s: float, fn: Callable[[], None]) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(delay_s, fn))

    def _cancel_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def _commit_timer_fired(self) -> None:
        assert self.storage is not None
        if self.storage.is_committed:
            return
        log.warning("%s: Update commit timeout expired; reverting", self.id)
        self.storage.revert()
        self._reboot_now()

    def _watchdog_fired(self) -> None:
        log.warning("%s: watchdog reset", self.id)
        self._reboot_now()
