"""The router: one mgRPC instance with local ids, channels, handlers and pending calls.

The same class serves both ends of the wire. A device is ``Node(id="esp32_0A1B2C")``; a host tool
is ``Node(id="mos", style="mos")`` (what :class:`rpc.client.AsyncClient` wraps). The rules are those
of rpc-common (spec/frame.md §3, §8):

* a request whose non-empty ``dst`` is not one of our ids is dropped without a reply (and a
  non-persistent channel is closed);
* a channel with no address learns the ``src`` of its first frame, unless another channel owns it;
* handlers are matched by mongoose glob, case-insensitive, newest registration first; no match is
  ``404 No handler for <M>`` (a ``mos``-style node answers ``Method [<M>] not found``);
* a request without ``id`` runs but gets no reply; a handler exception never escapes;
* replies: ``src`` = the request's non-empty ``dst`` or our first id, ``dst`` = the request's
  ``src``, ``tag`` copied, always on the channel the request came from;
* outgoing requests go to the channel whose address equals ``dst``, else to the default route
  (``*``); ``dst="RPC.LOCAL"`` loops back to ourselves with ``src`` ``RPC.LOCAL``;
* at most ``max_queue_length`` (25) calls are pending; one more fails the oldest with 429.

Sync handlers run inline in arrival order; coroutine handlers are started as tasks in arrival order,
so writes that must stay ordered (``OTA.Write``) keep their order when the handler does its work
before its first ``await``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rpc.auth import Authenticator, Credentials, make_auth
from rpc.channel import Channel
from rpc.errors import (
    ChannelClosed,
    HandlerError,
    MgrpcError,
    QueueOverflow,
    RemoteError,
    RpcTimeout,
    TransportError,
    UsageError,
)
from rpc.frame import ABSENT, ErrorInfo, Frame, RawJSON, Style
from rpc.glob import glob_match, is_glob
from rpc.jsonrpc import (
    JSONRPC_EXTRA,
    JsonRpcDispatcher,
    JsonRpcReply,
    ParamSpec,
    is_jsonrpc_frame,
    unavailable_reply,
)

__all__ = ["LOCAL_ADDR", "Context", "Handler", "Node"]

LOCAL_ADDR = "RPC.LOCAL"
DEFAULT_ROUTE = "*"
# After an auth retry, how long a 401 waits for the retry's own answer (it may be a duplicate of the
# first challenge: MQTT brokers deliver a request once per matching subscription).
AUTH_DUPLICATE_GRACE_S = 1.0

log = logging.getLogger("mgrpc.rpc")
_frame_std = logging.getLogger("mgrpc.frame")
_frame_log: Any = None  # structlog's logger, made when frame logging is first enabled


def _log_frame(direction: str, channel: Channel, frame: Frame, style: Style) -> None:
    """One structured line per frame, with its body (debug level only: structlog is imported on first use)."""
    global _frame_log
    if _frame_log is None:
        import structlog

        _frame_log = structlog.get_logger("mgrpc.frame")
    body = _frame_body(frame, style)
    _frame_log.debug(direction, channel=channel.type, id=frame.id, method=frame.method or None, body=body)


HandlerFunc = Callable[["Context", Any], Any]

_BODY_LOG_LIMIT = 4096  # characters of a frame body shown at DEBUG (``mgrpc -vv``)


def _frame_body(frame: Frame, style: Style) -> str:
    """The frame as it travels (its received bytes, or its JSON), for the DEBUG frame log."""
    if frame.raw is not None:
        text = frame.raw.decode("utf-8", "backslashreplace")
    else:
        try:
            text = frame.to_json(style)
        except Exception:  # a frame that cannot be encoded fails later, where it is reported
            text = repr(frame)
    text = text.rstrip("\r\n")
    if len(text) > _BODY_LOG_LIMIT:
        text = f"{text[:_BODY_LOG_LIMIT]}... ({len(text)} characters)"
    return text


@dataclass(slots=True)
class Context:
    """What a handler knows about the request it serves."""

    node: Node
    channel: Channel
    frame: Frame
    user: str | None = None

    @property
    def src(self) -> str:
        """The requester's id (``src`` of the request)."""
        return self.frame.src

    @property
    def method(self) -> str:
        """The method name as the requester wrote it."""
        return self.frame.method


