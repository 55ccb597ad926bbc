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

Also here: the TLS contexts built from the ``ca``/``cert``/``key`` URL options and the codec named by
``?codec=``, used by both modules.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aiohttp import web

from rpc.errors import TransportError, UsageError
from rpc.node import Node
from transports._urlopts import client_ssl_context, codec_from_url
from transports.registry import TransportURL

__all__ = [
    "JSONRPC_PATH",
    "RPC_PATH",
    "RoleHandler",
    "SharedServer",
    "acquire",
    "client_ssl_context",
    "codec_from_url",
    "is_rpc_path",
    "peer_address",
    "serve_role",
    "server_ssl_context",
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

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.roles: dict[str, tuple[RoleHandler, Node]] = {}
        self._runner: web.AppRunner | None = None

    def url(self, scheme: str, path: str = RPC_PATH) -> str:
        """The URL of ``path`` on this server (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"

    async def start(self) -> None:
        """Bind and start serving; a bind failure is a :class:`TransportError`."""
        app = web.Application(client_max_size=CLIENT_MAX_SIZE)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # A device stops abruptly; don't let a stuck upload hold a listener's close() for a minute.
        runner = web.AppRunner(app, access_log=_access_log, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, self.host or None, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise TransportError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from e
        self._runner = runner
        if self.port == 0:  # learn the port the OS picked
            for addr in runner.addresses:
                if isinstance(addr, tuple) and len(addr) >= 2:
                    self.port = int(addr[1])
                    break
        log.info("HTTP server listening on %s:%d", self.host, self.port)

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
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _http_handler(self, path: str) -> Callable[..., Awaitable[Any]] | None:
        best: tuple[int, Callable[..., Awaitable[Any]]] | None = None
        for _, node in self.roles.values():
            for prefix, handler in node.http_handlers.items():
                if path.startswith(prefix) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), handler)
        return best[1] if best is not None else None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
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


async def acquire(host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> SharedServer:
    """The running server for ``host:port`` (started now if needed). Port 0 always makes a new one."""
    key = (host, port)
    if port and key in _starting:
        await asyncio.wait({_starting[key]})
    srv = _servers.get(key) if port else None
    if srv is not None:
        if (srv.ssl_context is None) != (ssl_context is None):
            raise TransportError(f"{host}:{port} is already served {'with' if srv.ssl_context else 'without'} TLS")
        return srv
    srv = SharedServer(host, port, ssl_context)
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
    else 80. A server that has no other role is released again if attaching fails.
    """
    ssl_context = server_ssl_context(url) if tls else None
    port = url.port if url.port is not None else (443 if tls else 80)
    server = await acquire(url.host or "0.0.0.0", port, ssl_context=ssl_context)
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
