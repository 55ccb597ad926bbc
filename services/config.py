"""Layered device configuration and ``Config.Get`` / ``Config.Set`` / ``Config.Save``.

The effective config is the built-in defaults overlaid by ``conf0.json`` … ``conf9.json`` from the
device filesystem, in that order (Mongoose OS's levels: 0-8 ship with the firmware, 9 is the user's).
``Config.Set`` changes the running config; with ``save`` (or a later ``Config.Save``) the values that
differ from levels below are written to ``conf<level>.json`` (default 9). Keys not in the schema are
refused, as the device's schema-driven parser does.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from rpc.errors import HandlerError
from rpc.node import Context, Node
from services.firmware import DeviceFS, Firmware, mac_for

__all__ = ["DeviceConfig", "add_config_service", "default_config"]

log = logging.getLogger("mgrpc.services.config")
USER_LEVEL = 9


def default_config(device_id: str, arch: str) -> dict[str, Any]:
    """The schema and defaults of the virtual device's config (a subset of a real device's)."""
    return {
        "device": {"id": device_id, "mac": mac_for(device_id), "location": ""},
        "debug": {"level": 2, "udp_log_addr": ""},
        "rpc": {
            "enable": True, "max_frame_size": 4096, "max_queue_length": 25, "auth_domain": "RPC",
            "auth_file": "", "auth_algo": 0, "acl": "", "acl_file": "",
            "ws": {"enable": True, "server_address": ""}, "http_enable": True,
            "mqtt": {"enable": True, "sub_topic": "%.*s/rpc", "pub_topic": "%.*s/rpc", "qos": 1},
        },
        "update": {
            "timeout": 600, "commit_timeout": 0, "url": "", "interval": 0, "extra_http_headers": "",
            "enable_post": True, "sig_req_mask": -1,
            "allow_deflate": False,  # mgrpc extension: accept deflated bundle entries (stock devices refuse)
            **{f"key{i}": "" for i in range(8)},
        },
        "mqtt": {"enable": False, "server": "", "user": "", "pass": "", "client_id": ""},
        "shadow": {"enable": True, "ota_enable": True, "autocommit": False},
        "wifi": {"sta": {"enable": False, "ssid": "", "pass": ""}, "ap": {"enable": True, "ssid": "Mongoose_" + arch}},
    }  # fmt: skip


def _merge(base: dict[str, Any], over: dict[str, Any], *, strict: bool, path: str = "") -> None:
    for k, v in over.items():
        key = f"{path}.{k}" if path else k
        if k not in base:
            if strict:
                raise HandlerError(400, f"invalid config key {key}")
            continue
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise HandlerError(400, f"invalid value for {key}")
            _merge(base[k], v, strict=strict, path=key)
        else:
            if strict and not _same_type(base[k], v):
                raise HandlerError(400, f"invalid value for {key}")
            base[k] = v


def _same_type(old: Any, new: Any) -> bool:
    if isinstance(old, bool):
        return isinstance(new, bool)
    if isinstance(old, int):
        return isinstance(new, int) and not isinstance(new, bool)
    if isinstance(old, str):
        return isinstance(new, str)
    return True


def _diff(cur: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cur.items():
        if isinstance(v, dict):
            sub = _diff(v, ref.get(k, {}))
            if sub:
                out[k] = sub
        elif ref.get(k) != v:
            out[k] = v
    return out


class DeviceConfig:
    """The effective config of a device, loaded from defaults + ``conf0..9.json`` on ``fs``."""

    def __init__(self, fs: DeviceFS, defaults: dict[str, Any]) -> None:
        self.fs = fs
        self.defaults = defaults
        self.data = self.load_levels(USER_LEVEL)

    def _level_file(self, level: int) -> dict[str, Any]:
        name = f"conf{level}.json"
        try:
            if not self.fs.exists(name):
                return {}
            obj = json.loads(self.fs.read(name))
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", name, e)
            return {}
        return obj if isinstance(obj, dict) else {}

    def load_levels(self, upto: int) -> dict[str, Any]:
        """Defaults overlaid by conf0..conf<upto> (unknown keys in files are ignored)."""
        cfg = copy.deepcopy(self.defaults)
        for level in range(upto + 1):
            try:
                _merge(cfg, self._level_file(level), strict=False)
            except HandlerError as e:
                log.warning("conf%d.json: %s", level, e.message)
        return cfg

    def get(self, key: str | None = None) -> Any:
        """The whole config, or the value at a dotted ``key`` (404 if no such key)."""
        node: Any = self.data
        if key:
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise HandlerError(404, "invalid config key")
                node = node[part]
        return node

    def set(self, changes: dict[str, Any]) -> None:
        """Apply ``changes`` to the running config (validated against the schema, all or nothing)."""
        trial = copy.deepcopy(self.data)
        _merge(trial, changes, strict=True)
        self.data = trial

    def save(self, level: int = USER_LEVEL) -> None:
        """Write what differs from levels below into ``conf<level>.json``."""
        below = self.load_levels(level - 1)
        text = json.dumps(_diff(self.data, below), indent=2, sort_keys=True).encode()
        try:
            self.fs.write(f"conf{level}.json", text)
        except OSError as e:
            raise HandlerError(-1, f"error saving config: {e}") from None


def add_config_service(node: Node, fw: Firmware, cfg: DeviceConfig) -> None:
    """Register Config.Get / Config.Set / Config.Save."""

    def get(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        key = p.get("key")
        if not isinstance(key, str):
            key = None  # %Q takes strings only: anything else reads as no key (the whole config)
        level = p.get("level")
        if level is not None and not isinstance(level, bool) and isinstance(level, int):
            if not 0 <= level <= USER_LEVEL:
                raise HandlerError(400, f"invalid level (0..{USER_LEVEL})")
            data = cfg.load_levels(level)
            node_: Any = data
            for part in (key or "").split(".") if key else ():
                if not isinstance(node_, dict) or part not in node_:
                    raise HandlerError(404, "invalid config key")
                node_ = node_[part]
            return node_
        return cfg.get(key)

    def set_(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        changes = p.get("config")
        if not isinstance(changes, dict):
            raise HandlerError(400, "config is required")
        level = p.get("level", USER_LEVEL)
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= USER_LEVEL:
            # Checked before anything changes: a bad level must not leave the config half applied.
            raise HandlerError(400, f"invalid level (0..{USER_LEVEL})")
        cfg.set(changes)
        if p.get("save"):
            cfg.save(level)
            if p.get("reboot"):
                fw.reboot(0.5)
        return None

    def save(ctx: Context, params: Any) -> Any:
        p = params if isinstance(params, dict) else {}
        cfg.save()
        if p.get("reboot"):
            fw.reboot(0.5)
        return None

    node.add_handler("Config.Get", get, args_fmt="{key: %Q, level: %d}")
    node.add_handler("Config.Set", set_, args_fmt="{config: %M, level: %d, save: %B, reboot: %B, try_once: %B}")
    node.add_handler("Config.Save", save, args_fmt="{try_once: %B, reboot: %B}")
