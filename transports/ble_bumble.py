"""bleak on bumble: a BLE central whose host stack is bumble, on any HCI controller (``ble://…?hci=``).

bleak drives the operating system's Bluetooth stack (BlueZ over D-Bus on Linux, CoreBluetooth on
macOS). Where that stack is missing or unwanted (a container, a board without BlueZ, a dongle given
to one program), ``ble://NAME_OR_ADDR?hci=SPEC`` makes the ``ble://`` client run bumble's host stack
instead, on the HCI controller named by a bumble transport spec:

* ``hci=usb:0`` - the first USB Bluetooth dongle (the OS stack must not hold it);
* ``hci=serial:/dev/ttyACM0,1000000`` - an HCI UART controller (e.g. a Zephyr ``hci_uart`` board);
* ``hci=hci-socket:0`` - a Linux HCI socket (``CAP_NET_ADMIN``; the adapter down in BlueZ);
* ``hci=tcp-client:127.0.0.1:9000`` - HCI over TCP (an emulator, or the test bridge of
  :mod:`transports.ble_testing`).

It is done as a bleak backend: :class:`BumbleBleakClient` / :class:`BumbleBleakScanner` implement
bleak's ``BaseBleakClient`` / ``BaseBleakScanner`` on a bumble central :class:`~bumble.device.Device`,
so the transport's bleak code path is the same whichever stack is underneath. Where the centrals come
from is a :class:`BumbleHost`: :class:`HciHost` opens the HCI transport for each central (a scan,
then a connection) and closes it when the central is released; the test air
(:class:`transports.ble_testing.BumbleAir`) gives each central its own controller on an in-process
link. :meth:`BumbleHost.backends` returns the bleak backend classes bound to a host.

The central uses a fresh static random address; it asks for ATT MTU ``mtu`` (default 247) on
connect. Connecting by address scans for the address first (like bleak's BlueZ backend), to learn
whether it is public or random.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid as uuid_mod
from collections.abc import Callable
from typing import Any, ClassVar

from bleak.args import SizedBuffer
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError, BleakGATTProtocolError
from bumble import att
from bumble.core import UUID, AdvertisingData
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt import Characteristic
from bumble.gatt_client import CharacteristicProxy
from bumble.hci import Address

from rpc.errors import TransportError

__all__ = ["DEFAULT_MTU", "BumbleBleakClient", "BumbleBleakScanner", "BumbleHost", "HciHost"]

log = logging.getLogger("mgrpc.transport.ble")
_background: set[asyncio.Task[None]] = set()

DEFAULT_MTU = 247  # what phones and BlueZ typically ask for; rpc-gatts answers reads with MTU - 2 bytes
RELEASE_TIMEOUT_S = 2.0
DISCONNECT_TIMEOUT_S = 5.0

# bumble property bit -> bleak property name
_PROPERTY_NAMES: list[tuple[Characteristic.Properties, str]] = [
    (Characteristic.Properties.BROADCAST, "broadcast"),
    (Characteristic.Properties.READ, "read"),
    (Characteristic.Properties.WRITE_WITHOUT_RESPONSE, "write-without-response"),
    (Characteristic.Properties.WRITE, "write"),
    (Characteristic.Properties.NOTIFY, "notify"),
    (Characteristic.Properties.INDICATE, "indicate"),
    (Characteristic.Properties.AUTHENTICATED_SIGNED_WRITES, "authenticated-signed-writes"),
    (Characteristic.Properties.EXTENDED_PROPERTIES, "extended-properties"),
]


def _uuid_str(u: UUID) -> str:
    """bleak's UUID form: 128-bit, lowercase, dashed."""
    return str(uuid_mod.UUID(bytes=u.to_bytes(force_128=True)[::-1]))


LOST = "the connection went away during the GATT operation"


