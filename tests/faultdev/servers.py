"""The device's transports, written on asyncio streams and ``os.openpty`` (standard library only).

* :class:`HttpServer`: HTTP/1.1 on 127.0.0.1 with ``POST /rpc`` (full frame), ``/rpc/<Method>`` (REST),
  ``OPTIONS`` and the WebSocket upgrade on ``/rpc`` (RFC 6455 framing written here).
* :class:`TcpServer`: stream framing per connection (transports.md §7).
* :class:`PtySerial`: a pseudo-terminal; the suite opens :attr:`PtySerial.path`.
* :class:`MqttLink`: a minimal MQTT 3.1.1 client (CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import struct
import time
import urllib.parse
from typing import Any

from tests.faultdev import wire
from tests.faultdev.device import AUTH_NEEDED, WRONG_DST, Channel, Device
from tests.faultdev.faults import AUTH_REALM
from tests.faultdev.stream import StreamLink

__all__ = ["HttpServer", "MqttLink", "PtySerial", "TcpServer"]

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CORS = (("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Headers", "*"))
REASONS = {200: "OK", 101: "Switching Protocols", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}  # fmt: skip


class _Closer:
    """Tracks open connections so a reboot can drop them all."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        dev.reboot_hooks.append(self.drop_all)

    def drop_all(self) -> None:
        for w in list(self.writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self.writers.clear()

    def track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close_all(self) -> None:
        self.drop_all()
        if self.tasks:
            # Aborted connections end their tasks on their own; cancel only what is left.
            _, pending = await asyncio.wait(list(self.tasks), timeout=1.0)
            for t in pending:
                t.cancel()


# -- HTTP and WebSocket ----------------------------------------------------------------------------


class HttpServer(_Closer):
    """``http://127.0.0.1:PORT/rpc`` and ``ws://127.0.0.1:PORT/rpc``."""

    def __init__(self, dev: Device) -> None:
        super().__init__(dev)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> HttpServer:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.close_all()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.track()
        if self.dev.down:
            writer.transport.abort()  # rebooting: nobody listens
            return
        self.writers.add(writer)
        peer = writer.get_extra_info("peername")
        info = f"{peer[0]}:{peer[1]}" if peer else ""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                verb, target, _ = ([*lines[0].split(" ", 2), "", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = b""
                n = int(headers.get("content-length", "0") or 0)
                if n:
                    body = await reader.readexactly(n)
                path, _, query = target.partition("?")
                if headers.get("upgrade", "").lower() == "websocket" and path.rstrip("/") == "/rpc":
                    await self._websocket(reader, writer, headers, info)
                    return
                keep = await self._http(reader, writer, verb, path, query, headers, body, info)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        keep: bool,
        *,
        ctype: str = "application/json",
        extra: tuple[tuple[str, str], ...] = (),
    ) -> None:
        f = self.dev.fault
        if f == "http_content_type_text":
            ctype = "text/plain"
        hdrs = [("Server", "Mongoose/6.18"), ("Content-Type", ctype)]
        if f != "http_no_cors":
            hdrs += CORS
        hdrs += [("Content-Length", str(len(body))), ("Connection", "keep-alive" if keep else "close"), *extra]
        head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs)
        writer.write(head.encode("latin-1") + b"\r\n" + body)

    async def _http(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        verb: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        info: str,
    ) -> bool:
        f = self.dev.fault
        keep = headers.get("connection", "").lower() == "keep-alive" or f == "http_keepalive_always"
        ch = Channel("http", info)
        if self.dev.auth and headers.get("authorization"):
            ch.user = self.dev.http_user(headers["authorization"], verb)
        if path in ("/rpc", "/rpc/"):
            if verb == "OPTIONS" and f == "http_options_rpc_200":
                self._respond(writer, 200, b"", keep)
                await writer.drain()
                return keep
            if verb == "OPTIONS" or not body.strip():
                self._respond(writer, 400, b"Invalid request", keep)  # an empty frame (transports.md §3.5)
                await writer.drain()
                return keep
            out = await _settled(self.dev.handle(body.strip(), ch))
            if out is AUTH_NEEDED:
                await self._unauthorized(writer)
                return False
            if out is WRONG_DST:
                self._respond(writer, 400, b"Invalid request", False)
                await writer.drain()
                return False
            assert isinstance(out, list)
            if not out:
                # No id: no reply is produced; the request stays open until the client gives up.
                with contextlib.suppress(Exception):
                    await reader.read()
                return False
            reply = out[0].encode()
            status = 200
            if f == "http_error_status" and '"error"' in out[0]:
                status = 404
            self._respond(writer, status, reply + (b"" if f == "http_no_crlf" else b"\r\n"), keep)
            await writer.drain()
            return keep
        if path.startswith("/rpc/"):
            method = urllib.parse.unquote(path[len("/rpc/") :])
            if verb == "OPTIONS":
                self._respond(writer, 405 if f == "http_options_405" else 200, b"", keep)
                await writer.drain()
                return keep
            if verb == "GET" and f == "http_rest_get_refused":
                self._respond(writer, 405, b"", keep)
                await writer.drain()
                return keep
            args = body.strip()
            if not args and query and f != "http_rest_query_ignored":
                pairs = urllib.parse.parse_qsl(query)
                args = ("{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}").encode()
            frame = b'{"id":%d,"method":%s' % (random.randrange(1, 1 << 31), json.dumps(method).encode())
            frame += (b',"params":' + args if args else b"") + b"}"
            out = await _settled(self.dev.handle(frame, ch))
            if out is AUTH_NEEDED:
                await self._unauthorized(writer)
                return False
            if not isinstance(out, list) or not out:
                self._respond(writer, 400, b"Invalid request", False)
                await writer.drain()
                return False
            doc = json.loads(out[0])
            if f == "http_rest_whole_frame":
                status, text = 200, out[0]
            elif "error" in doc:
                code = doc["error"].get("code")
                status = {403: 403, 404: 404}.get(code, 500)
                if f == "http_rest_status_200":
                    status = 200
                elif f == "http_rest_status_404_all":
                    status = 404
                text = wire.compact(doc["error"])
            else:
                status = 200
                text = _member_text(out[0], "result")
                if isinstance(doc.get("result"), str) and f != "http_rest_string_quoted":
                    text = doc["result"]  # a string result is sent without its quotes (transports.md §3.5)
            self._respond(writer, status, text.encode() + b"\r\n", keep)
            await writer.drain()
            return keep
        if path == "/update":
            await self._update(writer, verb, query, headers, body)
            return False
        if path in ("/update/commit", "/update/revert") and verb == "GET":
            ok = self.dev.http_update(path.rsplit("/", 1)[1])
            self._respond(writer, 200 if ok else 400, b"Ok\r\n" if ok else b"Error\r\n", False, ctype="text/html")
            await writer.drain()
            return False
        self._respond(writer, 404, b"Not Found", False, ctype="text/plain")
        await writer.drain()
        return False

    async def _update(
        self, writer: asyncio.StreamWriter, verb: str, query: str, headers: dict[str, str], body: bytes
    ) -> None:
        """``/update``: a multipart POST pushes a bundle, GET (or a form POST) pulls one (ota.md §3)."""
        dev, f = self.dev, self.dev.fault

        async def reply(status: int, text: str) -> None:
            ctype = "text/html" if f == "http_push_html" else "text/plain"
            self._respond(writer, status, text.encode() + b"\r\n", False, ctype=ctype)
            await writer.drain()

        ctype = headers.get("content-type", "")
        if verb == "POST" and ctype.startswith("multipart/"):
            if dev.ota.state == 1:
                writer.transport.abort()  # an update already runs: the connection is simply closed (§3-f)
                return
            if not dev.ota.committed:
                await reply(400, "Previous update has not been committed yet")
                return
            boundary = ctype.split("boundary=", 1)[1].strip('"') if "boundary=" in ctype else ""
            data: bytes | None = None
            commit_timeout = 0
            for name, filename, value in _form_parts(body, boundary):
                if filename and data is None and (name == "file" or f != "http_push_file_field_only"):
                    data = value
                elif name == "commit_timeout" and value.strip().isdigit():
                    if data is not None and f == "http_push_ct_after_file_ignored":
                        continue
                    commit_timeout = int(value)
            if data is None:
                await reply(400, "Update aborted")
            elif dev.install(data, commit_timeout) or f == "http_push_bad_ok":
                await reply(200, "Update applied, finalizing")
            else:
                await reply(500, "-1 Invalid firmware bundle")
            return
        params = dict(urllib.parse.parse_qsl(query if verb == "GET" else body.decode("latin-1")))
        url = params.get("url", "")
        if not url:
            await reply(400, "Update URL not specified and none is configured.")
            return
        if dev.ota.state == 1 and f != "http_pull_busy_ok":
            await reply(409, "Another update is in progress.")
            return
        if not dev.ota.committed:
            await reply(409, "Failed to create updater context.")
            return
        ct = params.get("commit_timeout", "0")
        commit_timeout = int(ct) if ct.isdigit() and f != "http_pull_ct_ignored" else 0
        isv = params.get("ignore_same_version", "1")
        same_ok = (int(isv) > 0 if isv.lstrip("-").isdigit() else True) and f != "http_pull_same_version_installs"
        code, message = await dev.pull(url, commit_timeout, ignore_same_version=same_ok)
        await reply(200 if code >= 0 else 500, f"({code}) {message}")

    async def _unauthorized(self, writer: asyncio.StreamWriter) -> None:
        """HTTP 401 with the digest challenge (transports.md §3.3; real-device.md RD-A2)."""
        www = f'Digest qop="auth", realm="{AUTH_REALM}", nonce="{int(time.time()):x}", algorithm=MD5'
        extra = () if self.dev.fault == "http_auth_no_challenge" else (("WWW-Authenticate", www),)
        self._respond(writer, 401, b"", False, extra=extra)
        await writer.drain()

    # -- WebSocket (RFC 6455) ----------------------------------------------------------------------
    async def _websocket(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str], info: str
    ) -> None:
        f = self.dev.fault
        key = headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        resp = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept[::-1] if f == 'ws_accept_wrong' else accept}\r\n"
        )
        proto = headers.get("sec-websocket-protocol")
        if proto:
            resp += f"Sec-WebSocket-Protocol: {'json-rpc' if f == 'ws_subprotocol_wrong' else proto}\r\n"
        writer.write((resp + "\r\n").encode("latin-1"))
        await writer.drain()
        ch = Channel("ws", info)
        message = bytearray()
        msg_op = 0
        while True:
            b0, b1 = await reader.readexactly(2)
            fin, op = b0 & 0x80, b0 & 0x0F
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await reader.readexactly(8))
            mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(await reader.readexactly(n)))
            if op == 0x8:  # close: answer with a close and end
                if f == "ws_close_ignored":
                    continue
                writer.write(_ws_frame(0x8, data[:2]))
                await writer.drain()
                return
            if op == 0x9:
                if f == "ws_ping_ignored":
                    continue
                writer.write(_ws_frame(0xA, data))
                await writer.drain()
                continue
            if op == 0xA:
                continue
            if op in (0x1, 0x2):
                message, msg_op = bytearray(data), op
            elif op == 0x0:
                message += data
            if not fin:
                continue
            if msg_op == 0x2 and f == "ws_binary_ignored":
                continue
            if f == "ws_invalid_json_closes" and wire.parse(bytes(message)) is None:
                writer.transport.abort()
                return
            out = self.dev.handle(bytes(message).strip(), ch)
            if out is WRONG_DST:
                writer.transport.abort()  # closed without a close frame (transports.md §3.5)
                return

            def send(texts: list[str]) -> None:
                for text in texts:
                    payload = text.encode() + (b"\n" if f == "ws_newline_appended" else b"")
                    writer.write(_ws_frame(0x2 if f == "ws_binary_replies" else 0x1, payload))

            _deliver(out, send)
            await writer.drain()


