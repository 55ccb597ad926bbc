"""A small fake device for the host-side tests: a Node following the OTA.*, FS.* and Config.*
contracts, with hooks to inject faults (the ``fake`` fixture in conftest.py serves it over loop://)."""

from __future__ import annotations

import asyncio
import base64
import itertools
from typing import Any

from rpc.client import AsyncClient
from rpc.errors import HandlerError
from rpc.jsonfmt import member_text
from rpc.node import Context, Node

names = itertools.count()


class FakeOta:
    """A device following the OTA.* contract, with hooks to inject faults."""

    def __init__(self) -> None:
        self.node = Node(id="esp32_FAKE")
        self.state = 0
        self.size = 0
        self.data = bytearray()
        self.last: tuple[int, bytes] | None = None
        self.calls: list[str] = []
        self.begin_params_text: list[str | None] = []
        self.drop_reply_once: set[int] = set()  # accept the write at this offset but never answer
        self.fail_write: dict[int, int] = {}  # offset -> how many times to refuse it
        self.fail_status = False
        self.fail_begin = False
        self.end_error: str | None = None
        self.max_pending_seen = 0
        self.client: AsyncClient | None = None
        self.ended = 0
        self.files: dict[str, bytes] = {}
        self.fs_params: list[str] = []
        self.config: dict[str, Any] = {"wifi": {"sta": {"ssid": "x", "enable": False}}, "debug": {"level": 2}}
        self.frame_limit: int | None = None  # offered as Config.Get rpc.max_frame_size when set
        self.drop_frames_over: int | None = None  # OTA.Write frames longer are dropped unanswered
        self.largest_write_frame = 0
        n = self.node
        n.add_handler("OTA.Status", self.status)
        n.add_handler("OTA.Begin", self.begin)
        n.add_handler("OTA.Write", self.write)
        n.add_handler("OTA.End", self.end)
        n.add_handler("FS.Put", self.fs_put)
        n.add_handler("FS.Get", self.fs_get)
        n.add_handler("FS.List", lambda ctx, p: sorted(self.files, reverse=True))
        n.add_handler("Config.Get", self.config_get)
        n.add_handler("Config.Set", self.config_set)

    def _log(self, ctx: Context) -> None:
        self.calls.append(ctx.method)

    def status(self, ctx: Context, params: Any) -> Any:
        self._log(ctx)
        if self.fail_status:
            raise HandlerError(-1, "status broken")
        return {"state": self.state, "msg": "x", "is_committed": True, "commit_timeout": 0, "partition": 0,
                "progress_percent": 0, "bytes_written": len(self.data), "size": self.size}  # fmt: skip

    def begin(self, ctx: Context, params: Any) -> Any:
        self._log(ctx)
        raw = ctx.frame.raw.decode() if ctx.frame.raw else ""
        self.begin_params_text.append(member_text(raw, "params"))
        if self.fail_begin or self.state == 1:
            raise HandlerError(-1, "Update already in progress")
        self.state, self.size, self.data, self.last = 1, params["size"], bytearray(), None
        return None

    def config_get(self, ctx: Context, params: Any) -> Any:
        if isinstance(params, dict) and params.get("key") == "rpc.max_frame_size":
            if self.frame_limit is None:
                raise HandlerError(404, "no such key")
            return self.frame_limit
        return self.config

    def write(self, ctx: Context, params: Any) -> Any:
        size = len(ctx.frame.raw or b"")
        if self.drop_frames_over is not None and size > self.drop_frames_over:
            return asyncio.get_running_loop().create_future()  # a device drops a frame too big: no answer
        self.largest_write_frame = max(self.largest_write_frame, size)
        self._log(ctx)
        if self.client is not None:
            self.max_pending_seen = max(self.max_pending_seen, self.client.node.pending_count)
        if self.state != 1:
            raise HandlerError(-1, "No update in progress")
        off, chunk = params["offset"], base64.b64decode(params["data"])
        if self.fail_write.get(off, 0) > 0:
            self.fail_write[off] -= 1
            raise HandlerError(-1, "flash write error")
        if (off, chunk) == self.last:
            return None
        if off != len(self.data):
            raise HandlerError(-1, f"Expected offset {len(self.data)}, got {off}")
        self.data += chunk
        self.last = (off, chunk)
        if off in self.drop_reply_once:
            self.drop_reply_once.discard(off)
            return asyncio.get_running_loop().create_future()  # never answered
        return None

    def end(self, ctx: Context, params: Any) -> Any:
        self._log(ctx)
        self.ended += 1
        if self.state != 1:
            raise HandlerError(-1, "No update in progress")
        if len(self.data) < self.size:
            self.state = 0
            raise HandlerError(-1, "Update aborted")
        if self.end_error:
            self.state = 2
            raise HandlerError(-1, self.end_error)
        self.state = 3
        return None

    def fs_put(self, ctx: Context, params: Any) -> Any:
        raw = ctx.frame.raw.decode() if ctx.frame.raw else ""
        self.fs_params.append(member_text(raw, "params") or "")
        name = params["filename"]
        chunk = base64.b64decode(params["data"])
        self.files[name] = (self.files.get(name, b"") if params["append"] else b"") + chunk
        return None

    def fs_get(self, ctx: Context, params: Any) -> Any:
        raw = ctx.frame.raw.decode() if ctx.frame.raw else ""
        self.fs_params.append(member_text(raw, "params") or "")
        data = self.files[params["filename"]]
        off, n = params["offset"], params["len"]
        chunk = data[off : off + n]
        return {"data": base64.b64encode(chunk).decode(), "left": len(data) - off - len(chunk)}

    def config_set(self, ctx: Context, params: Any) -> Any:
        raw = ctx.frame.raw.decode() if ctx.frame.raw else ""
        self.fs_params.append(member_text(raw, "params") or "")
        return {"saved": True}


def firmware(n: int = 5000) -> bytes:
    return bytes((i * 7 + i // 256) % 256 for i in range(n))
