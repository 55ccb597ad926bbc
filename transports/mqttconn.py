"""A general asyncio MQTT client connection over paho-mqtt 2.x, used by the ``mqtt://`` mgRPC channels
(:mod:`transports.mqtt`), the device's shadow agent and the fleet dashboard.

:class:`MqttConnection` connects to the broker a ``mqtt://``/``mqtts://`` URL names
(:class:`BrokerConfig`; the URL options are listed in :mod:`transports.mqtt`), publishes and
subscribes with futures resolved by PUBACK/SUBACK, and reconnects by itself when the broker goes
away, renewing its subscriptions.

**No network thread.** paho is driven from the asyncio loop (its "external event loop" API): the
loop watches the socket and calls paho's ``loop_read``/``loop_write``, and ``loop_misc`` once a
second for the keep-alive. Only paho's blocking connect (TCP, TLS handshake, CONNECT queued) runs in
a worker thread, and the loop leaves paho alone meanwhile. So every paho callback runs on the loop's
thread, the socket is watched by the loop's selector (epoll: paho's own ``select()`` loop cannot
watch a descriptor above 1023, and a process with a few hundred connections has such descriptors),
and a connection costs one descriptor and no thread. Reconnecting is ours too: backoff with jitter,
a bounded wait for each CONNACK, until :meth:`MqttConnection.close`. Subscriptions are renewed
*inside* ``on_connect``: paho sends queued QoS 1 publishes right after ``on_connect`` returns, so a
request queued during an outage never reaches the device before its reply topic is subscribed again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import random
import select
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rpc.errors import ChannelClosed, TransportError, UsageError
from transports._urlopts import insecure_option
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
    "backoff_delay",
    "open_connection",
]

SCHEMES = ("mqtt", "mqtts")
# Every option a mqtt:// URL may carry: the broker's, plus ``id`` (the device id the mgRPC channel
# serves), so the same URL opens a device channel and a plain connection.
OPTIONS: frozenset[str] = frozenset({"client_id", "qos", "id", "ca", "cert", "key", "keepalive", "insecure"})
EXTRA = "mqtt"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

log = logging.getLogger("mgrpc.mqtt")
_READ_BUDGET = 256  # packets read per readiness of the socket before the loop runs other work
_EVENTS_PER_TURN = 16  # paho reports (messages, acks) handled per turn of the loop
_ROUTES_MAX = 65536  # topics whose callbacks are remembered (MqttConnection._route); then it starts afresh
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
        insecure = insecure_option(u)
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


def backoff_delay(attempt: int, min_s: float, max_s: float) -> float:
    """Seconds to wait before reconnection attempt ``attempt`` (0, 1, ...): a random time between
    half and all of ``min_s * 2**attempt``, capped at ``max_s`` (jitter: clients that lost their
    broker together do not all come back in the same instant)."""
    ceiling = min(max_s, min_s * 2 ** min(attempt, 32))
    return random.uniform(ceiling / 2, ceiling)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's exception as seen (no 'never retrieved' warning)."""
    if not fut.cancelled():
        fut.exception()


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

    Once connected, a lost connection is retried until :meth:`close`, however long the broker stays
    away: each attempt waits a random time between half and all of a delay that starts at
    ``reconnect_min_s`` and doubles up to ``reconnect_max_s`` (so a fleet that lost its broker does
    not come back all at once); an attempt whose CONNACK does not come within the ``timeout_s``
    given to :meth:`connect` is abandoned and the next one made.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        client_id: str | None = None,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 16.0,
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> None:
        self._mqtt = _paho()
        self.config = config
        self.will = will  # (topic, payload, qos, retain) the broker publishes if we vanish
        self.client_id = client_id or config.client_id or f"mgrpc-{random.randrange(1 << 31)}"
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = 10.0  # set by connect(); bounds every later attempt too
        self.connects = 0  # successful CONNACKs so far (a reconnect makes it > 1)
        self.attempts = 0  # connection attempts so far (the first one included)
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        # A connect()/reconnect() of paho running in a worker thread (TCP, TLS, CONNECT queued):
        # while it runs, the loop leaves paho alone.
        self._inflight: asyncio.Future[Any] | None = None
        self._fd: int | None = None  # the socket the loop watches (paho's), if any
        self._writing = False
        self._tick: asyncio.TimerHandle | None = None
        self._attempt_result: asyncio.Future[None] | None = None  # the CONNACK of the attempt in progress
        self._up = False  # CONNACK received, connection not yet lost
        self._reconnect_task: asyncio.Task[None] | None = None
        # Read by paho's callbacks, which run on the loop's thread; the lock is kept for the
        # resubscription snapshot taken inside on_connect.
        self._lock = threading.Lock()
        self._filters: dict[str, int] = {}
        self._resub_mid: int | None = None
        # Loop-thread state.
        self._callbacks: dict[str, list[MessageCallback]] = {}
        # topic -> the callbacks its messages go to (matching every filter for every message costs
        # more than the rest of a small message's dispatch); emptied whenever a callback comes or goes
        self._routes: dict[str, list[MessageCallback]] = {}
        self._sub_waiters: dict[int, asyncio.Future[list[bool] | None]] = {}
        self._pub_waiters: dict[int, asyncio.Future[None]] = {}
        self._ready = asyncio.Event()
        self._state_listeners: list[StateCallback] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        # paho's reports, handled on the loop a few per turn (see _post).
        self._events: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = collections.deque()
        self._events_scheduled = False
        # QoS 1/2 publishes made while paho connects in the worker thread, published when it is done.
        self._deferred: list[tuple[str, bytes | str, int, bool, asyncio.Future[None]]] = []
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
        """Connect (TCP, TLS, CONNECT/CONNACK); from then on the connection is kept up by itself.

        Raises :class:`TransportError` if the broker is unreachable or refuses us (bad
        credentials), :class:`MqttTimeout` if it does not answer within ``timeout_s``.
        """
        if self._client is not None:
            raise TransportError("already connected")
        mqtt = self._mqtt
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self.connect_timeout_s = timeout_s
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True, protocol=mqtt.MQTTv311
        )
        if self.config.user is not None:
            c.username_pw_set(self.config.user, self.config.password)
        ctx = self.config.ssl_context()
        if ctx is not None:
            c.tls_set_context(ctx)
        c.connect_timeout = timeout_s
        # paho reports an ordinary connection loss at ERROR level; our own messages say what
        # matters (lost, reconnected), so paho's go to debug.
        c.on_log = self._t_on_log
        c.on_connect = self._t_on_connect
        c.on_disconnect = self._t_on_disconnect
        c.on_subscribe = self._t_on_subscribe
        c.on_publish = self._t_on_publish
        c.on_message = self._t_on_message
        c.on_socket_open = self._t_on_socket_open
        c.on_socket_close = self._t_on_socket_close
        c.on_socket_register_write = self._t_on_socket_register_write
        c.on_socket_unregister_write = self._t_on_socket_unregister_write
        if self.will is not None:
            topic, payload, qos, retain = self.will
            c.will_set(topic, payload, qos=qos, retain=retain)
        self._client = c
        self._tick = loop.call_later(1.0, self._on_tick)
        addr = self.config.address
        try:
            await self._attempt(first=True)
        except MqttTimeout:
            await self.close()
            raise MqttTimeout(f"MQTT broker {addr} did not answer CONNECT within {timeout_s:g} s") from None
        except TransportError:
            await self.close()
            raise
        except (OSError, ValueError) as e:
            # A failure with a precise reason (refused, TLS error): reported, nothing kept.
            await self.close()
            raise TransportError(f"cannot connect to MQTT broker {addr}: {e}") from e
        except BaseException:
            await self.close()
            raise
        return self

    async def _attempt(self, *, first: bool) -> None:
        """One connection attempt: paho's blocking connect (TCP, TLS, CONNECT queued) in a worker
        thread, then the socket watched by the loop until the CONNACK (or its refusal, or the
        timeout: :class:`MqttTimeout`)."""
        c, loop = self._client, self._loop
        assert c is not None and loop is not None
        self.attempts += 1
        self._unwatch()  # paho closes the old socket in the worker thread
        result: asyncio.Future[None] = loop.create_future()
        result.add_done_callback(_retrieve)
        self._attempt_result = result
        if first:
            cfg = self.config
            call = loop.run_in_executor(None, c.connect, cfg.host, cfg.port, cfg.keepalive_s)
        else:
            call = loop.run_in_executor(None, c.reconnect)
        self._inflight = call
        call.add_done_callback(self._on_connect_call_done)
        await asyncio.shield(call)
        if self._closed:
            raise ChannelClosed("MQTT connection closed while connecting")
        self._watch()
        try:
            await asyncio.wait_for(asyncio.shield(result), self.connect_timeout_s)
        except TimeoutError:
            raise MqttTimeout(
                f"MQTT broker {self.config.address} did not answer CONNECT within {self.connect_timeout_s:g} s"
            ) from None

    def _on_connect_call_done(self, call: asyncio.Future[Any]) -> None:
        # Runs on the loop before the attempt resumes: paho is the loop's again.
        self._inflight = None
        if not call.cancelled():
            call.exception()  # an abandoned attempt's error is not worth a warning
        if self._closed:
            self._drop_socket()
        else:
            self._flush_deferred()

    def _reconnect_soon(self) -> None:
        if self._closed or (self._reconnect_task is not None and not self._reconnect_task.done()):
            return
        self._reconnect_task = asyncio.ensure_future(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        n = 0
        while not self._closed and not self._up:
            await asyncio.sleep(backoff_delay(n, self.reconnect_min_s, self.reconnect_max_s))
            n += 1
            if self._closed or self._up:
                return  # closed, or a late CONNACK of the previous attempt arrived meanwhile
            try:
                await self._attempt(first=False)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # whatever the reason, the broker is tried again
                log.debug("MQTT: reconnection %d to %s failed: %s", n, self.config.address, e)

    async def close(self) -> None:
        """Disconnect and stop; pending waits fail with :class:`ChannelClosed`."""
        if self._closed:
            return
        self._closed = True
        was_ready = self._ready.is_set()
        self._ready.clear()
        if self._tick is not None:
            self._tick.cancel()
        task = self._reconnect_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        c = self._client
        if c is not None and self._inflight is None:
            # A clean DISCONNECT (the broker then keeps the last will to itself), written at once,
            # with a bounded wait if the socket's buffer is full; paho closes the socket after it.
            c.disconnect()
            for _ in range(20):
                if c.socket() is None or not c.want_write():
                    break
                c.loop_write()
                if c.socket() is None or not c.want_write():
                    break
                await asyncio.sleep(0.05)
            self._drop_socket()
        # else: the worker thread's connect is still running; its end closes the socket.
        result = self._attempt_result
        if result is not None and not result.done():
            result.set_exception(ChannelClosed("MQTT connection closed while connecting"))
        for sfut in self._sub_waiters.values():
            if not sfut.done():
                sfut.set_exception(ChannelClosed("MQTT connection closed"))
                sfut.exception()
        self._sub_waiters.clear()
        for pfut in [*self._pub_waiters.values(), *(d[-1] for d in self._deferred)]:
            pfut.cancel()  # cancelled, not failed: fire-and-forget publishes never look at these
        self._pub_waiters.clear()
        self._deferred.clear()
        for t in list(self._tasks):
            t.cancel()
        if was_ready:
            self._notify_state(False)

    # -- the socket, watched by the event loop (epoll: no limit on descriptor numbers) ---------------
    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _watch(self) -> None:
        """Watch paho's current socket: reads always, writes while paho has something to send."""
        c, loop = self._client, self._loop
        if c is None or loop is None or self._closed:
            return
        sock = c.socket()
        if sock is None:
            return
        self._unwatch()
        fd = sock.fileno()
        loop.add_reader(fd, self._on_readable)
        self._fd = fd
        if c.want_write():
            self._want_write(True)

    def _unwatch(self) -> None:
        fd, loop = self._fd, self._loop
        if fd is None or loop is None:
            return
        self._fd = None
        self._writing = False
        if not loop.is_closed():
            loop.remove_reader(fd)
            loop.remove_writer(fd)

    def _want_write(self, on: bool) -> None:
        fd, loop = self._fd, self._loop
        if fd is None or loop is None or on == self._writing:
            return
        self._writing = on
        if on:
            loop.add_writer(fd, self._on_writable)
        else:
            loop.remove_writer(fd)

    def _drop_socket(self) -> None:
        """Stop watching and close whatever socket paho still has (after :meth:`close`)."""
        self._unwatch()
        c = self._client
        sock = c.socket() if c is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _on_readable(self) -> None:
        # Everything the socket holds (up to a budget, so other work gets its turn), with each
        # PUBACK written at once: a subscriber that reads one packet per turn of a busy loop lets
        # the broker's queue for it fill up, and the broker then drops messages (mosquitto keeps
        # 1000 per client by default).
        c = self._client
        if c is None or self._inflight is not None:
            return
        for _ in range(_READ_BUDGET):
            if c.loop_read() != 0:
                return  # the connection is gone (paho said so through on_disconnect)
            if c.want_write():
                c.loop_write()
            if not self._more_to_read():
                return

    def _more_to_read(self) -> bool:
        c = self._client
        sock = c.socket() if c is not None else None
        if sock is None or self._fd is None:
            return False
        pending = getattr(sock, "pending", None)  # TLS: records already decrypted wait in the SSL object
        if pending is not None and pending() > 0:
            return True
        if not hasattr(select, "poll"):  # Windows (its select() takes socket handles of any value)
            return bool(select.select([self._fd], [], [], 0)[0])
        poller = select.poll()  # (not select(): no limit on the descriptor's number)
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(0))

    def _on_writable(self) -> None:
        c = self._client
        if c is None or self._inflight is not None:
            return
        c.loop_write()  # paho then says (un)register_write

    def _on_tick(self) -> None:
        """Keep-alive (PINGREQ, and a broker that stopped answering), once a second."""
        if self._closed or self._loop is None:
            return
        c = self._client
        if c is not None and self._inflight is None and c.socket() is not None:
            c.loop_misc()
        self._tick = self._loop.call_later(1.0, self._on_tick)

    # -- paho's callbacks: on the loop's thread (from loop_read/loop_write/loop_misc), except the
    # socket ones during a connect in the worker thread, which the end of the attempt makes up for.
    def _t_on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        _nodelay(client, userdata, sock)
        if self._on_loop_thread() and self._inflight is None:
            self._watch()  # paho reconnected by itself (a protocol downgrade inside CONNACK handling)

    def _t_on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            self._unwatch()

    def _t_on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            self._want_write(True)

    def _t_on_socket_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            self._want_write(False)

    def _post(self, fn: Callable[..., object], *args: Any) -> None:
        # Handled outside paho's packet processing (listeners may publish, subscribe or close), in
        # the order paho reported them, a few per turn of the loop: between two batches the loop
        # reads the socket again, so slow message callbacks (a database write each) never keep the
        # socket unread while the broker's queue for us fills up and overflows.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if not self._on_loop_thread():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(self._post, fn, *args)
            return
        self._events.append((fn, args))
        if not self._events_scheduled:
            self._events_scheduled = True
            loop.call_soon(self._run_events)

    def _run_events(self) -> None:
        events = self._events
        for _ in range(_EVENTS_PER_TURN):
            if not events:
                break
            fn, args = events.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("MQTT: handling %s failed", getattr(fn, "__name__", fn))
        loop = self._loop
        if events and loop is not None and not loop.is_closed():
            loop.call_soon(self._run_events)  # the rest on the next turn, after the socket was read
        else:
            self._events_scheduled = False

    def _t_on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._post(self._on_connect_refused, str(reason_code))
            return
        mid: int | None = None
        with self._lock:
            filters = list(self._filters.items())
            if filters and not flags.session_present:
                # Subscribe here, before paho re-sends queued publishes (right after this returns):
                # a request queued during an outage never reaches the device before its reply
                # topic is subscribed again.
                rc, mid = client.subscribe(filters)
                if rc != self._mqtt.MQTT_ERR_SUCCESS:
                    mid = None
            self._resub_mid = mid
        self._post(self._on_connected, mid is None)

    def _t_on_log(self, client: Any, userdata: Any, level: int, buf: str) -> None:
        _paho_log.debug("%s: %s", self.client_id, buf)

    def _t_on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._on_loop_thread():
            self._ready.clear()  # at once: a subscribe() from now on waits for the resubscription
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
        if self._closed or self._ready.is_set() or not self._up:
            return
        self._ready.set()
        self._notify_state(True)

    def _on_connected(self, ready_now: bool) -> None:
        if self._closed:
            return
        self._up = True
        self.connects += 1
        result = self._attempt_result
        if result is not None and not result.done():
            result.set_result(None)
        if self.connects == 1:
            log.debug("MQTT: connected to %s as %s", self.config.address, self.client_id)
        else:
            log.info("MQTT: reconnected to %s as %s", self.config.address, self.client_id)
        if ready_now:
            self._set_ready()

    def _on_connect_refused(self, reason: str) -> None:
        err = TransportError(f"MQTT broker {self.config.address} refused the connection: {reason}")
        result = self._attempt_result
        if result is not None and not result.done():
            result.set_exception(err)
        if self.connects > 0 and not self._closed:
            log.warning("MQTT: broker %s refused the reconnection: %s", self.config.address, reason)

    def _on_disconnected(self, reason: str) -> None:
        was_ready = self._ready.is_set() or self._up
        was_up, self._up = self._up, False
        self._ready.clear()
        if self._closed:
            return
        result = self._attempt_result
        if result is not None and not result.done():
            result.set_exception(TransportError(f"MQTT broker {self.config.address} closed the connection: {reason}"))
        if not was_up:
            return  # an attempt that failed: whoever made it decides what next
        log.warning("MQTT: connection to %s lost (%s); reconnecting", self.config.address, reason)
        # A SUBACK that never came is replaced by the resubscription done on reconnect.
        for fut in self._sub_waiters.values():
            if not fut.done():
                fut.set_result(None)
        self._sub_waiters.clear()
        if was_ready:
            self._notify_state(False)
        self._reconnect_soon()

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

    def _route(self, topic: str) -> list[MessageCallback]:
        """The callbacks of the filters that match ``topic``, each once, in subscription order."""
        called = self._routes.get(topic)
        if called is not None:
            return called
        topic_matches_sub = self._mqtt.topic_matches_sub
        called = []
        for flt, cbs in self._callbacks.items():
            # A shared subscription ($share/<group>/<filter>) delivers the topics its filter matches.
            match = flt.split("/", 2)[2] if flt.startswith("$share/") and flt.count("/") >= 2 else flt
            if not topic_matches_sub(match, topic):
                continue
            for cb in cbs:
                if not any(cb is c or cb == c for c in called):  # overlapping filters: once per callback
                    called.append(cb)
        if len(self._routes) >= _ROUTES_MAX:
            self._routes.clear()
        self._routes[topic] = called
        return called

    def _dispatch(self, msg: MqttMessage) -> None:
        if self._closed:
            return
        for cb in self._route(msg.topic):
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
            self._routes.clear()
        with self._lock:
            self._filters[topic_filter] = q
        mqtt = self._mqtt
        try:
            if self._inflight is not None:  # connecting in the worker thread: renewed with the others
                rc, mid = mqtt.MQTT_ERR_NO_CONN, 0
            else:
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
        self._routes.clear()
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
        self._forget(topic_filter, callback)  # (empties the routes)
        with self._lock:
            still = topic_filter in self._filters
        if not still and self._inflight is None:  # (while connecting: simply not renewed)
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
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._inflight is not None:
            # paho is connecting in a worker thread: hand it the message when that ends.
            if q == 0:
                raise TransportError(f"not connected to MQTT broker {self.config.address}")
            if not topic or "+" in topic or "#" in topic:
                raise UsageError(f"cannot publish to {topic!r}: Publish topic cannot contain wildcards.")
            self._deferred.append((topic, payload, q, retain, fut))
            return fut
        self._publish_now(topic, payload, q, retain, fut)
        return fut

    def _publish_now(self, topic: str, payload: bytes | str, q: int, retain: bool, fut: asyncio.Future[None]) -> None:
        mqtt = self._mqtt
        try:
            info = self._client.publish(topic, payload, qos=q, retain=retain)
        except ValueError as e:
            raise UsageError(f"cannot publish to {topic!r}: {e}") from None
        if info.rc == mqtt.MQTT_ERR_NO_CONN and q == 0:
            raise TransportError(f"not connected to MQTT broker {self.config.address}")
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"cannot publish to {topic!r}: {mqtt.error_string(info.rc)}")
        if info.is_published():
            fut.set_result(None)
        else:
            # The PUBACK callback is posted to this loop, so it cannot run before this line.
            self._pub_waiters[info.mid] = fut

    def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for topic, payload, q, retain, fut in deferred:
            if fut.done():
                continue
            try:
                self._publish_now(topic, payload, q, retain, fut)
            except Exception as e:  # (TransportError, UsageError): the publisher learns it from its future
                fut.set_exception(e)
                fut.add_done_callback(_retrieve)

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
    reconnect_max_s: float = 16.0,
    will: tuple[str, bytes, int, bool] | None = None,
) -> MqttConnection:
    """Connect to the broker named by ``url`` and return the :class:`MqttConnection`.

    ``will`` = ``(topic, payload, qos, retain)``: the last will the broker publishes when this
    connection drops without a DISCONNECT (a killed process, a lost network).
    """
    cfg = BrokerConfig.from_url(url)
    conn = MqttConnection(cfg, client_id=client_id, reconnect_max_s=reconnect_max_s, will=will)
    return await conn.connect(timeout_s=timeout_s)
