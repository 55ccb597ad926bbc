"""A general asyncio MQTT client connection over paho-mqtt 2.x, used by the ``mqtt://`` mgRPC channels
(:mod:`transports.mqtt`), the device's shadow agent and the fleet dashboard.

:class:`MqttConnection` connects to the broker a ``mqtt://``/``mqtts://`` URL names
(:class:`BrokerConfig`; the URL options are listed in :mod:`transports.mqtt`), publishes and
subscribes with futures resolved by PUBACK/SUBACK, and reconnects by itself when the broker goes
away, renewing its subscriptions.

**Threading.** paho runs its network loop in its own thread (``loop_start``); its callbacks only
hand their arguments to the asyncio loop with ``call_soon_threadsafe``, and all state lives on the
loop's thread, except the set of subscribed filters: the network thread reads it (under a lock) to
resubscribe *inside* ``on_connect``. paho sends queued QoS 1 publishes right after ``on_connect``
returns, so this ordering guarantees a request queued during an outage never reaches the device
before its reply topic is subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rpc.errors import ChannelClosed, TransportError, UsageError
from transports.registry import TransportURL, parse_url

__all__ = [
    "DEFAULT_PORTS",
    "EXTRA",
    "OPTIONS",
    "SCHEMES",
    "BrokerConfig",
    "MessageCallback",
    "MqttConnection",
    "MqttMessage",
    "MqttTimeout",
    "StateCallback",
    "open_connection",
]

SCHEMES = ("mqtt", "mqtts")
# Every option a mqtt:// URL may carry: the broker's, plus ``id`` (the device id the mgRPC channel
# serves), so the same URL opens a device channel and a plain connection.
OPTIONS: frozenset[str] = frozenset({"client_id", "qos", "id", "ca", "cert", "key", "keepalive", "insecure"})
EXTRA = "mqtt"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

log = logging.getLogger("mgrpc.mqtt")
_paho_log = logging.getLogger("mgrpc.mqtt.paho")


def _paho() -> ModuleType:
    """``paho.mqtt.client``, imported on first use; a missing or too old paho names the extra."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError as e:
        raise TransportError(
            "the mqtt:// transport needs paho-mqtt 2.x; install it with: pip install 'mgrpc[mqtt]'"
        ) from e
    if not hasattr(mqtt, "CallbackAPIVersion"):
        raise TransportError("the mqtt:// transport needs paho-mqtt >= 2.0; upgrade with: pip install -U 'mgrpc[mqtt]'")
    return mqtt


class MqttTimeout(TransportError, TimeoutError):
    """The broker did not answer (CONNACK, SUBACK or PUBACK) in time."""


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where and how to connect: from a ``mqtt://``/``mqtts://`` URL (see the module docstring)."""

    host: str
    port: int
    tls: bool = False
    user: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False
    keepalive_s: int = 60
    client_id: str | None = None
    qos: int = 1

    @classmethod
    def from_url(cls, url: TransportURL | str) -> BrokerConfig:
        """Parse the broker part of a URL; bad values raise :class:`UsageError` naming the option."""
        u = parse_url(url) if isinstance(url, str) else url
        if u.scheme not in SCHEMES:
            raise UsageError(f"not an MQTT URL: {u.raw or u.scheme!r} (schemes: {', '.join(SCHEMES)})")
        unknown = sorted(set(u.query) - OPTIONS - {"codec", "dialect"})  # the registry handles those
        if unknown:
            valid = ", ".join(sorted(OPTIONS))
            raise UsageError(f"unknown option(s) {', '.join(unknown)} for {u.scheme}://; valid: {valid}")
        if not u.host:
            raise UsageError(f"no broker host in {u.raw!r}; use mqtt://[user[:pass]@]broker[:port]/<device_id>")
        tls = u.scheme == "mqtts"
        ca, cert, key = u.option("ca") or None, u.option("cert") or None, u.option("key") or None
        insecure_text = u.option("insecure", "0") or "0"
        if insecure_text not in ("0", "1"):
            raise UsageError(f"invalid insecure {insecure_text!r}: must be 0 or 1")
        insecure = insecure_text == "1"
        if not tls and (ca or cert or key or insecure):
            raise UsageError("the ca/cert/key/insecure options need an mqtts:// URL")
        if ca and insecure:
            raise UsageError("give either ca (verify the broker with it) or insecure=1 (verify nothing), not both")
        if key and not cert:
            raise UsageError("the key option needs a cert option too")
        qos_text = u.option("qos", "1") or "1"
        if qos_text not in ("0", "1", "2"):
            raise UsageError(f"invalid qos {qos_text!r}: must be 0, 1 or 2")
        ka_text = u.option("keepalive", "60") or "60"
        try:
            keepalive = int(ka_text)
        except ValueError:
            keepalive = -1
        if not 0 < keepalive <= 65535:
            raise UsageError(f"invalid keepalive {ka_text!r}: seconds, 1..65535")
        client_id = u.option("client_id") or None
        return cls(
            host=u.host,
            port=u.port if u.port is not None else DEFAULT_PORTS[u.scheme],
            tls=tls,
            user=u.user,
            password=u.password,
            ca=ca,
            cert=cert,
            key=key,
            insecure=insecure,
            keepalive_s=keepalive,
            client_id=client_id,
            qos=int(qos_text),
        )

    @property
    def address(self) -> str:
        """``host:port`` of the broker."""
        return f"{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``mqtts://`` (None for plain ``mqtt://``)."""
        if not self.tls:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            if self.ca:
                ctx.load_verify_locations(self.ca)
            elif self.insecure:
                # ?insecure=1: mos's behaviour without a CA file, nothing is verified.
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)  # the system's CAs
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"cannot load TLS files (ca={self.ca}, cert={self.cert}, key={self.key}): {e}") from e
        return ctx