def _cancelled_by_caller() -> bool:
    """Whether a ``CancelledError`` out of a bumble call is our task being cancelled.

    bumble cancels the pending ATT request when the connection goes away; that reaches the awaiting
    code as a ``CancelledError`` although nobody cancelled it, and would pass for a cancellation of the
    caller's task (the client's send or read). Only a real cancellation (``Task.cancelling()``) stays one.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _att_call_error(e: Exception) -> Exception:
    if isinstance(e, att.ATT_Error):
        return BleakGATTProtocolError(int(e.error_code))
    return BleakError(str(e))


class BumbleHost:
    """Where the bleak-on-bumble backend gets its bumble central devices from.

    Subclasses implement :meth:`open_device` (a device ready to :meth:`~bumble.device.Device.power_on`)
    and may extend :meth:`release`.
    """

    def __init__(self, *, mtu: int = DEFAULT_MTU) -> None:
        self.mtu = mtu
        self._backends: tuple[type[BaseBleakClient], type[BaseBleakScanner]] | None = None

    async def open_device(self, name: str) -> Device:
        """A new bumble device for one central (a scanner or a client), not powered on yet."""
        raise NotImplementedError

    async def release(self, device: Device) -> None:
        """Disconnect a device from everything and power it off (subclasses free its controller)."""
        for connection in list(device.connections.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.disconnect(), RELEASE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(device.power_off(), RELEASE_TIMEOUT_S)

    def backends(self) -> tuple[type[BaseBleakClient], type[BaseBleakScanner]]:
        """bleak backend classes (client, scanner) bound to this host, for ``BleakClient(backend=...)``."""
        if self._backends is None:
            client = type("BumbleBleakClientOnHost", (BumbleBleakClient,), {"host": self})
            scanner = type("BumbleBleakScannerOnHost", (BumbleBleakScanner,), {"host": self})
            self._backends = (client, scanner)
        return self._backends


class HciHost(BumbleHost):
    """Centrals on the HCI controller named by a bumble transport ``spec`` (e.g. ``usb:0``).

    Each central opens the transport (so the controller is reset and owned by one central at a time:
    bleak scans, stops, then connects) and closes it on release. Opening failures are
    :class:`~rpc.errors.TransportError` naming the spec.
    """

    def __init__(self, spec: str, *, mtu: int = DEFAULT_MTU) -> None:
        super().__init__(mtu=mtu)
        self.spec = spec
        self._transports: dict[int, Any] = {}  # id(device) -> its open bumble transport

    async def open_device(self, name: str) -> Device:
        """Open the HCI transport and build a bumble device on it with a fresh static random address."""
        from bumble.transport import open_transport

        try:
            transport = await open_transport(self.spec)
        except Exception as e:
            raise TransportError(f"cannot open HCI transport {self.spec!r}: {e}") from e
        device = Device.with_hci(name, Address.generate_static_address(), transport.source, transport.sink)
        self._transports[id(device)] = transport
        return device

    async def release(self, device: Device) -> None:
        """Disconnect, power off and close the device's HCI transport."""
        await super().release(device)
        transport = self._transports.pop(id(device), None)
        if transport is not None:
            with contextlib.suppress(Exception):
                await transport.close()


