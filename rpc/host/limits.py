"""What a device accepts, learnt before an update starts: its platform and its largest frame.

A device drops a frame longer than its ``rpc.max_frame_size`` (4096 bytes by default) without an
answer, so an ``--chunk-size`` too large for it shows up as timeouts, and a bundle for another
platform is refused only after the upload has started. :func:`device_limits` asks
(``Sys.GetInfo`` ``arch``, ``Config.Get rpc.max_frame_size``); :func:`ota_write_frame_size`,
:func:`max_chunk_size` and :func:`check_chunk_size` are pure arithmetic on the frames this client
would send (its codec, its ``dst``, mos's longest id), for the CLI's checks before ``OTA.Begin`` and
for anything that picks a chunk size from the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rpc.client import AsyncClient
from rpc.errors import MgrpcError, RemoteError
from rpc.frame import Frame
from rpc.host._common import OtaError, chunk_data, log

__all__ = [
    "DeviceLimits",
    "FrameLimitError",
    "check_chunk_size",
    "device_limits",
    "max_chunk_size",
    "ota_write_frame_size",
]

# The longest request id a client sends (mos: 40 random bits with bit 40 set, 13 digits).
_LONGEST_ID = (1 << 41) - 1


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """What the device told: its ``arch`` and ``rpc.max_frame_size`` (None where it did not say)."""

    arch: str | None
    max_frame_size: int | None


class FrameLimitError(OtaError):
    """OTA.Write frames for this chunk size would be longer than the device accepts."""

    def __init__(self, chunk_size: int, frame_size: int, limit: int, largest: int) -> None:
        super().__init__(
            f"OTA.Write frames for {chunk_size}-byte chunks are {frame_size} bytes, more than the device "
            f"accepts (rpc.max_frame_size {limit})"
        )
        self.chunk_size = chunk_size
        self.frame_size = frame_size
        self.limit = limit
        self.largest = largest


async def device_limits(client: AsyncClient, *, timeout_s: float | None = None) -> DeviceLimits:
    """Ask ``Sys.GetInfo`` (``arch``) and ``Config.Get {"key": "rpc.max_frame_size"}``.

    A device without the method, or that refuses it (ACL), simply leaves that limit unknown; a
    timeout or a lost link is raised (the update could not go on anyway).
    """
    arch: str | None = None
    limit: int | None = None
    try:
        info = await client.call("Sys.GetInfo", timeout_s=timeout_s)
        if isinstance(info, dict) and isinstance(info.get("arch"), str) and info["arch"]:
            arch = info["arch"]
    except MgrpcError as e:
        if not _answered(e):
            raise
        log.info("Sys.GetInfo refused (%s): platform not checked", e)
    try:
        value = await client.call("Config.Get", {"key": "rpc.max_frame_size"}, timeout_s=timeout_s)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limit = value
    except MgrpcError as e:
        if not _answered(e):
            raise
        log.info("Config.Get rpc.max_frame_size refused (%s): frame size not checked", e)
    return DeviceLimits(arch, limit)


def _answered(e: BaseException) -> bool:
    return isinstance(e, RemoteError)  # the device is there and said no (no such method, ACL, ...)


def _auth_estimate(client: AsyncClient) -> dict[str, Any] | None:
    creds = client.node.creds
    if creds is None:
        return None
    # The auth object a 401 retry carries (rpc.auth.make_auth), with generous realm/nonce lengths.
    return {"realm": "R" * 32, "username": creds.user, "nonce": 2**32, "cnonce": 2**32,
            "algorithm": "SHA-256", "response": "0" * 64}  # fmt: skip


def ota_write_frame_size(client: AsyncClient, chunk_size: int, *, total_size: int) -> int:
    """Bytes of the longest ``OTA.Write`` frame this client sends for ``chunk_size``-byte chunks of a
    ``total_size``-byte bundle (the largest offset, mos's longest id, the link's codec)."""
    params = {"offset": max(0, total_size), "data": chunk_data(client, bytes(chunk_size))}
    frame = Frame.request("OTA.Write", params, id=_LONGEST_ID, src=client.node.id, dst=client.dst)
    auth = _auth_estimate(client)
    if auth is not None:
        frame = frame.replace(auth=auth)
    return len(client.channel.encode(frame))


def max_chunk_size(client: AsyncClient, max_frame_size: int, *, total_size: int) -> int:
    """The largest chunk size whose ``OTA.Write`` frames fit in ``max_frame_size`` (0 if none does)."""
    lo, hi = 0, max(0, max_frame_size)
    while lo < hi:  # frame size grows with the chunk size: bisect for the last one that fits
        mid = (lo + hi + 1) // 2
        if ota_write_frame_size(client, mid, total_size=total_size) <= max_frame_size:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_chunk_size(client: AsyncClient, chunk_size: int, max_frame_size: int | None, *, total_size: int) -> None:
    """Raise :class:`FrameLimitError` if ``chunk_size`` makes frames longer than ``max_frame_size``
    (None: the device did not say, nothing is checked)."""
    if not max_frame_size:
        return
    size = ota_write_frame_size(client, chunk_size, total_size=total_size)
    if size > max_frame_size:
        largest = max_chunk_size(client, max_frame_size, total_size=total_size)
        raise FrameLimitError(chunk_size, size, max_frame_size, largest)
