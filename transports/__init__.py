"""Transports: one module per URL scheme, each with a host side and a device (listen) side.

Use :func:`connect` / :func:`connect_sync` for a client and :func:`listen` to serve a node.
Schemes: ``serial://`` (or a bare device path), ``tcp://``, ``udp://``, ``ws://``, ``wss://``,
``http://``, ``https://``, ``mqtt://``, ``mqtts://``, ``ble://``, ``loop://``.
"""

from transports.registry import (
    SCHEMES,
    Listener,
    TransportURL,
    connect,
    connect_sync,
    listen,
    open_client,
    parse_url,
)

__all__ = ["SCHEMES", "Listener", "TransportURL", "connect", "connect_sync", "listen", "open_client", "parse_url"]