@dataclass(slots=True)
class Handler:
    """A registered method: glob pattern, function, its ``args_fmt`` (for ``RPC.Describe``) and,
    if declared, its params (checked for JSON-RPC 2.0 requests, see :mod:`rpc.jsonrpc`)."""

    pattern: str
    func: HandlerFunc
    args_fmt: str = ""
    is_async: bool = False
    description: str = ""
    params: ParamSpec | None = None


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Frame]
    frame: Frame
    channel: Channel | None
    timer: asyncio.TimerHandle | None = None
    auth_retried: bool = field(default=False)
    late_401: asyncio.TimerHandle | None = None


class _LocalChannel(Channel):
    """rpc-loopback: frames sent to ``RPC.LOCAL`` come back to the same node."""

    type = "loopback"
    persistent = True
    broadcast = False

    def __init__(self, node: Node) -> None:
        super().__init__(style=node.style)
        self._node = node
        self.address = LOCAL_ADDR

    def send_nowait(self, frame: Frame) -> bool:
        """Deliver ``frame`` to our own node on the next loop iteration."""
        if frame.is_request:
            frame = frame.replace(src=LOCAL_ADDR, dst="")
        loop = asyncio.get_running_loop()
        loop.call_soon(self._node.frame_received, self, frame)
        return True

    async def send(self, frame: Frame) -> None:
        """See :meth:`send_nowait`."""
        self.send_nowait(frame)

    async def close(self) -> None:
        """The loopback channel never closes."""


