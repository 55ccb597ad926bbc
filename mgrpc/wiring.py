"""The wiring of the packages into running things: plain functions that the CLI, the tests and the
benches share (this package is the only composition root).

- :func:`virtual_device`: a :class:`services.device.VirtualDevice` whose listeners are the transports';
- :func:`linux_device`: the RPC side of a program on a Linux device, run by ``mgrpc supervise``;
- :func:`run_bridge`: a device reachable at one URL, served on others;
- :func:`start_fleet` / :func:`start_fleet_device`: the fleet dashboard (and shadow service) on a
  broker, and virtual devices attached to that broker.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Fleet", "attach_agent", "run_bridge", "start_fleet", "start_fleet_device", "virtual_device"]


def virtual_device(*, presence: bool = True, **kw: Any) -> Any:
    """A :class:`services.device.VirtualDevice` serving its ``listen`` URLs through :mod:`transports`.

    With ``presence`` (the default), the first ``mqtt://``/``mqtts://`` URL is served by a
    :class:`services.shadow.DeviceAgent`: besides RPC, the device announces itself with a retained
    ``<id>/status`` birth message and last will, reports OTA progress and follows its shadow, so a
    fleet dashboard on the same broker finds it.
    """
    import transports
    from services.device import VirtualDevice

    kw.setdefault("listen_fn", transports.listen)
    dev = VirtualDevice(**kw)
    mqtt_urls = [u for u in dev.listen_urls if urlsplit(u).scheme in ("mqtt", "mqtts")]
    if presence and mqtt_urls:
        attach_agent(dev, mqtt_urls[0], base_listen=kw["listen_fn"])
    return dev


def attach_agent(dev: Any, url: str, *, base_listen: Any = None, autocommit: bool | None = None) -> Any:
    """Serve ``dev`` on the MQTT ``url`` through a :class:`services.shadow.DeviceAgent` (presence,
    progress, shadow OTA, RPC); other listen URLs go to ``base_listen``. Returns the agent."""
    from services.shadow import DeviceAgent
    from transports.mqtt import MqttDeviceChannel, client_url
    from transports.mqttconn import open_connection
    from transports.registry import parse_url

    u = parse_url(url)
    dev_id = u.option("id") or u.path.strip("/") or dev.id
    broker = urlsplit(url)
    query = "&".join(f"{k}={v}" for k, v in u.query.items() if k not in ("id", "codec"))
    broker_url = f"{broker.scheme}://{broker.netloc}" + (f"?{query}" if query else "")

    async def connect(_url: str) -> Any:
        # A killed device process must show offline: the broker publishes this retained will.
        # With the boot counter, so a will that lands after the next boot's birth message is told stale.
        body = {"online": False, "id": dev_id, "boots": dev.boots}
        will = (f"{dev_id}/status", json.dumps(body).encode(), 1, True)
        return await open_connection(broker_url, client_id=u.option("client_id") or dev_id, will=will)

    async def serve_rpc(conn: Any, node: Any) -> Any:
        if not node.is_local_id(dev_id):
            node.ids.append(dev_id)
        ch = MqttDeviceChannel(conn, dev_id, owns_connection=False)
        node.add_channel(ch, default=True, address="*")
        await ch.start()
        return ch

    agent = DeviceAgent(dev, agent_url=url, connect=connect, serve_rpc=serve_rpc, base_listen=base_listen,
                        autocommit=autocommit, client_url=client_url(u, dev_id))  # fmt: skip
    dev.listen_fn = agent.listen
    dev.agent = agent
    return agent


def linux_device(**kw: Any) -> Any:
    """A :class:`services.linux.LinuxDevice` (a program run by ``mgrpc supervise``) serving its URLs
    (``listen=``, default ``MGRPC_RPC_URL``) through :mod:`transports`."""
    import transports
    from services.linux import LinuxDevice

    kw.setdefault("listen_fn", transports.listen)
    return LinuxDevice(**kw)


async def run_bridge(to: str, listen: list[str], *, device_id: str | None = None, timeout_s: float = 20.0) -> Any:
    """Start a bridge; returns ``(bridge_node, listeners)``. Close with ``bridge.close()``."""
    import transports
    from rpc.bridge import BridgeNode

    if device_id is None:
        async with await transports.connect(to, timeout_s=timeout_s) as probe:
            device_id = str((await probe.call("Sys.GetInfo"))["id"])
    bridge = BridgeNode(device_id, lambda: transports.open_client(to))
    listeners: list[Any] = []
    try:
        await bridge.start()
        for url in listen:
            listeners.append(await transports.listen(url, bridge))
    except BaseException:
        # A bad --listen URL must not leave the other listeners and the upstream link running.
        for lst in listeners:
            await lst.close()
        await bridge.close()
        raise
    return bridge, listeners


@dataclass
class Fleet:
    """A running dashboard (and shadow service): what :func:`start_fleet` returns."""

    app: Any  # mgrpc.fleet.FleetApp
    url: str
    runner: Any
    conn: Any | None
    shadow: Any | None
    db: Any
    devices: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        """Stop devices, the dashboard, the shadow service and the MQTT connection."""
        for dev in self.devices:
            with contextlib.suppress(Exception):
                await dev.stop()
        await self.app.close()
        await self.runner.cleanup()
        if self.shadow is not None:
            await self.shadow.close()
        if self.conn is not None:
            await self.conn.close()
        self.db.close()


async def start_fleet(
    *, broker: str, db_path: str | Path, listen: str = "http://127.0.0.1:0", public_url: str = "",
    shadow: bool = True, token: str | None = None, password_file: str | Path | None = None,
    tls_cert: str | Path | None = None, tls_key: str | Path | None = None, share_group: str | None = None,
    **app_kw: Any,
) -> Fleet:  # fmt: skip
    """Start the dashboard (and the shadow service) on ``listen``; port 0 picks a free port.

    ``db_path``: a SQLite file, or a ``postgresql://`` URL that several dashboard processes (workers)
    share. Workers split the device traffic through MQTT shared subscriptions of ``share_group``
    (default: ``mgrpc-fleet`` with a database URL, none with SQLite).

    ``http://`` on 127.0.0.1 may go without credentials; any other address needs ``token`` and/or
    ``password_file`` (htdigest) (:class:`mgrpc.fleet.security.SecurityError` otherwise).
    ``https://`` needs ``tls_cert`` and ``tls_key`` (PEM files).
    """
    import ssl

    from aiohttp import web

    import transports
    from mgrpc.fleet import FleetApp, FleetDB
    from mgrpc.fleet.security import Guard, require_credentials
    from mgrpc.shadow_server import ShadowServer, ShadowStore
    from transports.mqttconn import open_connection

    u = urlsplit(listen)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--listen must be http://HOST:PORT or https://HOST:PORT, not {listen!r}")
    ssl_ctx = None
    if u.scheme == "https" or tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_ctx.load_cert_chain(str(tls_cert), str(tls_key))
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot load the TLS certificate/key: {e}") from None
    require_credentials(u.hostname, token=token, password_file=password_file)
    guard = Guard(token=token, password_file=password_file, secure_cookies=ssl_ctx is not None)
    scheme = "https" if ssl_ctx is not None else "http"
    from mgrpc.fleet.sql import is_database_url

    if share_group is None:
        share_group = "mgrpc-fleet" if is_database_url(db_path) else ""
    db = FleetDB(db_path)
    conn = None
    shadow_srv = None
    broker_base = ""
    runner: Any = None
    try:
        if broker:
            b = urlsplit(broker)
            broker_base = f"{b.scheme}://{b.netloc}"
            conn = await open_connection(broker_base, client_id=f"mgrpc-dashboard-{id(db) & 0xFFFFFF:06x}")
            if shadow:
                store = ShadowStore(db_path, engine=db.engine)
                shadow_srv = ShadowServer(conn, store)
                if not share_group:  # with workers, FleetApp.start starts it (each answers its devices)
                    await shadow_srv.start()
        fleet_app = FleetApp(db, mqtt=conn, rpc_connect=transports.connect, broker_url=broker_base, guard=guard,
                             share_group=share_group, shadow_service=shadow_srv, **app_kw)  # fmt: skip
        runner = web.AppRunner(fleet_app.web_app(), access_log=None)
        await runner.setup()
        default_port = 443 if ssl_ctx is not None else 80
        site = web.TCPSite(runner, u.hostname, u.port if u.port is not None else default_port, ssl_context=ssl_ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        url = f"{scheme}://{host}:{port}"
        fleet_app.public_url = (public_url or url).rstrip("/")
        await fleet_app.start()
    except BaseException:
        if runner is not None:
            await runner.cleanup()
        if conn is not None:
            await conn.close()
        db.close()
        raise
    return Fleet(fleet_app, url, runner, conn, shadow_srv, db)


async def start_fleet_device(
    broker: str, dev_id: str, *, state_dir: str | Path | None = None, storage: Any = None,
    autocommit: bool | None = None, polling: bool = False, start: bool = True, **dev_kw: Any,
) -> Any:  # fmt: skip
    """A virtual device attached to the broker: RPC over MQTT, presence, progress, shadow OTA.

    ``storage`` (e.g. ``DeviceStorage.in_memory()``) avoids a flash file; ``polling`` runs
    ota-http-client polling from its ``update.*`` config.
    """
    from services.device import VirtualDevice
    from services.polling import attach_polling

    b = urlsplit(broker)
    agent_url = f"{b.scheme}://{b.netloc}/{dev_id}"
    dev: Any = VirtualDevice(
        id=dev_id, state_dir=state_dir or Path(tempfile.gettempdir()) / "mgrpc-fleet" / dev_id,
        listen=[agent_url], storage=storage, **dev_kw,
    )  # fmt: skip
    attach_agent(dev, agent_url, autocommit=autocommit)
    if polling:
        dev.pollers = attach_polling(dev)
    if start:
        await dev.start()
    return dev
