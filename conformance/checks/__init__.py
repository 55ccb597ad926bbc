"""The check groups; importing this package registers every check (run order: model.GROUP_ORDER)."""

from conformance.checks import auth, ble, config, frame, jsonrpc, mqtt, ota, rpcsvc, stream, web

__all__ = ["auth", "ble", "config", "frame", "jsonrpc", "mqtt", "ota", "rpcsvc", "stream", "web"]
