"""MQTT checks on raw topics and payloads (docs/protocol/transports.md §4), with their own broker connection."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from conformance.model import CheckSkipped, check, expect
from conformance.probe import Probe
from conformance.rawjson import show
from conformance.session import Session

MQTT = ("mqtt", "mqtts")


class _Mqtt:
    """A mos-like MQTT client: id ``mos-<n>``, subscribed to ``<dev>/rpc-resp/<id>/rpc``."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.dev = s.parsed.path.strip("/")
        if not self.dev:
            raise CheckSkipped("mqtt:// URL without a device id")
        self.client_id = f"mos-{random.randrange(1 << 31)}"
        self.src = f"{self.dev}/rpc-resp/{self.client_id}"
        self.messages: list[tuple[str, bytes]] = []
        self._changed = asyncio.Event()
        self.conn: Any = None

    async def __aenter__(self) -> _Mqtt:
        try:
            from transports.mqttconn import open_connection
        except ImportError:
            raise CheckSkipped("needs paho-mqtt (pip install 'mgrpc[mqtt]')") from None
        base = self.s.url.split("?", 1)[0]
        self.conn = await open_connection(base, client_id=self.client_id, timeout_s=self.s.options.timeout_s)
        await self.conn.subscribe(f"{self.src}/rpc", self._got, qos=1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    def _got(self, msg: Any) -> None:
        self.messages.append((msg.topic, bytes(msg.payload)))
        self._changed.set()

    async def publish(self, topic: str, doc: dict[str, Any]) -> None:
        payload = json.dumps(doc, separators=(",", ":"))
        self.s.note_sent(f"PUBLISH {topic} {payload}")
        await self.conn.publish(topic, payload, qos=1)

    def replies(self, fid: int) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in self.messages if _id_of(p) == fid]

    async def wait_reply(self, fid: int, timeout_s: float) -> tuple[str, bytes] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.replies(fid):
            left = deadline - loop.time()
            if left <= 0:
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return None
        return self.replies(fid)[0]

    async def ask(self, topic: str, doc: dict[str, Any], fid: int) -> tuple[str, bytes] | None:
        """Publish a request and return its reply; with ``--rpc-creds`` a 401 challenge is answered
        once with the same id (a duplicate of the 401 may arrive after the retry: it is skipped)."""
        await self.publish(topic, doc)
        got = await self.wait_reply(fid, self.s.options.timeout_s)
        creds = self.s.options.creds
        challenge = _challenge(got[1]) if got is not None else None
        if got is None or creds is None or challenge is None:
            return got
        from rpc.auth import make_auth

        seen = len(self.messages)
        auth = make_auth(challenge, creds)
        await self.publish(topic, {**doc, "auth": auth})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.options.timeout_s
        while loop.time() < deadline:
            later = [(t, p) for t, p in self.messages[seen:] if _id_of(p) == fid and _challenge(p) is None]
            if later:
                return later[0]
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            except TimeoutError:
                break
        return got

    async def silent(self, topic: str, doc: dict[str, Any], fid: int) -> list[tuple[str, bytes]]:
        """Publish a request that must not be answered, then a barrier; replies that came for ``fid``."""
        await self.publish(topic, doc)
        bid = Probe.new_id()
        await self.publish(f"{self.dev}/rpc", {"src": self.src, "dst": self.dev, "id": bid, "method": "RPC.Ping"})
        got = await self.wait_reply(bid, self.s.options.timeout_s)
        expect(got is not None, "no reply to the barrier request", seen="nothing", expected="a reply")
        await asyncio.sleep(self.s.options.quiet_s)
        return self.replies(fid)


def _challenge(payload: bytes) -> dict[str, Any] | None:
    """The digest challenge of a 401 reply, else None."""
    try:
        doc = json.loads(payload)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and err.get("code") == 401:
            ch = json.loads(err.get("message") or "")
            return ch if isinstance(ch, dict) else None
    except ValueError:
        return None
    return None


def _id_of(payload: bytes) -> Any:
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc.get("id") if isinstance(doc, dict) else None


