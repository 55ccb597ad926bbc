"""Host-side clients: :class:`AsyncClient` (asyncio) and the blocking :class:`Client`.

A client is a :class:`rpc.node.Node` with local id ``mos`` whose channel is its default route, so
it speaks exactly as the ``mos`` tool does: requests ``{"src":"mos","id":..,"method":..,"params":..}``,
random 2^40-range ids, one digest-auth retry with the same id after a 401, ``error.code == 0``
treated as success. Open one from a URL with :func:`transports.connect` / :func:`transports.connect_sync`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from rpc.auth import Credentials
from rpc.channel import Channel
from rpc.frame import ABSENT, Frame
from rpc.node import Node

__all__ = ["AsyncClient", "Client"]

T = TypeVar("T")


class AsyncClient:
    """Calls methods on the peer at the other end of ``channel``.

    ``timeout_s`` is the default per-call timeout (mos ``--timeout``, 20 s); ``creds`` answer a 401;
    ``compat_args`` sends ``args`` instead of ``params`` (``--mgrpc-compat-args``). ``max_pending``
    bounds calls in flight (mos has no bound; the device's own cap is 25, see :class:`rpc.node.Node`).
    """

    def __init__(
        self,
        channel: Channel,
        *,
        src: str = "mos",
        timeout_s: float = 20.0,
        creds: Credentials | None = None,
        compat_args: bool = False,
        dst: str = "",
        max_pending: int = 1024,
    ) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self.dst = dst
        self.node = Node(
            id=src, style="mos", creds=creds, compat_args=compat_args, builtins=False, max_queue_length=max_pending,
            max_frame_size=0,  # a host tool reads replies of any size, as mos does
        )
        self.node.add_channel(channel, default=True)

    async def start(self) -> AsyncClient:
        """Start the channel (open the port, start reading)."""
        await self.channel.start()
        return self

    async def call(
        self, method: str, params: Any = None, *, timeout_s: float | None = None, dst: str | None = None
    ) -> Any:
        """Call ``method``; return its result or raise :class:`rpc.errors.RemoteError` / ``RpcTimeout``."""
        return await self.node.call(
            method, params, dst=self.dst if dst is None else dst,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
        )  # fmt: skip

    async def call_frame(
        self, method: str, params: Any = ABSENT, *, timeout_s: float | None = None, dst: str | None = None
    ) -> Frame:
        """Call ``method`` and return the whole response frame (error frames are not raised)."""
        return await self.node.call_frame(
            method, params, dst=self.dst if dst is None else dst,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
        )  # fmt: skip

    def notify(self, method: str, params: Any = ABSENT) -> None:
        """Send a request without an id (the peer runs it and does not answer)."""
        self.node.notify(method, params, dst=self.dst)

    async def close(self) -> None:
        """Close the channel; pending calls fail with ``ChannelClosed``."""
        await self.node.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """A blocking facade: runs one event loop in a background thread and an :class:`AsyncClient` on it.

    Build it with :func:`transports.connect_sync`, or from any coroutine function that returns an
    :class:`AsyncClient` (``Client(factory)``).
    """

    def __init__(self, factory: Callable[[], Awaitable[AsyncClient]]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mgrpc-client", daemon=True)
        self._thread.start()
        try:
            self.aclient: AsyncClient = self._run(_await(factory()))
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def call(self, method: str, params: Any = None, *, timeout_s: float | None = None, dst: str | None = None) -> Any:
        """Call ``method`` and wait for the result (see :meth:`AsyncClient.call`)."""
        return self._run(self.aclient.call(method, params, timeout_s=timeout_s, dst=dst))

    def call_frame(self, method: str, params: Any = ABSENT, *, timeout_s: float | None = None) -> Frame:
        """Call ``method`` and return the response frame."""
        return self._run(self.aclient.call_frame(method, params, timeout_s=timeout_s))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine on the client's loop (e.g. one using ``client.aclient``)."""
        return self._run(coro)

    def close(self) -> None:
        """Close the connection and stop the background loop."""
        if self._loop.is_closed():
            return
        try:
            self._run(self.aclient.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _await(aw: Awaitable[T]) -> T:
    return await aw
