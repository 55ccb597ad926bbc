"""The shadow service that runs beside the broker: answers ``$aws/things/<id>/shadow/...`` requests
(topics in :mod:`services.shadow`) and keeps every document in the fleet database (SQLite or
PostgreSQL, :mod:`mgrpc.fleet.sql`).

:class:`ShadowStore` is the sans-I/O core: ``handle(topic, payload)`` returns the messages to
publish (and persists the document); :class:`ShadowServer` wires it to an injected MQTT
connection (e.g. ``transports.mqttconn.MqttConnection``). Replies are QoS 1, not retained.
With ``share_group`` the request topics are shared subscriptions (``$share/<group>/...``): each
request reaches one of the workers of the group. (mosquitto 2.0 delivers no ``$``-topic to a shared
subscription, so the fleet's workers each subscribe every request and answer those of their
devices instead: ``accept``, see :mod:`mgrpc.fleet.app`.)
Deletion: ``$aws/things/<id>/shadow/delete`` removes the document (the next update starts it at
version 1).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.shadow import ShadowDocument, ShadowError, ShadowTopics, parse_shadow_topic

__all__ = ["ShadowServer", "ShadowStore", "shared"]

log = logging.getLogger("mgrpc.mgrpc.shadow_server")

REQUEST_FILTERS = ("$aws/things/+/shadow/update", "$aws/things/+/shadow/get", "$aws/things/+/shadow/delete")

Outgoing = list[tuple[str, bytes]]


def shared(topic_filter: str, group: str) -> str:
    """``$share/<group>/<filter>`` (an MQTT 5 shared subscription), or the filter itself without a group."""
    return f"$share/{group}/{topic_filter}" if group else topic_filter


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class ShadowStore:
    """Shadow documents in the fleet database (a SQLite path, ``":memory:"`` for tests, or a
    ``postgresql://`` URL shared by several workers); ``handle`` answers requests.

    An update is one transaction holding the document's row, so two workers answering requests for
    the same thing at once cannot lose either update.
    """

    def __init__(self, path: str | Path = ":memory:", *, clock: Callable[[], float] = time.time,
                 engine: Any = None) -> None:  # fmt: skip
        from mgrpc.fleet import sql

        self.path = str(path)
        self.clock = clock
        self._sql = sql
        self.sa = sql.sqlalchemy()
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else sql.make_engine(path)
        sql.metadata()
        self.t = sql.TABLES["shadows"]

    def close(self) -> None:
        """Close the database (unless the engine was given)."""
        if self._owns_engine:
            self.engine.dispose()

    def get(self, thing: str) -> ShadowDocument | None:
        """The stored document of ``thing``, or None."""
        with self.engine.begin() as c:
            row = c.execute(self.sa.select(self.t.c.doc).where(self.t.c.thing == thing)).first()
        return ShadowDocument.from_json(json.loads(row[0])) if row and row[0] else None

    def things(self) -> list[str]:
        """Every thing with a document."""
        with self.engine.begin() as c:
            q = self.sa.select(self.t.c.thing).where(self.t.c.doc != "").order_by(self.t.c.thing)
            return [r[0] for r in c.execute(q)]

    def _delete(self, thing: str) -> bool:
        with self.engine.begin() as c:
            cur = c.execute(self.sa.delete(self.t).where(self.t.c.thing == thing, self.t.c.doc != ""))
            return bool(cur.rowcount)

    def update(self, thing: str, request: Any) -> Outgoing:
        """Apply an update request (parsed JSON) to ``thing``; the replies to publish."""
        t = ShadowTopics(thing)
        token = request.get("clientToken") if isinstance(request, dict) else None
        with self.engine.begin() as c:
            q = self._sql.for_update(self.sa.select(self.t.c.doc).where(self.t.c.thing == thing), self.engine)
            row = c.execute(q).first()
            if row is None:  # the first update of this thing: make the row to hold (two may race here)
                c.execute(self._sql.insert_ignore(self.t, self.engine).values(thing=thing, doc=""))
                row = c.execute(q).first()
            doc = ShadowDocument.from_json(json.loads(row[0])) if row and row[0] else ShadowDocument()
            previous = doc.to_json()
            try:
                accepted = doc.apply(request, now=int(self.clock()))
            except ShadowError as e:
                rej: dict[str, Any] = {"code": e.code, "message": e.message}
                if token is not None:
                    rej["clientToken"] = token
                return [(t.update_rejected, _dumps(rej))]
            c.execute(self.sa.update(self.t).where(self.t.c.thing == thing).values(doc=json.dumps(doc.to_json())))
        out: Outgoing = [(t.update_accepted, _dumps(accepted))]
        delta = doc.delta
        if "desired" in request["state"] and delta:
            out.append((t.update_delta, _dumps({"state": delta, "version": doc.version, "timestamp": doc.timestamp})))
        out.append((t.update_documents, _dumps({"previous": previous, "current": doc.to_json(),
                                                "timestamp": doc.timestamp})))  # fmt: skip
        return out

    def handle(self, topic: str, payload: bytes) -> Outgoing:
        """Answer one request message; returns ``[(topic, payload), ...]`` to publish."""
        parsed = parse_shadow_topic(topic)
        if parsed is None or parsed[1] not in ("update", "get", "delete"):
            return []
        thing, op = parsed
        t = ShadowTopics(thing)
        request: Any = {}
        if payload.strip():
            try:
                request = json.loads(payload)
            except ValueError:
                return [(getattr(t, f"{op}_rejected"), _dumps({"code": 400, "message": "Invalid JSON"}))]
        token = request.get("clientToken") if isinstance(request, dict) else None
        extra = {"clientToken": token} if token is not None else {}
        if op == "update":
            return self.update(thing, request)
        if op == "get":
            doc = self.get(thing)
            if doc is None:
                return [(t.get_rejected, _dumps({"code": 404, "message": f"No shadow exists with name: '{thing}'",
                                                 **extra}))]  # fmt: skip
            return [(t.get_accepted, _dumps({**doc.to_json(), **extra}))]
        if self._delete(thing):
            return [(t.delete_accepted, _dumps({"version": 0, "timestamp": int(self.clock()), **extra}))]
        return [(t.delete_rejected, _dumps({"code": 404, "message": f"No shadow exists with name: '{thing}'",
                                            **extra}))]  # fmt: skip


class ShadowServer:
    """Serve a :class:`ShadowStore` through an MQTT connection (``conn`` as in :mod:`services.shadow`)."""

    def __init__(self, conn: Any, store: ShadowStore, *, owns_connection: bool = False,
                 share_group: str = "", accept: Callable[[str], bool] | None = None) -> None:  # fmt: skip
        self.conn = conn
        self.share_group = share_group
        # which things' requests this server answers (None: all); several servers split them this way
        # where the broker cannot share $-topics (the fleet's workers, :mod:`mgrpc.fleet.app`)
        self.accept = accept
        self.serving = False
        self.store = store
        self.owns_connection = owns_connection
        self.handled = 0

    async def start(self) -> ShadowServer:
        """Subscribe the request topics (returns once the broker acknowledged them)."""
        for flt in REQUEST_FILTERS:
            await self.conn.subscribe(shared(flt, self.share_group), self._on_message, qos=1)
        self.serving = True
        log.info("shadow service: serving %s", ", ".join(shared(f, self.share_group) for f in REQUEST_FILTERS))
        return self

    async def stop_serving(self) -> None:
        """Stop answering requests (another worker took over); :meth:`update_desired` still works."""
        self.serving = False
        for flt in REQUEST_FILTERS:
            try:
                await self.conn.unsubscribe(shared(flt, self.share_group), self._on_message)
            except Exception as e:
                log.debug("unsubscribing %s failed: %s", flt, e)
        log.info("shadow service: no longer serving")

    def _on_message(self, msg: Any) -> None:
        if getattr(msg, "retain", False):
            return  # a stale retained request would be replayed at every start
        if self.accept is not None:
            parsed = parse_shadow_topic(msg.topic)
            if parsed is None or not self.accept(parsed[0]):
                return  # another server's
        try:
            replies = self.store.handle(msg.topic, msg.payload)
        except Exception:
            log.exception("shadow request on %s failed", msg.topic)
            return
        self.handled += 1
        for topic, payload in replies:
            try:
                self.conn.publish_nowait(topic, payload, qos=1)
            except Exception as e:
                log.warning("shadow reply to %s not sent: %s", topic, e)

    async def update_desired(self, thing: str, desired: dict[str, Any]) -> None:
        """Set desired state directly (as an operator's ``update`` would), publishing delta and replies."""
        for topic, payload in self.store.update(thing, {"state": {"desired": desired}}):
            self.conn.publish_nowait(topic, payload, qos=1)

    async def close(self) -> None:
        """Stop (and disconnect if the connection is ours); the database is closed too."""
        if self.owns_connection:
            await self.conn.close()
        self.store.close()
