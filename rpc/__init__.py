"""The mgRPC core: frames, stream framing, the router, digest auth, clients, codecs, bridging.

Nothing here does I/O on its own: transports (the ``transports`` package) carry frames, and the
device services live in ``services``. The names most programs need::

    from rpc import Node, AsyncClient, Client, Frame, RemoteError, RpcTimeout, HandlerError
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rpc.client import AsyncClient, Client
    from rpc.errors import (
        AuthError,
        ChannelClosed,
        FrameError,
        FrameTooLarge,
        HandlerError,
        MgrpcError,
        RemoteError,
        RpcTimeout,
        TransportError,
        UsageError,
    )
    from rpc.frame import ABSENT, ErrorInfo, Frame, RawJSON, parse_frame
    from rpc.node import LOCAL_ADDR, Context, Node

# The names below are imported on first use, so ``import rpc.errors`` (or a CLI command that needs
# only frames) does not load the router, the client and their dependencies.
_LAZY = {
    "AsyncClient": "rpc.client",
    "Client": "rpc.client",
    "ABSENT": "rpc.frame",
    "ErrorInfo": "rpc.frame",
    "Frame": "rpc.frame",
    "RawJSON": "rpc.frame",
    "parse_frame": "rpc.frame",
    "LOCAL_ADDR": "rpc.node",
    "Context": "rpc.node",
    "Node": "rpc.node",
}
_LAZY.update(
    dict.fromkeys(
        (
            "AuthError",
            "ChannelClosed",
            "FrameError",
            "FrameTooLarge",
            "HandlerError",
            "MgrpcError",
            "RemoteError",
            "RpcTimeout",
            "TransportError",
            "UsageError",
        ),
        "rpc.errors",
    )
)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "ABSENT",
    "LOCAL_ADDR",
    "AsyncClient",
    "AuthError",
    "ChannelClosed",
    "Client",
    "Context",
    "ErrorInfo",
    "Frame",
    "FrameError",
    "FrameTooLarge",
    "HandlerError",
    "MgrpcError",
    "Node",
    "RawJSON",
    "RemoteError",
    "RpcTimeout",
    "TransportError",
    "UsageError",
    "parse_frame",
]
