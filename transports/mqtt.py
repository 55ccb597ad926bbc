"""``mqtt://`` and ``mqtts://``: mgRPC over an MQTT broker (spec/transports.md §4), with paho-mqtt 2.x.

URL: ``mqtt://[user[:pass]@]broker[:port]/<device_id>`` (default ports 1883, and 8883 for
``mqtts://``). Options (``?name=value``):

``client_id``   MQTT client id. Client side default ``mos-<random int31>`` (as mos); device side
                default: the device id (as a Mongoose OS device).
``qos``         QoS of publishes and subscriptions, 0/1/2 (default 1, as ``rpc.mqtt.qos``).
``id``          device side only: the device id to serve (default: the URL path, else ``node.id``).
``ca``          ``mqtts://``: CA certificate file (PEM) to verify the broker with. Without it the
                broker is verified against the system's CA certificates (unlike mos, which then
                verifies nothing: a man in the middle could read the credentials and take over).
``insecure``    ``mqtts://``: ``1`` skips the verification of the broker's certificate (mos's
                behaviour without ``--ca-cert-file``; only for test brokers).
``cert``, ``key``  ``mqtts://``: client certificate and key files (PEM).
``keepalive``   MQTT keep-alive in seconds (default 60).

**Client side** (:func:`open_client`, exactly as mos ``codec/mqtt.go``): for every outgoing frame
an empty ``dst`` becomes the URL's device id, ``src`` becomes ``<dst>/rpc-resp/<client id>``, the
channel subscribes once per ``dst`` (QoS 1) to ``<dst>/rpc-resp/<client id>/rpc`` and publishes
(QoS 1, not retained) to ``<dst>/rpc`` the frame as Go's ``json.Marshal`` writes it (mos member
order, HTML escaping of ``<>&`` on, no newline). Replies arrive with ``dst`` = that ``src``; the
client node accepts them (a mos-style node ignores a response's ``dst``). ``rpc-resp`` is chosen so
the reply topic never matches the device's own ``<id>/rpc/#`` wildcard.

**Device side** (:func:`listen`, as rpc-mqtt): subscribes ``<id>/rpc`` and ``<id>/rpc/#``; the
channel is open when both SUBACKs have arrived (``listen`` returns then). A message on exactly
``<id>/rpc`` is a full frame; on ``<id>/rpc/<Method>`` the frame's ``method`` is replaced by the
topic suffix (an empty payload there counts as ``{}`` — *[inferred]*, handy with
``mosquitto_pub -n``). A request with ``method`` and ``id`` but no ``src`` is dropped ("Drop frame
without src"). Replies are published to ``<dst>/rpc`` (``dst`` = the request's ``src``), QoS 1, not
retained; a frame without ``dst`` cannot be sent ("Cannot reply to RPC over MQTT, no dst"). The
channel is persistent, the node's default route ``*``, not broadcast-enabled, type ``MQTT``, info
``""``. A broker may deliver a request twice (once per matching subscription, spec errata); the
channel drops a request seen with the same ``src``, ``id`` and payload within a few seconds, so it
is answered once (a digest-auth retry re-uses the id but carries ``auth``, so it differs).

Both sides reconnect by themselves when the broker goes away, and resubscribe: the channels run on
:class:`transports.mqttconn.MqttConnection`, the general asyncio MQTT connection (also used by the
shadow agent and the fleet dashboard). :func:`log_subscribe` follows a device's ``<id>/log`` topic
as ``mos console --port mqtt://...`` does.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import OrderedDict
from collections.abc import Callable

from rpc.channel import Channel, FrameCodec, JsonCodec
from rpc.errors import ChannelClosed, FrameError, TransportError, UsageError
from rpc.frame import Frame
from rpc.node import Node
from transports.mqttconn import DEFAULT_PORTS, EXTRA, OPTIONS, SCHEMES, BrokerConfig, MqttConnection, MqttMessage
from transports.registry import TransportURL, parse_url

__all__ = [
    "DEFAULT_PORTS",
    "EXTRA",
    "JSONRPC_ENVELOPE",
    "OPTIONS",
    "SCHEMES",
    "MqttClientChannel",
    "MqttDeviceChannel",
    "MqttListener",
    "client_url",
    "listen",
    "log_subscribe",
    "mos_client_id",
    "open_client",
]

log = logging.getLogger("mgrpc.mqtt")

# With ?dialect=jsonrpc a request keeps mgRPC's src/dst: the device replies on <src>/rpc
# (docs/protocol/jsonrpc.md §1, §12).
JSONRPC_ENVELOPE = True


def mos_client_id() -> str:
    """A client id as mos makes one: ``mos-`` and a random non-negative int31 (Go ``rand.Int31``)."""
    return f"mos-{random.randrange(1 << 31)}"


def _check_topic_level(name: str, what: str) -> None:
    # A device id ends up inside topic names and filters, where these characters have meaning.
    if not name or any(c in name for c in "+#\0"):
        raise UsageError(f"invalid {what} {name!r} for MQTT topics (must be non-empty, without '+', '#')")


def _codec_from(url: TransportURL, codec: FrameCodec | None, *, html_escape: bool) -> FrameCodec:
    if codec is not None:
        return codec
    name = url.option("codec", "json") or "json"
    if name != "json":
        raise UsageError(f"codec {name!r} is not available on mqtt://; valid: json")
    return JsonCodec(html_escape=html_escape)


# ---------------------------------------------------------------------------------------------
# client side


class MqttClientChannel(Channel):
    """The host side, as mos: requests to ``<dst>/rpc``, replies on ``<dst>/rpc-resp/<client id>/rpc``."""

    type = "MQTT"
    persistent = True
    broadcast = False

    def __init__(
        self,
        conn: MqttConnection,
        device_id: str,
        *,
        codec: FrameCodec | None = None,
        qos: int = 1,
        owns_connection: bool = True,
    ) -> None:
        super().__init__(codec=codec if codec is not None else JsonCodec(html_escape=True), style="mos")
        self.conn = conn
        self.device_id = device_id
        self.qos = qos
        self._owns = owns_connection
        self._subs: dict[str, asyncio.Future[None]] = {}

    @property
    def client_id(self) -> str:
        """The MQTT client id (``mos-NNN``)."""
        return self.conn.client_id

    def info(self) -> str:
        """The broker address and device id."""
        return f"{self.conn.config.address}/{self.device_id}"

    def src_for(self, dst: str) -> str:
        """The ``src`` written into frames for ``dst``: ``<dst>/rpc-resp/<client id>``."""
        return f"{dst}/rpc-resp/{self.client_id}"

    async def _subscribe_once(self, dst: str) -> None:
        fut = self._subs.get(dst)
        if fut is None:
            fut = asyncio.ensure_future(self.conn.subscribe(f"{self.src_for(dst)}/rpc", self._on_message, qos=self.qos))
            self._subs[dst] = fut
        try:
            await asyncio.shield(fut)
        except BaseException:
            if fut.done() and self._subs.get(dst) is fut:
                del self._subs[dst]  # let the next frame try again
            raise

    def _on_message(self, msg: MqttMessage) -> None:
        self.deliver_bytes(msg.payload)

    async def send(self, frame: Frame) -> None:
        """Publish ``frame`` to ``<dst>/rpc`` with ``src``/``dst`` rewritten as mos does."""
        if self.closed or self.conn.closed:
            raise ChannelClosed("MQTT channel is closed")
        dst = frame.dst or self.device_id
        if not dst:
            raise TransportError("no device id to send to: use mqtt://broker/<device_id> or give a dst")
        try:
            _check_topic_level(dst, "dst")
        except UsageError as e:
            raise TransportError(str(e)) from None
        await self._subscribe_once(dst)
        data = self.encode(frame.replace(src=self.src_for(dst), dst=dst))
        # Not waiting for the PUBACK: the call's own timeout covers a lost request, and QoS 1
        # messages queued during an outage go out after the reconnection.
        self.conn.publish_nowait(f"{dst}/rpc", data, qos=self.qos)

    async def close(self) -> None:
        """Close the channel (and its connection if it owns it)."""
        for fut in self._subs.values():
            fut.cancel()
        self._subs.clear()
        if self._owns:
            await self.conn.close()
        self.mark_closed()


async def open_client(
    url: TransportURL,
    *,
    codec: FrameCodec | None = None,
    connect_timeout_s: float = 10.0,
    reconnect_max_s: int = 16,
) -> Channel:
    """Connect to the broker and return the client channel for the URL's device id."""
    cfg = BrokerConfig.from_url(url)
    device_id = url.path.strip("/")
    if device_id:
        _check_topic_level(device_id, "device id")
    chosen_codec = _codec_from(url, codec, html_escape=True)
    conn = MqttConnection(cfg, client_id=cfg.client_id or mos_client_id(), reconnect_max_s=reconnect_max_s)
    await conn.connect(timeout_s=connect_timeout_s)
    return MqttClientChannel(conn, device_id, codec=chosen_codec, qos=cfg.qos)