def _form_parts(body: bytes, boundary: str) -> list[tuple[str, str, bytes]]:
    """The parts of a ``multipart/form-data`` body: (field name, file name or "", value)."""
    out: list[tuple[str, str, bytes]] = []
    if not boundary:
        return out
    for chunk in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, value = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disp = next(
            (ln for ln in head.decode("latin-1").split("\r\n") if ln.lower().startswith("content-disposition")), ""
        )
        attrs = dict(
            (k.strip().lower(), v.strip().strip('"')) for k, _, v in (a.partition("=") for a in disp.split(";")[1:])
        )
        out.append((attrs.get("name", ""), attrs.get("filename", ""), value.removesuffix(b"\r\n")))
    return out


def _deliver(out: Any, send: Any) -> None:
    """Send ``out`` (replies now, or a future of replies that wait, e.g. for OTA.Update's download)."""
    if isinstance(out, list):
        send(out)
    elif isinstance(out, asyncio.Future):

        def done(fut: asyncio.Future[list[str]]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                with contextlib.suppress(Exception):
                    send(fut.result())

        out.add_done_callback(done)


async def _settled(out: Any) -> Any:
    """``out``, or the replies once a deferred answer is ready."""
    return await out if isinstance(out, asyncio.Future) else out


def _ws_frame(op: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | op, n))
    elif n < 1 << 16:
        head = bytes((0x80 | op, 126)) + struct.pack(">H", n)
    else:
        head = bytes((0x80 | op, 127)) + struct.pack(">Q", n)
    return head + payload


