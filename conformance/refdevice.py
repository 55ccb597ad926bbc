"""A small reference device for the conformance suite's own tests and for client checks.

:func:`make_node` builds a device :class:`rpc.node.Node` with ``Sys.GetInfo``, ``Sys.Reboot``, an
in-memory ``Config.Get``/``Config.Set`` (``device.id``, ``debug.level``) and a
minimal in-memory OTA service (:class:`FakeOta`) that follows docs/protocol/ota.md: streaming
``OTA.Begin/Write/End/Status``, ``OTA.Commit/Revert``, ``OTA.GetBootState``, a simulated reboot into
the new slot uncommitted, and a bundle check (stored zip, ``manifest.json`` first, platform match).
It is used where the full virtual device (``services.device``) is not needed; it keeps no flash.

:class:`Recorder` wraps a node so every frame a client sends is kept for the client checks.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any

from rpc.channel import Channel
from rpc.errors import HandlerError
from rpc.frame import Frame, RawJSON
from rpc.node import Context, Node
from updater.errors import UpdaterError
from updater.manifest import manifest_object

__all__ = ["DEVICE_ID", "FakeOta", "Recorder", "make_node", "sys_getinfo_text"]

log = logging.getLogger("mgrpc.conformance.refdevice")

DEVICE_ID = "esp32_C0FFEE"
_closing: set[asyncio.Future[None]] = set()  # keeps reboot-close tasks alive until done
ARCH = "esp32"


def sys_getinfo_text(info: dict[str, Any]) -> RawJSON:
    """``Sys.GetInfo``'s result in device spacing (``": "`` and ``", "``), keys in the given order."""
    return RawJSON(json.dumps(info))


@dataclass
class _Slot:
    version: str
    build_id: str


