"""``FS.List``, ``FS.ListExt``, ``FS.Get``, ``FS.Put``, ``FS.Remove`` as rpc-service-fs answers them."""

from __future__ import annotations

import base64
import logging
from typing import Any

from rpc.errors import HandlerError
from rpc.node import Context, Node
from services.firmware import Firmware
from services.ota import decode_data

__all__ = ["add_fs_service"]

log = logging.getLogger("mgrpc.services.fs")


def _filename(params: Any) -> str:
    name = params.get("filename") if isinstance(params, dict) else None
    if not isinstance(name, str) or not name:
        raise HandlerError(400, "filename is required")
    return name.lstrip("/")


def _reason(e: OSError) -> str:
    # What the filesystem said, without the partition name: "no such file: data/r.bin".
    text = str(getattr(e, "message", None) or e)
    return text.split(": ", 1)[1] if ": " in text else text


def add_fs_service(node: Node, fw: Firmware) -> None:
    """Register the FS.* handlers working on the running slot's filesystem ``fw.fs``."""

    def list_(ctx: Context, params: Any) -> Any:
        return sorted(fw.fs.listdir("/"))

    def list_ext(ctx: Context, params: Any) -> Any:
        return [{"name": n, "size": fw.fs.size(n)} for n in sorted(fw.fs.listdir("/"))]

    def get(ctx: Context, params: Any) -> Any:
        name = _filename(params)
        offset = params.get("offset", 0)
        length = params.get("len", -1)
        if not isinstance(offset, int) or offset < 0:
            raise HandlerError(400, "illegal offset")
        try:
            data = fw.fs.read(name)
        except OSError:
            raise HandlerError(400, f'failed to open file "{name}"') from None
        offset = min(offset, len(data))
        if not isinstance(length, int) or length < 0 or offset + length > len(data):
            length = len(data) - offset
        chunk = data[offset : offset + length]
        return {"data": base64.b64encode(chunk).decode(), "left": len(data) - offset - length}

    def put(ctx: Context, params: Any) -> Any:
        name = _filename(params)
        chunk = decode_data(params.get("data"), code=400)
        try:
            if params.get("append") and fw.fs.exists(name):
                chunk = fw.fs.read(name) + chunk
            fw.fs.write(name, chunk)
        except OSError as e:
            log.warning("FS.Put %s: %s", name, e)
            # rpc-service-fs's words, then the filesystem's own reason (so the user learns why)
            raise HandlerError(500, f"failed to write data: {_reason(e)}") from None
        raise HandlerError(0)  # the device answers success through the error path

    def remove(ctx: Context, params: Any) -> Any:
        name = _filename(params)
        try:
            fw.fs.remove(name)
        except OSError as e:
            raise HandlerError(500, f"remove failed: {_reason(e)}") from None
        raise HandlerError(0)

    node.add_handler("FS.List", list_, args_fmt="{path: %Q}")
    node.add_handler("FS.ListExt", list_ext, args_fmt="{path: %Q}")
    node.add_handler("FS.Get", get, args_fmt="{filename: %Q, offset: %ld, len: %ld}")
    node.add_handler("FS.Put", put, args_fmt="{filename: %Q, data: %V, append: %B}")
    node.add_handler("FS.Remove", remove, args_fmt="{filename: %Q}")
