"""``ws://`` and ``wss://``: one mgRPC frame per WebSocket message (spec/transports.md §2).

Host side (:func:`open_client`), exactly as ``mos``: dial the URL minus query and userinfo with
``Origin: https://api.cesanta.com/``, ``Sec-WebSocket-Protocol: clubby.cesanta.com`` and
``Authorization: Bearer <userinfo>`` when the URL has one; send each frame as one TEXT message of
JSON followed by ``\\n``; accept TEXT or BINARY messages; answer pings. A non-101 answer is
``Invalid HTTP response code returned. Missing rpc-ws library?``. ``?reconnect=1`` keeps the channel
alive across disconnections (backoff 1 s doubling to 60 s, and an immediate attempt when a frame
is sent while disconnected). ``wss://`` verifies the server's certificate against the system CAs,
or ``?ca=FILE``; ``?insecure=1`` verifies nothing (mos without ``--ca-cert-file``); ``?cert=&key=``
present a client certificate.

Device side (:func:`listen`): the WebSocket upgrade at ``/rpc`` (and ``/rpc/...``) of the shared
aiohttp server (:mod:`transports._aioserver`), the request's ``Sec-WebSocket-Protocol`` echoed
verbatim; one channel per connection (type ``WS_in``, non-persistent, broadcast-enabled, info the
peer's ``ip:port``); device-style frames as TEXT messages without newline; periodic pings. A
message that is JSON but not a valid frame, or larger than the node's ``max_frame_size``, closes the
connection, as rpc-common closes a non-persistent channel on an invalid frame; text that is not JSON
at all is ignored and the connection stays usable, as on the real device (real-device.md RD-W5).

Device outbound (:func:`dial_out`, or ``listen("ws://server/path?outbound=1", node)``): dial a
server with subprotocol ``json-rpc`` and ``Origin: https://mongoose-os.com``, one persistent channel
(type ``WS_out``/``WSS_out``, broadcast-enabled) registered as the node's default route, reconnecting
from 1 s doubling to 60 s.

``?codec=msgpack`` (between two mgrpc ends) sends BINARY messages in that codec. A device listening
with it still serves JSON peers (mos): each message is read in its own codec, and the answers go
out in the codec the peer last used (:class:`rpc.codec.AutoCodec`).

Limits of the device side (listen URL options, shared with an ``http://`` listener on the same
``host:port``; see :mod:`transports._aioserver`): ``max_conns`` (default 64; one more closes first a
connection that has sent no request or WebSocket message yet, then the one quiet the longest),
``header_timeout`` (default 10 s from the first byte of a request head to its end; slowloris
connections are closed) and ``idle_timeout`` (default 60 s waiting for a request; upgraded
connections are not idle). A peer that does not read its replies is dropped once
:data:`MAX_OUT_BUFFER` bytes are unsent or :data:`MAX_PENDING_SENDS` sends wait.

``?stall_over=N`` (device side) makes the listener behave as a stock Mongoose OS device: after a
message longer than N bytes (Mongoose OS: :data:`MGOS_WS_MESSAGE_LIMIT`) nothing more is answered on
that connection. For benchmarks and tests of clients against stock devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from rpc.channel import Channel, FrameCodec
from rpc.errors import ChannelClosed, FrameError, FrameTooLarge, TransportError, UsageError
from rpc.frame import Frame, Style
from rpc.node import Node
from transports import _wsclient
from transports._urlopts import client_ssl_context, codec_from_url, tls_failure_hint
from transports.registry import TransportURL

if TYPE_CHECKING:
    from aiohttp import web

    from transports._aioserver import SharedServer

# The device side runs on aiohttp's server, imported when a listener starts; the client side is
# transports._wsclient (aiohttp's client alone takes longer to import than a whole `mgrpc call`).

__all__ = [
    "EXTRA",
    "MOS_ORIGIN",
    "MOS_SUBPROTOCOL",
    "OPTIONS",
    "OUTBOUND_ORIGIN",
    "OUTBOUND_SUBPROTOCOL",
    "SCHEMES",
    "WsChannel",
    "WsClientChannel",
    "WsListener",
    "WsOutbound",
    "dial_out",
    "listen",
    "open_client",
]

SCHEMES = ("ws", "wss")
# max_conns, header_timeout, idle_timeout: the shared server's limits (transports._aioserver)
OPTIONS: frozenset[str] = frozenset(
    {"reconnect", "outbound", "ca", "cert", "key", "insecure", "stall_over"}
    | {"max_conns", "header_timeout", "idle_timeout"}
)
# What Mongoose OS's rpc-ws does with a longer message (3072 bytes with its masked-frame header):
# nothing more is answered on that connection (measured on the real firmware, ../shared/mgos-ubuntu).
MGOS_WS_MESSAGE_LIMIT = 3064
EXTRA = "ws"

MOS_ORIGIN = "https://api.cesanta.com/"
MOS_SUBPROTOCOL = "clubby.cesanta.com"
OUTBOUND_ORIGIN = "https://mongoose-os.com"
OUTBOUND_SUBPROTOCOL = "json-rpc"
BAD_STATUS_MESSAGE = "Invalid HTTP response code returned. Missing rpc-ws library?"

log = logging.getLogger("mgrpc.ws")

# Close codes (RFC 6455) used when a device drops a connection for a bad frame.
_CLOSE_TOO_BIG = 1009
_CLOSE_BAD_DATA = 1007
# Device side: a peer that does not read its replies is dropped past either bound (memory stays bounded).
MAX_PENDING_SENDS = 256  # sends waiting
MAX_OUT_BUFFER = 1 << 20  # bytes queued on the socket
FAIR_MESSAGES = 16  # device side: messages of one connection handled per turn of the event loop


def _binary(codec: FrameCodec) -> bool:
    return codec.name != "json"


async def _send_message(ws: Any, data: bytes, *, binary: bool) -> None:
    """Write one message; a dead connection is :class:`ChannelClosed`."""
    if ws is None or ws.closed:
        raise ChannelClosed("WebSocket is closed")
    try:
        if binary:
            await ws.send_bytes(data)
        else:
            await ws.send_str(data.decode("utf-8"))
    except (ConnectionError, RuntimeError, OSError) as e:
        raise ChannelClosed(f"WebSocket send failed: {e}") from e


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


async def _server_messages(ws: web.WebSocketResponse, channel: Channel) -> AsyncIterator[tuple[bool, bytes]]:
    """The TEXT/BINARY messages of an accepted (aiohttp) connection as ``(is_text, data)``."""
    import aiohttp

    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            yield True, msg.data.encode("utf-8")
        elif msg.type == aiohttp.WSMsgType.BINARY:
            yield False, bytes(msg.data)
        elif msg.type == aiohttp.WSMsgType.ERROR:
            log.info("%s: connection error: %s", channel.type, ws.exception())
            break


async def _pump(
    messages: AsyncIterator[tuple[bool, bytes]],
    channel: Channel,
    *,
    close: Callable[[int], Awaitable[Any]] | None,
    stall_over: int | None = None,
) -> None:
    """Deliver every message (``(is_text, data)``) to ``channel`` until the connection ends.

    ``close(code)``: how a bad frame closes the connection (None: it is logged and skipped).
    ``stall_over``: after a message longer than that, nothing more is delivered (see ``?stall_over=``).
    """
    stalled = False
    async for is_text, data in messages:
        if stall_over is not None and (stalled or len(data) > stall_over):
            if not stalled:
                log.warning("%s %s: a %d-byte message: the connection stalls", channel.type, channel.info(), len(data))
            stalled = True
            continue
        if is_text or channel.codec.name == "json":
            # mos's Go encoder ends each message with "\n"; it is not part of the frame (nor of its size).
            data = data.rstrip(b"\r\n\t ")
            if not data:
                continue  # an empty message is not a frame
        try:
            frame = channel.codec.decode(data)
        except FrameError as e:
            if not isinstance(e, FrameTooLarge) and channel.deliver_jsonrpc(data):
                continue  # a JSON-RPC 2.0 batch, or JSON-RPC text that does not parse: answered
            log.warning("%s %s: bad frame: %s", channel.type, channel.info(), e)
            if close is not None and not isinstance(e, FrameTooLarge) and not _is_json(data):
                continue  # text that is not JSON at all is ignored; the connection stays (RD-W5)
            if close is not None:
                await close(_CLOSE_TOO_BIG if isinstance(e, FrameTooLarge) else _CLOSE_BAD_DATA)
                break
            continue
        channel.deliver(frame)


# ---------------------------------------------------------------------------------------------
# device side: inbound connections


@functools.cache
def _echo_protocol_response() -> type[web.WebSocketResponse]:
    """A WebSocket response that echoes the request's ``Sec-WebSocket-Protocol`` verbatim (mongoose 6)."""
    from aiohttp import web

    class EchoProtocolResponse(web.WebSocketResponse):
        def _handshake(self, request: web.BaseRequest) -> Any:
            headers, protocol, compress, notakeover = super()._handshake(request)
            value = request.headers.get("Sec-WebSocket-Protocol")
            if value is not None:
                headers["Sec-WebSocket-Protocol"] = value
                protocol = value
            return headers, protocol, compress, notakeover

    return EchoProtocolResponse