@dataclass
class FakeOta:
    """An in-memory model of the OTA service and boot state of a two-slot device.

    Good enough to exercise the OTA check group: it validates the zip's first entry is a
    ``manifest.json`` whose platform matches, that every entry is stored, CRCs match, and that all
    ``size`` bytes arrived; writes must be in order (an exact duplicate of the last chunk is
    accepted, a gap is an error).
    """

    arch: str = ARCH
    slots: list[_Slot] = field(default_factory=lambda: [_Slot("1.0", "20200101-000000/ref"), _Slot("", "")])
    active: int = 0  # slot the next boot uses
    running_slot: int = 0  # slot running now (changes only on reboot)
    committed: bool = True
    revert_slot: int = 0
    commit_timeout: int = 0
    state: int = 0  # 0 idle, 1 progress, 2 error, 3 success
    msg: str = "idle"
    size: int = 0
    buf: bytearray = field(default_factory=bytearray)
    last_chunk: tuple[int, bytes] | None = None
    begin_args: dict[str, Any] = field(default_factory=dict)
    reboots: int = 0

    @property
    def running(self) -> _Slot:
        """The firmware the device runs."""
        return self.slots[self.running_slot]

    def status(self) -> dict[str, Any]:
        """``OTA.Status`` result."""
        return {
            "state": self.state,
            "msg": self.msg,
            "is_committed": self.committed,
            "commit_timeout": self.commit_timeout,
            "partition": self.running_slot,
            "progress_percent": (100 * len(self.buf) // self.size) if self.state == 1 and self.size else 0,
        }

    def begin(self, args: Any) -> None:
        """``OTA.Begin``."""
        if self.state == 1:
            raise HandlerError(-1, "Update already in progress")
        if not self.committed:
            raise HandlerError(-1, "Previous update has not been committed yet")
        if not isinstance(args, dict) or not isinstance(args.get("size"), int) or args["size"] <= 0:
            raise HandlerError(-1, "Invalid size")
        self.begin_args = dict(args)
        self.size = args["size"]
        self.buf = bytearray()
        self.last_chunk = None
        self.state, self.msg = 1, "progress"

    def write(self, args: Any) -> None:
        """``OTA.Write``: in order; an exact repeat of the previous chunk is accepted as is."""
        if self.state != 1:
            raise HandlerError(-1, "No update in progress")
        if (
            not isinstance(args, dict)
            or not isinstance(args.get("offset"), int)
            or not isinstance(args.get("data"), str)
        ):
            raise HandlerError(-1, "bad request")
        try:
            data = base64.b64decode(args["data"], validate=True)
        except ValueError:
            raise HandlerError(-1, "Invalid base64 data") from None
        off = args["offset"]
        if self.last_chunk is not None and self.last_chunk == (off, data):
            return
        if off != len(self.buf):
            raise HandlerError(-1, f"Unexpected offset {off}, expected {len(self.buf)}")
        if off + len(data) > self.size:
            raise HandlerError(-1, "Image too big")
        self.buf += data
        self.last_chunk = (off, data)

    def end(self) -> bool:
        """``OTA.End``: validate and switch slots (True = the device must reboot)."""
        if self.state != 1:
            raise HandlerError(-1, "Wrong state for finalize")
        if len(self.buf) != self.size:
            self._fail("Update aborted")
            self.state, self.msg = 0, "idle"
            raise HandlerError(-1, "Not all data was processed")
        try:
            manifest = _check_bundle(bytes(self.buf), self.arch)
        except HandlerError as e:
            self._fail(e.message or "Update failed")
            raise
        new = 1 - self.running_slot
        self.slots[new] = _Slot(str(manifest["version"]), str(manifest["build_id"]))
        self.revert_slot = self.running_slot
        self.active = new
        self.committed = False
        self.commit_timeout = int(self.begin_args.get("commit_timeout", 0) or 0)
        self.state, self.msg = 3, "Update applied, finalizing"
        self.buf = bytearray()
        return True

    def _fail(self, msg: str) -> None:
        self.state, self.msg = 2, msg
        self.buf = bytearray()

    def commit(self) -> None:
        """``OTA.Commit``."""
        if self.committed:
            raise HandlerError(-1)
        self.committed = True
        self.commit_timeout = 0

    def revert(self) -> bool:
        """``OTA.Revert``: back to the revert slot (True = reboot)."""
        if self.committed:
            raise HandlerError(-1)
        self.active = self.revert_slot
        self.committed = True
        self.commit_timeout = 0
        return True

    def boot_state(self) -> dict[str, Any]:
        """``OTA.GetBootState``."""
        return {
            "active_slot": self.active,
            "is_committed": self.committed,
            "revert_slot": self.revert_slot,
            "commit_timeout": self.commit_timeout,
        }

    def rebooted(self) -> None:
        """What a reboot does to the service state."""
        self.reboots += 1
        self.running_slot = self.active
        if self.state != 1:
            self.state, self.msg = 0, "idle"


def _check_bundle(data: bytes, arch: str) -> dict[str, Any]:
    if not data.startswith(b"PK\x03\x04"):
        raise HandlerError(-1, "Malformed archive (invalid file header)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
        if not infos or infos[0].filename.split("/")[-1] != "manifest.json":
            raise HandlerError(-1, "Failed to parse manifest")
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise HandlerError(-1, "Cannot handle compressed .zip")
            zf.read(info)  # checks the CRC
        manifest = manifest_object(zf.read(infos[0]))
    except HandlerError:
        raise
    except UpdaterError:
        raise HandlerError(-1, "Failed to parse manifest") from None
    except (zipfile.BadZipFile, ValueError, KeyError, OSError):
        raise HandlerError(-1, "Malformed archive") from None
    if any(k not in manifest for k in ("platform", "version", "build_id", "parts")):
        raise HandlerError(-1, "Required manifest field missing")
    if not str(manifest["platform"]).lower().startswith(arch.lower()):
        raise HandlerError(-1, "Wrong platform")
    return manifest


def _merge_config(base: dict[str, Any], over: dict[str, Any], path: str) -> None:
    for k, v in over.items():
        key = f"{path}.{k}" if path else k
        if k not in base:
            raise HandlerError(400, f"invalid config key {key}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise HandlerError(400, f"invalid value for {key}")
            _merge_config(base[k], v, key)
        elif type(v) is not type(base[k]):
            raise HandlerError(400, f"invalid value for {key}")
        else:
            base[k] = v


def make_node(*, device_id: str = DEVICE_ID, ota: FakeOta | None = None, node_cls: type[Node] = Node) -> Node:
    """A reference device: built-in RPC.*, ``Sys.GetInfo``, ``Sys.Reboot`` and the fake OTA service."""
    node = node_cls(id=device_id)
    ota = ota if ota is not None else FakeOta()
    node.ota = ota  # type: ignore[attr-defined]
    boot_time = time.monotonic()

    def reboot_soon(delay_s: float = 0.1) -> None:
        def do() -> None:
            nonlocal boot_time
            boot_time = time.monotonic()
            ota.rebooted()
            # A reboot drops every connection; the probe reconnects.
            for ch in list(node.channels):
                task = asyncio.ensure_future(ch.close())
                _closing.add(task)
                task.add_done_callback(_closing.discard)

        asyncio.get_running_loop().call_later(delay_s, do)

    def getinfo(ctx: Context, params: Any) -> Any:
        slot = ota.running
        return sys_getinfo_text(
            {
                "id": device_id,
                "app": "conformance-ref",
                "fw_version": slot.version,
                "fw_id": slot.build_id,
                "mg_version": "2.20.0",
                "mg_id": "20200101-000000/ref",
                "mac": "C0FFEE000001",
                "arch": ota.arch,
                "uptime": int(time.monotonic() - boot_time),
                "public_key": None,
                "ram_size": 327680,
                "ram_free": 200000,
                "ram_min_free": 190000,
                "fs_size": 233681,
                "fs_free": 200000,
            }
        )

    def sys_reboot(ctx: Context, params: Any) -> Any:
        delay = params.get("delay_ms", 100) if isinstance(params, dict) else 100
        if not isinstance(delay, int) or delay < 0:
            raise HandlerError(400, "invalid delay value")
        reboot_soon(delay / 1000)
        return None

    def ota_end(ctx: Context, params: Any) -> Any:
        if ota.end():
            reboot_soon()
        return None

    def ota_revert(ctx: Context, params: Any) -> Any:
        if ota.revert():
            reboot_soon()
        return None

    config: dict[str, Any] = {"device": {"id": device_id}, "debug": {"level": 2}}

    def config_get(ctx: Context, params: Any) -> Any:
        key = params.get("key") if isinstance(params, dict) else None
        value: Any = config
        for part in key.split(".") if isinstance(key, str) and key else ():
            if not isinstance(value, dict) or part not in value:
                raise HandlerError(404, "invalid config key")
            value = value[part]
        return value

    def config_set(ctx: Context, params: Any) -> Any:
        changes = params.get("config") if isinstance(params, dict) else None
        if not isinstance(changes, dict):
            raise HandlerError(400, "config is required")
        _merge_config(config, changes, "")
        return None

    node.add_handler("Config.Get", config_get, args_fmt="{key: %Q, level: %d}")
    node.add_handler("Config.Set", config_set, args_fmt="{config: %M, level: %d, save: %B, reboot: %B, try_once: %B}")
    node.add_handler("Sys.GetInfo", getinfo)
    node.add_handler("Sys.Reboot", sys_reboot, args_fmt="{abort: %B, delay_ms: %d}")
    node.add_handler("OTA.Status", lambda ctx, p: ota.status())
    node.add_handler("OTA.Begin", lambda ctx, p: ota.begin(p), args_fmt="{timeout: %d, commit_timeout: %d, size: %d}")
    node.add_handler("OTA.Write", lambda ctx, p: ota.write(p), args_fmt="{offset: %d, data: %V}")
    node.add_handler("OTA.End", ota_end)
    node.add_handler("OTA.Commit", lambda ctx, p: ota.commit())
    node.add_handler("OTA.Revert", ota_revert)
    node.add_handler("OTA.GetBootState", lambda ctx, p: ota.boot_state())
    return node


class Recorder:
    """Keeps every frame a node receives (with the channel type it came on), for client checks."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.frames: list[tuple[str, Frame]] = []
        orig = node.frame_received

        def frame_received(channel: Channel, frame: Frame) -> None:
            self.frames.append((channel.type, frame))
            orig(channel, frame)

        node.frame_received = frame_received  # type: ignore[method-assign]

    def requests(self) -> list[Frame]:
        """The recorded requests, in arrival order."""
        return [f for _, f in self.frames if f.is_request]
