"""One aiohttp server per ``host:port``, shared by the ``ws://`` and ``http://`` listeners.

A device has one HTTP server (mongoose's) that serves the WebSocket upgrade at ``/rpc``, plain HTTP
RPC at ``/rpc`` and ``/rpc/<Method>``, and the extra endpoints services register (``/update`` of the
OTA service). Here the same: :func:`acquire` returns the :class:`SharedServer` for a ``host:port``,
creating and starting it on first use; each listener attaches a *role* (``"ws"`` or ``"http"``) and
releases it when it closes; the server stops when no role is left.

Dispatch (one catch-all route):

* ``/rpc`` and ``/rpc/...`` with ``Upgrade: websocket`` → the ws role (``503 WS is disabled`` if no
  ws listener is attached, as a device without rpc-ws);
* other ``/rpc`` requests → the http role (``404`` if none);
* ``/jsonrpc`` the same way (the http role serves it as JSON-RPC 2.0 only, docs/protocol/jsonrpc.md §8);
* any other path → the ``node.http_handlers`` entry with the longest matching path prefix;
* else ``404 Not Found``.

Limits (listen URL options of either role; they belong to the server, so a second listener on the same
``host:port`` may repeat them or leave them out, but not change them):

``max_conns``       connections held at once (default 64). One more closes the connection that is
                    worth least: first those that have not completed a request (or, once upgraded,
                    sent a WebSocket message) yet, then the one quiet the longest (no request,
                    WebSocket message or request-body byte). A well-behaved client that has made a
                    call keeps its connection while idle or half-open ones are around.
``header_timeout``  seconds from the first byte of a request to the end of its headers (default 10);
                    a slower head (slowloris) closes the connection. Also bounds a TLS handshake.
``idle_timeout``    seconds a connection may wait for a request without sending one (default 60):
                    after it is accepted and between keep-alive requests. Upgraded WebSocket
                    connections are not idle (the device pings them; they stay until closed).

A request head is at most 128 lines of at most 8190 bytes (aiohttp's parser), so what a half-open
connection can make the device hold is bounded by ``max_conns`` times that.

Also here: the TLS contexts built from the ``ca``/``cert``/``key`` URL options and the codec named by
``?codec=``, used by both modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar

from aiohttp import web

from rpc.errors import TransportError, UsageError
from rpc.node import Node
from transports._urlopts import client_ssl_context, codec_from_url, tls_failure_hint
from transports.registry import TransportURL

__all__ = [
    "JSONRPC_PATH",
    "LIMIT_OPTIONS",
    "RPC_PATH",
    "Connection",
    "Limits",
    "RoleHandler",
    "SharedServer",
    "acquire",
    "client_ssl_context",
    "codec_from_url",
    "is_rpc_path",
    "limits_from_url",
    "peer_address",
    "serve_role",
    "server_ssl_context",
    "tls_failure_hint",
]

log = logging.getLogger("mgrpc.http.server")
_access_log = logging.getLogger("mgrpc.http.access")

RPC_PATH = "/rpc"
JSONRPC_PATH = "/jsonrpc"
# Big enough for a multipart firmware upload read with request.post(); /rpc bodies are checked
# against the node's max_frame_size by the http transport itself.
CLIENT_MAX_SIZE = 64 * 1024 * 1024
SHUTDOWN_TIMEOUT_S = 2.0

RoleHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_servers: dict[tuple[str, int], SharedServer] = {}
# host:port -> done when the server being started there is up (or failed), so a ws and an http
# listener started at the same time share one server instead of the second failing to bind.
_starting: dict[tuple[str, int], asyncio.Future[None]] = {}


@dataclass(frozen=True)
class Limits:
    """What one server holds at most (see the module docstring)."""

    max_conns: int = 64
    header_timeout: float = 10.0
    idle_timeout: float = 60.0


LIMIT_OPTIONS = frozenset(f.name for f in fields(Limits))


def limits_from_url(url: TransportURL) -> tuple[Limits, frozenset[str]]:
    """The limits ``url`` asks for, and which of them it names; a bad value is a :class:`UsageError`."""
    default = Limits()
    values: dict[str, Any] = {}
    for name in LIMIT_OPTIONS:
        text = url.option(name)
        if text is None:
            continue
        try:
            value: float = int(text) if name == "max_conns" else float(text)
        except ValueError:
            value = 0
        if not (value > 0 and math.isfinite(value)):
            what = "a positive integer" if name == "max_conns" else "a positive number of seconds"
            raise UsageError(f"{url.scheme}:// option {name} must be {what}, not {text!r}")
        values[name] = value
    given = frozenset(values)
    return Limits(**{f.name: values.get(f.name, getattr(default, f.name)) for f in fields(Limits)}), given


class Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol inside, and what the limits need to know about it.

    ``useful`` is set by a request that reached the dispatcher (reset when the connection is upgraded to
    a WebSocket, then set by its first message); ``last_active`` is the time of the last request, WebSocket
    message or request-body byte. :attr:`SharedServer.connections` ranks them by ``(useful, last_active)``.
    """

    def __init__(self, server: SharedServer, inner: asyncio.Protocol) -> None:
        self.server = server
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.useful = False
        self.last_active = self.loop.time()
        self.busy = False  # a request is being handled (its body bytes count as activity)
        self.upgraded = False
        self._head_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol, passed on to aiohttp -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Make room (``max_conns``), then hand the connection to aiohttp."""
        self.transport = transport  # type: ignore[assignment]
        self.server.connection_made(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Start the header clock on the first byte of a request head; note body bytes as activity."""
        if self.upgraded:
            pass  # WebSocket frames: activity is counted per message (see message())
        elif self.busy:
            self.last_active = self.loop.time()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.server.limits.header_timeout, self._head_timeout)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        """Passed on."""
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection, then tell aiohttp."""
        self._cancel_head_timer()
        self.server.connection_lost(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """Passed on."""
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        """Passed on."""
        self.inner.resume_writing()

    # -- what the dispatcher and the WebSocket role report --------------------------------------------
    def request_started(self) -> None:
        """A request head is complete and dispatched."""
        self._cancel_head_timer()
        self.busy = True
        self.useful = True
        self.last_active = self.loop.time()

    def request_ended(self) -> None:
        """The handler returned (a WebSocket connection has ended by then)."""
        self.busy = False
        self.last_active = self.loop.time()

    def websocket_opened(self) -> None:
        """The connection is a WebSocket now: useful again only once it sends a message."""
        self.upgraded = True
        self.useful = False

    def message(self) -> None:
        """A WebSocket message arrived."""
        self.useful = True
        self.last_active = self.loop.time()

    def abort(self, why: str) -> None:
        """Drop the connection now."""
        log.info("HTTP server %s:%d: %s: closing %s", self.server.host, self.server.port, why, self.peer())
        self._cancel_head_timer()
        self.server.connections.discard(self)
        if self.transport is not None:
            self.transport.abort()

    def peer(self) -> str:
        """The peer's ``ip:port``."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.busy and not self.upgraded:
            self.abort(f"no complete request head within header_timeout ({self.server.limits.header_timeout:g} s)")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


