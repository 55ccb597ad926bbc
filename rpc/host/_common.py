"""What the host-side helpers share: their error, chunk encoding, retries, callback types."""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from rpc.client import AsyncClient
from rpc.errors import MgrpcError, QueueOverflow, RemoteError, RpcTimeout

__all__ = ["DEFAULT_CHUNK_SIZE", "MessageFn", "OtaError", "ProgressFn", "chunk_data"]

log = logging.getLogger("mgrpc.ota")
_retry_log = logging.getLogger("mgrpc.host")  # FS and config retries are not OTA

DEFAULT_CHUNK_SIZE = 512

ProgressFn = Callable[[int, int], None]
MessageFn = Callable[[str], None]


class OtaError(MgrpcError):
    """An OTA or file operation failed; the message is the one ``mos`` prints (plus the cause)."""


def chunk_data(client: AsyncClient, chunk: bytes) -> str | bytes:
    """Chunk data as the link carries it: base64 text on JSON links (as mos), raw bytes on binary ones."""
    if client.channel.binary:
        return chunk
    return base64.b64encode(chunk).decode("ascii")


def why(e: BaseException) -> str:
    """A failure as mos words it (a timeout is Go's ``context deadline exceeded``)."""
    if isinstance(e, RpcTimeout):
        return "context deadline exceeded"
    return str(e) or type(e).__name__


def is_transient(e: BaseException) -> bool:
    """Worth trying again: a timeout, a link error, a full request queue. An error the device answered
    (``RemoteError``: no such file, bad args, ...) is deterministic: the same request gets the same answer."""
    if isinstance(e, RemoteError):
        return isinstance(e, QueueOverflow)
    return isinstance(e, MgrpcError | OSError)


async def with_attempts(what: str, attempts: int, op: Callable[[], Awaitable[Any]]) -> Any:
    """``op()``, tried up to ``attempts`` times on transient errors (:func:`is_transient`); an error
    the device answered is raised at once, and after the last attempt the last error is raised."""
    last: BaseException | None = None
    for i in range(max(1, attempts)):
        try:
            return await op()
        except (MgrpcError, OSError) as e:
            if not is_transient(e):
                raise
            last = e
            # INFO, not WARNING: the CLI's default output is then the outcome alone (-v shows the retries)
            _retry_log.info("%s failed (attempt %d of %d): %s", what, i + 1, attempts, why(e))
    assert last is not None
    raise last
