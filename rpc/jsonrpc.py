"""The JSON-RPC 2.0 dialect: served by ``jsonrpcserver`` against the router's own handlers.

A device answers two dialects on every channel (docs/protocol/jsonrpc.md):

* **mgRPC** frames (``{"id":..,"src":..,"method":..}``), dispatched by :class:`rpc.node.Node` itself;
* **JSON-RPC 2.0** requests (a top-level ``"jsonrpc"`` member, or a batch array), dispatched here.

Parsing, schema validation, batch/notification handling, parameter binding and the response
objects are ``jsonrpcserver``'s (an optional dependency: ``pip install 'mgrpc[jsonrpc]'``). What this
module adds is the *method table*: a mapping that, for each request, asks the node for the handler of
that name (glob patterns, newest first, the same lookup as mgRPC) after the node's authenticator
has checked the method against the channel's user and ACL. There is one registry.

Error mapping (the ``error`` member of a response):

========================================  =====================================================
what happened                             ``code``, ``message``, ``data``
========================================  =====================================================
not JSON                                  -32700 ``Parse error``, the parser's text; ``id`` null
not a request object (schema)             -32600 ``Invalid request``; ``id`` null
no handler matches                        -32601 ``Method not found``, the method name
params do not fit the declared params     -32602 ``Invalid params``, what did not bind
the handler raised an unexpected error    -32603 ``Internal error`` (details only in the log)
the handler raised ``HandlerError(c, m)``  -32000 ``m`` (``Server error`` if empty),
                                          ``{"mgrpc_code": c}``
the ACL or auth refused the call          -32000 as above with the authenticator's code (401/403)
========================================  =====================================================

Handlers declare their params with ``node.add_handler(..., params=("name", "offset?"))``: names
in order, ``?`` marks an optional one. Only then are params checked (-32602), and a by-position
array is handed to the handler as the object those names make; without a declaration the handler
gets the ``params`` member as sent (``None`` if absent), exactly as over mgRPC.

The client side (``?dialect=jsonrpc`` on a port URL) is :class:`JsonRpcCodec`: it writes our
request frames as JSON-RPC 2.0 requests and reads JSON-RPC responses back into frames, so every
transport, the ``mgrpc`` CLI and the bridge speak it without knowing.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rpc.channel import FrameCodec, JsonCodec, looks_like_jsonrpc
from rpc.errors import FrameError, HandlerError, MgrpcError, UsageError
from rpc.frame import ABSENT, ErrorInfo, Frame, RawJSON, Style, parse_frame

if TYPE_CHECKING:
    from rpc.channel import Channel
    from rpc.node import Handler, Node

__all__ = [
    "DIALECTS",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "JSONRPC_EXTRA",
    "METHOD_NOT_FOUND",
    "MGRPC_CODE",
    "PARSE_ERROR",
    "SERVER_ERROR",
    "JsonRpcCodec",
    "JsonRpcDispatcher",
    "JsonRpcFault",
    "JsonRpcReply",
    "ParamSpec",
    "is_jsonrpc_frame",
    "looks_like_jsonrpc",
    "unavailable_reply",
    "with_dialect",
]

log = logging.getLogger("mgrpc.jsonrpc")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
# The member of ``error.data`` that carries an mgRPC error code through a server error.
MGRPC_CODE = "mgrpc_code"
JSONRPC_EXTRA: Mapping[str, Any] = {"jsonrpc": "2.0"}
DIALECTS = ("mgrpc", "jsonrpc")
_MISSING_DEP = "JSON-RPC 2.0 needs jsonrpcserver; install it with: pip install 'mgrpc[jsonrpc]'"


def is_jsonrpc_frame(frame: Frame) -> bool:
    """True if ``frame`` has a top-level ``jsonrpc`` member (mgRPC frames never do)."""
    return bool(frame.extra) and "jsonrpc" in frame.extra


class JsonRpcFault(MgrpcError):
    """Raised by a handler (or a bridge) to answer with exactly this JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = ABSENT) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


