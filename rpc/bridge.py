"""Bridging: expose a device reachable on one channel ("upstream") on other channels ("downstream").

A :class:`BridgeNode` is a :class:`rpc.node.Node` whose id is the device's id, so every transport
can serve it with ``listen`` exactly like a device (MQTT subscribes ``<id>/rpc``, HTTP answers
``/rpc``...). Instead of dispatching requests to handlers it forwards frames:

* a request from a downstream channel goes upstream unchanged — every member, ``auth`` included,
  and, when both links speak JSON, the very bytes it arrived as; the bridge remembers
  ``(id, src)`` → downstream channel;
* a response from upstream goes back to the channel that sent the request (matched by ``id`` and
  ``dst``), or to the downstream channel whose learned address equals ``dst``;
* a request the device originates (upstream) goes to the downstream channel whose address equals its
  ``dst``, or, with an empty ``dst``, to every broadcast-enabled downstream channel;
* a response from downstream (to a device-originated request) goes upstream.

Dialects (docs/protocol/jsonrpc.md): a JSON-RPC 2.0 request or batch from downstream is served by the
node's JSON-RPC dispatcher (jsonrpcserver), whose every method is "call it upstream": each request goes
up as an mgRPC frame (src ``jsonrpc``, an id of ours) and its answer comes back as the JSON-RPC
response (an mgRPC error code as a server error with ``data.mgrpc_code``, a 404 "no handler" as
-32601). Upstream may itself speak JSON-RPC (``?dialect=jsonrpc`` on its URL): its channel's codec
translates, so mgRPC requesters downstream reach a plain JSON-RPC 2.0 server.

Upstream is (re)opened by an ``open_upstream`` coroutine function, with backoff from 0.5 s to 10 s;
frames arriving while it is down wait in a queue of at most ``max_queue_length`` (oldest dropped,
as a device's queue does). Downstream links come and go with their listeners.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from rpc.channel import Channel
from rpc.errors import HandlerError, MgrpcError
from rpc.frame import ABSENT, Frame
from rpc.jsonrpc import METHOD_NOT_FOUND, JsonRpcFault, is_jsonrpc_frame
from rpc.node import Context, Handler, Node, _id_key

__all__ = ["BridgeNode"]

log = logging.getLogger("mgrpc.bridge")

OpenUpstream = Callable[[], Awaitable[Channel]]
MAX_ROUTES = 4096
JSONRPC_SRC = "jsonrpc"  # the src of requests the bridge sends up for JSON-RPC requesters


class BridgeNode(Node):
    """Forwards frames between downstream channels and one upstream channel (see the module doc)."""

    def __init__(self, id: str, open_upstream: OpenUpstream, *, max_queue_length: int = 25,
                 max_frame_size: int = 0) -> None:  # fmt: skip
        super().__init__(id=id, builtins=False, max_queue_length=max_queue_length, max_frame_size=max_frame_size)
        self._open_upstream = open_upstream
        self.upstream: Channel | None = None
        self._routes: OrderedDict[tuple[Any, str], Channel] = OrderedDict()
        self._queue: deque[Frame] = deque()
        self._task: asyncio.Task[None] | None = None
        self._up_ready = asyncio.Event()
        self._closing = False
        self.forwarded = 0
        # JSON-RPC requests from downstream, each called upstream as an mgRPC request of ours.
        self.call_timeout_s = 20.0
        self._forward_handler = Handler("*", self._call_upstream, is_async=True)
        self._calls: dict[Any, asyncio.Future[Frame]] = {}

    # -- upstream ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the upstream link (keeps reconnecting in the background if it fails or drops)."""
        self._task = asyncio.ensure_future(self._keep_upstream())
        ready = asyncio.ensure_future(self._up_ready.wait())
        await asyncio.wait((ready, self._task), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # the reconnecting task died: report why instead of waiting forever
            ready.cancel()
            self._task.result()

    async def _keep_upstream(self) -> None:
        delay = 0.5
        while not self._closing:
            if self.upstream is not None and not self.upstream.closed:
                await asyncio.sleep(0.2)
                continue
            ch: Channel | None = None
            try:
                ch = await self._open_upstream()
                ch.attach(self)
                await ch.start()  # may fail too (the port went away in between): retry as well
            except (MgrpcError, OSError) as e:
                if ch is not None:
                    await ch.close()
                log.warning("upstream unavailable (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            self.upstream = ch
            log.info("upstream connected: %r", ch)
            self._up_ready.set()
            while self._queue:
                self._forward(ch, self._queue.popleft())

    def channel_closed(self, channel: Channel) -> None:
        """A link went away; the upstream one is reopened by the background task."""
        if channel is self.upstream:
            log.warning("upstream link lost; reconnecting")
            self.upstream = None
            return
        super().channel_closed(channel)
        for key, ch in list(self._routes.items()):
            if ch is channel:
                del self._routes[key]

    # -- forwarding ---------------------------------------------------------------------------------
    def frame_received(self, channel: Channel, frame: Frame) -> None:
        """Forward ``frame`` according to where it came from (never raises)."""
        try:
            if channel is self.upstream:
                self._from_upstream(frame)
            else:
                self._from_downstream(channel, frame)
        except Exception:
            log.exception("error forwarding a frame")

    def _from_downstream(self, channel: Channel, frame: Frame) -> None:
        if is_jsonrpc_frame(frame) and (frame.is_request or (frame.result is ABSENT and frame.error is None)):
            self._spawn(self._answer_jsonrpc(channel, frame))  # served here, each call sent upstream
            return
        if frame.src and channel.address is None:
            channel.address = frame.src
        if frame.is_request and frame.wants_reply:
            self._routes[(_id_key(frame.id), frame.src)] = channel
            while len(self._routes) > MAX_ROUTES:
                self._routes.popitem(last=False)
        self._to_upstream(frame)

    def _to_upstream(self, frame: Frame) -> None:
        up = self.upstream
        if up is None or up.closed:
            self._queue.append(frame)
            while len(self._queue) > self.max_queue_length:
                dropped = self._queue.popleft()
                log.warning("upstream down: dropping queued frame id=%r", dropped.id)
            return
        self._forward(up, frame)

    def _from_upstream(self, frame: Frame) -> None:
        if frame.is_response:
            call = self._calls.get(_id_key(frame.id))
            if call is not None:  # the answer to a JSON-RPC request we sent up
                if not call.done():
                    call.set_result(frame)
                return
            ch = self._routes.pop((_id_key(frame.id), frame.dst), None) or self._by_address(frame.dst)
            if ch is None:
                log.info("no downstream link for response id=%r dst=%r", frame.id, frame.dst)
                return
            self._forward(ch, frame)
            return
        if frame.dst:
            ch = self._by_address(frame.dst)
            if ch is not None:
                self._forward(ch, frame)
                return
        for ch in list(self.channels):
            if ch.broadcast and not ch.closed:
                self._forward(ch, frame)

    # -- JSON-RPC 2.0 from downstream ---------------------------------------------------------------
    def find_handler(self, method: str) -> Handler | None:
        """Every method is served by calling it upstream (the device decides what exists)."""
        return self._forward_handler

    def jsonrpc_received(self, channel: Channel, data: bytes) -> None:
        """A JSON-RPC batch (or unparsable JSON-RPC) from downstream is served; from upstream, dropped."""
        if channel is self.upstream:
            log.info("upstream sent a message that is not a frame; dropped")
            return
        super().jsonrpc_received(channel, data)

    async def _call_upstream(self, ctx: Context, params: Any) -> Any:
        if ctx.frame.nr:  # a notification: sent up without an id, nothing to wait for
            self._to_upstream(Frame.request(ctx.method, ctx.frame.params, src=JSONRPC_SRC))
            return None
        fid = self.new_id()
        key = _id_key(fid)
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._calls[key] = fut
        try:
            self._to_upstream(Frame.request(ctx.method, ctx.frame.params, id=fid, src=JSONRPC_SRC))
            try:
                resp = await asyncio.wait_for(fut, self.call_timeout_s)
            except TimeoutError:
                raise HandlerError(504, f"no reply from upstream within {self.call_timeout_s:g} s") from None
        finally:
            self._calls.pop(key, None)
        err = resp.error
        if err is not None and err.code != 0:
            message = err.message or ""
            if -32768 <= err.code <= -32000:  # upstream speaks JSON-RPC: its error as it is
                raise JsonRpcFault(err.code, message)
            if err.code == 404 and message.startswith(("No handler for", "Method [")):
                raise JsonRpcFault(METHOD_NOT_FOUND, "Method not found", ctx.method)
            raise HandlerError(err.code, message)
        return None if resp.result is ABSENT else resp.result

    def _by_address(self, addr: str) -> Channel | None:
        if not addr:
            return None
        for ch in self.channels:
            if ch.address == addr and not ch.closed:
                return ch
        return None

    def _forward(self, ch: Channel, frame: Frame) -> None:
        self.forwarded += 1
        self._send(ch, frame)

    async def close(self) -> None:
        """Close every link and stop reconnecting."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.upstream is not None:
            up, self.upstream = self.upstream, None
            await up.close()
        await super().close()
