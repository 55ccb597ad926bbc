"""Device shadow (AWS IoT style) over MQTT: the document model, the topics, and the device side
(presence, OTA progress reports and the ota-shadow logic, spec/ota.md §5).

Topics (``<id>`` = ``device.id``; the service in :mod:`mgrpc.shadow_server` answers them):

==========================================  ======================================================
``$aws/things/<id>/shadow/update``           publish ``{"state": {"desired"|"reported": {...}},
                                             "clientToken"?, "version"?}``; ``null`` deletes a key
``$aws/things/<id>/shadow/update/accepted``  ``{"state": <the update>, "version", "timestamp",
                                             "clientToken"?}``
``$aws/things/<id>/shadow/update/rejected``  ``{"code": 400|409, "message", "clientToken"?}``
``$aws/things/<id>/shadow/update/delta``     ``{"state": <desired keys that differ from reported>,
                                             "version", "timestamp"}`` after an update of desired
``$aws/things/<id>/shadow/update/documents`` ``{"previous", "current", "timestamp"}``
``$aws/things/<id>/shadow/get``              empty payload (or ``{"clientToken"}``)
``$aws/things/<id>/shadow/get/accepted``     ``{"state": {"desired", "reported", "delta"?},
                                             "version", "timestamp"}``
``$aws/things/<id>/shadow/get/rejected``     ``{"code": 404, "message": "No shadow exists ..."}``
``$aws/things/<id>/shadow/delete``           deletes the document (``/delete/accepted|rejected``)
==========================================  ======================================================

Fleet topics of our design (the dashboard, :mod:`mgrpc.fleet`, subscribes to them):

* ``<id>/status`` (retained, QoS 1): ``{"online": true|false, "id", "arch", "app", "version",
  "build_id", "committed", "slot", "reverted", "reason"}``, published when a boot's MQTT session
  starts, after a commit, and (``online: false``) when the stack stops. The connection the composition
  root injects (``mgrpc dashboard``'s simulated devices) sets ``{"online": false, "id"}`` as its
  retained last will, so a killed device process shows offline too.
* ``<id>/ota/progress`` (QoS 0): ``{"state": "idle|progress|error|success", "done", "total",
  "percent", "message", "source"}`` from :attr:`services.ota.OtaService.on_progress`, whatever
  started the update (OTA.Begin/Write, OTA.Update, POST /update, polling, shadow); at most every
  2 % or on a state change.

ota-shadow (:class:`DeviceAgent`): on a ``desired.ota.url`` different from the one saved in
``ota_shadow.json`` on the device FS, the device saves it, reports ``reported.ota.code = 0``
``message = "starting update"``, downloads it (commit timeout ``desired.ota.commit_timeout``, else
``update.commit_timeout``, else 300 s), reports progress, ``code = 1`` ``Update applied,
finalizing`` and reboots. After the reboot the first successful shadow round trip (``get`` answered)
commits the firmware when autocommit is on (``desired.ota.autocommit``, else ``shadow.autocommit``)
and reports ``code = 1`` ``Committing FW update. OTA update finished.`` and ``reported.ota.url``
(which clears the delta). A failed update reports ``code < 0`` and leaves the delta uncleared; a
device that comes back on its old firmware after a rollback reports ``code = -1``
``Rolled back: <reason>``. The saved URL is not retried.

Layering: the MQTT connection is injected (anything with the methods of :class:`MqttLike`, e.g.
``transports.mqttconn.MqttConnection``); this module never imports :mod:`transports`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rpc.node import Node
from services.errors import ServiceError
from services.ota import OtaService, OtaState
from services.ota_http import fetch_update

__all__ = [
    "PROGRESS_TOPIC",
    "STATUS_TOPIC",
    "DeviceAgent",
    "MqttLike",
    "ShadowDocument",
    "ShadowError",
    "ShadowTopics",
    "delta_of",
    "merge_state",
    "parse_shadow_topic",
]

log = logging.getLogger("mgrpc.services.shadow")

STATUS_TOPIC = "{id}/status"
PROGRESS_TOPIC = "{id}/ota/progress"
STATE_FILE = "ota_shadow.json"
DEFAULT_COMMIT_TIMEOUT_S = 300  # ota-shadow's default: 5 min, then the device rolls back


class ShadowError(ServiceError, ValueError):
    """A shadow request that cannot be applied (``code`` is the rejection code: 400, 404, 409)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


