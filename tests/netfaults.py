"""Network faults for tests of clients that must keep trying (MQTT devices, the dashboard).

- :class:`Gate`: a TCP proxy on 127.0.0.1 in front of a server (e.g. the mosquitto of
  :mod:`tests.mosquitto`) that misbehaves on purpose: the first connections follow a ``plan``
  (``"drop"``: closed as soon as accepted, after the client's first bytes; ``"mute"``: accepted and
  read, never answered, as a broker too busy to send its CONNACK), later ones are forwarded;
  :meth:`Gate.cut` closes every forwarded connection at once, as a broker crash does.
- :func:`descriptors_above_1023`: while it is active, every descriptor this process opens is
  numbered above 1023, as in a process with a few hundred connections (``select()`` cannot watch
  such descriptors).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Iterator, Sequence

import pytest

__all__ = ["Gate", "descriptors_above_1023"]


class Gate:
    """A misbehaving TCP proxy to ``127.0.0.1:target_port`` (see the module docstring)."""

    def __init__(self, target_port: int, plan: Sequence[str] = ()) -> None:
        for step in plan:
            if step not in ("drop", "mute", "forward"):
                raise ValueError(f"unknown gate step {step!r} (drop, mute, forward)")
        self.target_port = target_port
        self.plan = list(plan)
        self.accepted = 0  # connections seen so far
        self.forwarded = 0  # of which forwarded to the target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._forwarded: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, path: str = "") -> str:
        """``mqtt://127.0.0.1:<gate port>/<path>``."""
        return f"mqtt://127.0.0.1:{self.port}/{path}"

    async def start(self) -> Gate:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        """Close every forwarded connection (both sides), as a broker crash does."""
        for w in list(self._forwarded):
            w.close()
        self._forwarded.clear()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def __aenter__(self) -> Gate:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        step = self.plan.pop(0) if self.plan else "forward"
        try:
            if step == "drop":
                await asyncio.wait_for(reader.read(1), 5)  # the client's CONNECT has started
                return
            if step == "mute":
                while await reader.read(4096):
                    pass  # swallowed; the client gives up and closes
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self.forwarded += 1
            self._writers.add(up_writer)
            self._forwarded.update((writer, up_writer))
            self._spawn(self._pipe(up_reader, writer))
            await self._pipe(reader, up_writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            self._writers.discard(writer)


@contextlib.contextmanager
def descriptors_above_1023() -> Iterator[None]:
    """Take every free descriptor up to 1023 (``/dev/null``), raising the soft open-files limit if
    needed; the test is skipped if the hard limit does not allow it. Everything is given back on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1400
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the open-files hard limit ({hard}) is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    taken: list[int] = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            taken.append(fd)
            if fd >= 1023:
                break
        yield
    finally:
        for fd in taken:
            os.close(fd)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
