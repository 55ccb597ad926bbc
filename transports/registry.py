"""Transport selection by URL, the way ``mos --port`` works (spec/transports.md §0).

A bare path (``/dev/ttyUSB0``, ``COM7``) means serial. Each scheme maps to a module given as an
import string and imported on first use, so a missing optional dependency only matters for the
transport that needs it, and the error names the extra to install.

Every transport module defines ``SCHEMES``, ``OPTIONS`` (allowed ``?query`` options), ``EXTRA`` and

* ``async def open_client(url: TransportURL, **opts) -> Channel`` — the host side;
* ``async def listen(url: TransportURL, node: Node, **opts) -> Listener`` — the device side.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from rpc.channel import Channel
from rpc.client import AsyncClient, Client
from rpc.errors import TransportError, UsageError
from rpc.jsonrpc import JsonRpcCodec, with_dialect
from rpc.node import Node

__all__ = [
    "COMMON_OPTIONS",
    "SCHEMES",
    "Listener",
    "TransportURL",
    "connect",
    "connect_sync",
    "listen",
    "load",
    "open_client",
    "parse_url",
]

# scheme -> (module import string, pip extra)
SCHEMES: dict[str, tuple[str, str]] = {
    "serial": ("transports.serial", "serial"),
    "tcp": ("transports.tcp", ""),
    "udp": ("transports.udp", ""),
    "ws": ("transports.ws", "ws"),
    "wss": ("transports.ws", "ws"),
    "http": ("transports.http", "http"),
    "https": ("transports.http", "http"),
    "mqtt": ("transports.mqtt", "mqtt"),
    "mqtts": ("transports.mqtt", "mqtt"),
    "ble": ("transports.ble", "ble"),
    "loop": ("transports.loop", ""),
}

# Options every transport accepts: the frame codec between two mgrpc ends, and (client side) the
# dialect spoken to the peer: mgrpc (default) or jsonrpc (JSON-RPC 2.0, docs/protocol/jsonrpc.md).
COMMON_OPTIONS = frozenset({"codec", "dialect"})


@dataclass(frozen=True, slots=True)
class TransportURL:
    """A parsed ``--port`` / ``--listen`` URL."""

    scheme: str
    host: str = ""
    port: int | None = None
    path: str = ""
    user: str | None = None
    password: str | None = None
    query: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    @property
    def address(self) -> str:
        """``host:port`` (port omitted when absent)."""
        return f"{self.host}:{self.port}" if self.port is not None else self.host

    def host_port(self, *, default_host: str | None = None) -> tuple[str, int]:
        """``(host, port)`` for a socket; :class:`UsageError` naming the form when either is missing."""
        host = self.host or default_host
        if not host or self.port is None:
            raise UsageError(
                f"{self.scheme}:// needs host:port, e.g. {self.scheme}://127.0.0.1:8910 (got {self.raw!r})"
            )
        return host, self.port

    def option(self, name: str, default: str | None = None) -> str | None:
        """A ``?query`` option's value."""
        return self.query.get(name, default)

    def flag(self, name: str, default: bool = False) -> bool:
        """A boolean ``?query`` option (``1/true/yes/on``)."""
        v = self.query.get(name)
        if v is None:
            return default
        return v.lower() in ("1", "true", "yes", "on", "")


class Listener(Protocol):
    """A device-side listener returned by a transport's ``listen``."""

    url: str

    async def close(self) -> None:
        """Stop listening and close its channels."""


def parse_url(url: str) -> TransportURL:
    """Parse a port URL; a value without ``://`` is a serial device path (as mos does)."""
    if not url:
        raise UsageError("empty port URL")
    if "://" not in url:
        return TransportURL("serial", path=url, raw=url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UsageError(f"unknown scheme {scheme!r} in {url!r}; valid schemes: {', '.join(sorted(SCHEMES))}")
    if scheme == "ble":
        # ble://AA:BB:CC:DD:EE:FF names an address (or a device name), not host:port.
        return TransportURL(
            scheme, host=parts.netloc or parts.path.strip("/"), path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)), raw=url,
        )  # fmt: skip
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"invalid port in {url!r}") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    path = parts.path
    if scheme == "serial":
        path = (parts.netloc + parts.path) if parts.netloc else parts.path
    return TransportURL(
        scheme=scheme,
        host=parts.hostname or "",
        port=port,
        path=path,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        query=query,
        raw=url,
    )


