"""The mgRPC core: frames, stream framing, the router, digest auth, clients, codecs, bridging.

Nothing here does I/O on its own: transports (the ``transports`` package) carry frames, and the
device services live in ``services``. The names most programs need::

    from rpc import Node, AsyncClient, Client, Frame, RemoteError, RpcTimeout, HandlerError
"""

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
