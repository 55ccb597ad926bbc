"""A small HTTP server the device downloads firmware from (the pull checks: ota.md §1.5, §3, §4).

Standard library only (asyncio streams). It serves named bundles with ``Content-Length``, answers
``/missing.zip`` with 404 and ``/unchanged.zip`` with 304, and records every request it got (method,
path, headers) and when it finished sending each body, so a check can tell whether the device's
reply came after the download.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from conformance.model import CheckSkipped

__all__ = ["FirmwareServer", "Served", "serve_host"]

# Schemes whose URL names the device's own host (MQTT names the broker, serial no host at all).
_HOSTED = ("http", "https", "ws", "wss", "tcp", "udp")


@dataclass
class Served:
    """One request the server answered."""

    method: str
    path: str
    headers: dict[str, str]
    status: int
    done_at: float = 0.0  # time.monotonic() when the last byte of the answer was written


@dataclass
class FirmwareServer:
    """Serves ``files`` (path -> bytes) on ``host``; :attr:`requests` records what was asked."""

    host: str
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[Served] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> FirmwareServer:
        """Listen on a free port of :attr:`host`."""
        self._server = await asyncio.start_server(self._conn, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def __aenter__(self) -> FirmwareServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30.0)
            lines = head.decode("latin-1").split("\r\n")
            method, target = ([*lines[0].split(" "), "", ""])[:2]
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            path = target.split("?", 1)[0]
            body = self.files.get(path)
            if path == "/unchanged.zip":
                status, reason, body = 304, "Not Modified", b""
            elif body is None or method != "GET":
                status, reason, body = 404, "Not Found", b"Not Found\r\n"
            else:
                status, reason = 200, "OK"
            served = Served(method, path, headers, status)
            self.requests.append(served)
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/zip\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            for i in range(0, len(body), 16384):
                writer.write(body[i : i + 16384])
                await writer.drain()
            await writer.drain()
            served.done_at = time.monotonic()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def serve_host(url: str, given: str | None) -> str:
    """The address to serve firmware on so that the device at ``url`` can reach it: ``given``
    (``--ota-serve-host``), else 127.0.0.1 for a device in this process (``loop://``) or on this
    machine, else the local address of the route to the device's host. Skips the check when the URL
    names no host of the device (serial, MQTT) and none was given."""
    if given:
        return given
    parts = urlsplit(url)
    if parts.scheme == "loop":
        return "127.0.0.1"
    if parts.scheme not in _HOSTED or not parts.hostname:
        raise CheckSkipped(f"no address known at which a {parts.scheme}:// device reaches us: give --ota-serve-host")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise CheckSkipped(f"cannot resolve {parts.hostname}: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)  # no packet is sent: this only picks the route (and our address on it)
        local = str(sock.getsockname()[0])
    return local