def _member_text(frame: str, name: str) -> str:
    """The exact text of a top-level member's value (the handler's spacing kept)."""
    dec = json.JSONDecoder()
    key = f'"{name}":'
    i = frame.rfind(key)
    start = i + len(key)
    _, end = dec.raw_decode(frame, start)
    return frame[start:end]


# -- TCP -------------------------------------------------------------------------------------------


class TcpServer(_Closer):
    """``tcp://127.0.0.1:PORT``: each connection is a fresh stream channel."""

    def __init__(self, dev: Device) -> None:
        super().__init__(dev)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TcpServer:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.close_all()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.track()
        if self.dev.down:
            writer.transport.abort()
            return
        self.writers.add(writer)
        peer = writer.get_extra_info("peername")
        ch = Channel("tcp", f"{peer[0]}:{peer[1]}" if peer else "")
        link = StreamLink(self.dev.fault, kind="tcp", max_frame_size=self.dev.max_frame_size)
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    return
                frames, now = link.feed(data)
                if now:
                    writer.write(now)
                for js in frames:
                    _deliver(self.dev.handle(js, ch), lambda texts: [writer.write(link.frame_out(x)) for x in texts])
                if link.close_now:
                    return
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self.writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()


# -- serial (a pty) --------------------------------------------------------------------------------


