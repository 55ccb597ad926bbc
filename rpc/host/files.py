"""Device files from the host: ``mos ls``, ``get``, ``put``, ``rm`` over ``FS.*``."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from rpc.client import AsyncClient
from rpc.errors import UsageError
from rpc.host._common import DEFAULT_CHUNK_SIZE, OtaError, ProgressFn, chunk_data, with_attempts

__all__ = ["OtaError", "fs_get", "fs_list", "fs_put", "fs_remove"]


async def fs_list(
    client: AsyncClient, path: str = "/", *, long: bool = False, timeout_s: float | None = None
) -> list[tuple[str, int | None]]:
    """``FS.List {"path"}`` (or ``FS.ListExt`` with sizes when ``long``), sorted by name as mos does."""
    method = "FS.ListExt" if long else "FS.List"
    res = await client.call(method, {"path": path}, timeout_s=timeout_s)
    if not isinstance(res, list):
        raise OtaError(f"{method} returned {type(res).__name__}, expected a list")
    out: list[tuple[str, int | None]] = []
    for item in res:
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            size = item.get("size")
            out.append((item["name"], size if isinstance(size, int) else None))
    out.sort(key=lambda t: t[0])
    return out


async def fs_get(
    client: AsyncClient,
    filename: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    attempts: int = 3,
    timeout_s: float | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> bytes:
    """Read a device file with ``FS.Get {"filename","len","offset"}`` until ``left`` is 0."""
    out = bytearray()
    offset = 0
    while True:
        params = {"filename": filename, "len": chunk_size, "offset": offset}

        async def get(params: dict[str, Any] = params) -> Any:
            return await client.call("FS.Get", params, timeout_s=timeout_s)

        res = await with_attempts(f"FS.Get {filename} @ {offset}", attempts, get)
        if not isinstance(res, dict) or not isinstance(res.get("data"), str):
            raise OtaError(f"FS.Get returned no data at offset {offset}")
        try:
            chunk = base64.b64decode(res["data"], validate=True)
        except ValueError as e:
            raise OtaError(f"FS.Get returned invalid base64 at offset {offset}: {e}") from e
        out += chunk
        offset += len(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
        left = res.get("left", 0)
        if not left:
            return bytes(out)
        if not chunk:
            raise OtaError(f"FS.Get made no progress at offset {offset} ({left} bytes left)")


async def fs_put(
    client: AsyncClient,
    data: bytes,
    filename: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    attempts: int = 3,
    timeout_s: float | None = None,
    on_progress: ProgressFn | None = None,
) -> None:
    """Write a device file with ``FS.Put {"filename","offset","append","data"}`` in chunks (mos order).

    The first chunk creates/truncates the file (``append: false``), the rest append. An empty
    ``data`` still sends one empty chunk so the file exists and is empty.
    """
    if chunk_size <= 0:
        raise UsageError("chunk size must be positive")
    offsets = range(0, len(data), chunk_size) if data else range(1)
    for offset in offsets:
        chunk = data[offset : offset + chunk_size]
        params = {
            "filename": filename, "offset": offset, "append": offset > 0,
            "data": chunk_data(client, chunk),
        }  # fmt: skip

        async def put(params: dict[str, Any] = params) -> Any:
            return await client.call("FS.Put", params, timeout_s=timeout_s)

        await with_attempts(f"FS.Put {filename} @ {offset}", attempts, put)
        if on_progress is not None:
            on_progress(offset + len(chunk), len(data))


async def fs_remove(client: AsyncClient, filename: str, *, timeout_s: float | None = None) -> None:
    """``FS.Remove {"filename"}``."""
    await client.call("FS.Remove", {"filename": filename}, timeout_s=timeout_s)