# ---------------------------------------------------------------------------------------------
# declared params


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """A handler's declared params: names in order, and which of them are required."""

    names: tuple[str, ...]
    required: frozenset[str]

    @classmethod
    def parse(cls, decl: Sequence[str]) -> ParamSpec:
        """``("name", "offset?")``: a trailing ``?`` marks an optional param."""
        if isinstance(decl, str):
            raise UsageError("params must be a sequence of names, e.g. ('name', 'offset?')")
        names: list[str] = []
        required: set[str] = set()
        for item in decl:
            name = item[:-1] if item.endswith("?") else item
            if not name.isidentifier() or name in names:
                raise UsageError(f"invalid or repeated param name {item!r}")
            names.append(name)
            if not item.endswith("?"):
                required.add(name)
        return cls(tuple(names), frozenset(required))

    def signature(self) -> inspect.Signature:
        """The Python signature jsonrpcserver binds the request's params against."""
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return inspect.Signature(
            [
                inspect.Parameter(n, kind, default=inspect.Parameter.empty if n in self.required else None)
                for n in self.names
            ]
        )

    def as_object(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The params as the object a handler expects (positional ones named, absent ones left out)."""
        out = dict(zip(self.names, args, strict=False))
        out.update(kwargs)
        return out


# ---------------------------------------------------------------------------------------------
# server side


@dataclass(frozen=True, slots=True)
class JsonRpcReply:
    """What a JSON-RPC message is answered with: the response object(s), or None (notifications)."""

    payload: dict[str, Any] | list[dict[str, Any]] | None
    body: bytes | None
    # The ``src`` of a single request that carried the mgRPC envelope: where the reply goes on
    # channels that route by it (MQTT publishes to ``<src>/rpc``).
    reply_to: str = ""

    @property
    def auth_challenge(self) -> str | None:
        """The message of the first error refused with mgRPC code 401 (a digest challenge), if any."""
        items = self.payload if isinstance(self.payload, list) else [self.payload]
        for item in items:
            err = item.get("error") if isinstance(item, dict) else None
            data = err.get("data") if isinstance(err, dict) else None
            if isinstance(data, dict) and data.get(MGRPC_CODE) == 401:
                return str(err.get("message", ""))  # type: ignore[union-attr]
        return None


def _encode(payload: Any) -> bytes | None:
    if payload is None:
        return None
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def unavailable_reply(reason: str) -> JsonRpcReply:
    """The -32603 reply given when jsonrpcserver is not installed (``reason`` names the extra)."""
    return _fallback(reason)


def _fallback(error_data: str, id_: Any = None) -> JsonRpcReply:
    """An internal-error reply built by hand (jsonrpcserver itself is missing or failed)."""
    payload = {"jsonrpc": "2.0", "error": {"code": INTERNAL_ERROR, "message": "Internal error", "data": error_data},
               "id": id_}  # fmt: skip
    return JsonRpcReply(payload, _encode(payload))


class _Unparsed:
    """The JSON parser's failure, handed to jsonrpcserver's deserializer so it builds the -32700."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _deserialize(obj: Any) -> Any:
    if isinstance(obj, _Unparsed):
        raise obj.error
    return obj


# mgRPC envelope members a JSON-RPC request may carry (docs/protocol/jsonrpc.md §1): the reply route
# (``src``, needed on MQTT), our id (``dst``), ``tag`` and digest ``auth``. Of another type, they stay
# in the request and make it invalid.
_ENVELOPE: dict[str, type] = {"src": str, "dst": str, "tag": str, "auth": dict}

_ANY_PARAMS = inspect.Signature(
    [
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


class JsonRpcDispatcher:
    """Serves JSON-RPC 2.0 messages for ``node`` through jsonrpcserver (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        try:
            import jsonrpcserver
            from jsonrpcserver.main import default_validator
        except ImportError as e:
            raise UsageError(_MISSING_DEP) from e
        self.node = node
        self._dispatch = jsonrpcserver.async_dispatch_to_serializable
        self._success = jsonrpcserver.Success
        self._error_cls = jsonrpcserver.JsonRpcError
        schema_check: Callable[[Any], Any] = default_validator

        def validate_one(obj: Any) -> Any:
            # jsonrpcserver would accept a nested array as a batch; a batch's element (and the
            # empty array, the spec's one bare -32600) must be a request object.
            if isinstance(obj, list):
                raise ValueError("not a request object")
            return schema_check(obj)

        self._validate_one = validate_one

    async def dispatch(self, channel: Channel, data: bytes | str | Frame) -> JsonRpcReply:
        """Answer one JSON-RPC message (text, or a frame already parsed) that arrived on ``channel``."""
        try:
            if isinstance(data, Frame):
                obj: Any = json.loads(data.raw if data.raw is not None else data.to_json("mos"))
            else:
                obj = json.loads(data)
        except (ValueError, RecursionError) as e:
            obj = _Unparsed(e)
        reply_to = ""
        try:
            if isinstance(obj, list) and obj:
                parts = await asyncio.gather(*(self._one(channel, item) for item in obj))
                answered = [p for p in parts if p is not None]
                payload: Any = answered or None  # a batch of notifications gets no reply at all
            else:
                if isinstance(obj, dict) and isinstance(obj.get("src"), str):
                    reply_to = obj["src"]
                payload = await self._one(channel, obj)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in the glue must still give the requester an answer
            log.exception("JSON-RPC dispatch failed")
            return _fallback(type(e).__name__)
        try:
            return JsonRpcReply(payload, _encode(payload), reply_to)
        except (TypeError, ValueError) as e:
            log.error("JSON-RPC reply not serializable: %s", e)
            return _fallback("result is not JSON")

    async def _one(self, channel: Channel, obj: Any) -> dict[str, Any] | None:
        envelope: dict[str, Any] = {}
        if isinstance(obj, dict) and not _ENVELOPE.keys().isdisjoint(obj):
            # mgRPC's envelope members are taken off before jsonrpcserver validates the request.
            obj = dict(obj)
            for name, kind in _ENVELOPE.items():
                if name in obj and isinstance(obj[name], kind):
                    envelope[name] = obj.pop(name)
            dst = envelope.get("dst")
            if dst and not self.node.is_local_id(dst):
                log.info("JSON-RPC request for dst %r on %s dropped", dst, channel.type)
                return None
        methods = _MethodTable(self, channel, obj, envelope)
        out = await self._dispatch(obj, methods, deserializer=_deserialize, validator=self._validate_one)
        return out  # type: ignore[return-value]

    def method_for(
        self, handler: Handler, name: str, channel: Channel, user: str | None, obj: Any, envelope: Mapping[str, Any]
    ) -> Any:
        """The callable jsonrpcserver calls for ``name``: binds params, runs the handler, maps errors."""
        from rpc.node import Context  # rpc.node imports this module

        node = self.node
        spec: ParamSpec | None = getattr(handler, "params", None)
        success, error_cls = self._success, self._error_cls

        async def call(*args: Any, **kwargs: Any) -> Any:
            if spec is not None:
                params: Any = spec.as_object(args, kwargs)
            else:
                params = obj.get("params")
            # nr marks a notification (no id member), which an id of null is not.
            frame = Frame(
                id=obj.get("id"), method=name, params=obj.get("params", ABSENT), nr="id" not in obj,
                src=envelope.get("src", ""), dst=envelope.get("dst", ""), tag=envelope.get("tag", ""),
                auth=envelope.get("auth"), extra=JSONRPC_EXTRA,
            )  # fmt: skip
            ctx = Context(node, channel, frame, user)
            try:
                result = handler.func(ctx, params)
                if inspect.isawaitable(result):
                    result = await result
                if isinstance(result, RawJSON):
                    result = json.loads(result)
                elif result is ABSENT:
                    result = None
                json.dumps(result)  # an unserializable result is the handler's bug: -32603, not a crash
            except HandlerError as e:
                raise error_cls(SERVER_ERROR, e.message or "Server error", {MGRPC_CODE: e.code}) from None
            except JsonRpcFault as e:
                if e.data is ABSENT:
                    raise error_cls(e.code, e.message) from None
                raise error_cls(e.code, e.message, e.data) from None
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handler for %s failed", name)
                raise error_cls(INTERNAL_ERROR, "Internal error") from None
            return success(result)

        call.__signature__ = spec.signature() if spec is not None else _ANY_PARAMS  # type: ignore[attr-defined]
        return call

    def refused(self, code: int, message: str | None) -> Any:
        """A callable answering every call with the authenticator's refusal."""
        error_cls = self._error_cls

        async def call(*args: Any, **kwargs: Any) -> Any:
            raise error_cls(SERVER_ERROR, message or "Server error", {MGRPC_CODE: code})

        call.__signature__ = _ANY_PARAMS  # type: ignore[attr-defined]
        return call


class _MethodTable(Mapping[str, Any]):
    """jsonrpcserver's ``methods`` for one request: the node's handler lookup, after auth and ACL."""

    __slots__ = ("_channel", "_disp", "_envelope", "_obj")

    def __init__(self, disp: JsonRpcDispatcher, channel: Channel, obj: Any, envelope: Mapping[str, Any]) -> None:
        self._disp = disp
        self._channel = channel
        self._obj = obj
        self._envelope = envelope

    def __getitem__(self, name: str) -> Any:
        node = self._disp.node
        channel = self._channel
        user = channel.user
        handler = node.find_handler(name)
        if handler is None:
            raise KeyError(name)  # jsonrpcserver answers -32601 (before the ACL, as over mgRPC)
        if node.auth is not None and channel is not getattr(node, "_local", None):
            decision = node.auth.check(name, channel.type, self._envelope.get("auth"), user)
            if not decision.allowed:
                return self._disp.refused(decision.code, decision.message)
            user = decision.user
        return self._disp.method_for(handler, name, channel, user, self._obj, self._envelope)

    def __iter__(self) -> Iterator[str]:
        return iter([h.pattern for h in self._disp.node.handlers])

    def __len__(self) -> int:
        return len(self._disp.node.handlers)


# ---------------------------------------------------------------------------------------------
# client side


class JsonRpcCodec:
    """A frame codec that speaks JSON-RPC 2.0 to the peer (``?dialect=jsonrpc``).

    Requests go out as ``{"jsonrpc":"2.0","method":..,"params":..,"id":..}`` with ids of our own
    numbering (so two mgRPC requesters behind a bridge can never collide); a response is read back
    into the frame the requester expects: its own ``id``, ``src``/``dst`` swapped back, ``tag`` kept.
    An error carrying ``data.mgrpc_code`` gives that code back; other errors keep their JSON-RPC
    code. Responses we send (a device-originated request answered) are written in JSON-RPC too.
    """

    name = "json"
    max_outstanding = 4096
    # Stream transports write one JSON message per line for this codec (not mos's """ framing).
    line_framed = True

    def __init__(self, inner: FrameCodec | None = None, *, envelope: bool = False) -> None:
        inner = inner if inner is not None else JsonCodec()
        # With ``envelope`` requests also carry mgRPC's src/dst (a link that routes by them: MQTT).
        self.envelope = envelope
        if inner.name != "json":
            raise UsageError(f"?dialect=jsonrpc needs the JSON codec, not {inner.name}")
        self.inner = inner
        self._next = 0
        self._outstanding: OrderedDict[int, Frame] = OrderedDict()

    @property
    def max_frame_size(self) -> int:
        """The inner codec's frame size limit."""
        return int(getattr(self.inner, "max_frame_size", 0))

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        if hasattr(self.inner, "max_frame_size"):
            self.inner.max_frame_size = value

    def encode(self, frame: Frame, style: Style) -> bytes:
        """One request (or response) as JSON-RPC 2.0 text."""
        obj: dict[str, Any] = {"jsonrpc": "2.0"}
        if frame.is_request:
            obj["method"] = frame.method
            params = frame.arguments if (frame.params is not ABSENT or frame.args is not ABSENT) else ABSENT
            if isinstance(params, RawJSON):
                params = json.loads(params)
            if params is not ABSENT and params is not None:
                if not isinstance(params, dict | list):
                    raise FrameError("JSON-RPC 2.0 params must be an object or an array")
                obj["params"] = params
            if self.envelope:
                if frame.src:
                    obj["src"] = frame.src
                if frame.dst:
                    obj["dst"] = frame.dst
            if frame.auth:  # the digest answer to a 401 (docs/protocol/jsonrpc.md §7)
                obj["auth"] = frame.auth
            if frame.wants_reply:
                self._next += 1
                obj["id"] = self._next
                self._outstanding[self._next] = frame
                while len(self._outstanding) > self.max_outstanding:
                    self._outstanding.popitem(last=False)
        else:
            if frame.error is not None and frame.error.code != 0:
                obj["error"] = {"code": frame.error.code, "message": frame.error.message or ""}
            else:
                result = frame.result
                obj["result"] = json.loads(result) if isinstance(result, RawJSON) else (
                    None if result is ABSENT else result)  # fmt: skip
            obj["id"] = frame.id
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def decode(self, data: bytes) -> Frame:
        """A JSON-RPC response as the frame answering our request (other messages parsed as is)."""
        frame = parse_frame(data, max_size=self.max_frame_size)
        if frame.method or not is_jsonrpc_frame(frame):
            return frame
        req = self._outstanding.pop(frame.id, None) if isinstance(frame.id, int) else None
        error = frame.error
        if error is not None:
            # Frame keeps only code and message of an error; its data member is read from the text.
            err_obj = json.loads(data).get("error")
            data_member = err_obj.get("data") if isinstance(err_obj, dict) else None
            code = error.code
            if isinstance(data_member, dict) and isinstance(data_member.get(MGRPC_CODE), int):
                code = data_member[MGRPC_CODE]
            error = ErrorInfo(code, error.message)
        if req is None:
            return Frame(id=frame.id, result=frame.result, error=error)
        return Frame(id=req.id, src=req.dst, dst=req.src, tag=req.tag, result=frame.result, error=error)


def with_dialect(codec: FrameCodec, dialect: str | None, *, envelope: bool = False) -> FrameCodec:
    """The codec a client channel uses for ``?dialect=`` (``mgrpc``, the default, or ``jsonrpc``);
    ``envelope`` for links that route by ``src``/``dst`` (see :class:`JsonRpcCodec`)."""
    if dialect is None or dialect.lower() in ("", "mgrpc"):
        return codec
    if dialect.lower() == "jsonrpc":
        return JsonRpcCodec(codec, envelope=envelope)
    raise UsageError(f"unknown dialect {dialect!r}; valid dialects: {', '.join(DIALECTS)}")
