"""``loop://NAME``: an in-process link to a node listening under NAME in the same process.

The device side registers ``NAME``; each client connection makes a fresh channel pair
(:func:`rpc.loopback.loop_pair`) so frames are encoded and parsed exactly as on a wire.
"""

from __future__ import annotations

from typing import Any

from rpc.channel import Channel
from rpc.codec import codec_by_name
from rpc.errors import TransportError, UsageError
from rpc.loopback import LoopChannel, loop_pair
from rpc.node import Node
from transports.registry import TransportURL

__all__ = ["EXTRA", "OPTIONS", "SCHEMES", "LoopListener", "listen", "open_client"]

SCHEMES = ("loop",)
OPTIONS: frozenset[str] = frozenset()
EXTRA = ""

_listeners: dict[str, LoopListener] = {}


def _name(url: TransportURL) -> str:
    return (url.host + url.path).strip("/") or "default"


class LoopListener:
    """A node reachable as ``loop://NAME`` in this process."""

    def __init__(self, name: str, node: Node, *, codec: str = "json") -> None:
        self.name = name
        self.node = node
        self.codec = codec
        self.url = f"loop://{name}"
        self.channels: list[LoopChannel] = []

    def accept(self) -> LoopChannel:
        """Make a new link: the device end is added to the node, the client end returned."""
        a, b = loop_pair(self.url, codec_a=codec_by_name(self.codec), codec_b=codec_by_name(self.codec))
        self.node.add_channel(b)
        # Forget links their clients closed, or a long-lived listener keeps every one ever made.
        self.channels = [ch for ch in self.channels if not ch.closed]
        self.channels.append(b)
        return a

    async def close(self) -> None:
        """Stop accepting and close every link."""
        if _listeners.get(self.name) is self:
            del _listeners[self.name]
        for ch in self.channels:
            await ch.close()
        self.channels.clear()


async def listen(url: TransportURL, node: Node, **opts: Any) -> LoopListener:
    """Serve ``node`` as ``loop://NAME``."""
    name = _name(url)
    if name in _listeners:
        raise TransportError(f"loop://{name} is already taken in this process")
    lst = LoopListener(name, node, codec=url.option("codec") or "json")
    codec_by_name(lst.codec)  # an unknown codec is refused here, not at the first connection
    _listeners[name] = lst
    return lst


async def open_client(url: TransportURL, **opts: Any) -> Channel:
    """Connect to the node listening as ``loop://NAME``."""
    name = _name(url)
    lst = _listeners.get(name)
    if lst is None:
        raise TransportError(f"nothing listens on loop://{name}")
    want = url.option("codec") or lst.codec
    if want != lst.codec:
        raise UsageError(f"loop://{name} speaks the {lst.codec} codec, not {want}")
    return lst.accept()
