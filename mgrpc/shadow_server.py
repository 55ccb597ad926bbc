"""The shadow service that runs beside the broker: answers ``$aws/things/<id>/shadow/...`` requests
(topics in :mod:`services.shadow`) and keeps every document in SQLite.

:class:`ShadowStore` is the sans-I/O core: ``handle(topic, payload)`` returns the messages to
publish (and persists the document); :class:`ShadowServer` wires it to an injected MQTT
connection (e.g. ``transports.mqttconn.MqttConnection``). Replies are QoS 1, not retained.
Deletion: ``$aws/things/<id>/shadow/delete`` removes the document (the next update starts it at
version 1).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.shadow import ShadowDocument, ShadowError, ShadowTopics, parse_shadow_topic

__all__ = ["ShadowServer", "ShadowStore"]

log = logging.getLogger("mgrpc.mgrpc.shadow_server")

REQUEST_FILTERS = ("$aws/things/+/shadow/update", "$aws/things/+/shadow/get", "$aws/things/+/shadow/delete")

Outgoing = list[tuple[str, bytes]]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class ShadowStore:
    """Shadow documents in an SQLite file (``":memory:"`` for tests); ``handle`` answers requests."""

    def __init__(self, path: str | Path = ":memory:", *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self.clock = clock
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
        self.db.execute("CREATE TABLE IF NOT EXISTS shadows (thing TEXT PRIMARY KEY, doc TEXT NOT NULL)")
        self.db.commit()

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def get(self, thing: str) -> ShadowDocument | None:
        """The stored document of ``thing``, or None."""
        with self._lock:
            row = self.db.execute("SELECT doc FROM shadows WHERE thing = ?", (thing,)).fetchone()
        return ShadowDocument.from_json(json.loads(row[0])) if row else None

    def things(self) -> list[str]:
        """Every thing with a document."""
        with self._lock:
            return [r[0] for r in self.db.execute("SELECT thing FROM shadows ORDER BY thing")]

    def _put(self, thing: str, doc: ShadowDocument) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO shadows (thing, doc) VALUES (?, ?)",
                            (thing, json.dumps(doc.to_json())))  # fmt: skip
            self.db.commit()

    def _delete(self, thing: str) -> bool:
        with self._lock:
            cur = self.db.execute("DELETE FROM shadows WHERE thing = ?", (thing,))
            self.db.commit()
            return cur.rowcount > 0

    def update(self, thing: str, request: Any) -> Outgoing:
        """Apply an update request (parsed JSON) to ``thing``; the replies to publish."""
        t = ShadowTopics(thing)
        token = request.get("clientToken") if isinstance(request, dict) else None
        doc = self.get(thing) or ShadowDocument()
        previous = doc.to_json()
        try:
            accepted = doc.apply(request, now=int(self.clock()))
        except ShadowError as e:
            rej: dict[str, Any] = {"code": e.code, "message": e.message}
            if token is not None:
                rej["clientToken"] = token
            return [(t.update_rejected, _dumps(rej))]
        self._put(thing, doc)
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

    def __init__(self, conn: Any, store: ShadowStore, *, owns_connection: bool = False) -> None:
        self.conn = conn
        self.store = store
        self.owns_connection = owns_connection
        self.handled = 0

    async def start(self) -> ShadowServer:
        """Subscribe the request topics (returns once the broker acknowledged them)."""
        for flt in REQUEST_FILTERS:
            await self.conn.subscribe(flt, self._on_message, qos=1)
        log.info("shadow service: serving %s", ", ".join(REQUEST_FILTERS))
        return self

    def _on_message(self, msg: Any) -> None:
        if getattr(msg, "retain", False):
            return  # a stale retained request would be replayed at every start
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