def is_rpc_path(path: str) -> bool:
    """True for ``/rpc`` and anything under ``/rpc/`` (mongoose endpoint prefix match)."""
    return path == RPC_PATH or path.startswith(RPC_PATH + "/")


def peer_address(request: web.BaseRequest) -> str:
    """``ip:port`` of the peer (the channel info a device reports)."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return request.remote or ""


class SharedServer:
    """The aiohttp server of one ``host:port`` and the roles (ws, http) attached to it."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, limits: Limits | None = None) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.limits = limits or Limits()
        self.roles: dict[str, tuple[RoleHandler, Node]] = {}
        self.connections: set[Connection] = set()
        self._by_transport: dict[Any, Connection] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    def url(self, scheme: str, path: str = RPC_PATH) -> str:
        """The URL of ``path`` on this server (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"

    async def start(self) -> None:
        """Bind and start serving; a bind failure is a :class:`TransportError`."""
        app = web.Application(client_max_size=CLIENT_MAX_SIZE)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # A device stops abruptly; don't let a stuck upload hold a listener's close() for a minute.
        # keepalive_timeout: aiohttp closes a connection that waits longer for a request (idle_timeout).
        runner = web.AppRunner(
            app, access_log=_access_log, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            keepalive_timeout=self.limits.idle_timeout,
        )  # fmt: skip
        await runner.setup()
        http_server = runner.server
        assert http_server is not None

        def protocol() -> Connection:  # aiohttp's low-level server is the protocol factory
            return Connection(self, http_server())

        loop = asyncio.get_running_loop()
        try:
            if self.ssl_context is None:
                server = await loop.create_server(protocol, self.host or None, self.port)
            else:  # a TLS handshake is part of the head: bounded by header_timeout as well
                server = await loop.create_server(
                    protocol, self.host or None, self.port, ssl=self.ssl_context,
                    ssl_handshake_timeout=self.limits.header_timeout,
                )  # fmt: skip
        except OSError as e:
            await runner.cleanup()
            raise TransportError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from e
        self._runner, self._server = runner, server
        if self.port == 0:  # learn the port the OS picked
            self.port = int(server.sockets[0].getsockname()[1])
        log.info("HTTP server listening on %s:%d", self.host, self.port)

    # -- connections ---------------------------------------------------------------------------------
    def connection_made(self, conn: Connection) -> None:
        """A new connection: past ``max_conns``, close the one worth least (see the module docstring)."""
        while len(self.connections) >= self.limits.max_conns:
            victim = min(self.connections, key=lambda c: (c.useful, c.last_active))
            victim.abort(f"{len(self.connections)} connections (max_conns)")
        self.connections.add(conn)
        self._by_transport[conn.transport] = conn

    def connection_lost(self, conn: Connection) -> None:
        """A connection is gone."""
        self.connections.discard(conn)
        if self._by_transport.get(conn.transport) is conn:
            del self._by_transport[conn.transport]

    def connection(self, request: web.BaseRequest) -> Connection | None:
        """The connection ``request`` came on (None if it is gone)."""
        return self._by_transport.get(request.transport)

    def attach(self, role: str, handler: RoleHandler, node: Node) -> None:
        """Serve ``role`` ("ws" or "http") with ``handler`` for ``node``."""
        if role in self.roles:
            raise TransportError(f"a {role} listener is already attached to {self.host}:{self.port}")
        self.roles[role] = (handler, node)

    async def release(self, role: str) -> None:
        """Detach ``role``; stop the server when nothing is left."""
        self.roles.pop(role, None)
        if self.roles:
            return
        if _servers.get((self.host, self.port)) is self:
            del _servers[(self.host, self.port)]
        server, self._server = self._server, None
        if server is not None:
            server.close()  # stop accepting; the runner closes the connections
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), SHUTDOWN_TIMEOUT_S)

    def _http_handler(self, path: str) -> Callable[..., Awaitable[Any]] | None:
        best: tuple[int, Callable[..., Awaitable[Any]]] | None = None
        for _, node in self.roles.values():
            for prefix, handler in node.http_handlers.items():
                if path.startswith(prefix) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), handler)
        return best[1] if best is not None else None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        conn = self.connection(request)
        if conn is not None:
            conn.request_started()
        try:
            return await self._route(request)
        finally:
            if conn is not None:
                conn.request_ended()

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if is_rpc_path(path) or path == JSONRPC_PATH:
            upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
            role = self.roles.get("ws" if upgrade else "http")
            if role is not None:
                return await role[0](request)
            if upgrade:
                return web.Response(status=503, text="WS is disabled")
            return web.Response(status=404, text="Not Found")
        handler = self._http_handler(path)
        if handler is not None:
            resp: web.StreamResponse = await handler(request)
            return resp
        return web.Response(status=404, text="Not Found")


async def acquire(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits | None = None,
    given: frozenset[str] = frozenset(),
) -> SharedServer:
    """The running server for ``host:port`` (started now if needed). Port 0 always makes a new one.

    ``limits`` apply to a new server; for a running one, the limits named in ``given`` must be its own
    (a :class:`UsageError` otherwise).
    """
    key = (host, port)
    if port and key in _starting:
        await asyncio.wait({_starting[key]})
    srv = _servers.get(key) if port else None
    if srv is not None:
        if (srv.ssl_context is None) != (ssl_context is None):
            raise TransportError(f"{host}:{port} is already served {'with' if srv.ssl_context else 'without'} TLS")
        wanted = limits or Limits()
        for name in sorted(given):
            if getattr(wanted, name) != getattr(srv.limits, name):
                raise UsageError(
                    f"{host}:{port} is already served with {name}={getattr(srv.limits, name):g}; "
                    "give every listener on it the same limits, or none"
                )
        return srv
    srv = SharedServer(host, port, ssl_context, limits)
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if port:
        _starting[key] = started
    try:
        await srv.start()
        _servers[(host, srv.port)] = srv
    finally:
        if _starting.get(key) is started:
            del _starting[key]
        started.set_result(None)
    return srv


class _RoleListener(Protocol):
    async def handle(self, request: web.Request) -> web.StreamResponse: ...


L = TypeVar("L", bound=_RoleListener)


async def serve_role(url: TransportURL, node: Node, role: str, *, tls: bool, make: Callable[[SharedServer], L]) -> L:
    """Attach ``make(server)``'s ``handle`` as ``role`` on the server for ``url``'s host:port.

    ``tls`` (wss, https) needs the ``cert``/``key`` URL options; the default port is 443 with TLS,
    else 80. The limit options (:data:`LIMIT_OPTIONS`) go to the server. A server that has no other
    role is released again if attaching fails.
    """
    limits, given = limits_from_url(url)
    ssl_context = server_ssl_context(url) if tls else None
    port = url.port if url.port is not None else (443 if tls else 80)
    server = await acquire(url.host or "0.0.0.0", port, ssl_context=ssl_context, limits=limits, given=given)
    listener = make(server)
    try:
        server.attach(role, listener.handle, node)
    except TransportError:
        if not server.roles:
            await server.release(role)
        raise
    return listener


# -- TLS -----------------------------------------------------------------------------------------


def server_ssl_context(url: TransportURL) -> ssl.SSLContext:
    """TLS for wss/https listeners: ``cert`` (and ``key``) required; ``ca`` makes client certs required."""
    ca, cert, key = url.option("ca"), url.option("cert"), url.option("key")
    if not cert:
        raise UsageError(f"{url.scheme}:// listening needs ?cert=<file> (and key=<file>)")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key or None)
        if ca:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load TLS files: {e}") from None
    return ctx