class BumbleBleakClient(BaseBleakClient):
    """bleak client backend over a bumble central from :attr:`host` (see :meth:`BumbleHost.backends`)."""

    host: ClassVar[BumbleHost]

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None,
        timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout)
        details = address_or_ble_device.details if isinstance(address_or_ble_device, BLEDevice) else None
        # A scanned device knows its address type (public or random); a bare address is scanned for.
        self._peer_address: Address | None = details.address if isinstance(details, Advertisement) else None
        self._device: Device | None = None
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._mtu = 23
        self._disconnecting = False
        self._subscriptions: dict[int, Callable[[bytes], None]] = {}

    @property
    def name(self) -> str:
        """The peer's address (no GAP name lookup)."""
        return self.address

    @property
    def mtu_size(self) -> int:
        """The ATT MTU negotiated on connect."""
        return self._mtu

    @property
    def is_connected(self) -> bool:
        """True while the bumble connection is up."""
        return self._connection is not None

    async def _find_address(self, device: Device, timeout_s: float) -> Address:
        """Scan for the target address to learn its type (as bleak's BlueZ backend does)."""
        try:
            want = Address(self.address).address_bytes
        except Exception as e:
            raise BleakDeviceNotFoundError(self.address, f"bad address {self.address!r}: {e}") from e
        found: asyncio.Future[Address] = asyncio.get_running_loop().create_future()

        def on_advertisement(adv: Advertisement) -> None:
            if adv.address.address_bytes == want and not found.done():
                found.set_result(adv.address)

        device.on("advertisement", on_advertisement)
        try:
            await device.start_scanning(active=False)
            return await asyncio.wait_for(found, timeout_s)
        except TimeoutError as e:
            raise BleakDeviceNotFoundError(self.address, f"not advertising within {timeout_s:g} s") from e
        finally:
            device.remove_listener("advertisement", on_advertisement)
            with contextlib.suppress(Exception):
                await device.stop_scanning()

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        """Power a central on, connect, exchange MTU and discover the whole GATT database."""
        if pair:
            raise BleakError("pairing is not supported by the bumble backend")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        device = await self.host.open_device("bleak-central")
        self._device = device
        try:
            await device.power_on()
            address = self._peer_address or await self._find_address(device, self._timeout)
            try:
                # bumble's own connect timeout waits for the controller to confirm the cancel, which
                # some controllers (bumble's in-process link) never do for an absent peer; bound it here.
                connection = await asyncio.wait_for(device.connect(address), max(0.1, deadline - loop.time()))
            except TimeoutError as e:
                raise BleakDeviceNotFoundError(self.address, f"no connection within {self._timeout:g} s") from e
            except Exception as e:
                raise BleakDeviceNotFoundError(self.address, f"cannot connect: {e}") from e
            self._connection = connection
            connection.on("disconnection", self._on_disconnection)
            peer = Peer(connection)
            self._peer = peer
            self._mtu = await peer.request_mtu(self.host.mtu)
            self.services = await self._discover(peer)
        except BaseException:
            await self._cleanup()
            raise

    async def _discover(self, peer: Peer) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        for svc in await peer.discover_services():
            bsvc = BleakGATTService(svc, svc.handle, _uuid_str(svc.uuid))
            collection.add_service(bsvc)
            for ch in await peer.discover_characteristics(service=svc):
                props = [name for bit, name in _PROPERTY_NAMES if ch.properties & bit]
                bch = BleakGATTCharacteristic(ch, ch.handle, _uuid_str(ch.uuid), props, lambda: self._mtu - 3, bsvc)  # type: ignore[arg-type]
                collection.add_characteristic(bch)
                for d in await peer.discover_descriptors(characteristic=ch):
                    collection.add_descriptor(BleakGATTDescriptor(d, d.handle, _uuid_str(d.type), bch))
        return collection

    def _on_disconnection(self, _reason: int) -> None:
        unsolicited = not self._disconnecting
        self._connection = None
        self._peer = None
        if self._device is not None:
            task = asyncio.get_running_loop().create_task(self._cleanup())
            _background.add(task)  # asyncio keeps only weak references to tasks
            task.add_done_callback(_background.discard)
        if unsolicited and self._disconnected_callback is not None:
            self._disconnected_callback()

    async def _cleanup(self) -> None:
        device, self._device = self._device, None
        self._connection = None
        self._peer = None
        if device is not None:
            await self.host.release(device)

    async def disconnect(self) -> None:
        """Disconnect (no disconnected callback: it is not unsolicited)."""
        connection = self._connection
        self._disconnecting = True
        if connection is not None:
            done = asyncio.get_running_loop().create_future()

            def on_gone(*_: object) -> None:
                if not done.done():
                    done.set_result(None)

            connection.once("disconnection", on_gone)
            with contextlib.suppress(Exception):
                await connection.disconnect()
                await asyncio.wait_for(done, DISCONNECT_TIMEOUT_S)
        await self._cleanup()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Not supported (rpc-gatts needs no pairing at ``sec_level`` 0)."""
        raise BleakError("pairing is not supported by the bumble backend")

    async def unpair(self) -> None:
        """Not supported."""
        raise BleakError("pairing is not supported by the bumble backend")

    def _require_peer(self) -> Peer:
        if self._peer is None:
            raise BleakError("Not connected")
        return self._peer

    async def read_gatt_char(
        self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        """ATT Read (bumble switches to Read Blob when the value fills MTU - 1)."""
        peer = self._require_peer()
        try:
            return bytearray(await peer.read_value(characteristic.handle))
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise BleakError(LOST) from None
        except Exception as e:
            raise _att_call_error(e) from e

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        """ATT Read of a descriptor."""
        peer = self._require_peer()
        try:
            return bytearray(await peer.read_value(descriptor.handle))
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise BleakError(LOST) from None
        except Exception as e:
            raise _att_call_error(e) from e

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool) -> None:
        """ATT Write Request (``response``) or Write Command."""
        peer = self._require_peer()
        try:
            await peer.write_value(characteristic.handle, bytes(data), with_response=response)
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise BleakError(LOST) from None
        except Exception as e:
            raise _att_call_error(e) from e

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: SizedBuffer) -> None:
        """ATT Write Request to a descriptor."""
        peer = self._require_peer()
        try:
            await peer.write_value(descriptor.handle, bytes(data), with_response=True)
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise BleakError(LOST) from None
        except Exception as e:
            raise _att_call_error(e) from e

    async def start_notify(
        self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback, **kwargs: Any
    ) -> None:
        """Write the CCCD (notifications preferred over indications, as bleak does)."""
        peer = self._require_peer()
        proxy: CharacteristicProxy[bytes] = characteristic.obj

        def on_value(value: bytes) -> None:
            callback(bytearray(value))

        self._subscriptions[characteristic.handle] = on_value
        try:
            await peer.subscribe(proxy, on_value, prefer_notify=True)
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise BleakError(LOST) from None
        except Exception as e:
            raise _att_call_error(e) from e

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        """Clear the CCCD."""
        peer = self._require_peer()
        on_value = self._subscriptions.pop(characteristic.handle, None)
        try:
            await peer.unsubscribe(characteristic.obj, on_value)
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise BleakError(LOST) from None
        except Exception as e:
            raise _att_call_error(e) from e


class BumbleBleakScanner(BaseBleakScanner):
    """bleak scanner backend: a bumble central from :attr:`host` scanning (see :meth:`BumbleHost.backends`)."""

    host: ClassVar[BumbleHost]

    def __init__(
        self,
        detection_callback: Any,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        **kwargs: Any,
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._active = scanning_mode != "passive"
        self._device: Device | None = None

    async def start(self) -> None:
        """Power a central on and scan."""
        self.seen_devices = {}
        device = await self.host.open_device("bleak-scanner")
        self._device = device
        device.on("advertisement", self._on_advertisement)
        try:
            await device.power_on()
            await device.start_scanning(active=self._active, filter_duplicates=False)
        except BaseException:
            self._device = None
            await self.host.release(device)
            raise

    def _on_advertisement(self, adv: Advertisement) -> None:
        data = adv.data
        name = data.get(AdvertisingData.COMPLETE_LOCAL_NAME) or data.get(AdvertisingData.SHORTENED_LOCAL_NAME)
        uuids: list[str] = []
        for t in (
            AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
            AdvertisingData.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
            AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
        ):
            for u in data.get_all(t) or []:
                for one in u if isinstance(u, list) else [u]:
                    uuids.append(_uuid_str(one))
        if not self.is_allowed_uuid(uuids):
            return
        address = adv.address.to_string(False)
        local_name = name if isinstance(name, str) else (name.decode() if isinstance(name, bytes) else None)
        ad = AdvertisementData(
            local_name=local_name,
            manufacturer_data={},
            service_data={},
            service_uuids=uuids,
            tx_power=None,
            rssi=adv.rssi,
            platform_data=(adv,),
        )
        previous = self.seen_devices.get(address)
        if previous is not None and local_name is None:
            # a scan response without a name keeps the name from the advertisement
            ad = ad._replace(local_name=previous[1].local_name)
        dev = self.create_or_update_device(address, address, ad.local_name, adv, ad)
        self.call_detection_callbacks(dev, ad)

    async def stop(self) -> None:
        """Stop scanning and release the central."""
        device, self._device = self._device, None
        if device is not None:
            with contextlib.suppress(Exception):
                await device.stop_scanning()
            await self.host.release(device)
