"""In-process channels: a connected pair that still encodes and parses every frame.

``loop://`` URLs (transports/loop.py) use these to connect a client to a device node in the same
process. Each side encodes with its own style and codec and the other side parses the bytes, so the
wire format is exercised exactly as on a real link.
"""

from __future__ import annotations

import asyncio

from rpc.channel import Channel, FrameCodec
from rpc.errors import ChannelClosed
from rpc.frame import Frame, Style

__all__ = ["LoopChannel", "loop_pair"]


class LoopChannel(Channel):
    """One end of an in-process link. ``type`` is ``loopback``; info is the link's name."""

    type = "loopback"
    persistent = True
    broadcast = False

    def __init__(self, name: str = "loop", *, style: Style = "mos", codec: FrameCodec | None = None) -> None:
        super().__init__(style=style, codec=codec)
        self.name = name
        self.peer: LoopChannel | None = None

    def info(self) -> str:
        """The link name, e.g. ``loop://dev1``."""
        return self.name

    def send_nowait(self, frame: Frame) -> bool:
        """Encode ``frame`` and hand the bytes to the peer on the next loop iteration."""
        peer = self.peer
        if self.closed or peer is None or peer.closed:
            raise ChannelClosed("loopback peer is gone")
        data = self.encode(frame)
        asyncio.get_running_loop().call_soon(peer.deliver_bytes, data)
        return True

    async def send(self, frame: Frame) -> None:
        """See :meth:`send_nowait`."""
        self.send_nowait(frame)

    async def close(self) -> None:
        """Close both ends."""
        peer, self.peer = self.peer, None
        self.mark_closed()
        if peer is not None and not peer.closed:
            peer.peer = None
            peer.mark_closed()


def loop_pair(
    name: str = "loop", *, codec_a: FrameCodec | None = None, codec_b: FrameCodec | None = None
) -> tuple[LoopChannel, LoopChannel]:
    """A connected pair: ``a`` is the client end (mos style), ``b`` the device end (device style)."""
    a = LoopChannel(name, style="mos", codec=codec_a)
    b = LoopChannel(name, style="device", codec=codec_b)
    a.peer, b.peer = b, a
    return a, b
