"""The check groups; importing this package registers every check (run order: model.GROUP_ORDER)."""

from conformance.checks import (
    auth,
    ble,
    config,
    config_keys,
    frame,
    frame_extra,
    fs,
    http_extra,
    jsonrpc,
    mqtt,
    ota,
    ota_rules,
    rpcsvc,
    stream,
    web,
    ws_raw,
)

__all__ = [
    "auth",
    "ble",
    "config",
    "config_keys",
    "frame",
    "frame_extra",
    "fs",
    "http_extra",
    "jsonrpc",
    "mqtt",
    "ota",
    "ota_rules",
    "rpcsvc",
    "stream",
    "web",
    "ws_raw",
]
