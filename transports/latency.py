"""A TCP relay on 127.0.0.1 that delays every byte by a fixed time in each direction.

Benchmarks and tests put it in front of a device's TCP, WebSocket or HTTP listener to see how a
protocol behaves over a link with a real round trip (Wi-Fi: ~20 ms) without any network. The delay
is a pure latency: data read at time *t* is written at *t + delay_s*, in order, and reading goes on
meanwhile, so throughput is not limited by the delay (a pipelined client still fills the link).

    proxy = LatencyProxy("127.0.0.1", 8000, delay_s=0.010)   # 20 ms round trip
    host, port = await proxy.start()
    ...
    await proxy.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

__all__ = ["LatencyProxy"]

log = logging.getLogger("mgrpc.transports.latency")

_READ_SIZE = 65536


class LatencyProxy:
    """Relay ``listen_host:0`` → ``target_host:target_port``, adding ``delay_s`` each way."""

    def __init__(self, target_host: str, target_port: int, *, delay_s: float, listen_host: str = "127.0.0.1") -> None:
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.listen_host = listen_host
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> tuple[str, int]:
        """Start listening; returns the ``(host, port)`` clients should dial."""
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.listen_host, self.port

    def url_for(self, url: str) -> str:
        """``url`` with its ``host:port`` replaced by the proxy's (e.g. a ``ws://`` listener URL)."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        netloc = f"{self.listen_host}:{self.port}"
        if parts.username:
            netloc = f"{parts.username}{':' + parts.password if parts.password else ''}@{netloc}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError as e:
            log.info("latency proxy: cannot reach %s:%d: %s", *self.target, e)
            writer.close()
            return
        self._writers.update((writer, up_writer))
        a = asyncio.ensure_future(self._pipe(reader, up_writer))
        b = asyncio.ensure_future(self._pipe(up_reader, writer))
        self._tasks.update((a, b))
        a.add_done_callback(self._tasks.discard)
        b.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One queue per direction: the reader stamps each piece with its due time, the writer waits
        # until then. Order is kept and reading never waits for the delay.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait_s = due - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                if not data:
                    break
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                queue.put_nowait((loop.time() + self.delay_s, data))
                if not data:  # EOF travels with the same delay
                    break
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    async def cut(self) -> None:
        """Drop every relayed connection now (a link failure); new connections are still accepted."""
        for w in list(self._writers):
            with contextlib.suppress(OSError, RuntimeError):
                w.transport.abort()
        self._writers.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            with contextlib.suppress(OSError, RuntimeError):
                w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._writers.clear()