# ---------------------------------------------------------------------------------------------
# device side


class MqttDeviceChannel(Channel):
    """The device side (rpc-mqtt): requests on ``<id>/rpc`` and ``<id>/rpc/<Method>``, replies to ``<dst>/rpc``."""

    type = "MQTT"
    persistent = True
    broadcast = False

    def __init__(
        self,
        conn: MqttConnection,
        device_id: str,
        *,
        codec: FrameCodec | None = None,
        qos: int = 1,
        dedupe_window_s: float = 5.0,
        owns_connection: bool = True,
    ) -> None:
        super().__init__(codec=codec, style="device")
        self.conn = conn
        self.device_id = device_id
        self.qos = qos
        self.sub_topic = f"{device_id}/rpc"
        self.dedupe_window_s = dedupe_window_s
        self._owns = owns_connection
        self._seen: OrderedDict[tuple[str, str, bytes], float] = OrderedDict()

    def info(self) -> str:
        """``""``, as rpc-mqtt reports for ``RPC.Ping``."""
        return ""

    async def start(self) -> None:
        """Subscribe ``<id>/rpc`` and ``<id>/rpc/#``; returns when both SUBACKs arrived."""
        await asyncio.gather(
            self.conn.subscribe(self.sub_topic, self._on_message, qos=self.qos),
            self.conn.subscribe(self.sub_topic + "/#", self._on_message, qos=self.qos),
        )

    def _on_message(self, msg: MqttMessage) -> None:
        frame = self._decode(msg)
        if frame is not None:
            self.deliver(frame)

    def _decode(self, msg: MqttMessage) -> Frame | None:
        """The frame a message carries, or None when it is to be dropped (logged)."""
        topic = msg.topic
        method = ""
        if topic.startswith(self.sub_topic + "/"):
            method = topic[len(self.sub_topic) + 1 :]
        elif topic != self.sub_topic:
            return None
        try:
            if method and not msg.payload:
                frame = Frame(method=method)
            else:
                frame = self.codec.decode(msg.payload)
                if method:
                    frame = frame.replace(method=method)
        except FrameError as e:
            log.warning("MQTT: dropping bad frame on %s: %s", topic, e)
            return None
        if frame.method and frame.wants_reply and not frame.src:
            log.warning("Drop frame without src (topic %s, id %r)", topic, frame.id)
            return None
        if frame.method and frame.wants_reply and self._is_duplicate(frame, msg.payload):
            log.info("MQTT: request %r from %r delivered twice, answering once", frame.id, frame.src)
            return None
        return frame

    def _is_duplicate(self, frame: Frame, payload: bytes) -> bool:
        now = asyncio.get_running_loop().time()
        while self._seen:
            oldest_key, seen_at = next(iter(self._seen.items()))
            if now - seen_at <= self.dedupe_window_s and len(self._seen) < 4096:
                break
            del self._seen[oldest_key]
        digest = hashlib.sha256(frame.method.encode() + b"\0" + payload).digest()
        key = (frame.src, repr(frame.id), digest)
        if key in self._seen:
            return True
        self._seen[key] = now
        return False

    async def send(self, frame: Frame) -> None:
        """Publish ``frame`` to ``<frame.dst>/rpc`` (QoS ``qos``, not retained)."""
        if self.closed or self.conn.closed:
            raise ChannelClosed("MQTT channel is closed")
        if not frame.dst:
            log.warning("Cannot reply to RPC over MQTT, no dst (id %r)", frame.id)
            raise TransportError("Cannot reply to RPC over MQTT, no dst")
        try:
            _check_topic_level(frame.dst, "dst")
        except UsageError as e:
            raise TransportError(str(e)) from None
        self.conn.publish_nowait(f"{frame.dst}/rpc", self.encode(frame), qos=self.qos)

    async def close(self) -> None:
        """Close the channel (and its connection if it owns it)."""
        if self._owns:
            await self.conn.close()
        self.mark_closed()


