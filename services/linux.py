"""A program on a real Linux device: Sys.*, Config.*, FS.*, OTA.* over its own slot directories.

The program runs under ``mgrpc supervise`` (:mod:`mgrpc.supervisor`), which starts it from the active
slot and tells it where things are through the environment (:mod:`updater.fsslots`). This module is
what such a program embeds::

    dev = LinuxDevice(listen_fn=transports.listen)     # URLs from MGRPC_RPC_URL, or listen=[...]
    dev.setup.append(lambda node, fw: node.add_handler("App.Hello", hello))
    await dev.run()                                     # returns when the supervisor restarts it

* OTA (``mgrpc ota``/``mos ota``, ``POST /update``, ``OTA.Update``) writes the inactive slot; the
  ``app`` part of the bundle is a tar of the program's files, the ``fs`` part a tar of its data
  directory. ``OTA.Commit`` (or :func:`updater.fsslots.commit`) commits the running slot.
* Config and FS.* live in the slot's data directory (``conf0.json`` ... ``conf9.json``), merged into
  the new slot on a first boot as a device merges its filesystem.
* Heartbeats go to the supervisor every ``MGRPC_HEARTBEAT_S`` from the event loop, so a blocked
  loop is a hang. A reboot (``Sys.Reboot``, after an update, ``OTA.Revert``) asks the supervisor to
  restart the program; :meth:`LinuxDevice.run` then returns. It also returns when the supervisor is
  gone or no longer knows this start (stale boot id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from rpc.auth import Authenticator
from rpc.node import Node
from services.config import DeviceConfig, default_config
from services.device import device_node
from services.firmware import Firmware
from services.ota import OtaService
from updater.errors import UpdaterError
from updater.fsslots import ENV_HEARTBEAT_S, ENV_RPC_URL, FsSlotStorage, StaleBoot, SupervisorClient

__all__ = ["LinuxDevice"]

log = logging.getLogger("mgrpc.services.linux")

ListenFunc = Callable[[str, Node], Awaitable[Any]]
MAX_HEARTBEAT_FAILURES = 3


class LinuxDevice:
    """The RPC side of a supervised program (see the module doc).

    ``setup`` callbacks get ``(node, firmware)`` before listening, to add the program's own handlers.
    """

    def __init__(
        self, *, id: str | None = None, arch: str = "linux", app: str = "mgrpc-linux", listen: Sequence[str] = (),
        listen_fn: ListenFunc | None = None, auth: Authenticator | None = None, storage: FsSlotStorage | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.env = dict(os.environ if env is None else env)
        self.storage = storage if storage is not None else FsSlotStorage.from_env(self.env)
        self.id = id or self.env.get("MGRPC_DEVICE_ID") or socket.gethostname()
        self.arch = arch
        self.app = app
        self.listen_urls = list(listen) or self.env.get(ENV_RPC_URL, "").split()
        self.listen_fn = listen_fn
        self.auth = auth
        self.setup: list[Callable[[Node, Firmware], None]] = []
        self.node: Node | None = None
        self.fw: Firmware | None = None
        self.ota: OtaService | None = None
        self.listeners: list[Any] = []
        self.urls: list[str] = []
        self.stop_reason = ""
        self._done = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def supervisor(self) -> SupervisorClient | None:
        """The supervisor's client (None when the storage has a local boot loader)."""
        control = self.storage.control
        return control if isinstance(control, SupervisorClient) else None

    async def start(self) -> None:
        """Build the services on the running slot's data directory and listen."""
        st = self.storage
        fs = st.fs()
        fw = Firmware(
            id=self.id, arch=self.arch, app=self.app, version=st.running_version, build_id=st.running_build_id,
            fs=fs, storage=st, reboot=self.reboot,
        )  # fmt: skip
        fw.config = DeviceConfig(fs, default_config(self.id, self.arch))
        node, self.ota = device_node(fw, device_id=self.id, auth=self.auth)
        for cb in list(self.setup):
            cb(node, fw)
        self.node, self.fw = node, fw
        if self.listen_fn is not None:
            for url in self.listen_urls:
                self.listeners.append(await self.listen_fn(url, node))
            self.urls = [str(getattr(lst, "client_url", getattr(lst, "url", u)))
                         for lst, u in zip(self.listeners, self.listen_urls, strict=True)]  # fmt: skip
        # Only now, serving, does the program count as "up": the first heartbeat says so.
        if self.supervisor is not None and self.env.get(ENV_HEARTBEAT_S):
            self._tasks.append(asyncio.ensure_future(self._heartbeats(float(self.env[ENV_HEARTBEAT_S]))))
        log.info("%s: slot %d version %s serving %s", self.id, st.running_slot, st.running_version, self.urls)

    async def run(self) -> str:
        """:meth:`start`, then :meth:`serve`."""
        await self.start()
        return await self.serve()

    async def serve(self) -> str:
        """Serve until a restart is due; returns why (``reboot``, ``supervisor gone``, ``stale``, ...)."""
        try:
            await self._done.wait()
        finally:
            await self.close()
        return self.stop_reason

    def stop(self, reason: str = "stopped") -> None:
        """Make :meth:`run` return."""
        if not self._done.is_set():
            self.stop_reason = reason
            self._done.set()

    async def close(self) -> None:
        """Stop heartbeats, listeners and the node."""
        for t in self._tasks:
            t.cancel()
        self._tasks.clear()
        for lst in self.listeners:
            with contextlib.suppress(Exception):
                await lst.close()
        self.listeners = []
        if self.ota is not None:
            self.ota.abort("Update aborted")
        if self.node is not None:
            await self.node.close()

    def reboot(self, delay_s: float = 0.1) -> None:
        """Ask for a restart after ``delay_s`` (the reply that asked for it leaves first)."""
        asyncio.get_running_loop().call_later(delay_s, self._reboot_now)

    def _reboot_now(self) -> None:
        try:
            self.storage.control.request("reboot")
        except UpdaterError as exc:
            log.warning("%s: restart request failed (%s); exiting", self.id, exc)
        self.stop("reboot")

    async def _heartbeats(self, interval_s: float) -> None:
        sup = self.supervisor
        assert sup is not None
        failures = 0
        while True:
            try:
                await sup.heartbeat()
                failures = 0
            except StaleBoot:
                log.error("%s: the supervisor no longer runs this program; stopping", self.id)
                self.stop("stale")
                return
            except (UpdaterError, OSError, ValueError, TimeoutError) as exc:
                failures += 1
                log.warning("%s: heartbeat failed (%s)", self.id, exc)
                if failures >= MAX_HEARTBEAT_FAILURES:
                    self.stop("supervisor gone")
                    return
            await asyncio.sleep(interval_s)
