"""The error tree of the RPC core.

Every exception raised by :mod:`rpc` derives from :class:`MgrpcError`. Where the
meaning matches a builtin, the class also inherits it, so callers can catch
``TimeoutError`` or ``OSError`` without knowing about mgrpc.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ChannelClosed",
    "FrameError",
    "FrameTooLarge",
    "HandlerError",
    "MgrpcError",
    "QueueOverflow",
    "RemoteError",
    "RpcTimeout",
    "TransportError",
    "UsageError",
]


class MgrpcError(Exception):
    """Base of every error raised by the RPC core."""


class FrameError(MgrpcError, ValueError):
    """Bytes that are not a valid mgRPC frame (bad JSON, wrong types, ...)."""


class FrameTooLarge(FrameError):
    """A frame longer than the configured maximum frame size."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the maximum frame size of {limit} bytes")
        self.size = size
        self.limit = limit


class RemoteError(MgrpcError):
    """The peer answered with an error frame (``error.code != 0``)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(f"remote error {code}: {message}")
        self.code = code
        self.message = message


class HandlerError(MgrpcError):
    """Raised by a handler to answer with ``{"error": {"code": .., "message": ..}}``.

    ``message=None`` omits the message member, as devices often do (``{"code":-1}``).
    ``code=0`` is a success reported through the error path (``Sys.SetDebug``, ``OTA.Update``).
    """

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if message is not None else str(code))
        self.code = code
        self.message = message


class RpcTimeout(MgrpcError, TimeoutError):
    """A call got no reply within its timeout."""


class QueueOverflow(RemoteError):
    """The pending-request queue was full: the oldest pending call failed locally with this
    (code 429 ``Request queue overflow``, as rpc-common does; never sent on the wire)."""

    def __init__(self, code: int = 429, message: str = "Request queue overflow") -> None:
        super().__init__(code, message)


class TransportError(MgrpcError, OSError):
    """A channel could not be opened, or failed while in use."""


class ChannelClosed(TransportError):
    """The channel was closed while a call was pending or a frame was being sent."""


class AuthError(MgrpcError):
    """Credentials were needed but missing, or rejected by the peer."""


class UsageError(MgrpcError, ValueError):
    """Bad arguments from the caller (invalid URL, unknown option, invalid JSON args, ...)."""