@check(
    "mqtt.topics",
    section="transports.md §4, §4.5",
    title="request on <id>/rpc, reply on <src>/rpc with src/dst swapped",
    only=MQTT,
)
async def _mqtt_topics(s: Session) -> str | None:
    async with _Mqtt(s) as m:
        fid = Probe.new_id()
        await m.publish(f"{m.dev}/rpc", {"src": m.src, "dst": m.dev, "id": fid, "method": "RPC.Ping"})
        got = await m.wait_reply(fid, s.options.timeout_s)
        expect(got is not None, f"no reply on {m.src}/rpc", seen="nothing", expected=f"a reply on {m.src}/rpc")
        assert got is not None
        topic, payload = got
        doc = json.loads(payload)
        expect(topic == f"{m.src}/rpc", "reply topic must be <request src>/rpc", seen=topic, expected=f"{m.src}/rpc")
        expect(
            doc.get("dst") == m.src and doc.get("src") == m.dev,
            "reply src/dst",
            seen=show(payload),
            expected=f'"src":"{m.dev}","dst":"{m.src}"',
        )
        await asyncio.sleep(s.options.quiet_s)
        replies = m.replies(fid)
        # The device subscribes to <id>/rpc and <id>/rpc/#, which both match <id>/rpc: a broker may
        # deliver the request once per subscription (mosquitto 2 does) and a real Mongoose OS device
        # answers each delivery. More than two answers, or two different ones, is wrong.
        expect(
            len(replies) <= 2 and all(r == replies[0] for r in replies),
            "a request is answered at most once per delivery (two overlapping subscriptions), identically",
            seen=f"{len(replies)} replies: " + "; ".join(show(p) for _, p in replies[:3]),
            expected="1 reply (2 identical ones if the broker delivered the request twice)",
        )
    if len(replies) == 2:
        return "answered twice: the broker delivered the request once per matching subscription"
    return None


@check(
    "mqtt.method_topic",
    section="transports.md §4",
    title="<id>/rpc/<Method> topic sets the method",
    only=MQTT,
    needs=["RPC.Describe"],
)
async def _mqtt_method_topic(s: Session) -> str | None:
    async with _Mqtt(s) as m:
        fid = Probe.new_id()
        got = await m.ask(f"{m.dev}/rpc/RPC.Describe", {"id": fid, "src": m.src, "params": {"name": "RPC.Ping"}}, fid)
        expect(got is not None, "no reply to a request on <id>/rpc/<Method>", seen="nothing", expected="a reply")
        assert got is not None
        doc = json.loads(got[1])
        res = doc.get("result")
        expect(
            isinstance(res, dict) and res.get("name") == "RPC.Ping",
            "the topic suffix must be the method",
            seen=show(got[1]),
            expected='result {"name": "RPC.Ping", ...}',
        )
    return None


@check("mqtt.no_src_dropped", section="transports.md §4", title="request with id but no src dropped", only=MQTT)
async def _mqtt_no_src_dropped(s: Session) -> str | None:
    async with _Mqtt(s) as m:
        fid = Probe.new_id()
        got = await m.silent(f"{m.dev}/rpc", {"id": fid, "method": "RPC.Ping"}, fid)
        expect(
            not got, "a request without src must be dropped", seen=show(got[0][1]) if got else "", expected="no reply"
        )
    return None


@check(
    "mqtt.wrong_dst_dropped", section="frames.md §3; transports.md §4", title="wrong dst on <id>/rpc dropped", only=MQTT
)
async def _mqtt_wrong_dst_dropped(s: Session) -> str | None:
    async with _Mqtt(s) as m:
        fid = Probe.new_id()
        doc = {"src": m.src, "dst": "conformance-not-this-device", "id": fid, "method": "RPC.Ping"}
        got = await m.silent(f"{m.dev}/rpc", doc, fid)
        expect(
            not got,
            "a request for another dst must be dropped",
            seen=show(got[0][1]) if got else "",
            expected="no reply",
        )
    return None