def client_url(url: TransportURL, device_id: str) -> str:
    """The ``--port`` URL a client uses to reach device ``device_id`` served at listen URL ``url``.

    ``mqtt://[user:pass@]broker:port/<device_id>``, keeping the ``codec`` and ``ca`` options (the
    device's own ``id``, ``client_id`` and client certificate are not the client's).
    """
    from urllib.parse import quote, urlencode

    userinfo = ""
    if url.user is not None:
        userinfo = quote(url.user, safe="")
        if url.password is not None:
            userinfo += ":" + quote(url.password, safe="")
        userinfo += "@"
    host = f"[{url.host}]" if ":" in url.host else url.host
    netloc = userinfo + host + (f":{url.port}" if url.port is not None else "")
    query = {k: v for k, v in url.query.items() if k in ("codec", "ca")}
    return f"{url.scheme}://{netloc}/{device_id}" + (f"?{urlencode(query)}" if query else "")


class MqttListener:
    """A node served over MQTT: its connection, its channel and the device id.

    ``url`` is the listen URL (listening on it again serves the same device); ``client_url`` is the
    URL a client passes as ``--port`` (it names the device).
    """

    def __init__(self, url: str, node: Node, channel: MqttDeviceChannel, *, client_url: str = "") -> None:
        self.url = url
        self.node = node
        self.channel = channel
        self.conn = channel.conn
        self.device_id = channel.device_id
        self.client_url = client_url or url

    async def close(self) -> None:
        """Disconnect; the channel leaves the node."""
        await self.channel.close()