def load(scheme: str) -> ModuleType:
    """Import the module for ``scheme``; a missing dependency names the extra to install."""
    try:
        modname, extra = SCHEMES[scheme]
    except KeyError:
        raise UsageError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(sorted(SCHEMES))}") from None
    try:
        return importlib.import_module(modname)
    except ImportError as e:
        hint = f"; install it with: pip install 'mgrpc[{extra}]'" if extra else ""
        raise TransportError(f"the {scheme}:// transport needs {e.name or 'a missing module'}{hint}") from e


def _check_options(mod: ModuleType, url: TransportURL) -> None:
    valid = frozenset(getattr(mod, "OPTIONS", frozenset())) | COMMON_OPTIONS
    unknown = sorted(set(url.query) - valid)
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(unknown)} for {url.scheme}://; valid options: {', '.join(sorted(valid))}"
        )


def _parsed(url: str | TransportURL) -> TransportURL:
    return url if isinstance(url, TransportURL) else parse_url(url)


async def open_client(url: str | TransportURL, **opts: Any) -> Channel:
    """Open the host side of a transport and return its channel (not yet attached to a node)."""
    u = _parsed(url)
    mod = load(u.scheme)
    _check_options(mod, u)
    channel: Channel = await mod.open_client(u, **opts)
    dialect = u.option("dialect")
    if dialect is not None and not isinstance(channel.codec, JsonRpcCodec):
        try:
            # A transport that routes by src/dst (MQTT) sets JSONRPC_ENVELOPE: requests keep them.
            channel.codec = with_dialect(channel.codec, dialect, envelope=getattr(mod, "JSONRPC_ENVELOPE", False))
        except UsageError:
            await channel.close()
            raise
    return channel


async def listen(url: str | TransportURL, node: Node, **opts: Any) -> Listener:
    """Start the device side of a transport for ``node``."""
    u = _parsed(url)
    mod = load(u.scheme)
    _check_options(mod, u)
    if "dialect" in u.query:
        raise UsageError("?dialect= is a client option; a device answers mgRPC and JSON-RPC 2.0 alike")
    listener: Listener = await mod.listen(u, node, **opts)
    # The bound URL keeps the options it was opened with, so it can be reopened as it was (a
    # rebooting device) and clients can use it as their --port (``?codec=msgpack`` must match).
    query = u.raw.split("?", 1)[1] if "?" in u.raw else ""
    url = getattr(listener, "url", "")
    if query and url and "?" not in url:
        try:
            listener.url = f"{url}?{query}"
        except AttributeError:
            pass  # a listener with a read-only url
    return listener


async def connect(url: str | TransportURL, *, timeout_s: float = 20.0, **opts: Any) -> AsyncClient:
    """Connect to a device and return a started :class:`AsyncClient`.

    ``opts`` go to the client (``creds``, ``compat_args``, ``src``) or, if not a client option, to
    the transport.
    """
    client_keys = {"creds", "compat_args", "src", "dst"}
    copts = {k: v for k, v in opts.items() if k in client_keys}
    topts = {k: v for k, v in opts.items() if k not in client_keys}
    u = _parsed(url)
    if copts.get("creds") is not None and getattr(load(u.scheme), "WANTS_CREDS", False):
        topts["creds"] = copts["creds"]  # e.g. HTTP digest is answered by the transport itself
    channel = await open_client(u, **topts)
    client = AsyncClient(channel, timeout_s=timeout_s, **copts)
    try:
        await client.start()
    except BaseException:
        await client.close()
        raise
    return client


def connect_sync(url: str | TransportURL, *, timeout_s: float = 20.0, **opts: Any) -> Client:
    """Blocking variant of :func:`connect`."""
    return Client(lambda: connect(url, timeout_s=timeout_s, **opts))
