"""The fleet dashboard: an aiohttp web app over the fleet model, MQTT presence/progress and rollouts.

Routes (everything is served by this app; the page uses no CDN):

* ``GET /`` the page; ``GET /static/<file>`` its JS and CSS.
* ``GET /api/state`` devices, bundles and the latest rollouts with per-device jobs, and the CSRF
  token for this session; ``GET /api/events`` the same as server-sent events after every change
  (the page listens to it instead of polling).
* ``POST /api/rollouts/<id>/pause|resume|abort`` controls a rollout (409 if it cannot now).
* ``POST /api/devices`` ``{"url": "ws://..."}`` adds a device by RPC URL (asks ``Sys.GetInfo`` and
  ``OTA.GetBootState``); ``POST /api/devices/refresh`` asks every URL device again.
* ``POST /api/bundles`` multipart upload of a fw.zip (any file field) → the bundle's info.
* ``GET /fw/<sha256>.zip`` the bundle bytes (devices download from here: OTA.Update, shadow).
* ``GET /update`` the ota-http-client polling endpoint: a device (``X-MGOS-Device-ID``) with a
  pending ``poll`` job gets its bundle, anyone else ``304 Not Modified``.
* ``POST /api/rollouts`` ``{"devices": [...], "bundle": sha, "method": "push"|"url"|"shadow"|"poll",
  "commit_timeout": s, "autocommit": bool, "stage_size": N, "max_failures": K}``.

Access rules (credentials, CSRF, loopback default) are :mod:`mgrpc.fleet.security`'s.

Devices are seen over MQTT through the topics of :mod:`services.shadow` (``<id>/status``,
``<id>/ota/progress``, the shadow's ``update/accepted``). Methods: ``push`` = OTA.Begin/Write/End
over RPC (:func:`rpc.host.ota.ota_update`); ``url`` = ``OTA.Update`` with this app's bundle URL;
``shadow`` = ``desired.ota = {url, commit_timeout, autocommit}`` in the device's shadow (offline
devices pick it up when they connect); ``poll`` = served to the device's next poll of ``/update``.
With ``autocommit`` the dashboard commits (``OTA.Commit``) once the device runs the new version,
except for ``shadow``, where the device commits itself after its first shadow connection. A job
ends ``done`` (new version running, committed unless autocommit is off), ``rolled_back`` (the
device came back on another version) or ``failed``.

Several workers: every dashboard process on the same database (PostgreSQL) is a worker. The
database decides: a job moves in one transaction on its row (:meth:`FleetDB.locked_job`), jobs
start in one transaction on the rollout (:meth:`FleetDB.locked_rollout`), so whichever worker gets
a device's message, the move happens once. Workers split ``<id>/ota/progress`` through the shared
subscription ``$share/<share_group>/...``; ``<id>/status`` (retained; shared subscriptions get no
retained messages) and the ``$aws/...`` shadow topics reach every worker (mosquitto 2.0 delivers no
``$``-topic to a shared subscription, MQTT 3.1.1 and 5 alike: tests/mgrpc/test_fleet_workers.py
checks it). Each worker writes a heartbeat every second; a job's ``owner`` is the worker driving
it (the one that started it; for ``committing``, the one that made that move, as it commits). The
jobs of a worker silent for ``WORKER_DEAD_S`` are taken over by another (:meth:`FleetApp._adopt_orphans`),
which drives each from where the device stands (:meth:`FleetApp._resume_transfer`): a push is
resumed at the device's offset, a device that already runs the bundle is only committed, an
OTA.Update never sent is sent. A worker restarted under the same id takes back its own jobs. The
moves a worker makes from its own work on a job are fenced by ownership, so one that was only
thought dead cannot undo its successor's. The messages every worker receives (presence, shadow
requests) are each device's worker's to act on: the live workers split the devices by a hash of
the id (:meth:`FleetApp._serves`), so each stores and answers its share, and the share of a worker
that stops goes to the others when its heartbeat is missed.

Injected from the composition root (this package never imports :mod:`transports`): ``mqtt`` (a
connection like ``transports.mqttconn.MqttConnection``) and ``rpc_connect(url)`` (e.g.
``transports.connect``, returning an :class:`rpc.client.AsyncClient`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from mgrpc.fleet.model import DeviceRecord, FleetDB, FleetError
from mgrpc.fleet.rollout import METHODS, InvalidTransition, Job, Rollout
from mgrpc.fleet.security import COOKIE, Guard
from rpc.errors import MgrpcError, RemoteError
from rpc.host.ota import ota_update
from services.shadow import ShadowTopics

__all__ = ["STATIC_DIR", "FleetApp"]

log = logging.getLogger("mgrpc.fleet")

STATIC_DIR = Path(__file__).parent / "static"
SEND_TIMEOUT_S = 120.0  # push/url: no word from the device for this long fails the job
REBOOT_GRACE_S = 60.0  # beyond the commit timeout, for a device to come back after applying
PUSH_CHUNK = 2048  # raw bytes per OTA.Write: ~2.8 KB frames, under the default 4096 max frame size
PUSH_WINDOW = 4
MAX_UPLOAD = 64 << 20
EVENT_MIN_GAP_S = 0.05  # server-sent events: at most 20 state updates a second per browser
EVENT_KEEPALIVE_S = 15.0
BUNDLE_CACHE = 4  # bundles kept in memory for downloads
PROGRESS_SAVE_S = 5.0  # transfer progress goes to the database at most this often per device
SHADOW_RESEND_S = 10.0  # shadow: a device online that has not begun is sent desired.ota again
SHADOW_ASKED_RESEND_S = 60.0  # ... or after this, if it has asked for its shadow since (see FleetApp._resend_after)
PUMP_COALESCE_S = 0.25  # a finished job starts the next ones within this (one pump for all finished meanwhile)
WORKER_DEAD_S = 5.0  # a worker not heard from for this long is dead: its waiting jobs are taken over

RpcConnect = Callable[[str], Awaitable[Any]]
# The request's session (for its CSRF token); aiohttp >= 3.11 wants typed request keys.
_SESSION: Any = web.RequestKey("session", str) if hasattr(web, "RequestKey") else "session"


class FleetApp:
    """The dashboard's state and behaviour; :meth:`web_app` gives the aiohttp application."""

    def __init__(
        self,
        db: FleetDB,
        *,
        mqtt: Any | None = None,
        rpc_connect: RpcConnect | None = None,
        broker_url: str = "",
        public_url: str = "",
        send_timeout_s: float = SEND_TIMEOUT_S,
        reboot_grace_s: float = REBOOT_GRACE_S,
        guard: Guard | None = None,
        share_group: str = "",
        worker_id: str = "",
        shadow_service: Any | None = None,
    ) -> None:
        self.db = db
        self.share_group = share_group
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        # the shadow service beside this dashboard (mgrpc.shadow_server.ShadowServer): sets desired
        # state directly; with a share group, one worker at a time answers the devices' requests
        self.shadow_service = shadow_service
        if shadow_service is not None and share_group:
            shadow_service.accept = self._serves  # each worker answers its devices' requests
        self.guard = guard or Guard()
        self.mqtt = mqtt
        self.rpc_connect = rpc_connect
        self.broker_url = broker_url.rstrip("/")
        self.public_url = public_url.rstrip("/")
        self.send_timeout_s = send_timeout_s
        self.reboot_grace_s = reboot_grace_s
        self.devices: dict[str, DeviceRecord] = {d.id: d for d in db.devices()}
        for d in self.devices.values():
            if d.source == "mqtt":
                d.online = False  # until the broker says otherwise
        self.rollouts: dict[str, Rollout] = {r.id: r for r in db.rollouts()}
        self._devices_seen = time.time()
        self._bundle_cache: dict[str, bytes] = {}  # sha -> bytes (immutable): downloads do not hit the database
        self._saved_progress: dict[str, float] = {}  # device -> when its transfer progress was last saved
        self._last_change = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._job_tasks: dict[tuple[str, str], asyncio.Task[Any]] = {}  # (rollout, device) -> the task driving it
        self._ticker: asyncio.Task[None] | None = None
        self.changes = 0  # bumped on every change (the page can skip redraws)
        self._listeners: set[asyncio.Event] = set()  # one per server-sent-events client
        self._peers: list[str] = [self.worker_id]  # the live workers, sorted (see _serves)
        self._pump_due: dict[str, asyncio.TimerHandle] = {}  # rollout id -> its coming pump (_pump_soon)
        self._shadow_asked: dict[str, float] = {}  # device -> when it last asked for its shadow (a get)
        self._desired_set: dict[str, float] = {}  # device -> when this worker last set its desired.ota

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> FleetApp:
        """Subscribe the fleet topics and start the timeout ticker."""
        self.db.heartbeat(self.worker_id)
        self._set_peers(self.db.live_workers(WORKER_DEAD_S))
        if self.mqtt is not None:
            g = self.share_group
            # Presence is retained, and a shared subscription gets no retained messages: every worker
            # follows every device's status (in memory; the device's worker stores it and acts on it).
            await self.mqtt.subscribe("+/status", self._on_status, qos=1)
            # The bulk of the traffic: one worker of the group gets each message.
            await self.mqtt.subscribe(_shared("+/ota/progress", g), self._on_progress, qos=0)
            # mosquitto 2.0 delivers no $-topic to a shared subscription: every worker follows the
            # shadow traffic (light: a few messages per update; the device's worker answers requests).
            await self.mqtt.subscribe("$aws/things/+/shadow/update/accepted", self._on_shadow, qos=1)
            # Discovery of devices that speak only the shadow protocol (Mongoose OS devices): their
            # own requests name them.
            await self.mqtt.subscribe("$aws/things/+/shadow/update", self._on_shadow_request, qos=1)
            await self.mqtt.subscribe("$aws/things/+/shadow/get", self._on_shadow_request, qos=1)
            if hasattr(self.mqtt, "on_state"):
                self.mqtt.on_state(self._on_broker_state)
        if self.shadow_service is not None and self.share_group and not self.shadow_service.serving:
            await self.shadow_service.start()
        self._take_over(restart=True)
        for r in list(self.rollouts.values()):
            if r.state == "running":
                self._pump(r)
        self._ticker = asyncio.ensure_future(self._tick_loop())
        return self

    def _serves(self, dev_id: str) -> bool:
        """Whether this worker is the device's: it stores the device's presence, makes the job moves
        its presence causes, and answers its shadow requests. Every worker receives all of these
        (retained and ``$`` topics cannot be shared subscriptions); the live workers split the devices
        by a hash of the id, so each does its share, and a dead worker's devices go to the others
        within ``WORKER_DEAD_S``. Without a share group (one worker) every device is this worker's."""
        peers = self._peers
        return len(peers) < 2 or peers[zlib.crc32(dev_id.encode()) % len(peers)] == self.worker_id

    def _set_peers(self, live: set[str] | frozenset[str]) -> None:
        """The live workers changed: split the devices again (:meth:`_serves`). Devices this worker
        gains are stored and checked against their jobs (the worker they had may have died before
        doing it; this worker saw their messages too)."""
        peers = sorted(set(live) | {self.worker_id}) if self.share_group else [self.worker_id]
        if peers == self._peers:
            return
        had = {d for d in self.devices if self._serves(d)}
        self._peers = peers
        gained = [d for d in self.devices.values() if d.id not in had and self._serves(d.id) and d.source == "mqtt"]
        n = sum(1 for d in self.devices if self._serves(d))
        log.warning("worker %s: workers %s; this one serves %d of %d devices (presence, shadow requests)",
                    self.worker_id, ", ".join(peers), n, len(self.devices))  # fmt: skip
        for d in gained:
            self._touch(d)
            if d.online:
                self._device_online(d)

    async def close(self) -> None:
        """Stop the ticker and the running job tasks (the database stays open: the caller owns it)."""
        if self._ticker is not None:
            self._ticker.cancel()
        for h in self._pump_due.values():
            h.cancel()
        self._pump_due.clear()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, *(x for x in [self._ticker] if x), return_exceptions=True)
        with contextlib.suppress(Exception):
            self.db.forget_worker(self.worker_id)

    def bundle_data(self, sha: str) -> bytes:
        """A bundle's bytes, cached (:class:`FleetError` if unknown)."""
        data = self._bundle_cache.get(sha)
        if data is None:
            data = self.db.bundle_data(sha)
            if len(self._bundle_cache) >= BUNDLE_CACHE:
                self._bundle_cache.pop(next(iter(self._bundle_cache)))
            self._bundle_cache[sha] = data
        return data

    def _bump(self) -> None:
        """Something the page shows changed: wake the event streams."""
        self.changes += 1
        for ev in self._listeners:
            ev.set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- devices ---------------------------------------------------------------------------------
    def device_url(self, d: DeviceRecord) -> str:
        """The RPC URL to reach a device."""
        if d.source == "mqtt" and self.broker_url:
            return f"{self.broker_url}/{d.id}"
        return d.url

    def _touch(self, d: DeviceRecord, *, save: bool = True) -> None:
        self._bump()
        if save:
            self.db.save_device(d)

    def _on_status(self, msg: Any) -> None:
        try:
            st = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(st, dict):
            return
        dev_id = msg.topic.rsplit("/", 1)[0]
        d = self.devices.get(dev_id)
        if d is None:
            d = self.devices[dev_id] = DeviceRecord(id=dev_id, source="mqtt")
        elif not st.get("online") and isinstance(st.get("boots"), int) and st["boots"] < d.boots:
            return  # an earlier boot's last will or "offline", landing after this boot's birth message
        d.online = bool(st.get("online"))
        d.presence = "status"
        for key in ("arch", "app", "version", "build_id"):
            if isinstance(st.get(key), str) and st[key]:
                setattr(d, key, st[key])
        if "committed" in st:
            d.committed = bool(st["committed"])
        d.reverted = bool(st.get("reverted"))
        if isinstance(st.get("reason"), str):
            d.reason = st["reason"]
        if isinstance(st.get("boots"), int):
            d.boots = st["boots"]
        if isinstance(st.get("url"), str) and not d.url:
            d.url = st["url"]
        d.last_seen = time.time()
        mine = self._serves(dev_id)
        self._touch(d, save=mine)
        if d.online and mine:
            self._device_online(d)

    def _on_broker_state(self, up: bool) -> None:
        """Without the broker nothing is known of MQTT devices; their retained status comes back on reconnect."""
        if up:
            return
        for d in self.devices.values():
            if d.source == "mqtt" and d.online:
                d.online = False
                self._touch(d, save=self._serves(d.id))

    def _on_shadow_request(self, msg: Any) -> None:
        """A device's own shadow request (``update`` with ``reported`` state, or ``get``): it is on the broker."""
        if getattr(msg, "retain", False):
            return
        try:
            obj = json.loads(msg.payload) if msg.payload.strip() else {}
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        parts = msg.topic.split("/")
        if len(parts) < 5 or not parts[2]:
            return
        dev_id, op = parts[2], parts[4]
        if op == "get":
            self._shadow_asked[dev_id] = time.time()
        reported = (obj.get("state") or {}).get("reported") if isinstance(obj.get("state"), dict) else None
        d = self.devices.get(dev_id)
        if op == "update" and not isinstance(reported, dict):
            return  # an operator's desired state, not the device
        if d is None:
            if op != "update":
                return  # a get alone may come from anyone
            d = self.devices[dev_id] = DeviceRecord(id=dev_id, source="mqtt", presence="shadow")
            log.info("device %s discovered by its shadow reports", dev_id)
        before = (d.online, d.version, d.build_id, d.app, d.arch)
        if isinstance(reported, dict):
            _apply_reported(d, reported)
        d.online = True  # a live (not retained) request: it is connected now
        d.last_seen = time.time()
        changed = (d.online, d.version, d.build_id, d.app, d.arch) != before
        mine = self._serves(dev_id)
        self._touch(d, save=mine and (changed or d.presence == "shadow"))
        if changed and mine:
            self._device_online(d)

    def _on_progress(self, msg: Any) -> None:
        try:
            p = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(p, dict):
            return
        dev_id = msg.topic.split("/", 1)[0]
        d = self.devices.get(dev_id)
        if d is not None:
            d.progress = p
            self._touch(d, save=False)
        state = p.get("state")
        if state not in ("progress", "success", "error", "committed") or (state == "progress" and not p.get("done")):
            return  # not a move (a progress of 0: an update began; each poll begins one, most end with 304)
        # Transfer progress is the bulk of the traffic: a job this worker knows to be transferring
        # is used as cached (a move is re-checked under the row lock anyway). Workers get the messages
        # of a transfer in turns (a shared subscription), and one that is behind gets some after the
        # device came back with the update: a job known to be past its transfer moves no more on them.
        found = None
        if state == "progress":
            found = self._cached_job(dev_id)
            if found is not None and found[1].state in ("rebooting", "committing"):
                return
        found = found or self._active_job(dev_id)
        if found is None:
            return
        r, job = found
        if state == "progress":
            done = int(p.get("done") or 0)
            total = p.get("total") if isinstance(p.get("total"), int) else job.total_bytes
            self._progress(r, job, done, total, "downloading" if r.method != "push" else "writing")
        elif state == "success":
            self._event(r, job, "applied", message=str(p.get("message") or "applied, rebooting"),
                        done_bytes=job.total_bytes or job.done_bytes)  # fmt: skip
        elif state == "error":
            self._event(r, job, "error", error=str(p.get("message") or "update failed"))
        elif state == "committed":
            self._event(r, job, "committed", message="committed")

    def _progress(self, r: Rollout, job: Job, done: int, total: int | None, message: str) -> None:
        """Transfer progress: every step is shown by this worker; the database (other workers' pages,
        the timeouts) gets the start and then at most one step every PROGRESS_SAVE_S."""
        now = time.time()
        if job.state == "updating" and now - self._saved_progress.get(job.device, 0.0) < PROGRESS_SAVE_S:
            job.done_bytes, job.total_bytes, job.changed_at = done, total, now
            self._bump()
            return
        self._saved_progress[job.device] = now
        self._event(r, job, "progress", message=message, done_bytes=done, total_bytes=total, changed_at=now)

    def _on_shadow(self, msg: Any) -> None:
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        ota = ((obj.get("state") or {}).get("reported") or {}).get("ota") if isinstance(obj, dict) else None
        if not isinstance(ota, dict):
            return
        dev_id = msg.topic.split("/")[2]
        d = self.devices.get(dev_id)
        if d is not None:
            d.ota = {**d.ota, **ota}
            self._touch(d, save=False)
        code = ota.get("code")
        if not isinstance(code, int) or code >= 0:
            return  # only a failure moves a job here (the rest is the device's progress and status)
        found = self._active_job(dev_id)
        if found is None:
            return
        r, job = found
        if job.state in ("sending", "updating"):
            self._event(r, job, "error", error=str(ota.get("message") or f"error {code}"))

    async def add_device_url(self, url: str) -> DeviceRecord:
        """Add (or refresh) a device reachable at an RPC URL."""
        if self.rpc_connect is None:
            raise FleetError("this dashboard cannot open RPC connections")
        if not url or "://" not in url:
            raise FleetError(f"not a device URL: {url!r}")
        try:
            client = await self.rpc_connect(url)
        except (OSError, MgrpcError) as e:
            raise FleetError(f"cannot connect to {url}: {e}") from None
        try:
            info = await client.call("Sys.GetInfo", timeout_s=10)
            try:
                bs = await client.call("OTA.GetBootState", timeout_s=10)
                ota = await client.call("OTA.Status", timeout_s=10)
            except RemoteError:
                bs, ota = {}, {}
        except (OSError, MgrpcError) as e:
            raise FleetError(f"{url}: {e}") from None
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if not isinstance(info, dict):
            raise FleetError(f"{url}: Sys.GetInfo did not answer an object: {info!r:.80}")
        dev_id = str(info.get("id") or url)
        d = self.devices.get(dev_id) or DeviceRecord(id=dev_id, source="url")
        d.url = url
        if d.source != "mqtt":
            d.source = "url"
        d.arch = str(info.get("arch", d.arch))
        d.app = str(info.get("app", d.app))
        d.version = str(info.get("fw_version", d.version))
        d.build_id = str(info.get("fw_id", d.build_id))
        d.committed = bool(bs.get("is_committed", True)) if isinstance(bs, dict) else True
        # Applied but not yet rebooted: the old firmware still answers; that is no rollback.
        d.reboot_pending = (isinstance(bs, dict) and isinstance(ota, dict) and "partition" in ota
                            and bs.get("active_slot") != ota.get("partition"))  # fmt: skip
        d.online = True
        d.last_seen = time.time()
        self.devices[dev_id] = d
        self._touch(d)
        self._device_online(d)
        return d

    async def refresh_url_devices(self) -> None:
        """Ask every device added by URL again (online state, version, committed)."""
        for d in list(self.devices.values()):
            if d.source != "url":
                continue
            try:
                await self.add_device_url(d.url)
            except FleetError:
                d.online = False
                self._touch(d)

    # -- rollouts --------------------------------------------------------------------------------
    def _rollout(self, rollout_id: str) -> Rollout | None:
        """The cached rollout (loaded from the database if another worker started it)."""
        r = self.rollouts.get(rollout_id)
        if r is None:
            r = self.db.rollout(rollout_id)
            if r is not None:
                self.rollouts[r.id] = r
        return r

    def _cached_job(self, dev_id: str) -> tuple[Rollout, Job] | None:
        """The device's latest started job as this worker last knew it, if transferring or past that
        and not finished."""
        for r in reversed(list(self.rollouts.values())):
            j = r.jobs.get(dev_id)
            if j is not None and j.state != "queued":
                return (r, j) if j.state in ("updating", "rebooting", "committing") else None
        return None

    def _active_job(self, dev_id: str) -> tuple[Rollout, Job] | None:
        """The device's job that events may still move (from the database: any worker may have moved it)."""
        for rid, fresh in self.db.active_jobs(dev_id):
            r = self._rollout(rid)
            if r is None:
                continue
            if fresh.state == "done" and r.autocommit:
                continue  # committed: nothing can undo it
            job = r.jobs.setdefault(dev_id, fresh)
            _copy_job(job, fresh)
            return r, job
        return None

    def start_rollout(
        self, *, devices: list[str], bundle: str, method: str, commit_timeout_s: int = 300, autocommit: bool = True,
        stage_size: int = 0, max_failures: int = -1, concurrency: int = 0,
    ) -> Rollout:  # fmt: skip
        """Validate and start a rollout; :class:`FleetError` on bad input (nothing started then)."""
        info = self.db.bundle(bundle)
        if info is None:
            raise FleetError(f"unknown bundle {bundle!r}: upload it first")
        if method not in METHODS:
            raise FleetError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
        if not devices:
            raise FleetError("no devices selected")
        if not 0 <= commit_timeout_s <= 86400:
            raise FleetError("commit_timeout must be 0..86400 s")
        for dev_id in devices:
            d = self.devices.get(dev_id)
            if d is None:
                raise FleetError(f"unknown device {dev_id!r}")
            if d.arch and info.arch and d.arch != info.arch:
                raise FleetError(f"device {dev_id} is {d.arch}, the bundle is for {info.arch}")
            busy = self._active_job(dev_id)
            if busy is not None and not busy[1].terminal:
                raise FleetError(f"device {dev_id} is already being updated (rollout {busy[0].id})")
            if method in ("push", "url") and not self.device_url(d):
                raise FleetError(f"device {dev_id} has no RPC URL")
        if method == "shadow" and self.mqtt is None:
            raise FleetError("the shadow method needs an MQTT broker (--broker)")
        r = Rollout(  # bad input: FleetError
            id=uuid.uuid4().hex[:12], bundle=bundle, version=info.version, method=method, devices=list(devices),
            commit_timeout_s=commit_timeout_s, autocommit=autocommit, stage_size=stage_size,
            max_failures=max_failures, concurrency=concurrency,
        )  # fmt: skip
        self.db.save_rollout(r)
        self.rollouts[r.id] = r
        log.info("rollout %s: %s %s to %d devices by %s", r.id, info.name, info.version, len(devices), method)
        self._pump(r)
        return r

    def control(self, rollout_id: str, action: str) -> Rollout:
        """``pause``, ``resume`` or ``abort`` a rollout (:class:`FleetError` if it cannot be done now).

        Abort skips the queued jobs and withdraws the offer from devices that have not begun
        (shadow: ``desired.ota`` is cleared; poll: the next poll gets 304); transfers under way finish.
        """
        r = self._rollout(rollout_id)
        if r is None:
            raise FleetError(f"unknown rollout {rollout_id!r}")
        if action not in ("pause", "resume", "abort"):
            raise FleetError(f"unknown action {action!r}: pause, resume or abort")
        waiting: list[str] = []
        try:
            with self.db.locked_rollout(r.id) as fr:
                assert fr is not None
                if action == "pause":
                    fr.pause()
                elif action == "resume":
                    fr.resume()
                else:
                    waiting = fr.abort()
        except InvalidTransition as e:
            _copy_rollout(r, fr)
            raise FleetError(str(e)) from None
        _copy_rollout(r, fr)
        self._bump()
        if action == "abort":
            for dev_id in waiting:
                job = r.jobs[dev_id]
                if r.method == "shadow" and self.shadow_service is not None:
                    self._spawn(self.shadow_service.update_desired(dev_id, {"ota": None}))
                elif r.method == "shadow" and self.mqtt is not None:
                    body = json.dumps({"state": {"desired": {"ota": None}}, "clientToken": f"fleet-{r.id}-abort"})
                    self._spawn(self.mqtt.publish(ShadowTopics(dev_id).update, body, qos=1))
                if r.method in ("shadow", "poll"):
                    self._event(r, job, "abort", message="aborted by the operator before the device began")
        log.info("rollout %s: %s by the operator", r.id, action)
        self._pump(r)
        return r

    def _pump(self, r: Rollout, *, dead: Callable[[str], bool] | None = None) -> None:
        """Start what may start now (one transaction: no other worker starts the same job); with
        ``dead`` (a job owner -> whether that worker is gone), first take over the dead workers' jobs."""
        adopted: list[str] = []
        self._pump_due.pop(r.id, None)
        with self.db.locked_rollout(r.id, light=dead is None) as fr:
            if fr is None:
                return
            if dead is not None:
                adopted = self._adopt_orphans(fr, dead)
            starts = fr.startable()
            for dev_id in starts:
                job = fr.jobs[dev_id]
                job.fire("start")
                job.owner = self.worker_id
                job.error = ""
                job.message = {"push": "connecting", "url": "OTA.Update sent", "shadow": "desired.ota.url set",
                               "poll": "waiting for the device to poll"}[r.method]  # fmt: skip
        _copy_rollout(r, fr)
        for dev_id in starts:
            if dev_id in fr.jobs:  # (not if another worker moved it meanwhile)
                self._spawn_job(r, r.jobs[dev_id])
        for dev_id in adopted:
            self._spawn_job(r, r.jobs[dev_id], resume=True)
        self._bump()

    def _pump_soon(self, r: Rollout) -> None:
        """:meth:`_pump` within ``PUMP_COALESCE_S``: the jobs that finish meanwhile free their slots
        for one pump (each pump is a transaction over the whole rollout)."""
        if r.id in self._pump_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._pump(r)
            return
        self._pump_due[r.id] = loop.call_later(PUMP_COALESCE_S, self._pump_due_now, r)

    def _pump_due_now(self, r: Rollout) -> None:
        try:
            self._pump(r)
        except Exception:
            log.exception("rollout %s: starting jobs failed (the tick tries again)", r.id)

    def _adopt_orphans(self, r: Rollout, dead: Callable[[str], bool]) -> list[str]:
        """Take over the jobs of workers that died (inside the rollout's transaction, so one worker
        does); returns the devices whose jobs this worker now drives (:meth:`_run_job` ``resume``).

        * shadow or poll not begun (``sending``): queued again and started anew (the same URL: a device
          acts on it once);
        * push or url transfers (``sending``, ``updating``): driven from where the device stands
          (:meth:`_resume_transfer`: committed only if it already runs the bundle, resumed if mid-transfer);
        * ``committing``: this worker commits; ``rebooting`` devices added by URL: this worker watches them;
        * the rest (a device downloading by itself, an MQTT device rebooting) is moved by the device's
          own reports, as before; this worker owns it from now on.
        """
        now = time.time()
        out = []
        for job in r.jobs.values():
            if job.state == "queued" or job.terminal or not dead(job.owner):
                continue
            who = f"worker {job.owner}" if job.owner else "the dashboard"
            if job.state == "sending" and r.method in ("shadow", "poll"):
                job.fire("requeue")
                job.message = f"{who} stopped; starting again"
                log.warning("rollout %s: %s requeued (%s stopped)", r.id, job.device, who)
                continue
            job.owner = self.worker_id
            job.message = f"{who} stopped in state {job.state}; worker {self.worker_id} took over"
            if job.state in ("sending", "updating"):
                job.changed_at = now  # a whole send timeout from here
            log.warning("rollout %s: %s taken over in state %s (%s stopped)", r.id, job.device, job.state, who)
            out.append(job.device)
        return out

    def _take_over(self, *, restart: bool = False) -> None:
        """Adopt rollouts other workers started, and the jobs of workers that died (``restart``: also
        the jobs this worker's id owned before it started: nothing drives them now)."""
        live = frozenset(self.db.live_workers(WORKER_DEAD_S))
        self._set_peers(live)

        def dead(owner: str) -> bool:
            return owner not in live or (restart and owner == self.worker_id)

        for fr in self.db.rollouts(unsettled_only=True):
            r = self.rollouts.setdefault(fr.id, fr)
            _copy_rollout(r, fr)
            if any(not j.terminal and j.state != "queued" and dead(j.owner) for j in r.jobs.values()):
                self._pump(r, dead=dead)

    def _spawn_job(self, r: Rollout, job: Job, *, resume: bool = False) -> None:
        """Run a job this worker owns (one task per job; :meth:`tick` cancels it if another worker took it)."""
        key = (r.id, job.device)
        old = self._job_tasks.get(key)
        if old is not None:
            old.cancel()
        task = asyncio.ensure_future(self._run_job(r, job, resume=resume))
        self._tasks.add(task)
        self._job_tasks[key] = task

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if self._job_tasks.get(key) is t:
                del self._job_tasks[key]

        task.add_done_callback(done)

    def _mine(self, job: Job, *states: str) -> bool:
        """This worker still owns the job and it is in one of ``states``."""
        return job.owner == self.worker_id and job.state in states

    def _event(self, r: Rollout, job: Job, event: str, *, message: str = "", error: str = "", owned: bool = False,
               **fields: Any) -> None:  # fmt: skip
        """Move a job (one transaction on its row; a move another worker already made is not made twice).

        ``owned``: the move comes from this worker's own work on the job (a transfer, a commit), and is
        made only while this worker owns the job (one that took it over after this one was thought
        dead decides now). The worker that moves a job into ``committing`` owns it from then on: it
        makes the commit."""
        before = job.state
        d = self.devices.get(job.device)
        with self.db.locked_job(r.id, job.device) as fresh:
            if fresh is None:
                return
            before = fresh.state
            if owned and fresh.owner != self.worker_id:
                log.warning("rollout %s: %s not moved (%s): worker %s owns it now", r.id, job.device, event,
                            fresh.owner)  # fmt: skip
            elif fresh.can(event):
                for k, v in fields.items():
                    setattr(fresh, k, v)
                fresh.fire(event)
                if fresh.state == "committing" and before != "committing":
                    fresh.owner = self.worker_id  # it makes the commit (a dead committer's job is taken over)
                mqtt_dev = d is not None and d.source == "mqtt"
                if fresh.state == "rebooting" and before != "rebooting":
                    fresh.applied_boots = d.boots if d is not None and mqtt_dev else -1
                elif fresh.state == "committing" and fresh.applied_boots < 0 and d is not None and mqtt_dev:
                    # Running the new version from boot d.boots on: only a later boot on the old one is a
                    # rollback (another worker may still be working through older status messages).
                    fresh.applied_boots = d.boots - 1
                if message:
                    fresh.message = message
                if error:
                    fresh.error = error
                    fresh.message = error
                if fresh.terminal and fresh.state != before:
                    fresh.result_version = d.version if d else ""
        _copy_job(job, fresh)
        self._bump()
        if job.state != before:
            log.info("rollout %s: %s %s -> %s %s", r.id, job.device, before, job.state, error or message)
            if job.state == "committing":
                self._committing(r, job)
            if job.terminal and (r.state != "running" or any(j.state == "queued" for j in r.jobs.values())
                                 or all(j.terminal for j in r.jobs.values())):  # fmt: skip
                self._pump_soon(r)  # (otherwise nothing can start: the tick settles the rest)

    def _note(self, r: Rollout, job: Job, **fields: Any) -> None:
        """Change a job's fields (a message, progress) without moving it."""
        with self.db.locked_job(r.id, job.device) as fresh:
            if fresh is not None and fresh.state == job.state:
                for k, v in fields.items():
                    setattr(fresh, k, v)
        if fresh is not None:
            _copy_job(job, fresh)
        self._bump()

    def bundle_url(self, r: Rollout) -> str:
        """Where devices download the rollout's bundle (unique per rollout, so shadow sees a new URL)."""
        return f"{self.public_url}/fw/{r.bundle}.zip?rollout={r.id}"

    async def _run_job(self, r: Rollout, job: Job, *, resume: bool = False) -> None:
        """Drive a job this worker owns: start it, or (``resume``) go on with one taken over from a
        dead worker, from whatever state it is in."""
        try:
            d = self.devices.get(job.device)
            if d is None:
                raise FleetError(f"unknown device {job.device!r}")
            if resume:
                if job.state in ("sending", "updating") and r.method in ("push", "url"):
                    await self._resume_transfer(r, job, d)
                elif job.state == "committing" and r.autocommit and r.method != "shadow":
                    await self._commit(r, job, d)  # the cached "committed" may be stale: ask (-1: already is)
                elif job.state == "committing":
                    self._committing(r, job)
            elif r.method == "push":
                await self._push(r, job, d)
            elif r.method == "url":
                await self._ota_update(r, job, d)
            elif r.method == "shadow":
                await self._shadow(r, job, d)
            # poll: served by /update when the device asks
            if d.source == "url" and r.method in ("push", "url"):
                await self._watch_url_device(r, job, d)
        except asyncio.CancelledError:
            raise
        except (OSError, MgrpcError, FleetError) as e:
            self._event(r, job, "error", error=str(e) or type(e).__name__, owned=True)
        except Exception as e:
            log.exception("rollout %s: job %s failed", r.id, job.device)
            self._event(r, job, "error", error=f"internal error: {e}", owned=True)

    def _runs_target(self, r: Rollout, d: DeviceRecord) -> bool:
        """The device runs the rollout's bundle: the same build id where both are known, else the same version."""
        info = self.db.bundle(r.bundle)
        if info is not None and info.build_id and d.build_id:
            return d.build_id == info.build_id
        return bool(d.version) and d.version == r.version

    async def _where(self, d: DeviceRecord) -> tuple[dict[str, Any], dict[str, Any]]:
        """The device's ``OTA.Status`` and ``Sys.GetInfo``."""
        client = await self._client(d)
        try:
            st = await client.call("OTA.Status", timeout_s=10)
            info = await client.call("Sys.GetInfo", timeout_s=10)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if not isinstance(st, dict) or not isinstance(info, dict):
            raise FleetError(f"device {d.id}: OTA.Status/Sys.GetInfo did not answer objects")
        return st, info

    async def _resume_transfer(self, r: Rollout, job: Job, d: DeviceRecord) -> None:
        """A push or OTA.Update a dead worker was making: ask the device where it stands, then

        * it runs the bundle already (rebooted into it): no second transfer, only the commit (or
          nothing, if committed);
        * ``OTA.End`` went through (state 3, rebooting): the job is ``applied``;
        * push, mid-transfer (state 1): the writes go on from the device's ``bytes_written``
          (:func:`rpc.host.ota.ota_update` resumes an update of the same size); idle or failed: from the start;
        * OTA.Update, downloading (state 1): the device's reports (or this loop) see the end; idle or
          failed: OTA.Update is sent again.

        An MQTT device that is offline (rebooting) is waited for; a device that stays silent for the
        send timeout fails the job with the reason."""
        deadline = time.monotonic() + self.send_timeout_s
        last: BaseException | None = None
        written = -1
        while self._mine(job, "sending", "updating"):
            why = f"no answer: {last}" if last else "offline"
            if time.monotonic() > deadline:
                raise FleetError(f"taken over after its worker stopped, but the device stayed silent ({why})")
            if (d.source == "mqtt" and not d.online) or last is not None:
                # this loop bounds the wait (the tick's send timeout would fail the job with less to say)
                self._note(r, job, message=f"taken over; waiting for the device ({why})", changed_at=time.time())
                await asyncio.sleep(min(1.0, self.send_timeout_s / 4))
                if d.source == "mqtt" and not d.online:
                    continue
            try:
                st, info = await self._where(d)
            except (OSError, MgrpcError) as e:
                last = e
                continue
            last = None
            d.version = str(info.get("fw_version") or d.version)
            d.build_id = str(info.get("fw_id") or d.build_id)
            d.committed = bool(st.get("is_committed", d.committed))
            if not self._mine(job, "sending", "updating"):
                return  # the device's own reports moved it meanwhile
            if self._runs_target(r, d):
                self._touch(d)
                self._event(r, job, "online_new", message="already running the new version", owned=True)
                if d.committed:
                    self._event(r, job, "committed", message="committed", owned=True)
                return
            state = st.get("state")
            if state == 3:
                self._event(r, job, "applied", message="applied, rebooting", owned=True)
                return
            if r.method == "push":
                await self._push(r, job, d, resume=state == 1)
                return
            if state != 1:
                await self._ota_update(r, job, d)
                return
            # OTA.Update, the device downloading by itself: wait while it gets on (its reports or this loop see the end)
            done = st.get("bytes_written")
            if isinstance(done, int) and done > written:
                written = done
                deadline = time.monotonic() + self.send_timeout_s
                self._note(r, job, message="taken over; the device is downloading the bundle", changed_at=time.time())
            await asyncio.sleep(1.0)

    async def _watch_url_device(self, r: Rollout, job: Job, d: DeviceRecord) -> None:
        """A device without MQTT reports nothing: ask it until the job has a result."""
        while job.state in ("rebooting", "committing"):
            await asyncio.sleep(0.3)
            if job.state == "committing" and d.version == r.version:
                continue  # the commit call is on its way
            with contextlib.suppress(FleetError):
                await self.add_device_url(d.url)

    async def _client(self, d: DeviceRecord) -> Any:
        if self.rpc_connect is None:
            raise FleetError("this dashboard cannot open RPC connections")
        return await self.rpc_connect(self.device_url(d))

    async def _push(self, r: Rollout, job: Job, d: DeviceRecord, *, resume: bool = False) -> None:
        """OTA.Begin/Write/End; ``resume``: go on with the update in progress on the device (a taken-over
        transfer: same size, continued at the device's ``bytes_written``) instead of refusing it."""
        data = self.bundle_data(r.bundle)
        client = await self._client(d)

        def progress(done: int, total: int) -> None:
            self._progress(r, job, done, total, "writing")

        try:
            res = await ota_update(client, data, chunk_size=PUSH_CHUNK, window=PUSH_WINDOW, resume=resume,
                                   commit_timeout_s=r.commit_timeout_s, on_progress=progress)  # fmt: skip
            client = res.client
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if res.resumed_from:
            log.warning("rollout %s: %s: the push resumed at byte %d of %d", r.id, d.id, res.resumed_from, len(data))
        self._event(r, job, "applied", message="applied, rebooting", done_bytes=len(data), total_bytes=len(data),
                    owned=True)  # fmt: skip

    async def _ota_update(self, r: Rollout, job: Job, d: DeviceRecord) -> None:
        client = await self._client(d)
        try:
            await client.call("OTA.Update", {"url": self.bundle_url(r), "commit_timeout": r.commit_timeout_s},
                              timeout_s=self.send_timeout_s)  # fmt: skip
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        self._event(r, job, "applied", message="applied, rebooting", owned=True)

    async def _shadow(self, r: Rollout, job: Job, d: DeviceRecord) -> None:
        assert self.mqtt is not None
        desired = {"ota": {"url": self.bundle_url(r), "commit_timeout": r.commit_timeout_s,
                           "autocommit": r.autocommit}}  # fmt: skip
        if self.shadow_service is not None:
            # straight into the shadow (no request that a dying worker could swallow); the device gets the delta
            await self.shadow_service.update_desired(d.id, desired)
        else:
            body = json.dumps({"state": {"desired": desired}, "clientToken": f"fleet-{r.id}"})
            await self.mqtt.publish(ShadowTopics(d.id).update, body, qos=1)
        self._desired_set[d.id] = time.time()
        if not d.online:
            self._note(r, job, message="desired.ota.url set; waiting for the device to come online")

    def _device_online(self, d: DeviceRecord) -> None:
        found = self._active_job(d.id)
        if found is None:
            return
        r, job = found
        if d.version == r.version:
            if d.committed and job.state != "done":
                self._event(r, job, "online_new", message="running the new version")
                self._event(r, job, "committed", message="committed")
            else:
                self._event(r, job, "online_new", message="running the new version (uncommitted)")
        elif job.state in ("rebooting", "committing", "done") and not d.reboot_pending and (
            job.applied_boots < 0 or d.boots > job.applied_boots  # a new boot, not an old message
        ):
            if d.reverted and d.reason:
                why = d.reason
            elif job.state == "rebooting":
                why = f"{r.version} never came online within the commit timeout ({r.commit_timeout_s} s)"
            else:
                why = f"{r.version} was not committed within the commit timeout ({r.commit_timeout_s} s)"
            self._event(r, job, "online_old", error=f"rolled back to {d.version}: {why}")

    def _committing(self, r: Rollout, job: Job) -> None:
        d = self.devices[job.device]
        if d.committed:
            self._event(r, job, "committed", message="committed")
        elif not r.autocommit:
            self._event(r, job, "uncommitted_ok", message="running uncommitted (no auto-commit)")
        elif r.method != "shadow":
            self._spawn(self._commit(r, job, d))
        # shadow + autocommit: the device commits itself after its first shadow connection

    async def _commit(self, r: Rollout, job: Job, d: DeviceRecord) -> None:
        try:
            client = await self._client(d)
            try:
                await client.call("OTA.Commit", timeout_s=20)
            except RemoteError as e:
                if e.code != -1:  # -1: already committed
                    raise
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
        except (OSError, MgrpcError, FleetError) as e:
            self._event(r, job, "error", error=f"commit failed: {e}", owned=True)
            return
        d.committed = True
        self._touch(d)
        self._event(r, job, "committed", message="committed", owned=True)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.tick()
            except Exception:
                log.exception("fleet tick failed")

    def tick(self, now: float | None = None) -> None:
        """Called every second: say this worker is alive, adopt other workers' rollouts and the jobs
        of dead workers, fail jobs that waited too long, start what may start."""
        t = time.time() if now is None else now
        self.db.heartbeat(self.worker_id)
        self._take_over()
        for (rid, dev_id), task in list(self._job_tasks.items()):
            cached = self.rollouts.get(rid)
            job_now = cached.jobs.get(dev_id) if cached else None
            if job_now is not None and job_now.owner and job_now.owner != self.worker_id:
                # this worker was thought dead (silent too long) and another took the job: it decides now
                log.warning("rollout %s: %s is worker %s's now: this worker stops driving it", rid, dev_id,
                            job_now.owner)  # fmt: skip
                task.cancel()
        for d in self.db.devices(since=self._devices_seen - 2.0):  # found by another worker
            if d.id not in self.devices:
                self.devices[d.id] = d
                self._bump()
        self._devices_seen = t
        change = self.db.last_change()
        if change > self._last_change:
            self._last_change = change
            self._bump()
        for r in list(self.rollouts.values()):
            if r.state == "finished" or (r.settled and r.state != "running"):
                continue
            for job in list(r.jobs.values()):
                limit: float | None = None
                if (job.state in ("sending", "updating") and r.method in ("push", "url")) or job.state == "updating":
                    limit = self.send_timeout_s
                elif job.state in ("rebooting", "committing"):
                    limit = r.commit_timeout_s + self.reboot_grace_s
                if limit is not None and t - job.changed_at > limit:
                    self._event(r, job, "timeout", error=f"no result within {limit:g} s ({job.state})")
                elif (r.method == "shadow" and job.state == "sending" and job.owner == self.worker_id
                      and t - job.changed_at > self._resend_after(job.device)):  # fmt: skip
                    # The device may have missed the delta (it was reconnecting); saying it again
                    # is harmless (the device acts once per URL).
                    dev = self.devices.get(job.device)
                    if dev is not None and dev.online:
                        self._note(r, job, changed_at=t)
                        self._spawn(self._shadow(r, job, dev))
            if r.state == "running" and not _slots_full(r):
                self._pump(r)

    def _resend_after(self, dev_id: str) -> float:
        """Seconds a shadow job may wait for its device to begin before desired.ota is said again:
        SHADOW_RESEND_S, or SHADOW_ASKED_RESEND_S once the device has asked for its shadow since it
        was set (the answer carries it: the device is only slow, and a resend would add to the load)."""
        asked = self._shadow_asked.get(dev_id, 0.0) > self._desired_set.get(dev_id, float("inf"))
        return SHADOW_ASKED_RESEND_S if asked else SHADOW_RESEND_S

    # -- HTTP ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything the page shows."""
        rollouts = sorted(self.rollouts.values(), key=lambda r: r.created_at)[-10:]
        return {
            "devices": [d.to_json() for d in sorted(self.devices.values(), key=lambda d: d.id)],
            "bundles": [b.to_json() for b in self.db.bundles()],
            "rollouts": [r.to_json() for r in reversed(rollouts)],
            "broker": self.broker_url, "changes": self.changes, "worker": self.worker_id,
        }  # fmt: skip

    def web_app(self) -> web.Application:
        """The aiohttp application (routes in the module docstring)."""
        app = web.Application(client_max_size=MAX_UPLOAD, middlewares=[self._guard_mw])
        app.router.add_get("/", self._h_index)
        app.router.add_static("/static/", STATIC_DIR)
        app.router.add_get("/api/state", self._h_state)
        app.router.add_post("/api/devices", self._h_add_device)
        app.router.add_post("/api/devices/refresh", self._h_refresh)
        app.router.add_post("/api/bundles", self._h_upload)
        app.router.add_post("/api/rollouts", self._h_rollout)
        app.router.add_post("/api/rollouts/{id}/{action}", self._h_control)
        app.router.add_get("/api/events", self._h_events)
        app.router.add_get("/fw/{sha}.zip", self._h_fw)
        app.router.add_get("/update", self._h_poll)
        return app

    @web.middleware
    async def _guard_mw(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:  # fmt: skip
        own = frozenset({self.public_url} if self.public_url else set())
        dec = self.guard.check(request.method, request.path, request.headers, request.cookies, request.query,
                               own_origins=own)  # fmt: skip
        if not dec.ok:
            headers = {"WWW-Authenticate": 'Basic realm="mgrpc-dashboard", charset="UTF-8"'} if dec.challenge else {}
            return web.json_response({"error": dec.reason}, status=dec.status, headers=headers)
        request[_SESSION] = dec.set_cookie or (request.cookies.get(COOKIE, "") if self.guard.required else "")
        resp = await handler(request)
        if dec.set_cookie:
            resp.headers.add("Set-Cookie", self.guard.cookie_header(dec.set_cookie))
        return resp

    async def _h_index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def _h_state(self, request: web.Request) -> web.Response:
        return web.json_response({**self.state(), "csrf": self.guard.csrf_token(request.get(_SESSION, ""))})

    @staticmethod
    def _bad(message: str, status: int = 400) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            obj = await request.json()
        except ValueError:
            raise FleetError("the request body is not JSON") from None
        if not isinstance(obj, dict):
            raise FleetError("a JSON object is expected")
        return obj

    async def _h_add_device(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
            d = await self.add_device_url(str(body.get("url", "")))
        except FleetError as e:
            return self._bad(str(e))
        return web.json_response(d.to_json())

    async def _h_refresh(self, request: web.Request) -> web.Response:
        await self.refresh_url_devices()
        return web.json_response({"ok": True})

    async def _h_upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return self._bad("upload the fw.zip as multipart/form-data")
        reader = await request.multipart()
        async for part in reader:
            filename = getattr(part, "filename", None)
            if filename and isinstance(part, BodyPartReader):
                data = await part.read()
                try:
                    info = self.db.add_bundle(bytes(data), filename=str(filename))
                except FleetError as e:
                    return self._bad(str(e))
                self._bump()
                log.info("bundle %s uploaded: %s %s for %s", info.sha[:12], info.name, info.version, info.arch)
                return web.json_response(info.to_json())
        return self._bad("no file in the upload")

    async def _h_rollout(self, request: web.Request) -> web.Response:
        try:
            b = await self._json(request)
            devices = b.get("devices")
            if not isinstance(devices, list) or not all(isinstance(x, str) for x in devices):
                raise FleetError("devices must be a list of device ids")
            r = self.start_rollout(
                devices=devices, bundle=str(b.get("bundle", "")), method=str(b.get("method", "")),
                commit_timeout_s=_int(b, "commit_timeout", 300), autocommit=bool(b.get("autocommit", True)),
                stage_size=_int(b, "stage_size", 0), max_failures=_int(b, "max_failures", -1),
                concurrency=_int(b, "concurrency", 0),
            )  # fmt: skip
        except FleetError as e:
            return self._bad(str(e))
        return web.json_response(r.to_json())

    async def _h_control(self, request: web.Request) -> web.Response:
        try:
            r = self.control(request.match_info["id"], request.match_info["action"])
        except FleetError as e:
            return self._bad(str(e), 404 if "unknown rollout" in str(e) else 409)
        return web.json_response(r.to_json())

    async def _h_events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``event: state`` with everything the page shows, after each change
        (at most every ``EVENT_MIN_GAP_S``), and a comment every ``EVENT_KEEPALIVE_S`` to keep proxies open."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})  # fmt: skip
        await resp.prepare(request)
        ev = asyncio.Event()
        ev.set()  # the current state at once
        self._listeners.add(ev)
        csrf = self.guard.csrf_token(request.get(_SESSION, ""))
        try:
            while True:
                try:
                    await asyncio.wait_for(ev.wait(), EVENT_KEEPALIVE_S)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                ev.clear()
                data = json.dumps({**self.state(), "csrf": csrf, "sent_at": time.time()}, separators=(",", ":"))
                await resp.write(f"event: state\ndata: {data}\n\n".encode())
                await asyncio.sleep(EVENT_MIN_GAP_S)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._listeners.discard(ev)
        return resp

    async def _h_fw(self, request: web.Request) -> web.Response:
        sha = request.match_info["sha"]
        try:
            data = self.bundle_data(sha)
        except (FleetError, OSError):
            return web.Response(status=404, text="no such bundle\r\n")
        return web.Response(body=data, content_type="application/zip")

    async def _h_poll(self, request: web.Request) -> web.Response:
        dev_id = (request.headers.get("X-MGOS-Device-ID") or "").split(" ", 1)[0]
        found = self._active_job(dev_id) if dev_id else None
        if found is None or found[0].method != "poll" or found[1].state not in ("sending", "updating"):
            return web.Response(status=304)
        r, job = found
        self._note(r, job, message="device polled; downloading")
        return web.Response(body=self.bundle_data(r.bundle), content_type="application/zip")


def _slots_full(r: Rollout) -> bool:
    """As far as this worker knows, ``concurrency`` jobs are under way and others wait: no pump can
    start one (a job that ends pumps; the tick skips the transaction)."""
    if r.concurrency <= 0:
        return False
    active = queued = 0
    for j in r.jobs.values():
        if j.state == "queued":
            queued += 1
        elif not j.terminal:
            active += 1
    return queued > 0 and active >= r.concurrency


def _shared(topic_filter: str, group: str) -> str:
    return f"$share/{group}/{topic_filter}" if group else topic_filter


def _copy_job(dst: Job, src: Job) -> None:
    """Refresh a cached job in place (callers hold references to it); transfer progress newer than
    the stored one (saved only now and then) is kept."""
    if dst is src:
        return
    if dst.state == src.state == "updating" and dst.changed_at > src.changed_at:
        done, total, changed = dst.done_bytes, dst.total_bytes, dst.changed_at
        dst.__dict__.update(src.__dict__)
        dst.done_bytes, dst.total_bytes, dst.changed_at = done, total, changed
    else:
        dst.__dict__.update(src.__dict__)


def _copy_rollout(dst: Rollout, src: Rollout | None) -> None:
    """Refresh a cached rollout and its jobs in place."""
    if src is None or dst is src:
        return
    dst.state = src.state
    for dev_id, job in src.jobs.items():
        if dev_id in dst.jobs:
            _copy_job(dst.jobs[dev_id], job)
        else:
            dst.jobs[dev_id] = job


def _apply_reported(d: DeviceRecord, reported: dict[str, Any]) -> None:
    """Identity from a shadow's reported state: ours (``fw``) or Mongoose OS ota-shadow's (``ota``)."""
    fw = reported.get("fw")
    if isinstance(fw, dict):
        for key, attr in (("version", "version"), ("arch", "arch"), ("build_id", "build_id"), ("app", "app")):
            if isinstance(fw.get(key), str) and fw[key]:
                setattr(d, attr, fw[key])
    ota = reported.get("ota")
    if isinstance(ota, dict):
        for key, attr in (("fw_version", "version"), ("fw_id", "build_id"), ("app", "app"), ("arch", "arch")):
            if isinstance(ota.get(key), str) and ota[key]:
                setattr(d, attr, ota[key])


def _int(obj: dict[str, Any], key: str, default: int) -> int:
    v = obj.get(key, default)
    if v in (None, ""):
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise FleetError(f"{key} must be an integer") from None