def _nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """paho leaves Nagle on; small MQTT packets then wait for delayed ACKs (~40 ms per hop)."""
    import socket

    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (or already closed): nothing to tune


# ---------------------------------------------------------------------------------------------
# the asyncio wrapper around paho


@dataclass(frozen=True, slots=True)
class MqttMessage:
    """One received MQTT message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


MessageCallback = Callable[[MqttMessage], object]
StateCallback = Callable[[bool], object]


class MqttConnection:
    """One MQTT client connection for asyncio: connect, publish, subscribe, reconnect by itself.

    Create it with :func:`open_connection` (or construct and ``await conn.connect()``), on the event
    loop that will use it. Subscriptions are remembered and renewed after every reconnect (clean
    sessions, since a restarted broker forgets them anyway). Message callbacks run on the loop's
    thread; a message matching several subscribed filters reaches each distinct callback once.
    ``on_state`` listeners are told ``True`` when the connection is ready (connected and
    resubscribed) and ``False`` when it is lost.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        client_id: str | None = None,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 16,
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> None:
        self._mqtt = _paho()
        self.config = config
        self.will = will  # (topic, payload, qos, retain) the broker publishes if we vanish
        self.client_id = client_id or config.client_id or f"mgrpc-{random.randrange(1 << 31)}"
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connects = 0  # successful CONNACKs so far (a reconnect makes it > 1)
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Shared with paho's network thread (resubscription inside on_connect); guarded by _lock.
        self._lock = threading.Lock()
        self._filters: dict[str, int] = {}
        self._resub_mid: int | None = None
        # Loop-thread state.
        self._callbacks: dict[str, list[MessageCallback]] = {}
        self._sub_waiters: dict[int, asyncio.Future[list[bool] | None]] = {}
        self._pub_waiters: dict[int, asyncio.Future[None]] = {}
        self._ready = asyncio.Event()
        self._first: asyncio.Future[None] | None = None
        self._state_listeners: list[StateCallback] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "ready" if self.ready else "down"
        return f"<MqttConnection {self.client_id} @ {self.config.address} {state}>"

    # -- state ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Connected, and every remembered subscription renewed."""
        return self._ready.is_set()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def on_state(self, callback: StateCallback) -> None:
        """Call ``callback(True)`` when the connection becomes ready, ``callback(False)`` when lost."""
        self._state_listeners.append(callback)

    async def wait_ready(self, *, timeout_s: float = 10.0) -> None:
        """Wait until connected and resubscribed; :class:`MqttTimeout` after ``timeout_s``."""
        self._check_open()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            raise MqttTimeout(f"MQTT broker {self.config.address} not reachable within {timeout_s:g} s") from None

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(f"MQTT connection to {self.config.address} is closed")
        if self._client is None:
            raise TransportError("MqttConnection.connect() has not been called")

    # -- connecting -------------------------------------------------------------------------------
    async def connect(self, *, timeout_s: float = 10.0) -> MqttConnection:
        """Connect (TCP, TLS, CONNECT/CONNACK) and start paho's network thread.

        Raises :class:`TransportError` if the broker is unreachable or refuses us (bad
        credentials), :class:`MqttTimeout` if it does not answer within ``timeout_s``.
        """
        if self._client is not None:
            raise TransportError("already connected")
        mqtt = self._mqtt
        loop = asyncio.get_running_loop()
        self._loop = loop
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True, protocol=mqtt.MQTTv311
        )
        if self.config.user is not None:
            c.username_pw_set(self.config.user, self.config.password)
        ctx = self.config.ssl_context()
        if ctx is not None:
            c.tls_set_context(ctx)
        c.reconnect_delay_set(self.reconnect_min_s, self.reconnect_max_s)
        c.connect_timeout = timeout_s
        # paho reports an ordinary connection loss at ERROR level; our own messages say what
        # matters (lost, reconnected), so paho's go to debug.
        c.on_log = self._t_on_log
        c.on_connect = self._t_on_connect
        c.on_disconnect = self._t_on_disconnect
        c.on_subscribe = self._t_on_subscribe
        c.on_publish = self._t_on_publish
        c.on_message = self._t_on_message
        c.on_socket_open = _nodelay
        if self.will is not None:
            topic, payload, qos, retain = self.will
            c.will_set(topic, payload, qos=qos, retain=retain)
        self._client = c
        self._first = loop.create_future()
        addr = self.config.address
        try:
            # Blocking socket connect and TLS handshake: off the event loop. A failure here has a
            # precise reason (refused, TLS error) that paho's own retry loop would hide.
            await loop.run_in_executor(None, c.connect, self.config.host, self.config.port, self.config.keepalive_s)
        except (OSError, ValueError) as e:
            self._client = None
            raise TransportError(f"cannot connect to MQTT broker {addr}: {e}") from e
        c.loop_start()
        try:
            await asyncio.wait_for(asyncio.shield(self._first), timeout_s)
        except TimeoutError:
            await self.close()
            raise MqttTimeout(f"MQTT broker {addr} did not answer CONNECT within {timeout_s:g} s") from None
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Disconnect and stop the network thread; pending waits fail with :class:`ChannelClosed`."""
        if self._closed:
            return
        self._closed = True
        was_ready = self._ready.is_set()
        self._ready.clear()
        c = self._client
        if c is not None:
            c.disconnect()
            # loop_stop joins the network thread; it ends within about a second (its reconnect
            # wait polls the stop flag), so waiting for it is bounded; the thread is a daemon.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(c.loop_stop), 5.0)
        if self._first is not None and not self._first.done():
            self._first.set_exception(ChannelClosed("MQTT connection closed while connecting"))
            self._first.exception()  # retrieved here so an abandoned connect does not warn
        for sfut in self._sub_waiters.values():
            if not sfut.done():
                sfut.set_exception(ChannelClosed("MQTT connection closed"))
                sfut.exception()
        self._sub_waiters.clear()
        for pfut in self._pub_waiters.values():
            pfut.cancel()  # cancelled, not failed: fire-and-forget publishes never look at these
        self._pub_waiters.clear()
        for task in list(self._tasks):
            task.cancel()
        if was_ready:
            self._notify_state(False)

    # -- paho's network thread: hand everything to the loop ----------------------------------------
    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(fn, *args)

    def _t_on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._post(self._on_connect_refused, str(reason_code))
            return
        mid: int | None = None
        with self._lock:
            filters = list(self._filters.items())
            if filters and not flags.session_present:
                # Subscribe here, in the network thread, before paho re-sends queued publishes.
                rc, mid = client.subscribe(filters)
                if rc != self._mqtt.MQTT_ERR_SUCCESS:
                    mid = None
            self._resub_mid = mid
        self._post(self._on_connected, mid is None)

    def _t_on_log(self, client: Any, userdata: Any, level: int, buf: str) -> None:
        _paho_log.debug("%s: %s", self.client_id, buf)

    def _t_on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._post(self._on_disconnected, str(reason_code))

    def _t_on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        self._post(self._on_suback, mid, [not rc.is_failure for rc in reason_codes])

    def _t_on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._post(self._on_puback, mid)

    def _t_on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("MQTT: dropping a message whose topic is not UTF-8")
            return
        self._post(self._dispatch, MqttMessage(topic, bytes(msg.payload), int(msg.qos), bool(msg.retain)))

    # -- the loop's thread ---------------------------------------------------------------------------
    def _notify_state(self, up: bool) -> None:
        for cb in list(self._state_listeners):
            try:
                cb(up)
            except Exception:
                log.exception("MQTT state listener failed")

    def _set_ready(self) -> None:
        if self._closed or self._ready.is_set():
            return
        self._ready.set()
        self._notify_state(True)

    def _on_connected(self, ready_now: bool) -> None:
        if self._closed:
            return
        self.connects += 1
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
            log.debug("MQTT: connected to %s as %s", self.config.address, self.client_id)
        else:
            log.info("MQTT: reconnected to %s as %s", self.config.address, self.client_id)
        if ready_now:
            self._set_ready()

    def _on_connect_refused(self, reason: str) -> None:
        if self._first is not None and not self._first.done():
            err = TransportError(f"MQTT broker {self.config.address} refused the connection: {reason}")
            self._first.set_exception(err)
        elif not self._closed:
            log.warning("MQTT: broker %s refused the reconnection: %s", self.config.address, reason)

    def _on_disconnected(self, reason: str) -> None:
        was_ready = self._ready.is_set()
        self._ready.clear()
        if self._closed:
            return
        if self._first is not None and not self._first.done():
            err = TransportError(f"MQTT broker {self.config.address} closed the connection: {reason}")
            self._first.set_exception(err)
            return
        if self.connects == 0:
            return  # a refused first connection: connect() reports it
        log.warning("MQTT: connection to %s lost (%s); reconnecting", self.config.address, reason)
        # A SUBACK that never came is replaced by the resubscription done on reconnect.
        for fut in self._sub_waiters.values():
            if not fut.done():
                fut.set_result(None)
        self._sub_waiters.clear()
        if was_ready:
            self._notify_state(False)

    def _on_suback(self, mid: int, oks: list[bool]) -> None:
        fut = self._sub_waiters.pop(mid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(oks)
            return
        with self._lock:
            resub = self._resub_mid
        if mid == resub:
            if not all(oks):
                log.warning("MQTT: broker %s refused some subscriptions after reconnecting", self.config.address)
            self._set_ready()

    def _on_puback(self, mid: int) -> None:
        fut = self._pub_waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _dispatch(self, msg: MqttMessage) -> None:
        if self._closed:
            return
        topic_matches_sub = self._mqtt.topic_matches_sub
        called: list[MessageCallback] = []
        for flt, cbs in list(self._callbacks.items()):
            # A shared subscription ($share/<group>/<filter>) delivers the topics its filter matches.
            match = flt.split("/", 2)[2] if flt.startswith("$share/") and flt.count("/") >= 2 else flt
            if not topic_matches_sub(match, msg.topic):
                continue
            for cb in cbs:
                if any(cb is c or cb == c for c in called):
                    continue  # overlapping filters: once per callback
                called.append(cb)
                try:
                    res = cb(msg)
                    if inspect.isawaitable(res):
                        task = asyncio.ensure_future(res)
                        self._tasks.add(task)  # keep a reference until it finishes
                        task.add_done_callback(self._task_done)
                except Exception:
                    log.exception("MQTT message callback for %s failed", msg.topic)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("MQTT message callback failed", exc_info=task.exception())

    # -- subscribe / publish --------------------------------------------------------------------------
    async def subscribe(
        self,
        topic_filter: str,
        callback: MessageCallback | None = None,
        *,
        qos: int | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        """Subscribe ``topic_filter`` and wait for the SUBACK; ``callback(msg)`` gets each message.

        The subscription is renewed after every reconnect. While the broker is away this waits
        (up to ``timeout_s``) for the reconnection. A refused subscription raises
        :class:`TransportError`. ``callback`` may be a coroutine function.
        """
        self._check_open()
        q = self.config.qos if qos is None else qos
        if q not in (0, 1, 2):
            raise UsageError(f"invalid qos {q!r}")
        if not topic_filter:
            raise UsageError("empty topic filter")
        if callback is not None:
            self._callbacks.setdefault(topic_filter, []).append(callback)
        with self._lock:
            self._filters[topic_filter] = q
        mqtt = self._mqtt
        try:
            rc, mid = self._client.subscribe(topic_filter, q)
        except ValueError as e:
            self._forget(topic_filter, callback)
            raise UsageError(f"invalid topic filter {topic_filter!r}: {e}") from None
        if rc == mqtt.MQTT_ERR_NO_CONN:
            await self.wait_ready(timeout_s=timeout_s)  # resubscribed with the others on reconnect
            return
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._forget(topic_filter, callback)
            raise TransportError(f"cannot subscribe {topic_filter!r}: {mqtt.error_string(rc)}")
        fut: asyncio.Future[list[bool] | None] = asyncio.get_running_loop().create_future()
        self._sub_waiters[mid] = fut
        try:
            oks = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            self._sub_waiters.pop(mid, None)
            raise MqttTimeout(f"no SUBACK for {topic_filter!r} within {timeout_s:g} s") from None
        if oks is None:  # connection lost before the SUBACK
            await self.wait_ready(timeout_s=timeout_s)
        elif not all(oks):
            self._forget(topic_filter, callback)
            raise TransportError(f"MQTT broker {self.config.address} refused the subscription to {topic_filter!r}")

    def _forget(self, topic_filter: str, callback: MessageCallback | None) -> None:
        cbs = self._callbacks.get(topic_filter)
        if cbs is not None and callback is not None:
            with contextlib.suppress(ValueError):
                cbs.remove(callback)
        if not cbs:
            self._callbacks.pop(topic_filter, None)
            with self._lock:
                self._filters.pop(topic_filter, None)

    async def unsubscribe(self, topic_filter: str, callback: MessageCallback | None = None) -> None:
        """Remove ``callback`` (or every callback) of ``topic_filter``; unsubscribe when none is left."""
        self._check_open()
        if callback is None:
            self._callbacks.pop(topic_filter, None)
        self._forget(topic_filter, callback)
        with self._lock:
            still = topic_filter in self._filters
        if not still:
            self._client.unsubscribe(topic_filter)

    def publish_nowait(
        self, topic: str, payload: bytes | str, *, qos: int | None = None, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a message; the returned future completes at its PUBACK (QoS 1/2) or once written (QoS 0).

        QoS 1/2 messages queued while the broker is away are sent after the reconnection; a QoS 0
        message then raises :class:`TransportError`.
        """
        self._check_open()
        q = self.config.qos if qos is None else qos
        mqtt = self._mqtt
        try:
            info = self._client.publish(topic, payload, qos=q, retain=retain)
        except ValueError as e:
            raise UsageError(f"cannot publish to {topic!r}: {e}") from None
        if info.rc == mqtt.MQTT_ERR_NO_CONN and q == 0:
            raise TransportError(f"not connected to MQTT broker {self.config.address}")
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"cannot publish to {topic!r}: {mqtt.error_string(info.rc)}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if info.is_published():
            fut.set_result(None)
        else:
            # The PUBACK callback is posted to this loop, so it cannot run before this line.
            self._pub_waiters[info.mid] = fut
        return fut

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int | None = None,
        retain: bool = False,
        wait: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        """Publish; with ``wait`` (default) return once the broker acknowledged it (PUBACK)."""
        fut = self.publish_nowait(topic, payload, qos=qos, retain=retain)
        if not wait:
            return
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise MqttTimeout(f"no PUBACK for {topic!r} within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            if self._closed:
                raise ChannelClosed("MQTT connection closed before the PUBACK") from None
            raise

    async def __aenter__(self) -> MqttConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_connection(
    url: TransportURL | str,
    *,
    client_id: str | None = None,
    timeout_s: float = 10.0,
    reconnect_max_s: int = 16,
    will: tuple[str, bytes, int, bool] | None = None,
) -> MqttConnection:
    """Connect to the broker named by ``url`` and return the :class:`MqttConnection`.

    ``will`` = ``(topic, payload, qos, retain)``: the last will the broker publishes when this
    connection drops without a DISCONNECT (a killed process, a lost network).
    """
    cfg = BrokerConfig.from_url(url)
    conn = MqttConnection(cfg, client_id=client_id, reconnect_max_s=reconnect_max_s, will=will)
    return await conn.connect(timeout_s=timeout_s)