class WsChannel(Channel):
    """A channel over one accepted WebSocket connection (device side, type ``WS_in``)."""

    type = "WS_in"
    persistent = False
    broadcast = True

    def __init__(
        self,
        ws: web.WebSocketResponse,
        peer: str,
        *,
        codec: FrameCodec | None = None,
        transport: asyncio.BaseTransport | None = None,
        stall_over: int | None = None,
        on_message: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(codec=codec, style="device")
        self.ws = ws
        self.peer = peer
        self._transport = transport
        self.stall_over = stall_over
        self._on_message = on_message
        self._sending = 0

    def info(self) -> str:
        """The peer's ``ip:port``."""
        return self.peer

    async def send(self, frame: Frame) -> None:
        """Send ``frame`` as one message (TEXT, no newline, for JSON).

        A peer that stops reading makes replies pile up; once :data:`MAX_OUT_BUFFER` bytes are unsent
        or :data:`MAX_PENDING_SENDS` sends wait, the connection is dropped rather than holding ever
        more of them (memory stays bounded).
        """
        transport: Any = self._transport
        unsent = transport.get_write_buffer_size() if transport is not None else 0
        if self._sending >= MAX_PENDING_SENDS or unsent > MAX_OUT_BUFFER:
            log.warning("ws %s: the peer does not read its replies (%d bytes unsent, %d waiting); closing",
                        self.peer, unsent, self._sending)  # fmt: skip
            self.mark_closed()
            if transport is not None:
                transport.abort()
            raise ChannelClosed("WebSocket peer does not read")
        self._sending += 1
        try:
            await _send_message(self.ws, self.encode(frame), binary=_binary(self.codec))
        finally:
            self._sending -= 1

    async def run(self) -> None:
        """Read messages until the connection ends (``on_message`` is told of each)."""
        await _pump(self._messages(), self, close=lambda code: self.ws.close(code=code), stall_over=self.stall_over)

    async def _messages(self) -> AsyncIterator[tuple[bool, bytes]]:
        n = 0
        async for msg in _server_messages(self.ws, self):
            if self._on_message is not None:
                self._on_message()
            yield msg
            n += 1
            if n % FAIR_MESSAGES == 0:
                # Queued messages come without a pause: give the other connections a turn now and then,
                # so a flood on one connection delays them by milliseconds, not by its whole backlog.
                await asyncio.sleep(0)

    async def close(self) -> None:
        """Drop the connection as mongoose does (send what is queued, then close; no close frame).

        This is what the router's close of a non-persistent channel (a wrong ``dst``) looks like to
        the peer (spec errata).
        """
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        else:
            with contextlib.suppress(Exception):
                await self.ws.close()
        self.mark_closed()


def _stall_over(url: TransportURL) -> int | None:
    value = url.option("stall_over")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"ws:// option stall_over must be a number of bytes, not {value!r}") from None
    if n <= 0:
        raise UsageError("ws:// option stall_over must be positive")
    return n


