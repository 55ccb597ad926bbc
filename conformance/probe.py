"""A raw view of a device: hand-built frames out, every received frame recorded as it arrived.

A :class:`Probe` sits where a router would (it is the channel's sink), so nothing is hidden: frames
whose id matches no request, replies to notifications and frames arriving after a ``dst`` the
device should have dropped are all kept in :attr:`Probe.frames`, each with ``frame.raw`` holding the
exact bytes the transport delivered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Callable
from typing import Any

from rpc.channel import Channel
from rpc.errors import TransportError
from rpc.frame import ABSENT, Frame

__all__ = ["Probe", "id_key"]

log = logging.getLogger("mgrpc.conformance")


CLOSE_TIMEOUT_S = 3.0

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def id_key(fid: Any) -> Any:
    """Normalise an id for matching: a number written as a string (devices quote ``-5``, ``1.5``)
    matches the number, and integral floats compare as ints; the checks look at the raw text."""
    if isinstance(fid, str) and _NUMBER.fullmatch(fid):
        fid = float(fid) if "." in fid else int(fid)
    if isinstance(fid, float) and fid.is_integer():
        return int(fid)
    return fid


class Probe:
    """Records every frame a channel delivers and sends frames exactly as built."""

    def __init__(self, channel: Channel, *, sent_ids: set[Any] | None = None) -> None:
        self.channel = channel
        self.frames: list[Frame] = []
        self.closed = False
        # Ids of every request sent (shared by the probes of one session): a reply carrying one of
        # them answers *that* request, never another check's (a late or duplicated reply).
        self.sent_ids: set[Any] = sent_ids if sent_ids is not None else set()
        self.last_sent: bytes = b""
        self._changed = asyncio.Event()
        channel.attach(self)

    @classmethod
    async def open(
        cls, url: str, *, open_timeout_s: float | None = None, sent_ids: set[Any] | None = None, **opts: Any
    ) -> Probe:
        """Open the host side of ``url`` (any registered transport) and start receiving.

        ``open_timeout_s`` bounds connecting and starting (a silent peer raises ``TransportError``).
        """
        import transports

        async def opening() -> Probe:
            channel = await transports.open_client(url, **opts)
            probe = cls(channel, sent_ids=sent_ids)
            try:
                await channel.start()
            except BaseException:
                await probe.close()
                raise
            return probe

        if open_timeout_s is None:
            return await opening()
        try:
            return await asyncio.wait_for(opening(), open_timeout_s)
        except TimeoutError:
            raise TransportError(f"could not open {url} within {open_timeout_s:g} s") from None

    # -- ChannelSink --------------------------------------------------------------------------------
    def frame_received(self, channel: Channel, frame: Frame) -> None:
        """Record a received frame."""
        self.frames.append(frame)
        self._changed.set()

    def channel_closed(self, channel: Channel) -> None:
        """Record that the channel went away."""
        self.closed = True
        self._changed.set()

    # -- sending ------------------------------------------------------------------------------------
    @staticmethod
    def new_id() -> int:
        """A fresh id in mos's range (2^40 .. 2^41-1)."""
        return random.getrandbits(40) | (1 << 40)

    async def send(self, frame: Frame, *, timeout_s: float | None = None) -> int:
        """Send ``frame`` as built; returns the index in :attr:`frames` where its answers will start.

        ``timeout_s`` bounds the send (an HTTP "send" waits for the reply); past it
        :class:`TimeoutError` is raised and the channel should be reopened.
        """
        if self.closed:
            raise TransportError("the probe's channel is closed")
        mark = len(self.frames)
        if frame.id is not None:
            self.sent_ids.add(id_key(frame.id))
        try:
            self.last_sent = frame.encode("mos")
        except Exception:  # a deliberately odd frame the encoder refuses: the report just lacks it
            self.last_sent = b""
        try:
            if timeout_s is None:
                await self.channel.send(frame)
            else:
                await asyncio.wait_for(self.channel.send(frame), timeout_s)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # A transport whose link vanished mid-write (a rebooting BLE peer) may surface the
            # cancellation of its own operation; for us that is a failed send, not a cancelled check.
            raise TransportError("send interrupted: the link went away") from None
        return mark

    async def wait_for(self, pred: Callable[[Frame], bool], *, start: int = 0, timeout_s: float) -> Frame | None:
        """The first frame at index >= ``start`` matching ``pred``, waiting up to ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        i = start
        while True:
            while i < len(self.frames):
                f = self.frames[i]
                i += 1
                if pred(f):
                    return f
            left = deadline - loop.time()
            if left <= 0 or self.closed:
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return None

    async def request(
        self,
        method: str,
        params: Any = ABSENT,
        *,
        id: int | str | None = None,
        src: str = "mos",
        dst: str = "",
        tag: str = "",
        args: Any = ABSENT,
        timeout_s: float = 5.0,
        **kw: Any,
    ) -> Frame | None:
        """Send a request and return the response with the same id (None when none came in time)."""
        fid = self.new_id() if id is None else id
        frame = Frame(id=fid, src=src, dst=dst, tag=tag, method=method, params=params, args=args, **kw)
        return await self.exchange(frame, timeout_s=timeout_s)

    async def exchange(self, frame: Frame, *, timeout_s: float = 5.0) -> Frame | None:
        """Send ``frame`` (which must carry an id) and wait for the response matching its id.

        None when no response came within ``timeout_s`` (sending included).
        """
        key = id_key(frame.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            mark = await self.send(frame, timeout_s=timeout_s)
        except TimeoutError:
            return None
        left = max(0.0, deadline - loop.time())
        return await self.wait_for(lambda f: f.is_response and id_key(f.id) == key, start=mark, timeout_s=left)

    async def close(self) -> None:
        """Close the channel (bounded: a wedged peer that never completes a close handshake is left)."""
        try:
            await asyncio.wait_for(self.channel.close(), CLOSE_TIMEOUT_S)
        except Exception:  # closing a half-broken transport must not hide the check's result
            log.debug("closing the probe channel failed", exc_info=True)
        self.closed = True
