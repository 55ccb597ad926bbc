"""An in-process BLE "air" for tests: bumble controllers on a ``LocalLink`` behind bleak's API.

:class:`BumbleAir` owns a bumble :class:`~bumble.link.LocalLink`. Device listeners join it with
``listen("ble://", node, link=air.link)``; a bleak client joins it through the backend classes
:attr:`BumbleAir.client_backend` and :attr:`BumbleAir.scanner_backend`: the bleak-on-bumble backend
of :mod:`transports.ble_bumble` (the one ``ble://…?hci=`` uses) with each central on its own
controller on the same link. ``BleakClient(address, backend=air.client_backend)`` then runs bleak's
real client code (characteristic resolution, notification callback wrapping, ...) and our transport's
bleak code, while the bytes travel through bumble's ATT/L2CAP/HCI stack and link-layer model. No
radio needed.

:meth:`BumbleAir.hci_bridge` puts the air within reach of *another process*: an HCI-over-TCP server
on 127.0.0.1 where every TCP connection gets a fresh controller on the link (like plugging in a new
dongle), so ``mgrpc --port "ble://dev1?hci=tcp-client:127.0.0.1:PORT" call RPC.List`` reaches a
device listening on the air.

Like real stacks, the central negotiates an ATT MTU on connect (``mtu``, default 247) and reads
use bumble's GATT client, which switches to read-blob when a read fills MTU - 1 bytes; this is why
rpc-gatts answers reads with at most MTU - 2 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from typing import Any

from bleak.backends.client import BaseBleakClient
from bleak.backends.scanner import BaseBleakScanner
from bumble import hci
from bumble.controller import Controller
from bumble.device import Device
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink, StreamPacketSource

from transports.ble_bumble import DEFAULT_MTU, BumbleHost

__all__ = ["BumbleAir", "HciBridge"]

log = logging.getLogger("mgrpc.transport.ble.testing")


class BumbleAir(BumbleHost):
    """A shared in-process link: device listeners and bleak clients meet here.

    ``mtu`` is the ATT MTU the bleak-side central asks for on connect. Each central (client or
    scanner) gets its own controller and static random address.
    """

    def __init__(self, *, mtu: int = DEFAULT_MTU) -> None:
        super().__init__(mtu=mtu)
        self.link = LocalLink()
        self._addresses = itertools.count(0x10)
        self._controllers: dict[int, Controller] = {}  # id(device) -> its controller
        backends = self.backends()
        self.client_backend: type[BaseBleakClient] = backends[0]
        self.scanner_backend: type[BaseBleakScanner] = backends[1]

    def new_address(self) -> str:
        """A fresh static random address (top two bits set) for a device on this link."""
        n = next(self._addresses)
        return f"C0:00:00:00:{n >> 8 & 0xFF:02X}:{n & 0xFF:02X}"

    def make_device(self, name: str, address: str | None = None) -> Device:
        """A bumble device with its own controller on the link (not powered on yet)."""
        addr = address or self.new_address()
        controller = Controller(name, link=self.link)
        device = Device(name=name, address=hci.Address(addr), host=Host(controller, AsyncPipeSink(controller)))
        self._controllers[id(device)] = controller
        return device

    async def open_device(self, name: str) -> Device:
        """See :meth:`make_device` (the bleak backend's way in)."""
        return self.make_device(name)

    async def release(self, device: Device) -> None:
        """Disconnect a device, power it off and take its controller off the link."""
        await super().release(device)
        controller = self._controllers.pop(id(device), None)
        if controller is not None and controller in self.link.controllers:
            self.link.remove_controller(controller)

    async def hci_bridge(self, *, host: str = "127.0.0.1") -> HciBridge:
        """Serve controllers on this air as HCI over TCP on ``host`` (a free port); see :class:`HciBridge`."""
        return await HciBridge(self, host=host).start()


class _TcpHciSink:
    """Controller -> host: HCI packets (H4, type byte first) onto the TCP connection."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport

    def on_packet(self, packet: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(packet)


class _HciConnection(asyncio.Protocol):
    """One HCI host over TCP: a fresh controller on the air for as long as the connection lasts."""

    def __init__(self, bridge: HciBridge) -> None:
        self.bridge = bridge
        self.source = StreamPacketSource()
        self.transport: asyncio.WriteTransport | None = None
        self.controller: Controller | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # asyncio sets this only on sockets created with proto IPPROTO_TCP; without it every ATT
            # round trip waits for a delayed ACK (~40 ms)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.controller = self.bridge.attach(self.source, _TcpHciSink(transport))
        self.bridge.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.source.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.connections.discard(self)
        controller, self.controller = self.controller, None
        if controller is not None:
            self.bridge.detach(controller)


class HciBridge:
    """Controllers on a :class:`BumbleAir`, reachable as HCI over TCP (bumble's ``tcp-client:`` spec).

    Every TCP connection gets its own new controller on the air; when the connection ends, the
    controller's connections are terminated (as if its radio went silent, the peers see a
    disconnection) and it leaves the link. :attr:`spec` is what a host gives bumble, e.g.
    ``ble://dev1?hci=<spec>``.
    """

    def __init__(self, air: BumbleAir, *, host: str = "127.0.0.1") -> None:
        self.air = air
        self.host = host
        self.port = 0
        self.connections: set[_HciConnection] = set()
        self._server: asyncio.Server | None = None
        self._count = itertools.count(1)

    @property
    def spec(self) -> str:
        """The bumble transport spec of this bridge: ``tcp-client:HOST:PORT``."""
        return f"tcp-client:{self.host}:{self.port}"

    async def start(self) -> HciBridge:
        """Listen on a free port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = int(sock.getsockname()[1])
        self._server = await asyncio.get_running_loop().create_server(lambda: _HciConnection(self), sock=sock)
        return self

    def attach(self, source: StreamPacketSource, sink: _TcpHciSink) -> Controller:
        """A new controller on the air, fed by ``source`` and answering into ``sink``."""
        return Controller(f"hci-bridge-{next(self._count)}", host_source=source, host_sink=sink, link=self.air.link)

    def detach(self, controller: Controller) -> None:
        """Terminate the controller's connections and take it off the air."""
        controller.host = None  # the host is gone: nothing to report to
        for connection in list(controller.le_connections.values()):
            with contextlib.suppress(Exception):
                controller.on_hci_disconnect_command(
                    hci.HCI_Disconnect_Command(
                        connection_handle=connection.handle,
                        reason=hci.HCI_ErrorCode.REMOTE_USER_TERMINATED_CONNECTION_ERROR,
                    )
                )
        if controller in self.air.link.controllers:
            self.air.link.remove_controller(controller)

    async def close(self) -> None:
        """Stop listening and drop every connected host (their controllers leave the air)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
            conn.connection_lost(None)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def __aenter__(self) -> HciBridge:
        return self if self._server is not None else await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