class WsListener:
    """The ``ws://`` role of a shared aiohttp server: accepts WebSocket connections for ``node``."""

    def __init__(self, server: SharedServer, node: Node, url: TransportURL, *, ping_interval_s: float | None) -> None:
        self.server = server
        self.node = node
        self.ping_interval_s = ping_interval_s
        self._url = url
        self.stall_over = _stall_over(url)
        self.channels: set[WsChannel] = set()
        self.host = server.host
        self.port = server.port
        self.url = server.url(url.scheme)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Upgrade the request and serve the connection as one channel."""
        from rpc.auth import Authenticator, verify_http_digest
        from rpc.codec import device_codec
        from transports._aioserver import peer_address

        requested = request.headers.get("Sec-WebSocket-Protocol", "")
        protocols = tuple(p.strip() for p in requested.split(",") if p.strip())
        ws = _echo_protocol_response()(protocols=protocols, compress=False, autoping=True)
        await ws.prepare(request)
        conn = self.server.connection(request)
        if conn is not None:
            conn.websocket_opened()
        # A device listening with a binary codec still serves JSON peers (mos): the codec follows the peer.
        codec = device_codec(codec_from_url(self._url))
        ch = WsChannel(
            ws, peer_address(request), codec=codec, transport=request.transport, stall_over=self.stall_over,
            on_message=conn.message if conn is not None else None,
        )  # fmt: skip
        if isinstance(self.node.auth, Authenticator):
            # A valid digest on the upgrade request names the channel's user (spec §2).
            ch.user = verify_http_digest(self.node.auth, request.headers.get("Authorization", ""), request.method)
        self.node.add_channel(ch)
        self.channels.add(ch)
        pinger = asyncio.ensure_future(self._ping(ws)) if self.ping_interval_s else None
        try:
            await ch.run()
        finally:
            if pinger is not None:
                pinger.cancel()
            self.channels.discard(ch)
            with contextlib.suppress(Exception):
                await ws.close()
            ch.mark_closed()
        return ws

    async def _ping(self, ws: web.WebSocketResponse) -> None:
        # Mongoose pings idle connections and does not drop a peer that fails to answer; same here.
        assert self.ping_interval_s
        while not ws.closed:
            await asyncio.sleep(self.ping_interval_s)
            with contextlib.suppress(Exception):
                await ws.ping()

    async def close(self) -> None:
        """Close every connection and detach from the server (which stops if nothing else uses it)."""
        for ch in list(self.channels):
            await ch.close()
        await self.server.release("ws")


# ---------------------------------------------------------------------------------------------
# host side and device outbound: a dialled connection, optionally reconnecting


def _dial_target(url: TransportURL) -> tuple[str, str | None]:
    """The URL mos dials (no userinfo, query or fragment) and the raw userinfo, if any."""
    parts = urlsplit(url.raw)
    userinfo, sep, hostport = parts.netloc.rpartition("@")
    target = urlunsplit((parts.scheme.lower(), hostport, parts.path, "", ""))
    return target, (userinfo if sep else None)


class WsClientChannel(Channel):
    """A dialled WebSocket: the host side (``mos`` style) or a device's outbound channel.

    With ``reconnect`` the channel survives disconnections: a background task redials with a
    backoff from ``reconnect_min_s`` doubling to ``reconnect_max_s``, and :meth:`send` while
    disconnected triggers an immediate attempt and waits up to ``connect_timeout_s``. Without it,
    the channel closes when the connection ends.
    """

    type = "WS"
    persistent = True
    broadcast = False

    def __init__(
        self,
        target: str,
        *,
        style: Style = "mos",
        codec: FrameCodec | None = None,
        protocols: Sequence[str] = (MOS_SUBPROTOCOL,),
        origin: str = MOS_ORIGIN,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        newline: bool = True,
        reconnect: bool = False,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        type_: str | None = None,
        broadcast: bool | None = None,
    ) -> None:
        super().__init__(codec=codec, style=style)
        if type_ is not None:
            self.type = type_
        if broadcast is not None:
            self.broadcast = broadcast
        self.target = target
        self.protocols = tuple(protocols)
        self.origin = origin
        self.headers = dict(headers or {})
        self.ssl_context = ssl_context
        self.newline = newline
        self.reconnect = reconnect
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self.ws: _wsclient.WsConnection | None = None
        self.connections = 0  # how many times a connection was established
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False

    def info(self) -> str:
        """The URL dialled."""
        return self.target

    @property
    def connected(self) -> bool:
        """True while a connection is up."""
        return self.ws is not None and not self.ws.closed

    async def connect(self) -> None:
        """Dial once; raise :class:`TransportError` (with mos's message for a non-101 answer)."""
        try:
            # Bounded like tcp://'s connect: a wedged peer must not hold the caller for minutes.
            # mos (Go) sends neither a User-Agent nor Accept-Encoding on the upgrade request; nor do we.
            async with asyncio.timeout(self.connect_timeout_s):  # (wait_for may swallow a cancel: 3.11)
                ws = await _wsclient.connect(
                    self.target, protocols=self.protocols, origin=self.origin, headers=self.headers,
                    ssl_context=self.ssl_context,
                )  # fmt: skip
        except _wsclient.WsHandshakeError as e:
            if e.status != 101:
                raise TransportError(BAD_STATUS_MESSAGE) from e
            raise TransportError(f"WebSocket handshake with {self.target} failed: {e.message}") from e
        except TimeoutError:
            raise TransportError(
                f"cannot connect to {self.target}: timed out after {self.connect_timeout_s:g} s"
            ) from None
        except OSError as e:
            reason = f"{e or type(e).__name__}{tls_failure_hint(e)}"
            raise TransportError(f"cannot connect to {self.target}: {reason}") from e
        self.ws = ws
        self.connections += 1
        self._connected.set()
        log.debug("%s connected to %s", self.type, self.target)

    async def start(self) -> None:
        """Start the reader (and, with ``reconnect``, the redialling) task."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        delay = self.reconnect_min_s
        while not self._closing:
            if not self.connected:
                try:
                    await self.connect()
                    delay = self.reconnect_min_s
                except TransportError as e:
                    if not self.reconnect:
                        break
                    log.info("%s: %s; retrying in %g s", self.type, e, delay)
                    await self._sleep(delay)
                    delay = min(delay * 2, self.reconnect_max_s)
                    continue
            ws = self.ws
            if ws is not None:
                await _pump(ws.__aiter__(), self, close=None)
            self._connected.clear()
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()
            if not self.reconnect:
                break
            log.info("%s: connection to %s lost", self.type, self.target)
        if not self._closing:
            # Gone for good: the router forgets the channel, so nobody will call close() on it.
            self.mark_closed()

    async def _sleep(self, delay_s: float) -> None:
        """Sleep for the backoff delay, or less if a sender wants the connection now."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay_s)
        self._wake.clear()

    async def send(self, frame: Frame) -> None:
        """Send ``frame`` as one message (``mos`` style: TEXT, JSON + ``\\n``)."""
        if self.closed:
            raise ChannelClosed("WebSocket channel is closed")
        if not self.connected:
            if not self.reconnect:
                raise ChannelClosed("WebSocket is closed")
            self._wake.set()
            try:
                await asyncio.wait_for(self._connected.wait(), self.connect_timeout_s)
            except TimeoutError:
                raise TransportError(f"not connected to {self.target}") from None
        data = self.encode(frame)
        binary = _binary(self.codec)
        if self.newline and not binary:
            data += b"\n"
        await _send_message(self.ws, data, binary=binary)

    async def close(self) -> None:
        """Stop redialling and close the connection."""
        self._closing = True
        task, self._task = self._task, None
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self.ws is not None and not self.ws.closed:  # connected while we were cancelling
            with contextlib.suppress(Exception):
                await self.ws.close()
        self.mark_closed()


def _client_channel(url: TransportURL, **kw: Any) -> WsClientChannel:
    target, _ = _dial_target(url)
    ssl_context = client_ssl_context(url) if url.scheme == "wss" else None
    return WsClientChannel(target, codec=codec_from_url(url), ssl_context=ssl_context, **kw)


async def open_client(url: TransportURL, *, reconnect: bool | None = None, **opts: Any) -> WsClientChannel:
    """Dial the device as ``mos`` does; the connection is up when this returns.

    Options (keyword): ``reconnect`` (default from ``?reconnect=``), ``reconnect_min_s``,
    ``reconnect_max_s``, ``connect_timeout_s`` (bounds each dial, default 10).
    """
    _, userinfo = _dial_target(url)
    headers = {"Authorization": f"Bearer {userinfo}"} if userinfo else {}
    opts.pop("creds", None)  # frame-level digest is answered by the node, not the transport
    ch = _client_channel(
        url, headers=headers, reconnect=url.flag("reconnect") if reconnect is None else reconnect, **opts
    )
    try:
        await ch.connect()
    except BaseException:
        await ch.close()
        raise
    return ch


# ---------------------------------------------------------------------------------------------
# device outbound


class WsOutbound:
    """A device's outbound WebSocket: one persistent channel, the node's default route."""

    def __init__(self, node: Node, channel: WsClientChannel) -> None:
        self.node = node
        self.channel = channel
        self.url = channel.target

    async def close(self) -> None:
        """Stop redialling and close the connection."""
        await self.channel.close()
        self.node.remove_channel(self.channel)


async def dial_out(
    url: str | TransportURL,
    node: Node,
    *,
    reconnect_min_s: float = 1.0,
    reconnect_max_s: float = 60.0,
    **opts: Any,
) -> WsOutbound:
    """Connect ``node`` out to a server at ``url`` (rpc-ws outbound) and keep reconnecting."""
    from transports.registry import parse_url

    u = url if isinstance(url, TransportURL) else parse_url(url)
    if u.scheme not in SCHEMES:
        raise UsageError(f"dial_out needs a ws:// or wss:// URL, not {u.raw!r}")
    ch = _client_channel(
        u,
        style="device",
        protocols=(OUTBOUND_SUBPROTOCOL,),
        origin=OUTBOUND_ORIGIN,
        newline=False,
        reconnect=True,
        reconnect_min_s=reconnect_min_s,
        reconnect_max_s=reconnect_max_s,
        type_="WSS_out" if u.scheme == "wss" else "WS_out",
        broadcast=True,
        **opts,
    )
    node.add_channel(ch, default=True)
    await ch.start()
    return WsOutbound(node, ch)


# ---------------------------------------------------------------------------------------------
# listen


async def listen(
    url: TransportURL, node: Node, *, ping_interval_s: float | None = 5.0, **opts: Any
) -> WsListener | WsOutbound:
    """Serve ``node`` over WebSocket at ``/rpc`` on ``host:port`` (``?outbound=1``: :func:`dial_out`)."""
    if url.flag("outbound"):
        return await dial_out(url, node, **opts)
    if url.path not in ("", "/", "/rpc"):
        raise UsageError(f"the WebSocket endpoint is /rpc; got path {url.path!r}")
    try:
        from transports._aioserver import serve_role
    except ImportError as e:  # the client side needs nothing, the device side aiohttp's server
        raise TransportError(
            f"the ws:// device side needs {e.name or 'aiohttp'}; install it with: pip install 'mgrpc[ws]'"
        ) from e

    return await serve_role(
        url, node, "ws", tls=url.scheme == "wss",
        make=lambda server: WsListener(server, node, url, ping_interval_s=ping_interval_s),
    )  # fmt: skip
