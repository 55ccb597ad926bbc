"""An in-process BLE "air" for tests: bumble controllers on a ``LocalLink`` behind bleak's API.

:class:`BumbleAir` owns a bumble :class:`~bumble.link.LocalLink`. Device listeners join it with
``listen("ble://", node, link=air.link)``; a bleak client joins it through the backend classes
:attr:`BumbleAir.client_backend` and :attr:`BumbleAir.scanner_backend`, which implement bleak's
``BaseBleakClient`` / ``BaseBleakScanner`` with a bumble *central* device (its own controller on the
same link). ``BleakClient(address, backend=air.client_backend)`` then runs bleak's real client code
(characteristic resolution, notification callback wrapping, ...) and our transport's bleak code,
while the bytes travel through bumble's ATT/L2CAP/HCI stack and link-layer model. No radio needed.

Like real stacks, the central negotiates an ATT MTU on connect (``mtu``, default 247) and reads
use bumble's GATT client, which switches to read-blob when a read fills MTU - 1 bytes; this is why
rpc-gatts answers reads with at most MTU - 2 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid as uuid_mod
from collections.abc import Callable
from typing import Any

from bleak.args import SizedBuffer
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError, BleakGATTProtocolError
from bumble import att
from bumble.controller import Controller
from bumble.core import UUID, AdvertisingData
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt import Characteristic
from bumble.gatt_client import CharacteristicProxy
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

__all__ = ["BumbleAir"]

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


def _att_call_error(e: Exception) -> Exception:
    if isinstance(e, att.ATT_Error):
        return BleakGATTProtocolError(int(e.error_code))
    return BleakError(str(e))


class BumbleAir:
    """A shared in-process link: device listeners and bleak clients meet here.

    ``mtu`` is the ATT MTU the bleak-side central asks for on connect; ``scan_interval_ms`` its scan
    timing. Each central (client or scanner) gets its own controller and static random address.
    """

    def __init__(self, *, mtu: int = 247) -> None:
        self.link = LocalLink()
        self.mtu = mtu
        self._addresses = itertools.count(0x10)
        self._controllers: dict[int, Controller] = {}  # id(device) -> its controller
        self.client_backend: type[BaseBleakClient] = type("BumbleBleakClient", (_BumbleBleakClient,), {"air": self})
        self.scanner_backend: type[BaseBleakScanner] = type("BumbleBleakScanner", (_BumbleBleakScanner,), {"air": self})

    def new_address(self) -> str:
        """A fresh static random address (top two bits set) for a device on this link."""
        n = next(self._addresses)
        return f"C0:00:00:00:{n >> 8 & 0xFF:02X}:{n & 0xFF:02X}"

    def make_device(self, name: str, address: str | None = None) -> Device:
        """A bumble device with its own controller on the link (not powered on yet)."""
        addr = address or self.new_address()
        controller = Controller(name, link=self.link)
        device = Device(name=name, address=Address(addr), host=Host(controller, AsyncPipeSink(controller)))
        self._controllers[id(device)] = controller
        return device

    async def release(self, device: Device) -> None:
        """Disconnect a device, power it off and take its controller off the link."""
        for connection in list(device.connections.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.disconnect(), 2.0)
        with contextlib.suppress(Exception):
            await device.power_off()
        controller = self._controllers.pop(id(device), None)
        if controller is not None and controller in self.link.controllers:
            self.link.remove_controller(controller)


class _BumbleBleakClient(BaseBleakClient):
    """bleak client backend over a bumble central on :class:`BumbleAir`'s link."""

    air: BumbleAir

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None,
        timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout)
        self._device: Device | None = None
        self._connection: Connection | None = None
        self._peer: Peer | None = None
        self._mtu = 23
        self._disconnecting = False
        self._subscriptions: dict[int, Callable[[bytes], None]] = {}

    @property
    def name(self) -> str:
        """The peer's address (the link has no GAP name lookup)."""
        return self.address

    @property
    def mtu_size(self) -> int:
        """The ATT MTU negotiated on connect."""
        return self._mtu

    @property
    def is_connected(self) -> bool:
        """True while the bumble connection is up."""
        return self._connection is not None

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        """Power a central on, connect, exchange MTU and discover the whole GATT database."""
        if pair:
            raise BleakError("pairing is not supported by the bumble test backend")
        device = self.air.make_device("bleak-central")
        self._device = device
        try:
            await device.power_on()
            try:
                # bumble's own connect timeout waits for the controller to confirm the cancel, which
                # the in-process link never does for an absent peer; bound it here.
                connection = await asyncio.wait_for(device.connect(Address(self.address)), self._timeout)
            except TimeoutError as e:
                raise BleakDeviceNotFoundError(self.address, f"no connection within {self._timeout:g} s") from e
            except Exception as e:
                raise BleakDeviceNotFoundError(self.address, f"cannot connect: {e}") from e
            self._connection = connection
            connection.on("disconnection", self._on_disconnection)
            peer = Peer(connection)
            self._peer = peer
            self._mtu = await peer.request_mtu(self.air.mtu)
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
            asyncio.get_running_loop().create_task(self._cleanup())
        if unsolicited and self._disconnected_callback is not None:
            self._disconnected_callback()

    async def _cleanup(self) -> None:
        device, self._device = self._device, None
        self._connection = None
        self._peer = None
        if device is not None:
            await self.air.release(device)

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
                await asyncio.wait_for(done, 5.0)
        await self._cleanup()

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        """Not supported by the test backend."""
        raise BleakError("pairing is not supported by the bumble test backend")

    async def unpair(self) -> None:
        """Not supported by the test backend."""
        raise BleakError("pairing is not supported by the bumble test backend")

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
        except Exception as e:
            raise _att_call_error(e) from e

    async def read_gatt_descriptor(
        self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False, **kwargs: Any
    ) -> bytearray:
        """ATT Read of a descriptor."""
        peer = self._require_peer()
        try:
            return bytearray(await peer.read_value(descriptor.handle))
        except Exception as e:
            raise _att_call_error(e) from e

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: SizedBuffer, response: bool) -> None:
        """ATT Write Request (``response``) or Write Command."""
        peer = self._require_peer()
        try:
            await peer.write_value(characteristic.handle, bytes(data), with_response=response)
        except Exception as e:
            raise _att_call_error(e) from e

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: SizedBuffer) -> None:
        """ATT Write Request to a descriptor."""
        peer = self._require_peer()
        try:
            await peer.write_value(descriptor.handle, bytes(data), with_response=True)
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
        except Exception as e:
            raise _att_call_error(e) from e

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        """Clear the CCCD."""
        peer = self._require_peer()
        on_value = self._subscriptions.pop(characteristic.handle, None)
        try:
            await peer.unsubscribe(characteristic.obj, on_value)
        except Exception as e:
            raise _att_call_error(e) from e


class _BumbleBleakScanner(BaseBleakScanner):
    """bleak scanner backend: a bumble central scanning :class:`BumbleAir`'s link."""

    air: BumbleAir

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
        device = self.air.make_device("bleak-scanner")
        self._device = device
        device.on("advertisement", self._on_advertisement)
        await device.power_on()
        await device.start_scanning(active=self._active, filter_duplicates=False)

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
            await self.air.release(device)