async def listen(
    url: TransportURL,
    node: Node,
    *,
    codec: FrameCodec | None = None,
    connect_timeout_s: float = 10.0,
    reconnect_max_s: int = 16,
    dedupe_window_s: float = 5.0,
) -> MqttListener:
    """Serve ``node`` as device ``?id=`` (else the URL path, else ``node.id``) through the broker.

    If that id is not yet one of the node's ids it is added, so requests addressed to it are
    accepted. Returns once both subscriptions are acknowledged.
    """
    cfg = BrokerConfig.from_url(url)
    device_id = url.option("id") or url.path.strip("/") or node.id
    if not device_id:
        raise UsageError("no device id: give the node an id, or use mqtt://broker/<id> or ?id=")
    _check_topic_level(device_id, "device id")
    if not node.is_local_id(device_id):
        node.ids.append(device_id)
    chosen_codec = _codec_from(url, codec, html_escape=False)
    conn = MqttConnection(cfg, client_id=cfg.client_id or device_id, reconnect_max_s=reconnect_max_s)
    await conn.connect(timeout_s=connect_timeout_s)
    ch = MqttDeviceChannel(conn, device_id, codec=chosen_codec, qos=cfg.qos, dedupe_window_s=dedupe_window_s)
    # Registered before subscribing, so no message can arrive while the channel has no router.
    node.add_channel(ch, default=True, address="*")
    try:
        await ch.start()
    except BaseException:
        await ch.close()
        raise
    log.info("MQTT: serving %s on %s", device_id, cfg.address)
    return MqttListener(
        url.raw or f"{url.scheme}://{cfg.address}/{device_id}", node, ch, client_url=client_url(url, device_id)
    )


# ---------------------------------------------------------------------------------------------
# console


async def log_subscribe(
    url: TransportURL | str,
    on_line: Callable[[str], object],
    *,
    timeout_s: float = 10.0,
) -> MqttConnection:
    """Follow ``<device_id>/log`` (QoS 0) as ``mos console --port mqtt://broker/<id>`` does.

    ``on_line(text)`` gets every payload decoded as UTF-8 (bad bytes replaced). Returns the
    connection; close it to stop.
    """
    u = parse_url(url) if isinstance(url, str) else url
    cfg = BrokerConfig.from_url(u)
    device_id = u.path.strip("/")
    _check_topic_level(device_id, "device id")
    conn = MqttConnection(cfg, client_id=cfg.client_id or mos_client_id())
    await conn.connect(timeout_s=timeout_s)

    def deliver(msg: MqttMessage) -> object:
        return on_line(msg.payload.decode("utf-8", "replace"))

    try:
        await conn.subscribe(f"{device_id}/log", deliver, qos=0, timeout_s=timeout_s)
    except BaseException:
        await conn.close()
        raise
    return conn