class Node:
    """An mgRPC router (see the module docstring for the rules it follows).

    ``id`` is the first local id (``device.id``); ``ids`` adds more. ``style`` is how this node
    writes replies (``"device"``) or, for a host tool, ``"mos"``. ``auth`` checks credentials and
    ACLs on incoming requests; ``creds`` answer a 401 from a peer, once, with the same id.
    """

    def __init__(
        self,
        id: str | None = None,
        *,
        ids: Iterable[str] = (),
        style: Style = "device",
        max_frame_size: int = 4096,
        max_queue_length: int = 25,
        auth: Authenticator | None = None,
        creds: Credentials | None = None,
        compat_args: bool = False,
        builtins: bool = True,
    ) -> None:
        self.ids: list[str] = [i for i in ([id] if id else []) + list(ids) if i]
        self.style: Style = style
        self.max_frame_size = max_frame_size
        self.max_queue_length = max_queue_length
        self.auth = auth
        self.creds = creds
        self.compat_args = compat_args
        self._handlers: list[Handler] = []  # newest first
        self._lookup: dict[str, Handler | None] = {}
        self.channels: list[Channel] = []
        self._default: list[Channel] = []
        self._pending: OrderedDict[Any, _Pending] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_id = 0
        self._local = _LocalChannel(self)
        self._local.attach(self)
        self.on_request: Callable[[Channel, Frame], bool] | None = None
        self.on_channel_closed: list[Callable[[Channel], None]] = []
        # Extra HTTP endpoints served by HTTP transports next to /rpc (path prefix -> async handler
        # taking the transport's request object); the OTA service registers /update here.
        self.http_handlers: dict[str, Callable[..., Awaitable[Any]]] = {}
        self._jsonrpc: JsonRpcDispatcher | None = None
        if builtins:
            self._add_builtins()

    # -- identity ---------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """The first local id ("" if none)."""
        return self.ids[0] if self.ids else ""

    def is_local_id(self, dst: str) -> bool:
        """True if ``dst`` names this node."""
        return dst in self.ids

    # -- handlers ---------------------------------------------------------------------------------
    def add_handler(
        self,
        pattern: str,
        func: HandlerFunc,
        *,
        args_fmt: str = "",
        description: str = "",
        params: Sequence[str] | None = None,
    ) -> Handler:
        """Register ``func(ctx, params)`` for methods matching ``pattern``; newest registration wins.

        ``params`` declares the handler's params by name, in order (``"offset?"`` is optional): a
        JSON-RPC 2.0 request whose params do not fit is answered -32602, and by-position params
        reach the handler as an object. mgRPC frames are not checked (a device does not check).
        """
        spec = ParamSpec.parse(params) if params is not None else None
        h = Handler(pattern, func, args_fmt, inspect.iscoroutinefunction(func), description, spec)
        self._handlers.insert(0, h)
        self._lookup.clear()
        return h

    def method(
        self, pattern: str, *, args_fmt: str = "", params: Sequence[str] | None = None
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Decorator form of :meth:`add_handler`."""

        def deco(func: HandlerFunc) -> HandlerFunc:
            self.add_handler(pattern, func, args_fmt=args_fmt, params=params)
            return func

        return deco

    def remove_handler(self, pattern: str) -> None:
        """Remove every handler registered with exactly ``pattern``."""
        self._handlers = [h for h in self._handlers if h.pattern != pattern]
        self._lookup.clear()

    @property
    def handlers(self) -> list[Handler]:
        """Registered handlers, newest first."""
        return list(self._handlers)

    def find_handler(self, method: str) -> Handler | None:
        """The handler ``method`` dispatches to (first match, newest first), or None."""
        try:
            return self._lookup[method]
        except KeyError:
            pass
        found = None
        low = method.lower()
        for h in self._handlers:
            if glob_match(h.pattern, method) if is_glob(h.pattern) else h.pattern.lower() == low:
                found = h
                break
        if len(self._lookup) > 4096:
            self._lookup.clear()
        self._lookup[method] = found
        return found

    def _add_builtins(self) -> None:
        def rpc_list(ctx: Context, params: Any) -> Any:
            return RawJSON(json.dumps([h.pattern for h in self._handlers], separators=(",", ":")))

        def rpc_describe(ctx: Context, params: Any) -> Any:
            name = params.get("name") if isinstance(params, dict) else None
            if not isinstance(name, str) or not name:
                raise HandlerError(400, "name is required")
            for h in self._handlers:
                if h.pattern == name:
                    return {"name": name, "args_fmt": h.args_fmt}
            raise HandlerError(404, "name not found")

        def rpc_ping(ctx: Context, params: Any) -> Any:
            return {"channel_info": ctx.channel.info()}

        self.add_handler("RPC.List", rpc_list)
        self.add_handler("RPC.Describe", rpc_describe, args_fmt="{name: %T}", params=("name",))
        self.add_handler("RPC.Ping", rpc_ping)

    # -- channels ---------------------------------------------------------------------------------
    def add_channel(self, channel: Channel, *, default: bool = False, address: str | None = None) -> Channel:
        """Attach ``channel``; ``default=True`` registers it as the default route ``*``."""
        channel.attach(self)
        codec = channel.codec
        if hasattr(codec, "max_frame_size"):
            codec.max_frame_size = self.max_frame_size
        if address is not None:
            channel.address = address
        self.channels.append(channel)
        if default:
            self._default.append(channel)
        return channel

    def remove_channel(self, channel: Channel) -> None:
        """Detach ``channel``; calls pending on it fail with :class:`ChannelClosed`."""
        if channel in self.channels:
            self.channels.remove(channel)
        if channel in self._default:
            self._default.remove(channel)
        for key, p in list(self._pending.items()):
            if p.channel is channel and not p.future.done():
                self._fail(key, ChannelClosed("channel closed while the call was pending"))

    def channel_closed(self, channel: Channel) -> None:
        """ChannelSink: a channel went away."""
        self.remove_channel(channel)
        for cb in list(self.on_channel_closed):
            cb(channel)

    def route(self, dst: str) -> Channel | None:
        """The channel a request for ``dst`` goes out on (address match, else the default route)."""
        if dst == LOCAL_ADDR:
            return self._local
        if dst:
            for ch in self.channels:
                if ch.address == dst and not ch.closed:
                    return ch
        for ch in self._default:
            if not ch.closed:
                return ch
        if not dst and len(self.channels) == 1 and not self.channels[0].closed:
            return self.channels[0]
        return None

    # -- receiving ---------------------------------------------------------------------------------
    def frame_received(self, channel: Channel, frame: Frame) -> None:
        """ChannelSink: route one incoming frame (never raises)."""
        if _frame_std.isEnabledFor(logging.DEBUG):
            _log_frame("rx", channel, frame, self.style)
        try:
            if frame.is_request:
                self._handle_request(channel, frame)
            else:
                self._handle_response(channel, frame)
        except Exception:  # a bug here must not kill the transport's reader
            log.exception("error routing a frame on %s", channel.type)

    def _handle_request(self, channel: Channel, frame: Frame) -> None:
        if frame.extra and is_jsonrpc_frame(frame):
            self._spawn(self._answer_jsonrpc(channel, frame))
            return
        if frame.dst and not self.is_local_id(frame.dst):
            if self.on_request is not None and self.on_request(channel, frame):
                return
            log.info("Wrong dst %r on %s, frame dropped", frame.dst, channel.type)
            if not channel.persistent:
                self._spawn(channel.close())
            return
        if channel.address is None and frame.src and frame.src != LOCAL_ADDR:
            if any(c.address == frame.src for c in self.channels if c is not channel):
                log.warning("duplicate id %r, channel address not learned", frame.src)
            else:
                channel.address = frame.src
        if self.style == "mos" and frame.nr:
            return
        user = channel.user
        # The method is looked up first: an unknown one is 404 whatever the ACL (as rpc-common does,
        # frames.md §6-d; real-device.md RD-A14); the ACL decides only for methods that exist.
        handler = self.find_handler(frame.method)
        if handler is None:
            if self.style == "mos":
                self._reply_error(channel, frame, 404, f"Method [{frame.method}] not found")
            else:
                self._reply_error(channel, frame, 404, f"No handler for {frame.method}")
            return
        if self.auth is not None and channel is not self._local:
            decision = self.auth.check(frame.method, channel.type, frame.auth, user)
            if not decision.allowed:
                if decision.code == 401 and not frame.wants_reply and channel.type == "HTTP":
                    # HTTP answers even a notification with its 401 challenge (frames.md §6-g; RD-A2).
                    err = ErrorInfo(401, decision.message)
                    self._send(channel, Frame(src=self._reply_src(frame), dst=frame.src, error=err))
                    return
                self._reply_error(channel, frame, decision.code, decision.message)
                return
            user = decision.user
        ctx = Context(self, channel, frame, user)
        if handler.is_async:
            self._spawn(self._run_async(handler, ctx))
            return
        try:
            result = handler.func(ctx, frame.arguments)
        except HandlerError as e:
            self._reply_error(channel, frame, e.code, e.message)
            return
        except Exception:
            log.exception("handler for %s failed", frame.method)
            self._reply_error(channel, frame, 500, "internal error")
            return
        if inspect.isawaitable(result):
            self._spawn(self._finish_awaitable(result, ctx))
            return
        self._reply(channel, frame, result)

    async def _run_async(self, handler: Handler, ctx: Context) -> None:
        await self._finish_awaitable(handler.func(ctx, ctx.frame.arguments), ctx)

    async def _finish_awaitable(self, aw: Awaitable[Any], ctx: Context) -> None:
        try:
            result = await aw
        except HandlerError as e:
            self._reply_error(ctx.channel, ctx.frame, e.code, e.message)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler for %s failed", ctx.frame.method)
            self._reply_error(ctx.channel, ctx.frame, 500, "internal error")
            return
        self._reply(ctx.channel, ctx.frame, result)

    def _reply_src(self, frame: Frame) -> str:
        return frame.dst or self.id

    def _reply(self, channel: Channel, req: Frame, result: Any) -> None:
        if not req.wants_reply:
            return
        if self.style == "mos":
            reply = Frame(id=req.id, result=result)
        else:
            reply = Frame(id=req.id, src=self._reply_src(req), dst=req.src, tag=req.tag, result=result)
        self._send(channel, reply)

    def _reply_error(self, channel: Channel, req: Frame, code: int, message: str | None) -> None:
        if not req.wants_reply:
            return
        if self.style == "mos":
            reply = Frame(id=req.id, error=ErrorInfo(code, message))
        else:
            reply = Frame(id=req.id, src=self._reply_src(req), dst=req.src, tag=req.tag, error=ErrorInfo(code, message))
        self._send(channel, reply)

    def _handle_response(self, channel: Channel, frame: Frame) -> None:
        if frame.extra and frame.result is ABSENT and frame.error is None and is_jsonrpc_frame(frame):
            # JSON-RPC without a method is neither a request nor a response: an invalid request.
            self._spawn(self._answer_jsonrpc(channel, frame))
            return
        if frame.dst and self.ids and not self.is_local_id(frame.dst) and channel is not self._local:
            if self.on_request is not None and self.on_request(channel, frame):
                return
            # mos accepts responses whatever their dst (MQTT rewrites it); the device drops them.
            if self.style != "mos":
                log.info("Wrong dst %r on a response, dropped", frame.dst)
                return
        key = _id_key(frame.id)
        p = self._pending.get(key)
        if p is None:
            if frame.id is None:
                log.info("Response without an ID on %s", channel.type)
                if not channel.persistent:
                    self._spawn(channel.close())
            else:
                log.info("ignoring unsolicited response id=%r", frame.id)
            return
        if (
            frame.error is not None
            and frame.error.code == 401
            and self.creds is not None
            and not p.auth_retried
            and p.frame.auth is None
        ):
            challenge = _parse_challenge(frame.error.message)
            if challenge is not None and challenge.get("auth_type") == "digest":
                p.auth_retried = True
                retry = p.frame.replace(auth=make_auth(challenge, self.creds))
                p.frame = retry
                self._send(p.channel or channel, retry, fail_key=key)
                return
        if frame.error is not None and frame.error.code == 401 and p.auth_retried and p.late_401 is None:
            # The retry reuses the id, so a 401 now may be a duplicate of the first challenge (an MQTT
            # broker delivering the request once per matching subscription, the device answering
            # each) rather than the verdict on the retry: give the retry's answer a moment to come.
            p.late_401 = asyncio.get_running_loop().call_later(AUTH_DUPLICATE_GRACE_S, self._settle, key, frame)
            return
        if p.late_401 is not None and frame.error is not None and frame.error.code == 401:
            return
        self._settle(key, frame)

    def _settle(self, key: Any, frame: Frame) -> None:
        p = self._pending.pop(key, None)
        if p is None:
            return
        if p.late_401 is not None:
            p.late_401.cancel()
        if p.timer is not None:
            p.timer.cancel()
        if not p.future.done():
            p.future.set_result(frame)

    # -- the JSON-RPC 2.0 dialect (rpc.jsonrpc) ----------------------------------------------------
    def jsonrpc_received(self, channel: Channel, data: bytes) -> None:
        """ChannelSink: a message that is not an mgRPC frame but looks like JSON-RPC (a batch, or
        JSON-RPC text that does not parse); it is answered as JSON-RPC 2.0 requires."""
        if self.max_frame_size and len(data) > self.max_frame_size:
            log.warning("%s: dropping a JSON-RPC message of %d bytes (max %d)", channel.type, len(data),
                        self.max_frame_size)  # fmt: skip
            return
        self._spawn(self._answer_jsonrpc(channel, data))

    async def serve_jsonrpc(self, channel: Channel, data: bytes | str | Frame) -> JsonRpcReply:
        """Answer one JSON-RPC 2.0 message (text, or a parsed frame) from ``channel`` through
        jsonrpcserver, against this node's handlers, auth and ACL. Transports that hold the reply
        themselves (HTTP) call this; the others get the reply sent on the channel."""
        if self._jsonrpc is None:
            try:
                self._jsonrpc = JsonRpcDispatcher(self)
            except UsageError as e:  # jsonrpcserver is not installed: say so, in JSON-RPC
                log.warning("%s: JSON-RPC request not served: %s", channel.type, e)
                return unavailable_reply(str(e))
        return await self._jsonrpc.dispatch(channel, data)

    async def _answer_jsonrpc(self, channel: Channel, data: bytes | Frame) -> None:
        reply = await self.serve_jsonrpc(channel, data)
        if reply.body is not None:
            # dst only routes the reply (MQTT: <src>/rpc); the text sent is the JSON-RPC response.
            self._send(channel, Frame(src=self.id, dst=reply.reply_to, extra=JSONRPC_EXTRA, raw=reply.body))

    # -- sending -----------------------------------------------------------------------------------
    def _send(self, channel: Channel, frame: Frame, *, fail_key: Any = None) -> None:
        if _frame_std.isEnabledFor(logging.DEBUG):
            _log_frame("tx", channel, frame, self.style)
        if channel.closed and channel is not self._local:
            if fail_key is not None:
                self._fail(fail_key, ChannelClosed("channel is closed"))
            return
        sender = getattr(channel, "send_nowait", None)
        if sender is not None:
            try:
                if sender(frame):
                    return
            except MgrpcError as e:
                if fail_key is not None:
                    self._fail(fail_key, e)
                return
        self._spawn(self._send_async(channel, frame, fail_key))

    async def _send_async(self, channel: Channel, frame: Frame, fail_key: Any) -> None:
        try:
            await channel.send(frame)
        except (MgrpcError, OSError) as e:
            log.info("send on %s failed: %s", channel.type, e)
            if fail_key is not None:
                self._fail(fail_key, e if isinstance(e, MgrpcError) else TransportError(str(e)))

    def send_frame(self, frame: Frame, *, channel: Channel | None = None) -> None:
        """Send a prepared frame as is (used by bridges); routed by ``dst`` unless ``channel`` given."""
        ch = channel or self.route(frame.dst)
        if ch is None:
            raise TransportError(f"no channel for dst {frame.dst!r}")
        self._send(ch, frame)

    def _outbound(self, method: str, dst: str, channel: Channel | None) -> tuple[Channel, str]:
        """The channel a request goes out on and the ``src`` it carries there."""
        ch = channel or self.route(dst)
        if ch is None:
            raise TransportError(f"no channel to send {method} to (dst {dst!r})")
        return ch, (self.id if ch is not self._local else LOCAL_ADDR)

    def new_id(self) -> int:
        """A fresh request id: mos's random 2^40-range ids, or a device's growing counter."""
        if self.style == "mos":
            return random.getrandbits(40) | (1 << 40)
        # The device adds rand() & 0xffff, which may be 0; we add at least 1 so that an id is never
        # reused while its call may still be pending.
        self._next_id += random.getrandbits(16) or 1
        return self._next_id

    async def call_frame(
        self,
        method: str,
        params: Any = ABSENT,
        *,
        dst: str = "",
        timeout_s: float | None = 20.0,
        channel: Channel | None = None,
        id: int | str | None = None,
        tag: str = "",
        extra: dict[str, Any] | None = None,
    ) -> Frame:
        """Send a request and return the response frame (errors are *not* raised; see :meth:`call`)."""
        ch, src = self._outbound(method, dst, channel)
        fid = id if id is not None else self.new_id()
        frame = Frame.request(
            method, params, id=fid, src=src, dst="" if ch is self._local else dst,
            compat_args=self.compat_args, tag=tag, extra=extra or {},
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Frame] = loop.create_future()
        key = _id_key(fid)
        p = _Pending(fut, frame, ch)
        if timeout_s is not None:
            p.timer = loop.call_later(timeout_s, self._timeout, key, method, timeout_s)
        self._pending[key] = p
        while len(self._pending) > self.max_queue_length:
            oldest = next(iter(self._pending))
            self._fail(oldest, QueueOverflow())
        self._send(ch, frame, fail_key=key)
        try:
            return await fut
        finally:
            # The caller gave up (cancelled): free its slot and timer, or with timeout_s=None it
            # would hold one of the max_queue_length slots forever.
            if fut.cancelled() and self._pending.get(key) is p:
                del self._pending[key]
                if p.timer is not None:
                    p.timer.cancel()

    async def call(
        self,
        method: str,
        params: Any = ABSENT,
        *,
        dst: str = "",
        timeout_s: float | None = 20.0,
        channel: Channel | None = None,
    ) -> Any:
        """Call ``method`` and return its result; raise :class:`RemoteError` for an error reply.

        ``params=None`` (or absent) sends no ``params`` member, as ``mos call`` without arguments.
        An error with code 0 counts as success and returns None, as mos does.
        """
        if params is None:
            params = ABSENT
        resp = await self.call_frame(method, params, dst=dst, timeout_s=timeout_s, channel=channel)
        if resp.error is not None:
            if resp.error.code != 0:
                raise RemoteError(resp.error.code, resp.error.message or "")
            return None
        return None if resp.result is ABSENT else resp.result

    def notify(self, method: str, params: Any = ABSENT, *, dst: str = "", channel: Channel | None = None) -> None:
        """Send a request without an id (no reply will come)."""
        ch, src = self._outbound(method, dst, channel)
        self._send(ch, Frame.request(method, params, src=src, dst=dst, compat_args=self.compat_args))

    def broadcast(self, method: str, params: Any = ABSENT) -> int:
        """Send a notification on every broadcast-enabled channel; returns how many got it."""
        n = 0
        for ch in self.channels:
            if ch.broadcast and not ch.closed:
                self._send(ch, Frame.request(method, params, src=self.id))
                n += 1
        return n

    def _timeout(self, key: Any, method: str, timeout_s: float) -> None:
        self._fail(key, RpcTimeout(f"{method}: no reply within {timeout_s:g} s (context deadline exceeded)"))

    def _fail(self, key: Any, exc: BaseException) -> None:
        p = self._pending.pop(key, None)
        if p is None:
            return
        if p.timer is not None:
            p.timer.cancel()
        if not p.future.done():
            p.future.set_exception(exc)

    @property
    def pending_count(self) -> int:
        """Number of calls waiting for a reply."""
        return len(self._pending)

    # -- lifecycle ---------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close every channel, fail pending calls and cancel running handler tasks."""
        for key in list(self._pending):
            self._fail(key, ChannelClosed("node closed"))
        for ch in list(self.channels):
            try:
                await ch.close()
            except Exception:
                log.debug("closing %r failed", ch, exc_info=True)
        self.channels.clear()
        self._default.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _id_key(fid: Any) -> Any:
    if isinstance(fid, str) and fid.isdigit():
        return int(fid)
    if isinstance(fid, float) and fid.is_integer():
        return int(fid)
    return fid


def _parse_challenge(message: str | None) -> dict[str, Any] | None:
    if not message:
        return None
    try:
        obj = json.loads(message)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