class MqttLike(Protocol):
    """What the shadow code needs from an MQTT connection (``transports.mqttconn.MqttConnection`` has it)."""

    async def subscribe(self, topic_filter: str, callback: Any = None, *, qos: int | None = None,
                        timeout_s: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK; ``callback(msg)`` gets ``msg.topic``/``msg.payload``."""

    def publish_nowait(self, topic: str, payload: bytes | str, *, qos: int | None = None,
                       retain: bool = False) -> asyncio.Future[None]:
        """Queue a message; the future completes at the PUBACK."""

    async def close(self) -> None:
        """Disconnect."""


@dataclass(frozen=True, slots=True)
class ShadowTopics:
    """The shadow topics of one thing."""

    thing: str

    @property
    def prefix(self) -> str:
        """``$aws/things/<thing>/shadow``."""
        return f"$aws/things/{self.thing}/shadow"

    def __getattr__(self, name: str) -> str:
        # update, update_accepted, update_delta, get_rejected, ... -> the topic with '/' for '_'
        if name.startswith("_"):
            raise AttributeError(name)
        return f"$aws/things/{self.thing}/shadow/" + name.replace("_", "/")


SHADOW_OPS = frozenset({
    "update", "get", "delete", "update/accepted", "update/rejected", "update/delta", "update/documents",
    "get/accepted", "get/rejected", "delete/accepted", "delete/rejected",
})  # fmt: skip


def parse_shadow_topic(topic: str) -> tuple[str, str] | None:
    """``("<thing>", "<op>")`` for a shadow topic (op e.g. ``update``, ``get/accepted``), else None."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "shadow" or not parts[2]:
        return None
    op = "/".join(parts[4:])
    return (parts[2], op) if op in SHADOW_OPS else None


def merge_state(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in recursively; a ``None`` value deletes the key."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_state(out[k], v)
        elif isinstance(v, dict):
            out[k] = merge_state({}, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def delta_of(desired: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    """The desired keys whose values differ from the reported ones (recursively, AWS semantics)."""
    out: dict[str, Any] = {}
    for k, v in desired.items():
        r = reported.get(k)
        if isinstance(v, dict) and isinstance(r, dict):
            sub = delta_of(v, r)
            if sub:
                out[k] = sub
        elif v != r:
            out[k] = copy.deepcopy(v)
    return out


@dataclass
class ShadowDocument:
    """One thing's shadow: desired and reported state, a version counting updates, a timestamp."""

    desired: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    timestamp: int = 0

    @property
    def delta(self) -> dict[str, Any]:
        """Desired keys that differ from reported."""
        return delta_of(self.desired, self.reported)

    def apply(self, request: Any, *, now: int | None = None) -> dict[str, Any]:
        """Apply an ``update`` request (parsed JSON); returns the ``update/accepted`` payload.

        Raises :class:`ShadowError` 400 for a malformed request, 409 for a version conflict; the
        document is unchanged then.
        """
        if not isinstance(request, dict) or not isinstance(request.get("state"), dict):
            raise ShadowError(400, "Missing required node: state")
        state = request["state"]
        unknown = set(state) - {"desired", "reported"}
        if unknown:
            raise ShadowError(400, f"State contains an invalid node: {sorted(unknown)[0]}")
        for part in ("desired", "reported"):
            if part in state and state[part] is not None and not isinstance(state[part], dict):
                raise ShadowError(400, f"Invalid {part}: an object or null is expected")
        if "version" in request:
            v = request["version"]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ShadowError(400, "Invalid version")
            if v != self.version:
                raise ShadowError(409, "Version conflict")
        for part in ("desired", "reported"):
            if part in state:
                upd = state[part]
                setattr(self, part, {} if upd is None else merge_state(getattr(self, part), upd))
        self.version += 1
        self.timestamp = int(time.time()) if now is None else now
        out: dict[str, Any] = {"state": state, "version": self.version, "timestamp": self.timestamp}
        if "clientToken" in request:
            out["clientToken"] = request["clientToken"]
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``get/accepted`` payload."""
        state: dict[str, Any] = {"desired": self.desired, "reported": self.reported}
        d = self.delta
        if d:
            state["delta"] = d
        return {"state": state, "version": self.version, "timestamp": self.timestamp}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShadowDocument:
        """Inverse of :meth:`to_json` (as stored by the shadow service)."""
        st = obj.get("state") or {}
        return cls(desired=dict(st.get("desired") or {}), reported=dict(st.get("reported") or {}),
                   version=int(obj.get("version", 0)), timestamp=int(obj.get("timestamp", 0)))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the device side


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class DeviceAgent:
    """Fleet side of one virtual device across its boots: presence, progress, ota-shadow.

    ``dev`` is a :class:`services.device.VirtualDevice`. Use :meth:`listen` as (or inside) the
    device's ``listen_fn``: for the URL ``agent_url`` it opens a connection with ``connect(url)``,
    lets ``serve_rpc(conn, node)`` (optional) serve RPC on it, and runs a session; the returned
    listener ends the session (``online: false``) when the device's stack stops. Other URLs go to
    ``base_listen``. ``autocommit`` overrides the ``shadow.autocommit`` config; ``client_url`` is the
    URL a client uses to reach the device (the status message's ``url``).
    """

    def __init__(
        self,
        dev: Any,
        *,
        agent_url: str,
        connect: Callable[[str], Awaitable[Any]],
        serve_rpc: Callable[[Any, Node], Awaitable[Any]] | None = None,
        base_listen: Callable[[str, Node], Awaitable[Any]] | None = None,
        autocommit: bool | None = None,
        shadow_ota: bool = True,
        client_url: str = "",
    ) -> None:
        self.dev = dev
        self.client_url = client_url or agent_url
        self.agent_url = agent_url
        self.connect = connect
        self.serve_rpc = serve_rpc
        self.base_listen = base_listen
        self.autocommit = autocommit
        self.shadow_ota = shadow_ota
        self.sessions = 0
        self.session: _Session | None = None

    async def listen(self, url: str, node: Node) -> Any:
        """A ``listen_fn``: the agent URL starts a session, others go to ``base_listen``."""
        if url != self.agent_url:
            if self.base_listen is None:
                raise ValueError(f"no listener for {url!r}")
            return await self.base_listen(url, node)
        session = _Session(self, node)
        self.sessions += 1
        self.session = session
        try:
            await session.connect()
        except (OSError, TimeoutError) as e:
            # A device boots without its broker and keeps trying, as a real one does.
            log.warning("%s: MQTT not reachable (%s); retrying in the background", self.dev.id, e)
            session.retry()
        except Exception:
            log.warning("%s: MQTT session failed to start; retrying in the background", self.dev.id, exc_info=True)
            session.retry()
        return session


@dataclass
class _SavedState:
    url: str = ""
    phase: str = ""  # "", "downloading", "applied", "done", "failed", "rolled_back"
    autocommit: bool | None = None
    from_slot: int = -1  # the slot that applied the update: booting it again means a rollback
    desired: dict[str, Any] = field(default_factory=dict)  # the desired.ota acted on (reported back on success)


class _Session:
    """One boot's MQTT session of a :class:`DeviceAgent` (also the listener the device closes)."""

    def __init__(self, agent: DeviceAgent, node: Node) -> None:
        self.agent = agent
        self.dev = agent.dev
        self.conn: Any = None
        self.node = node
        self.rpc: Any = None
        self._retry_task: asyncio.Task[None] | None = None
        self._get_task: asyncio.Task[None] | None = None
        self.fw = self.dev.fw
        self.ota: OtaService | None = self.dev.ota
        self.id = self.dev.id
        self.url = agent.agent_url
        self.client_url = agent.client_url  # what a client passes as --port to reach this device
        self.topics = ShadowTopics(self.id)
        self.shadow_ok = False
        self._last_pct = -100
        self._last_state = -1
        self._last_committed: bool | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._rolled_back = False

    # -- connecting --------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect, serve RPC on the connection, start the session (raises if the broker is away)."""
        conn = await self.agent.connect(self.url)
        try:
            if self.agent.serve_rpc is not None:
                self.rpc = await self.agent.serve_rpc(conn, self.node)
            self.conn = conn
            await self.start()
        except BaseException:
            self.conn = None
            if self.rpc is not None:  # the next attempt serves RPC on its own connection
                rpc, self.rpc = self.rpc, None
                try:
                    await rpc.close()
                except Exception:
                    log.debug("closing the RPC channel failed", exc_info=True)
            await conn.close()
            raise

    def retry(self, *, min_delay_s: float = 0.5, max_delay_s: float = 8.0) -> None:
        """Keep trying :meth:`connect` until it works or the stack stops, as a device does: whatever
        the failure, the next attempt comes after a random time between half and all of a delay
        that doubles from ``min_delay_s`` up to ``max_delay_s`` (jitter: a fleet rebooted or cut off
        together does not hit its broker all in the same instant)."""

        async def loop() -> None:
            delay = min_delay_s
            n = 0
            while not self._closed:
                await asyncio.sleep(random.uniform(delay / 2, delay))
                n += 1
                try:
                    await self.connect()
                    log.info("%s: MQTT session started at attempt %d", self.id, n + 1)
                    return
                except (OSError, TimeoutError) as e:
                    log.debug("%s: MQTT connect failed: %s", self.id, e)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._closed or (task is not None and task.cancelling()):
                        raise
                    # a cancellation from inside the attempt, not of this loop: try again
                    log.warning("%s: MQTT session start was cancelled; retrying", self.id)
                except Exception:
                    # whatever it was, a device keeps trying to reach its broker
                    log.warning("%s: MQTT session failed to start; retrying", self.id, exc_info=True)
                delay = min(max_delay_s, delay * 2)

        self._retry_task = asyncio.ensure_future(loop())

    # -- state file --------------------------------------------------------------------------
    def _load(self) -> _SavedState:
        try:
            obj = json.loads(self.fw.fs.read(STATE_FILE))
            desired = obj.get("desired")
            return _SavedState(str(obj.get("url", "")), str(obj.get("phase", "")), obj.get("autocommit"),
                               int(obj.get("from_slot", -1)), desired if isinstance(desired, dict) else {})
        except (OSError, ValueError, AttributeError):
            return _SavedState()

    def _save(self, st: _SavedState) -> None:
        try:
            self.fw.fs.write(STATE_FILE, _dumps({"url": st.url, "phase": st.phase, "autocommit": st.autocommit,
                                                  "from_slot": st.from_slot, "desired": st.desired}))
        except OSError as e:
            log.warning("%s: cannot save %s: %s", self.id, STATE_FILE, e)

    # -- publishing --------------------------------------------------------------------------
    def _publish(self, topic: str, obj: Any, *, qos: int = 1, retain: bool = False) -> asyncio.Future[None] | None:
        if self._closed or self.conn is None:
            return None
        try:
            return self.conn.publish_nowait(topic, _dumps(obj), qos=qos, retain=retain)
        except Exception as e:  # a lost connection must not break the firmware
            log.debug("%s: publish to %s failed: %s", self.id, topic, e)
            return None

    def status(self, *, online: bool = True) -> dict[str, Any]:
        """The ``<id>/status`` object of this boot."""
        info = self.dev.boot_info
        st = self.dev.storage
        return {
            "online": online, "id": self.id, "arch": self.fw.arch, "app": self.fw.app,
            "version": self.fw.version, "build_id": self.fw.build_id,
            "committed": bool(st.is_committed) if st is not None else True,
            "slot": info.slot if info else 0, "reverted": self._rolled_back or bool(info and info.reverted),
            "reason": info.reason if info else "", "boots": self.dev.boots, "url": self.client_url,
        }  # fmt: skip

    def publish_status(self, *, online: bool = True) -> asyncio.Future[None] | None:
        """Publish the retained presence/identity message."""
        s = self.status(online=online)
        self._last_committed = s["committed"]
        return self._publish(STATUS_TOPIC.format(id=self.id), s, retain=True)

    def report(self, reported: dict[str, Any]) -> asyncio.Future[None] | None:
        """Publish a ``reported`` update to the shadow."""
        return self._publish(self.topics.update, {"state": {"reported": reported}})

    def _report_ota(self, code: int, message: str, **extra: Any) -> asyncio.Future[None] | None:
        return self.report({"ota": {"code": code, "message": message, **extra}})

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe the shadow replies, announce presence, ask for the shadow."""
        t = self.topics
        if self.agent.shadow_ota:
            await asyncio.gather(
                self.conn.subscribe(t.get_accepted, self._on_get, qos=1),
                self.conn.subscribe(t.get_rejected, self._on_get, qos=1),
                self.conn.subscribe(t.update_delta, self._on_delta, qos=1),
            )
        if self.ota is not None:
            self.ota.on_progress.append(self._on_progress)
        saved = self._load()
        info = self.dev.boot_info
        reported: dict[str, Any] = {"fw": {"version": self.fw.version, "arch": self.fw.arch,
                                           "build_id": self.fw.build_id}}  # fmt: skip
        if saved.phase == "applied" and info is not None and info.slot == saved.from_slot:
            saved.phase = "rolled_back"
            self._save(saved)
            self._rolled_back = True
            reported["ota"] = {"code": -1, "message": f"Rolled back: {info.reason or 'update not committed'}"}
            self._progress_msg("rolled_back", 0, None, reported["ota"]["message"])
        self.publish_status()
        self.report(reported)
        # The previous boot's last will or its late "offline" (another connection, so no ordering
        # with this one) may land after this birth message: say online again when that happens.
        await self.conn.subscribe(STATUS_TOPIC.format(id=self.id), self._on_own_status, qos=1)
        if hasattr(self.conn, "on_state"):
            # A restarted broker may have lost the retained birth message: say it again on every reconnect.
            self.conn.on_state(self._on_conn_state)
        if self.agent.shadow_ota:
            self._get_task = asyncio.ensure_future(self._get_until_answered())

    def _on_own_status(self, msg: Any) -> None:
        if self._closed:
            return
        try:
            st = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(st, dict) and st.get("online") is False:
            self.publish_status()

    def _on_conn_state(self, up: bool) -> None:
        if up and not self._closed:
            self.publish_status()

    async def _get_until_answered(self, *, every_s: float = 3.0) -> None:
        # The shadow service may not be subscribed yet (it reconnects to a restarted broker too),
        # so the request is repeated until one is answered; that answer is the "first successful
        # shadow connection".
        n = 0
        while not self.shadow_ok and not self._closed:
            n += 1
            self._publish(self.topics.get, {"clientToken": f"{self.id}-{self.dev.boots}-{n}"})
            await asyncio.sleep(every_s)

    async def close(self) -> None:
        """The stack stops: say offline, stop the download, disconnect."""
        if self._closed:
            return
        for task in (self._retry_task, self._get_task):
            if task is not None:
                task.cancel()
        if self.ota is not None and self._on_progress in self.ota.on_progress:
            self.ota.on_progress.remove(self._on_progress)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        fut = self.publish_status(online=False)
        self._closed = True
        if fut is not None:
            try:
                await asyncio.wait_for(asyncio.shield(fut), 2.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                pass
        if self.rpc is not None:
            try:
                await self.rpc.close()
            except Exception:
                log.debug("closing the RPC channel failed", exc_info=True)
        if self.conn is not None:
            await self.conn.close()

    # -- progress ----------------------------------------------------------------------------
    def _progress_msg(self, state: str, done: int, total: int | None, message: str, **extra: Any) -> None:
        pct = int(done * 100 / total) if total else (100 if state == "success" else 0)
        self._publish(PROGRESS_TOPIC.format(id=self.id), {
            "state": state, "done": done, "total": total, "percent": pct, "message": message,
            "version": self.fw.version, **extra,
        }, qos=0)  # fmt: skip

    def _on_progress(self, done: int, total: int | None, state: int, message: str) -> None:
        pct = int(done * 100 / total) if total else 0
        if state != self._last_state or abs(pct - self._last_pct) >= 2 or (total and done >= total):
            self._last_state, self._last_pct = state, pct
            u = self.ota.update if self.ota is not None else None
            self._progress_msg(OtaState.NAMES.get(state, str(state)), done, total, message,
                               source=u.source if u else "")  # fmt: skip
        st = self.dev.storage
        # After finish() the boot config already names the new, uncommitted slot: that is no news
        # about the running firmware, so no status until the reboot.
        if (st is not None and self._last_committed is not None and not st.reboot_pending
                and bool(st.is_committed) != self._last_committed):
            self.publish_status()

    # -- ota-shadow --------------------------------------------------------------------------
    def _on_get(self, msg: Any) -> None:
        first = not self.shadow_ok
        self.shadow_ok = True
        try:
            obj = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            obj = {}
        if first:
            self._first_connection()
        if msg.topic.endswith("/accepted"):
            desired = ((obj.get("state") or {}).get("desired") or {}) if isinstance(obj, dict) else {}
            self._consider(desired.get("ota") if isinstance(desired, dict) else None)

    def _on_delta(self, msg: Any) -> None:
        try:
            obj = json.loads(msg.payload)
        except ValueError:
            return
        ota = (obj.get("state") or {}).get("ota") if isinstance(obj, dict) else None
        if isinstance(ota, dict):
            # A delta carries only the keys that changed; act on the whole desired.ota instead.
            self._publish(self.topics.get, {"clientToken": f"{self.id}-delta-{obj.get('version', '')}"})

    def _autocommit(self, saved: _SavedState) -> bool:
        if saved.autocommit is not None:
            return bool(saved.autocommit)
        if self.agent.autocommit is not None:
            return self.agent.autocommit
        try:
            return bool(self.fw.config.get("shadow.autocommit"))
        except Exception:
            return False

    def _first_connection(self) -> None:
        """The first successful shadow round trip after boot: commit when autocommit is on."""
        st = self.dev.storage
        saved = self._load()
        if st is None or st.is_committed or not self._autocommit(saved):
            if saved.phase == "applied" and st is not None and st.is_committed:
                saved.phase = "done"
                self._save(saved)
                self.report({"ota": {**saved.desired, "url": saved.url, "code": 1, "message": "OTA update finished."}})
            return
        if st.commit():
            log.info("%s: Committing FW update. OTA update finished.", self.id)
            saved.phase = "done"
            self._save(saved)
            self.report({"ota": {**saved.desired, "url": saved.url, "code": 1,
                                 "message": "Committing FW update. OTA update finished."},
                         "fw": {"version": self.fw.version, "arch": self.fw.arch, "build_id": self.fw.build_id}})
            self.publish_status()
            self._progress_msg("committed", 0, None, "committed")

    def _consider(self, ota: Any) -> None:
        if not isinstance(ota, dict):
            return
        url = ota.get("url")
        if not isinstance(url, str) or not url or (self.fw.config is not None and not self._ota_enabled()):
            return
        saved = self._load()
        if url == saved.url or (self._task is not None and not self._task.done()):
            return
        ct = ota.get("commit_timeout")
        ac = ota.get("autocommit")
        self._task = asyncio.ensure_future(self._update(
            url, int(ct) if isinstance(ct, int) and not isinstance(ct, bool) else None,
            ac if isinstance(ac, bool) else None, dict(ota),
        ))  # fmt: skip

    def _ota_enabled(self) -> bool:
        try:
            return bool(self.fw.config.get("shadow.ota_enable"))
        except Exception:
            return True

    async def _update(
        self, url: str, commit_timeout_s: int | None, autocommit: bool | None, desired: dict[str, Any]
    ) -> None:
        svc = self.ota
        if svc is None:
            return
        if commit_timeout_s is None:
            try:
                commit_timeout_s = int(self.fw.config.get("update.commit_timeout")) or DEFAULT_COMMIT_TIMEOUT_S
            except Exception:
                commit_timeout_s = DEFAULT_COMMIT_TIMEOUT_S
        saved = _SavedState(url, "downloading", autocommit, desired=desired)
        self._save(saved)
        log.info("%s: shadow OTA from %s", self.id, url)
        self._report_ota(0, "starting update")
        try:
            u = svc.begin(size=None, commit_timeout_s=commit_timeout_s, timeout_s=None, source="shadow")
        except Exception as e:
            saved.phase = "failed"
            self._save(saved)
            self._report_ota(-1, getattr(e, "message", None) or str(e))
            return
        try:
            code, message = await fetch_update(svc, u, url, finalize=False)
        except Exception as e:  # the stack stopped under us, or an updater bug: report, never crash
            log.warning("%s: shadow OTA failed: %s", self.id, e)
            code, message = -5, "Update failed"
        if code == 0:
            saved.phase = "applied"
            saved.from_slot = self.dev.storage.running_slot if self.dev.storage is not None else -1
            self._save(saved)  # before finish(): the new slot's FS merge copies this file
            fut = self._report_ota(1, "Update applied, finalizing")
            if fut is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), 2.0)
                except asyncio.CancelledError:
                    # The stack stops (its reboot aborts the update): not "applied", or the next boot,
                    # back on this slot, would report a rollback.
                    saved.phase = "failed"
                    self._save(saved)
                    raise
                except (TimeoutError, Exception):
                    pass
            if u.ctx.result < 0 or svc.update is not u:
                # Aborted while the report went out (watchdog, stack stopping): nothing was switched,
                # and finish() would act on whatever update runs now.
                saved.phase = "failed"
                self._save(saved)
                self._report_ota(-5, f"-5 {u.ctx.status_message}")
                return
            res = svc.finish()
            if res < 0:
                saved.phase = "failed"
                self._save(saved)
                self._report_ota(res, f"{res} {svc.msg}")
            return
        saved.phase = "done" if code > 0 else "failed"
        self._save(saved)
        if code > 0:
            self.report({"ota": {**desired, "url": url, "code": 1, "message": message}})
        else:
            self._report_ota(code, f"{code} {message}")
