"""``Sys.GetInfo``, ``Sys.Reboot``, ``Sys.SetDebug`` (spec/frame.md §4)."""

from __future__ import annotations

import logging
from typing import Any

from rpc.errors import HandlerError
from rpc.node import Context, Node
from services.firmware import Firmware

__all__ = ["add_sys_service", "sys_info"]

log = logging.getLogger("mgrpc.services.sys")


def sys_info(fw: Firmware) -> dict[str, Any]:
    """The ``Sys.GetInfo`` object, members in the device's order (frame.md §4)."""
    fs_used, fs_size = fw.fs.stat_fs()
    info: dict[str, Any] = {
        "id": fw.id,
        "app": fw.app,
        "fw_version": fw.version,
        "fw_id": fw.build_id,
        "mg_version": fw.mg_version,
        "mg_id": fw.mg_id,
        "mac": fw.mac,
        "arch": fw.arch,
        "uptime": fw.uptime_s,
        "public_key": None,
        "ram_size": fw.ram_size,
        "ram_free": fw.ram_free,
        "ram_min_free": fw.ram_free - 4096,
        "fs_size": fs_size,
        "fs_free": fs_size - fs_used,
    }
    info.update(fw.extra_info)
    return info


def add_sys_service(node: Node, fw: Firmware) -> None:
    """Register the Sys.* handlers on ``node`` for firmware ``fw``."""

    def get_info(ctx: Context, params: Any) -> Any:
        return sys_info(fw)

    def reboot(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        delay_ms = p.get("delay_ms", 100)
        if not isinstance(delay_ms, int) or isinstance(delay_ms, bool) or delay_ms < 0:
            raise HandlerError(400, "invalid delay value")
        delay_s = 0.0 if p.get("abort") else delay_ms / 1000
        fw.reboot(delay_s)
        return None

    def set_debug(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        level = p.get("level")
        if level is not None:
            if not isinstance(level, int) or not -1 <= level <= 4:
                raise HandlerError(400, "invalid level")
            logging.getLogger("mgrpc").setLevel(
                [logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG][
                    level + 1
                ]
            )
        if p.get("udp_log_addr"):
            raise HandlerError(501, "MGOS_ENABLE_DEBUG_UDP is not enabled")
        raise HandlerError(0)  # success is reported through the error path, as the device does

    node.add_handler("Sys.GetInfo", get_info)
    node.add_handler("Sys.Reboot", reboot, args_fmt="{abort: %B, delay_ms: %d}")
    node.add_handler("Sys.SetDebug", set_debug, args_fmt="{udp_log_addr: %Q, level: %d, file_level: %Q}")
