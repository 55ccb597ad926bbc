"""``http://`` and ``https://``: one POST per frame (spec/transports.md §3).

Host side (:func:`open_client`), as ``mos``'s HTTP codec: ``POST <url>`` with
``Content-Type: application/json`` and the frame JSON + ``\\n`` as body, one request per frame; the
reply body is one frame. A non-200, non-401 status is ``server returned an error``. On 401 the
``WWW-Authenticate: Digest`` challenge is answered once with the channel's ``creds`` (handed over by
:func:`transports.connect`); a second 401 is ``authentication failed``. ``https://`` verifies the
server as ``wss://`` does (system CAs, ``?ca=FILE``, or ``?insecure=1`` for nothing).

Device side (:func:`listen`), the ``/rpc`` endpoint of the shared aiohttp server
(:mod:`transports._aioserver`), each request a short-lived channel (type ``HTTP``, non-persistent,
not broadcast, info the peer's ``ip:port``):

* full-frame mode, ``/rpc`` or ``/rpc/``: the body is a frame; status 200 with the reply frame and
  ``\\r\\n``, or an empty body when the frame has no ``id``; an invalid frame, or one that closes the
  channel (a wrong non-empty ``dst``), is ``400 Invalid request``; ``OPTIONS`` is ``400`` too (an
  empty frame);
* REST mode, ``/rpc/<Method>``: the body is the args (for a ``GET`` with an empty body, args are
  synthesised from the query string with the values inserted raw, as the device does); the reply
  is the result (a string result bare, without quotes) or the error object, status 200, 403, 404 or
  500; ``OPTIONS`` is a 200 CORS preflight. Args that are not valid JSON get the error object
  ``{"code":400,"message":"invalid JSON args"}`` with status 500 (the 403/404/other mapping);
* every reply carries ``Content-Type: application/json``, ``Access-Control-Allow-Origin: *``,
  ``Access-Control-Allow-Headers: *`` and ``Connection: keep-alive`` only if the request asked for
  it (otherwise ``close``, and the connection is closed);
* auth: an ``Authorization: Digest`` header (RFC 2617, qop=auth) is checked against the node's
  :class:`rpc.auth.Authenticator` and names the channel's user; when the authenticator answers 401
  the reply is HTTP 401 with ``WWW-Authenticate: Digest qop="auth", realm=.., nonce=<hex time>,
  algorithm=..``.

JSON-RPC 2.0 (docs/protocol/jsonrpc.md): ``POST /jsonrpc`` takes a JSON-RPC request or batch and is
answered by the node's JSON-RPC dispatcher (:meth:`rpc.node.Node.serve_jsonrpc`, jsonrpcserver against the
same handlers): status 200 with the response object or array, ``204`` when nothing is owed (notifications),
``401`` with the digest challenge when the authenticator asks for credentials, ``405`` for a method other
than POST (``OPTIONS`` is a CORS preflight), ``413`` with a -32600 object for a body over the node's frame
size. On ``/rpc``, a body that is a JSON-RPC request (a ``"jsonrpc"`` member), a batch array, or JSON-RPC
text that does not parse is answered the same way; anything else there is mgRPC as above.

Other paths go to ``node.http_handlers`` (longest prefix), e.g. the OTA service's ``/update``.

Limits of the device side (listen URL options, shared with a ``ws://`` listener on the same
``host:port``; see :mod:`transports._aioserver`): ``max_conns`` (default 64; one more closes first a
connection that has not completed a request yet, then the one quiet the longest), ``header_timeout``
(default 10 s from the first byte of a request head to its end: slowloris connections are closed)
and ``idle_timeout`` (default 60 s waiting for a request, after accepting and between keep-alive
requests). A ``/rpc`` body over the node's ``max_frame_size`` is refused without being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from rpc.auth import Authenticator, Credentials, http_challenge_header, http_digest_authorization, parse_digest_header
from rpc.auth import verify_http_digest as _verify_digest
from rpc.channel import Channel, FrameCodec, JsonCodec, looks_like_jsonrpc
from rpc.errors import AuthError, ChannelClosed, FrameError, TransportError, UsageError
from rpc.frame import ABSENT, Frame, RawJSON, value_text
from rpc.jsonrpc import is_jsonrpc_frame
from rpc.node import Node
from transports._aioserver import (
    JSONRPC_PATH,
    RPC_PATH,
    SharedServer,
    client_ssl_context,
    codec_from_url,
    peer_address,
    serve_role,
    tls_failure_hint,
)
from transports.registry import TransportURL

__all__ = [
    "EXTRA",
    "OPTIONS",
    "SCHEMES",
    "WANTS_CREDS",
    "HttpChannel",
    "HttpClientChannel",
    "HttpListener",
    "listen",
    "open_client",
]

SCHEMES = ("http", "https")
# max_conns, header_timeout, idle_timeout: the shared server's limits (transports._aioserver)
OPTIONS: frozenset[str] = frozenset({"ca", "cert", "key", "insecure", "max_conns", "header_timeout", "idle_timeout"})
EXTRA = "http"
# transports.connect() hands the client's credentials to open_client() of modules that set this.
WANTS_CREDS = True

log = logging.getLogger("mgrpc.http")

_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Headers": "*"}
INVALID_REQUEST = b"Invalid request"
_TOO_LARGE = (
    b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid request","data":"request too large"},"id":null}'
)


# ---------------------------------------------------------------------------------------------
# host side


class HttpClientChannel(Channel):
    """``mos``'s HTTP codec: each frame is one ``POST``; the reply body is the response frame."""

    type = "HTTP"
    persistent = True
    broadcast = False

    def __init__(
        self,
        target: str,
        *,
        creds: Credentials | None = None,
        codec: FrameCodec | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(codec=codec, style="mos")
        self.target = target
        self.uri = urlsplit(target).path or "/"
        self.creds = creds
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def info(self) -> str:
        """The URL posted to."""
        return self.target

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # The call deadline is the node's business; only connecting is bounded here.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def _post(self, body: bytes, authorization: str | None) -> tuple[int, bytes, str]:
        headers = {"Content-Type": "application/json" if self.codec.name == "json" else "application/x-msgpack"}
        if authorization:
            headers["Authorization"] = authorization
        try:
            async with self._get_session().post(
                self.target,
                data=body,
                headers=headers,
                ssl=self.ssl_context if self.ssl_context is not None else True,
            ) as resp:
                data = await resp.read()
                return resp.status, data, resp.headers.get("WWW-Authenticate", "")
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            cert_error = getattr(e, "certificate_error", None)  # aiohttp's ClientConnectorCertificateError
            hint = tls_failure_hint(cert_error if isinstance(cert_error, BaseException) else e)
            raise TransportError(f"POST {self.target} failed: {e or type(e).__name__}{hint}") from e

    async def send(self, frame: Frame) -> None:
        """POST ``frame``; deliver the reply frame (if any) to the node."""
        if self.closed:
            raise ChannelClosed("HTTP channel is closed")
        body = self.encode(frame)
        if self.codec.name == "json":
            body += b"\n"  # the Go JSON encoder's newline, as mos sends it
        status, data, challenge = await self._post(body, None)
        if status == 401:
            params = parse_digest_header(challenge) if challenge else None
            if params is None:
                raise AuthError("authentication failed: the server did not offer Digest authentication")
            if self.creds is None:
                raise AuthError("authentication required: pass credentials (--rpc-creds user:pass)")
            authz = http_digest_authorization(params, self.creds, method="POST", uri=self.uri)
            status, data, _ = await self._post(body, authz)
            if status == 401:
                raise AuthError("authentication failed")
        if status == 204:
            return  # No Content: what JSON-RPC 2.0 servers answer a notification with
        if status != 200:
            detail = data.decode("utf-8", "replace").strip()[:200]
            raise TransportError(f"server returned an error: HTTP {status}" + (f" {detail}" if detail else ""))
        if not (data.strip() if self.codec.name == "json" else data):
            return  # a notification gets no reply
        try:
            reply = self.codec.decode(data)
        except FrameError as e:
            raise TransportError(f"invalid reply from {self.target}: {e}") from None
        self.deliver(reply)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.mark_closed()


async def open_client(
    url: TransportURL, *, creds: Credentials | None = None, connect_timeout_s: float = 10.0, **opts: Any
) -> HttpClientChannel:
    """The host side: frames are POSTed to the URL minus query and fragment."""
    if opts:
        raise UsageError(f"unknown option(s) for {url.scheme}://: {', '.join(sorted(opts))}")
    parts = urlsplit(url.raw)
    target = urlunsplit((parts.scheme.lower(), parts.netloc, parts.path, "", ""))
    ssl_context = client_ssl_context(url) if url.scheme == "https" else None
    return HttpClientChannel(
        target, creds=creds, codec=codec_from_url(url), ssl_context=ssl_context, connect_timeout_s=connect_timeout_s
    )


# ---------------------------------------------------------------------------------------------
# device side


class HttpChannel(Channel):
    """One HTTP request as a channel: the first response frame sent on it is the HTTP reply."""

    type = "HTTP"
    persistent = False
    broadcast = False

    def __init__(self, peer: str, *, codec: FrameCodec | None = None) -> None:
        super().__init__(codec=codec, style="device")
        self.peer = peer
        self.reply: asyncio.Future[Frame | None] = asyncio.get_running_loop().create_future()

    def info(self) -> str:
        """The peer's ``ip:port``."""
        return self.peer

    def send_nowait(self, frame: Frame) -> bool:
        """Take the reply frame (only responses; the channel answers exactly one request)."""
        if frame.is_request:
            raise ChannelClosed("an HTTP channel carries only the reply to its request")
        if self.reply.done():
            log.info("HTTP %s: second reply frame dropped", self.peer)
        else:
            self.reply.set_result(frame)
        return True

    async def send(self, frame: Frame) -> None:
        """See :meth:`send_nowait`."""
        self.send_nowait(frame)

    async def close(self) -> None:
        """Close without a reply (answered ``400 Invalid request`` if nothing was sent yet)."""
        if not self.reply.done():
            self.reply.set_result(None)
        self.mark_closed()


def _keep_alive(request: web.BaseRequest) -> bool:
    tokens = (t.strip().lower() for t in request.headers.get("Connection", "").split(","))
    return "keep-alive" in tokens


def _response(
    request: web.BaseRequest,
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    keep_alive: bool | None = None,
) -> web.Response:
    """A reply with the device's headers (§3.1): content type, CORS, and its Connection rule."""
    ka = _keep_alive(request) if keep_alive is None else keep_alive
    h = {"Content-Type": content_type, **_CORS, "Connection": "keep-alive" if ka else "close"}
    if headers:
        h.update(headers)
    resp = web.Response(status=status, body=body, headers=h)
    if not ka:
        resp.force_close()
    return resp


def _invalid(request: web.BaseRequest, *, close: bool = False) -> web.Response:
    """``400 Invalid request``; ``close``: and close the connection (a body was left unread)."""
    return _response(request, 400, INVALID_REQUEST, content_type="text/plain", keep_alive=False if close else None)


def _rest_status(code: int) -> int:
    return {0: 200, 403: 403, 404: 404}.get(code, 500)


def _json_text(value: Any) -> str:
    # The same text a full frame would carry: a device's handler output, with its spacing.
    if value is ABSENT or value is None:
        return "null"
    return value_text(value, "device")


class HttpListener:
    """The ``http://`` role of a shared aiohttp server: ``/rpc`` for ``node``."""

    def __init__(
        self, server: SharedServer, node: Node, url: TransportURL, *, reply_timeout_s: float | None = None
    ) -> None:
        self.server = server
        self.node = node
        self.reply_timeout_s = reply_timeout_s
        self._url = url
        self._codec_name = (url.option("codec") or "json").lower()
        self._next_id = 0
        self.channels: set[HttpChannel] = set()
        self.host = server.host
        self.port = server.port
        self.url = server.url(url.scheme)

    # -- auth ----------------------------------------------------------------------------------
    def _user(self, request: web.BaseRequest) -> str | None:
        auth = self.node.auth
        header = request.headers.get("Authorization", "")
        if not header or not isinstance(auth, Authenticator):
            return None
        return _verify_digest(auth, header, request.method)

    def _unauthorized(self, request: web.BaseRequest, message: str | None) -> web.Response:
        auth = self.node.auth
        realm = auth.realm if isinstance(auth, Authenticator) else "RPC"
        algorithm = auth.algorithm if isinstance(auth, Authenticator) else "MD5"
        nonce: int | None = None
        with contextlib.suppress(ValueError, TypeError):
            challenge = json.loads(message or "")
            if isinstance(challenge, dict):
                realm = str(challenge.get("realm", realm))
                algorithm = str(challenge.get("algorithm", algorithm))
                nonce = int(challenge["nonce"]) if "nonce" in challenge else None
        if nonce is None:  # each nonce() is a new one: take it only when the challenge has none
            nonce = int(auth.nonce()) if isinstance(auth, Authenticator) else 0
        return _response(
            request,
            401,
            headers={"WWW-Authenticate": http_challenge_header(realm, algorithm, nonce)},
            keep_alive=False,
        )

    # -- dispatch ------------------------------------------------------------------------------
    def _too_big(self, size: int, *, slack: int = 0) -> bool:
        # max_frame_size 0 means no limit (a bridge forwards whatever the device behind it accepts).
        limit = self.node.max_frame_size
        return bool(limit) and size > limit + slack

    async def _read_body(self, request: web.BaseRequest, *, slack: int = 2) -> bytes | None:
        """The body, or None once it is over the frame size (the rest is not read: a chunked body has no
        Content-Length to refuse it by, and must not make the device hold megabytes)."""
        if self._too_big(request.content_length or 0, slack=slack):
            return None
        if not self.node.max_frame_size:
            return await request.read()
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if self._too_big(len(body), slack=slack):
                return None
        return bytes(body)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one request to ``/rpc`` or ``/rpc/<Method>``."""
        raw_path = request.rel_url.raw_path
        if request.path == JSONRPC_PATH:
            return await self._jsonrpc_endpoint(request)
        method_name = raw_path[len(RPC_PATH) + 1 :] if raw_path.startswith(RPC_PATH + "/") else ""
        if method_name:
            return await self._rest(request, method_name)
        return await self._full_frame(request)

    async def _exchange(
        self, request: web.BaseRequest, build: Callable[[HttpChannel], Frame | None]
    ) -> tuple[HttpChannel, Frame | None, Frame | None]:
        """Run one request on a fresh channel: (channel, request frame or None if invalid, reply or None)."""
        codec = codec_from_url(self._url) if self._codec_name != "json" else None
        ch = HttpChannel(peer_address(request), codec=codec)
        ch.user = self._user(request)
        self.node.add_channel(ch)
        self.channels.add(ch)
        try:
            frame = build(ch)
            if frame is None:
                return ch, None, None
            ch.deliver(frame)
            if frame.is_request and frame.wants_reply:
                try:
                    reply = await asyncio.wait_for(asyncio.shield(ch.reply), self.reply_timeout_s)
                except TimeoutError:
                    log.warning("HTTP %s: no reply to %s within %s s", ch.peer, frame.method, self.reply_timeout_s)
                    reply = None
                return ch, frame, reply
            # No reply will come; let the router finish (it may close the channel for a wrong dst).
            await asyncio.sleep(0)
            if ch.reply.done():
                return ch, frame, ch.reply.result()
            return ch, frame, None
        finally:
            self.channels.discard(ch)
            ch.mark_closed()

    async def _full_frame(self, request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return _invalid(request)  # an empty frame (errata)
        body = await self._read_body(request)
        if body is None:
            return _invalid(request, close=True)  # too big to be a frame: the rest is not even read
        if self._codec_name == "json":
            body = body.rstrip(b"\r\n\t ")  # mos's trailing newline is not part of the frame

        codec = codec_from_url(self._url) if self._codec_name != "json" else None
        decoder: FrameCodec = codec or JsonCodec()
        if hasattr(decoder, "max_frame_size"):
            decoder.max_frame_size = self.node.max_frame_size
        try:
            parsed: Frame | None = decoder.decode(body)
        except FrameError as e:
            if codec is None and looks_like_jsonrpc(body):
                return await self._jsonrpc(request, body)  # a batch, or JSON-RPC that does not parse
            log.info("HTTP %s: invalid frame: %s", peer_address(request), e)
            parsed = None
        if parsed is not None and is_jsonrpc_frame(parsed):
            return await self._jsonrpc(request, body)

        def build(ch: HttpChannel) -> Frame | None:
            return parsed

        ch, frame, reply = await self._exchange(request, build)
        if frame is None:
            return _invalid(request)
        if reply is None:
            if frame.is_request and not frame.wants_reply and not ch.reply.done():
                return _response(request, 200)  # a notification: no reply body
            return _invalid(request)  # closed without a reply (wrong dst, ...)
        if reply.error is not None and reply.error.code == 401:
            return self._unauthorized(request, reply.error.message)
        tail = b"\r\n" if self._codec_name == "json" else b""  # the device's CRLF, JSON only
        return _response(request, 200, ch.encode(reply) + tail)

    async def _jsonrpc_endpoint(self, request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return _response(request, 200)  # CORS preflight
        if request.method != "POST":
            return _response(request, 405, b"JSON-RPC 2.0 takes POST\r\n", content_type="text/plain",
                             headers={"Allow": "POST, OPTIONS"})  # fmt: skip
        body = await self._read_body(request)
        if body is None:
            return _response(request, 413, _TOO_LARGE, keep_alive=False)
        return await self._jsonrpc(request, body)

    async def _jsonrpc(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        """Answer one JSON-RPC 2.0 message on a short-lived HTTP channel (ACL type ``HTTP``)."""
        ch = HttpChannel(peer_address(request))
        ch.user = self._user(request)
        self.node.add_channel(ch)
        self.channels.add(ch)
        try:
            reply = await self.node.serve_jsonrpc(ch, body)
        finally:
            self.channels.discard(ch)
            ch.mark_closed()
        challenge = reply.auth_challenge
        if challenge is not None and ch.user is None:
            return self._unauthorized(request, challenge)
        if reply.body is None:
            return _response(request, 204)  # notifications only: nothing is owed
        return _response(request, 200, reply.body)

    async def _rest(self, request: web.Request, method_name: str) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return _response(request, 200)  # CORS preflight
        body = await self._read_body(request)
        if body is None:
            return _invalid(request, close=True)
        text = body.decode("utf-8", "replace").strip()
        if not text and request.method == "GET" and request.query_string:
            # As the device: {"k":v,...} with the URL-decoded values inserted raw (not quoted).
            pairs = parse_qsl(request.query_string, keep_blank_values=True)
            text = "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}"
        if self._too_big(len(text)):
            return _invalid(request)
        args: Any = ABSENT
        bad_args = False
        if text:
            try:
                args = json.loads(text)
            except ValueError:
                bad_args = True
        if bad_args:
            return _response(request, 500, b'{"code":400,"message":"invalid JSON args"}\r\n')
        self._next_id += 1
        fid = self._next_id
        _, _, reply = await self._exchange(request, lambda ch: Frame(id=fid, method=method_name, params=args))
        if reply is None:
            return _invalid(request)
        err = reply.error
        if err is not None and err.code == 401:
            return self._unauthorized(request, err.message)
        if err is not None and err.code != 0:
            body_text = json.dumps(err.to_json_obj(), ensure_ascii=False, separators=(",", ":"))
            return _response(request, _rest_status(err.code), (body_text + "\r\n").encode())
        result = reply.result
        # Errata: a string result is sent without its JSON quotes.
        out = result if isinstance(result, str) and not isinstance(result, RawJSON) else _json_text(result)
        return _response(request, 200, (out + "\r\n").encode("utf-8"))

    async def close(self) -> None:
        """Detach from the server (which stops if nothing else uses it)."""
        for ch in list(self.channels):
            await ch.close()
        await self.server.release("http")


async def listen(url: TransportURL, node: Node, *, reply_timeout_s: float | None = None, **opts: Any) -> HttpListener:
    """Serve ``node`` over HTTP at ``/rpc`` on ``host:port`` (shared with a ``ws://`` listener there).

    ``reply_timeout_s`` bounds how long a request waits for its handler (default: no bound, as a
    device; a request that times out is answered ``400 Invalid request``).
    """
    if opts:
        raise UsageError(f"unknown option(s) for listening on {url.scheme}://: {', '.join(sorted(opts))}")
    if url.path not in ("", "/", "/rpc"):
        raise UsageError(f"the HTTP RPC endpoint is /rpc; got path {url.path!r}")
    return await serve_role(
        url, node, "http", tls=url.scheme == "https",
        make=lambda server: HttpListener(server, node, url, reply_timeout_s=reply_timeout_s),
    )  # fmt: skip