class PtySerial:
    """The device's UART on a pseudo-terminal; modes learned stay on until :meth:`close`."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.master = self.slave = -1
        self.path = ""
        self.link = StreamLink(dev.fault, kind="serial", max_frame_size=dev.max_frame_size)
        self.ch = Channel("serial", "UART0")

    async def start(self) -> PtySerial:
        import tty

        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        asyncio.get_running_loop().add_reader(self.master, self._readable)
        return self

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        frames, now = self.link.feed(data)
        out = now
        for js in frames:
            res = self.dev.handle(js, self.ch)
            if isinstance(res, list):
                for text in res:
                    out += self.link.frame_out(text)
            else:
                _deliver(res, lambda texts: self._write(b"".join(self.link.frame_out(x) for x in texts)))
        if out:
            self._write(out)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                continue
            except OSError:
                return
            view = view[n:]

    async def close(self) -> None:
        if self.master >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.master)
            for fd in (self.master, self.slave):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.master = self.slave = -1


# -- MQTT 3.1.1 ------------------------------------------------------------------------------------


def _varlen(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


class MqttLink:
    """The device's MQTT channel: subscribes ``<id>/rpc/#``, answers on ``<request src>/rpc``."""

    def __init__(self, dev: Device, host: str, port: int) -> None:
        self.dev = dev
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self._pid = 0
        self.ch = Channel("mqtt", "")

    async def start(self) -> MqttLink:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        cid = f"faultdev-{random.randrange(1 << 30)}"
        var = _str("MQTT") + bytes((4, 0x02)) + struct.pack(">H", 0)  # clean session, no keep-alive
        self._send(0x10, var + _str(cid))
        ptype, _ = await self._read()
        if ptype != 0x20:
            raise ConnectionError("no CONNACK")
        self._send(0x82, struct.pack(">H", self._next()) + _str(f"{self.dev.id}/rpc/#") + b"\x01")
        ptype, _ = await self._read()
        if ptype != 0x90:
            raise ConnectionError("no SUBACK")
        self.task = asyncio.ensure_future(self._run())
        return self

    def _next(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def _send(self, first: int, body: bytes) -> None:
        assert self.writer is not None
        self.writer.write(bytes((first,)) + _varlen(len(body)) + body)

    async def _read(self) -> tuple[int, bytes]:
        assert self.reader is not None
        first = (await self.reader.readexactly(1))[0]
        n, mult = 0, 1
        while True:
            b = (await self.reader.readexactly(1))[0]
            n += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return first, await self.reader.readexactly(n)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """PUBLISH (QoS 0 or 1, not retained)."""
        body = _str(topic) + (struct.pack(">H", self._next()) if qos else b"") + payload
        self._send(0x30 | (qos << 1), body)

    async def _run(self) -> None:
        try:
            while True:
                first, body = await self._read()
                if first >> 4 != 3:
                    continue  # PUBACK, SUBACK, PINGRESP
                qos = (first >> 1) & 3
                (tlen,) = struct.unpack(">H", body[:2])
                topic = body[2 : 2 + tlen].decode()
                i = 2 + tlen
                if qos:
                    self._send(0x40, body[i : i + 2])
                    i += 2
                self._message(topic, body[i:])
                assert self.writer is not None
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def _message(self, topic: str, payload: bytes) -> None:
        f = self.dev.fault
        base = f"{self.dev.id}/rpc"
        doc = wire.parse(payload)
        if doc is None:
            return
        if topic.startswith(base + "/") and f != "mqtt_method_topic_ignored":
            doc["method"] = topic[len(base) + 1 :]
        elif topic != base and not topic.startswith(base + "/"):
            return
        if doc.get("method") and "id" in doc and not doc.get("src"):
            return  # "Drop frame without src" (transports.md §4)
        out = self.dev.handle(json.dumps(doc).encode(), self.ch)
        dst = doc.get("src") if isinstance(doc.get("src"), str) else ""

        def send(texts: list[str]) -> None:
            for text in texts:
                if not dst:
                    continue  # "Cannot reply to RPC over MQTT, no dst"
                reply_topic = f"{dst}/resp" if f == "mqtt_reply_topic_wrong" else f"{dst}/rpc"
                self.publish(reply_topic, text.encode())

        _deliver(out, send)

    async def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self._send(0xE0, b"")  # DISCONNECT
                self.writer.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
