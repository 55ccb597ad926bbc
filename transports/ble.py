"""``ble://``: mgRPC over BLE GATT, the rpc-gatts protocol (spec/transports.md §5).

Device side (``listen("ble://", node)``): a bumble GATT server with the ``_mOS_RPC_SVC_ID_`` service
and its ``data`` / ``rx_ctl`` / ``tx_ctl`` characteristics, advertising the node id as its name. Each
BLE connection is one channel (type ``GATTS``, non-persistent, broadcast, info
``conn <handle> peer <bt addr>``). The controller is chosen with a bumble transport spec:

* ``ble://?hci=usb:0`` - the first USB Bluetooth dongle (the host's own stack must not hold it);
* ``ble://?hci=serial:/dev/ttyACM0,1000000`` - an HCI UART controller (e.g. a Zephyr hci_uart board);
* ``ble://?hci=hci-socket:0`` - a Linux HCI socket (needs ``CAP_NET_ADMIN``; bring the adapter down
  in BlueZ first).

A client that writes requests and does not read the replies is disconnected once
:data:`MAX_QUEUED_FRAMES` frames or :data:`MAX_OUT_BUFFER` bytes wait for it (what the device holds stays
bounded); how many clients connect at once is up to the controller.

``?address=C0:11:22:33:44:55`` sets the static random address (default: derived from the name, see
:func:`static_address_for`), ``?name=`` the advertised name (default: the node id). Like rpc-gatts with
``rpc.gatts.sec_level`` 0, the characteristics need no pairing or encryption. Tests pass ``link=``
(a bumble ``LocalLink``) instead of a controller; see :mod:`transports.ble_testing`.

Client side (``open_client("ble://AA:BB:CC:DD:EE:FF")`` or ``ble://<name>``, a name being found
by scanning; ``ble:///AA:BB:CC:DD:EE:FF`` is the same address written as a path, for URL parsers
that read ``host:port`` from the authority): bleak's :class:`~bleak.BleakClient`. A frame goes out
as the 4-byte big-endian length written to ``tx_ctl``, then the frame written to ``data`` in chunks
of MTU - 3, all with response; frames are sent one at a time (the device has one frame in flight).
Frames come in through ``rx_ctl``: a notification (or, without notifications, a poll of ``rx_ctl``
every ``poll_s``) says a frame is pending, and ``data`` is read until the announced length is
collected. The channel type is ``GATT`` and frames are written in mos style. ``bleak_backend=`` /
``bleak_scanner_backend=`` select a bleak backend class (default: bleak's backend for this platform).

``ble://NAME_OR_ADDR?hci=SPEC`` runs bumble's host stack instead of the OS one (BlueZ,
CoreBluetooth), on the HCI controller named by the same bumble transport specs as the device side
(``usb:0``, ``serial:/dev/ttyACM0,1000000``, ``hci-socket:0``, ``tcp-client:127.0.0.1:9000``): the
bleak backend of :mod:`transports.ble_bumble`. Useful where there is no BlueZ (containers) or to give
a dongle to mgrpc alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from rpc.channel import Channel
from rpc.errors import ChannelClosed, TransportError, UsageError
from rpc.frame import Frame
from rpc.node import Node
from transports.ble_proto import (
    DATA_UUID,
    DEFAULT_MAX_FRAME_SIZE,
    RX_CTL_UUID,
    SERVICE_UUID,
    TX_CTL_UUID,
    FrameReassembler,
    FrameReceiver,
    FrameSender,
    GattProtocolError,
    decode_length,
    encode_length,
    write_chunks,
)
from transports.registry import TransportURL

if TYPE_CHECKING:
    from bleak import BleakClient
    from bleak.backends.characteristic import BleakGATTCharacteristic
    from bleak.backends.client import BaseBleakClient
    from bleak.backends.scanner import BaseBleakScanner
    from bumble.device import Connection, Device
    from bumble.gatt import Characteristic
    from bumble.link import LocalLink

__all__ = [
    "EXTRA",
    "OPTIONS",
    "SCHEMES",
    "BleListener",
    "GattChannel",
    "GattsChannel",
    "listen",
    "open_client",
    "static_address_for",
]

SCHEMES = ("ble",)
OPTIONS: frozenset[str] = frozenset({"hci", "address", "name", "timeout_s", "poll_s"})
EXTRA = "ble"

log = logging.getLogger("mgrpc.transport.ble")

T = TypeVar("T")

DEFAULT_HCI = "usb:0"
DEFAULT_ADVERTISING_INTERVAL_MS = 100.0
DEFAULT_CONNECT_TIMEOUT_S = 20.0
DEFAULT_POLL_S = 0.1  # the reference client's rx_ctl polling period
DISCONNECT_TIMEOUT_S = 5.0
READER_STOP_TIMEOUT_S = 2.0
MAX_INCOMING_FRAME = 1 << 20  # a sanity bound on announced lengths; the codec enforces the real limit
# Device side: a client that does not read its replies is disconnected past either bound (memory stays
# bounded), as the ws:// and tcp:// listeners drop a peer that does not read.
MAX_QUEUED_FRAMES = 256
MAX_OUT_BUFFER = 1 << 20
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_CB_UUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")


def static_address_for(name: str) -> str:
    """A static random BLE address derived from ``name``: stable across restarts, so clients can keep it."""
    raw = bytearray(hashlib.sha256(name.encode()).digest()[:6])
    raw[0] |= 0xC0  # the two top bits of a static random address are 1
    return ":".join(f"{b:02X}" for b in raw)


def _float_option(url: TransportURL, name: str, default: float) -> float:
    raw = url.option(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"option {name} of {url.raw!r} must be a number, got {raw!r}") from None


# ================================================================================================
# Device side: a bumble GATT server
# ================================================================================================


class GattsChannel(Channel):
    """One BLE connection to our GATT server (rpc-gatts): type ``GATTS``, non-persistent, broadcast."""

    type = "GATTS"
    persistent = False
    broadcast = True

    def __init__(self, listener: BleListener, connection: Connection, *, max_frame_size: int) -> None:
        super().__init__(style="device")
        self.listener = listener
        self.connection = connection
        self.receiver = FrameReceiver(max_frame_size=max_frame_size)
        self.sender = FrameSender()
        self._tasks: set[asyncio.Task[Any]] = set()

    def info(self) -> str:
        """``conn <handle> peer <bt addr>``."""
        return f"conn {self.connection.handle} peer {self.connection.peer_address.to_string(False)}"

    # -- GATT callbacks (called by the listener for this connection) ------------------------------
    def on_tx_ctl_write(self, value: bytes) -> None:
        """``tx_ctl`` written: a new frame length (raises :class:`GattProtocolError`)."""
        self.receiver.write_tx_ctl(value)

    def on_data_write(self, value: bytes) -> None:
        """``data`` written: part of the announced frame; a complete frame goes to the router."""
        frame = self.receiver.write_data(value)
        if frame is not None:
            self.deliver_bytes(frame)

    def on_rx_ctl_read(self) -> bytes:
        """``rx_ctl`` read: the pending length; rewinds the read offset."""
        return self.sender.read_rx_ctl()

    def on_data_read(self) -> bytes:
        """``data`` read: the next chunk of the pending frame."""
        chunk = self.sender.read_data(self.connection.att_mtu)
        if chunk.announce:
            self._announce(chunk.announce)
        return chunk.data

    # -- sending ----------------------------------------------------------------------------------
    def _announce(self, length: int) -> None:
        task = asyncio.get_running_loop().create_task(self.listener.announce(self.connection, length))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def send_nowait(self, frame: Frame) -> bool:
        """Queue ``frame``; announce it on ``rx_ctl`` if it is the pending one now.

        A client that lets :data:`MAX_QUEUED_FRAMES` frames or :data:`MAX_OUT_BUFFER` bytes pile up
        unread is disconnected (:class:`ChannelClosed`), rather than the device holding ever more.
        """
        if self.closed:
            raise ChannelClosed("BLE connection is gone")
        if len(self.sender) >= MAX_QUEUED_FRAMES or self.sender.queued_bytes > MAX_OUT_BUFFER:
            log.warning("BLE: %s does not read its replies (%d frames, %d bytes queued); disconnecting",
                        self.info(), len(self.sender), self.sender.queued_bytes)  # fmt: skip
            self.mark_closed()
            self.sender.clear()
            task = asyncio.get_running_loop().create_task(self._disconnect())
            self.listener._tasks.add(task)
            task.add_done_callback(self.listener._tasks.discard)
            raise ChannelClosed("BLE client does not read its replies")
        announce = self.sender.queue(self.encode(frame))
        if announce:
            self._announce(announce)
        return True

    async def send(self, frame: Frame) -> None:
        """See :meth:`send_nowait`."""
        self.send_nowait(frame)

    async def close(self) -> None:
        """Disconnect the BLE connection."""
        if not self.closed:
            self.mark_closed()
            self.sender.clear()
            await self._disconnect()
        for t in list(self._tasks):
            t.cancel()

    async def _disconnect(self) -> None:
        # bounded: a controller that lost the peer may never report the disconnection
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.disconnect(), DISCONNECT_TIMEOUT_S)

    def connection_lost(self) -> None:
        """The BLE connection went away."""
        self.sender.clear()
        for t in list(self._tasks):
            t.cancel()
        self.mark_closed()


def _require_bumble() -> None:
    try:
        import bumble  # noqa: F401
    except ImportError as e:
        raise TransportError("the ble:// device side needs bumble; install it with: pip install 'mgrpc[ble]'") from e


class BleListener:
    """A node served as a BLE GATT peripheral (bumble). Build it with :func:`listen`."""

    def __init__(
        self,
        node: Node,
        *,
        name: str,
        hci: str | None = None,
        link: LocalLink | None = None,
        address: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        advertising_interval_ms: float = DEFAULT_ADVERTISING_INTERVAL_MS,
    ) -> None:
        self.node = node
        self.name = name
        self.hci = hci
        self.link = link
        self.address = address or static_address_for(name)
        self.max_frame_size = max_frame_size
        self.advertising_interval_ms = advertising_interval_ms
        self.channels: dict[int, GattsChannel] = {}
        self.device: Device | None = None
        self._transport: Any = None
        self._controller: Any = None  # our controller on ``link`` (tests)
        self._adv_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rx_ctl: Characteristic[bytes] | None = None
        self.url = f"ble://?hci={hci}" if hci else "ble://"
        # Sees every client write as (connection handle, "tx_ctl" | "data", value), before it is
        # processed, refused ones included: for recording what a client put on the air.
        self.write_observer: Callable[[int, str, bytes], None] | None = None

    async def start(self) -> None:
        """Power on the controller, register the GATT service and start advertising."""
        from bumble.core import AdvertisingData
        from bumble.device import Device
        from bumble.gatt import Characteristic, CharacteristicValue, Service
        from bumble.hci import Address

        if self.link is not None:
            from bumble.controller import Controller
            from bumble.host import Host
            from bumble.transport.common import AsyncPipeSink

            controller = Controller(f"mgrpc-{self.name}", link=self.link)
            self._controller = controller
            device = Device(
                name=self.name, address=Address(self.address), host=Host(controller, AsyncPipeSink(controller))
            )
        else:
            from bumble.transport import open_transport

            try:
                self._transport = await open_transport(self.hci or DEFAULT_HCI)
            except Exception as e:
                raise TransportError(f"cannot open HCI transport {self.hci or DEFAULT_HCI!r}: {e}") from e
            device = Device.with_hci(self.name, Address(self.address), self._transport.source, self._transport.sink)

        props = Characteristic.Properties
        data: Characteristic[bytes] = Characteristic(
            DATA_UUID,
            props.READ | props.WRITE,
            Characteristic.Permissions.READABLE | Characteristic.Permissions.WRITEABLE,
            CharacteristicValue(read=self._read_data, write=self._write_data),
        )
        rx_ctl: Characteristic[bytes] = Characteristic(
            RX_CTL_UUID,
            props.READ | props.NOTIFY | props.INDICATE,
            Characteristic.Permissions.READABLE,
            CharacteristicValue(read=self._read_rx_ctl),
        )
        tx_ctl: Characteristic[bytes] = Characteristic(
            TX_CTL_UUID,
            props.WRITE,
            Characteristic.Permissions.WRITEABLE,
            CharacteristicValue(write=self._write_tx_ctl),
        )
        device.add_service(Service(SERVICE_UUID, [data, rx_ctl, tx_ctl]))
        self._rx_ctl = rx_ctl
        name = self.name.encode()
        device.advertising_data = bytes(
            AdvertisingData(
                [
                    (AdvertisingData.FLAGS, bytes([0x06])),  # LE general discoverable, no BR/EDR
                    (AdvertisingData.COMPLETE_LOCAL_NAME, name),
                ]
            )
        )
        # The 128-bit service UUID does not fit next to a long name; it goes in the scan response.
        device.scan_response_data = bytes(
            AdvertisingData(
                [
                    (
                        AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                        bytes.fromhex(SERVICE_UUID.replace("-", ""))[::-1],
                    )
                ]
            )
        )
        device.on("connection", self._on_connection)
        self.device = device
        try:
            await device.power_on()
            await self._advertise()
        except Exception as e:
            await self._close_transport()
            raise TransportError(f"cannot start the BLE peripheral: {e}") from e
        log.info("BLE: advertising as %r (%s)", self.name, self.address)

    async def _advertise(self) -> None:
        # Advertising stops when a central connects; we start it again right away (and after each
        # disconnection) so more clients can connect, each getting its own channel.
        async with self._adv_lock:
            device = self.device
            if device is None or device.is_advertising:
                return
            await device.start_advertising(
                advertising_interval_min=self.advertising_interval_ms,
                advertising_interval_max=self.advertising_interval_ms,
            )

    def _readvertise(self) -> None:
        async def run() -> None:
            try:
                await self._advertise()
            except Exception as e:  # e.g. the controller's connection limit: advertise after a disconnect
                log.info("BLE: cannot advertise now: %s", e)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections ------------------------------------------------------------------------------
    def _on_connection(self, connection: Connection) -> None:
        ch = GattsChannel(self, connection, max_frame_size=self.max_frame_size)
        self.channels[connection.handle] = ch
        self.node.add_channel(ch)
        log.info("BLE: %s connected", ch.info())

        def on_disconnection(reason: int) -> None:
            log.info("BLE: %s disconnected (reason 0x%02x)", ch.info(), reason)
            if self.channels.get(connection.handle) is ch:
                del self.channels[connection.handle]
            ch.connection_lost()
            self._readvertise()

        connection.on("disconnection", on_disconnection)
        self._readvertise()

    def _gatt_op(self, connection: Connection, op: Callable[[GattsChannel], T]) -> T:
        """Run one GATT access on the connection's channel; protocol errors become ATT errors."""
        from bumble.att import ATT_Error, ErrorCode

        ch = self.channels.get(connection.handle)
        if ch is None or ch.closed:
            raise ATT_Error(ErrorCode.UNLIKELY_ERROR)
        try:
            return op(ch)
        except GattProtocolError as e:
            log.info("BLE: %s: %s", ch.info(), e)
            raise ATT_Error(int(e.att_error)) from e

    def _observe(self, connection: Connection, char: str, value: bytes) -> None:
        if self.write_observer is not None:
            self.write_observer(connection.handle, char, value)

    def _write_tx_ctl(self, connection: Connection, value: bytes) -> None:
        self._observe(connection, "tx_ctl", bytes(value))
        self._gatt_op(connection, lambda ch: ch.on_tx_ctl_write(bytes(value)))

    def _write_data(self, connection: Connection, value: bytes) -> None:
        self._observe(connection, "data", bytes(value))
        self._gatt_op(connection, lambda ch: ch.on_data_write(bytes(value)))

    def _read_rx_ctl(self, connection: Connection) -> bytes:
        return self._gatt_op(connection, lambda ch: ch.on_rx_ctl_read())

    def _read_data(self, connection: Connection) -> bytes:
        return self._gatt_op(connection, lambda ch: ch.on_data_read())

    async def announce(self, connection: Connection, length: int) -> None:
        """Tell the client on ``connection`` a frame of ``length`` bytes is pending (notify/indicate).

        Each call only reaches a client that enabled that mode in the CCCD; a client that enabled
        neither polls ``rx_ctl``.
        """
        if self.device is None or self._rx_ctl is None:
            return
        value = encode_length(length)
        try:
            await self.device.notify_subscriber(connection, self._rx_ctl, value)
            await self.device.indicate_subscriber(connection, self._rx_ctl, value)
        except Exception as e:  # the connection may be gone; the client will poll or reconnect
            log.debug("BLE: announcing on conn %s failed: %s", connection.handle, e)

    async def _close_transport(self) -> None:
        if self._transport is not None:
            t, self._transport = self._transport, None
            with contextlib.suppress(Exception):
                await t.close()

    async def close(self) -> None:
        """Stop advertising, drop every connection and release the controller."""
        device, self.device = self.device, None
        for t in list(self._tasks):
            t.cancel()
        for ch in list(self.channels.values()):
            self.node.remove_channel(ch)
            await ch.close()
        self.channels.clear()
        if device is not None:
            with contextlib.suppress(Exception):
                await device.stop_advertising()
            with contextlib.suppress(Exception):
                await device.power_off()
            controller, self._controller = self._controller, None
            if self.link is not None and controller in self.link.controllers:
                self.link.remove_controller(controller)
        await self._close_transport()


def _json_only(url: TransportURL) -> None:
    # rpc-gatts carries JSON frames; a binary codec has not been specified or tested over GATT.
    codec = url.option("codec") or "json"
    if codec != "json":
        raise UsageError(f"ble:// carries JSON frames only, not the {codec} codec")


async def listen(
    url: TransportURL,
    node: Node,
    *,
    link: LocalLink | None = None,
    address: str | None = None,
    name: str | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    advertising_interval_ms: float = DEFAULT_ADVERTISING_INTERVAL_MS,
    **opts: Any,
) -> BleListener:
    """Serve ``node`` as a BLE GATT peripheral (see the module docstring for the URL options)."""
    _require_bumble()
    if opts:
        raise UsageError(f"unknown option(s) for ble:// listen: {', '.join(sorted(opts))}")
    _json_only(url)
    addr = url.option("address") or address
    if addr is not None and not _MAC_RE.match(addr):
        raise UsageError(f"address must look like C0:11:22:33:44:55, got {addr!r}")
    lst = BleListener(
        node,
        name=url.option("name") or name or node.id or "mgrpc",
        hci=url.option("hci"),
        link=link,
        address=addr,
        max_frame_size=max_frame_size,
        advertising_interval_ms=advertising_interval_ms,
    )
    await lst.start()
    return lst


# ================================================================================================
# Client side: bleak
# ================================================================================================


def _bleak_error(exc: BaseException, what: str) -> TransportError:
    """Turn a bleak/backend exception into our error tree, keeping the ATT code when there is one."""
    from bleak.exc import BleakGATTProtocolError

    if isinstance(exc, BleakGATTProtocolError):
        return TransportError(f"{what}: device answered ATT error 0x{int(exc.code):02x} ({exc.code.name.lower()})")
    if isinstance(exc, TransportError):
        return exc
    return TransportError(f"{what}: {exc}")


class GattChannel(Channel):
    """The host side of a BLE GATT link to an rpc-gatts device (type ``GATT``, mos style)."""

    type = "GATT"
    persistent = True
    broadcast = False

    def __init__(self, client: BleakClient, *, target: str, poll_s: float = DEFAULT_POLL_S) -> None:
        super().__init__(style="mos")
        self.client = client
        self.target = target
        self.poll_s = poll_s
        self.notifying = False
        self._tx_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._chars: dict[str, BleakGATTCharacteristic] = {}

    def info(self) -> str:
        """``GATT <address>``."""
        return f"GATT {self.client.address}"

    @property
    def mtu(self) -> int:
        """The negotiated ATT MTU (at least 23)."""
        return max(23, int(self.client.mtu_size))

    async def setup(self) -> None:
        """Find the characteristics and subscribe to ``rx_ctl`` (falls back to polling)."""
        service = self.client.services.get_service(SERVICE_UUID)
        if service is None:
            raise TransportError(f"{self.target} has no mOS RPC GATT service ({SERVICE_UUID})")
        for uuid in (DATA_UUID, RX_CTL_UUID, TX_CTL_UUID):
            ch = service.get_characteristic(uuid)
            if ch is None:
                raise TransportError(f"{self.target}: the RPC service lacks characteristic {uuid}")
            self._chars[uuid] = ch
        rx_ctl = self._chars[RX_CTL_UUID]
        if "notify" in rx_ctl.properties or "indicate" in rx_ctl.properties:
            try:
                await self.client.start_notify(rx_ctl, self._on_rx_ctl)
                self.notifying = True
            except Exception as e:  # some stacks refuse; polling rx_ctl works everywhere
                log.info("BLE: rx_ctl notifications unavailable (%s); polling every %.2fs", e, self.poll_s)

    def _on_rx_ctl(self, _char: BleakGATTCharacteristic, _value: bytearray) -> None:
        self._wake.set()

    def disconnected(self) -> None:
        """bleak's disconnected callback: the peer went away."""
        log.info("BLE: %s disconnected", self.target)
        self._stop_reader()
        self.mark_closed()

    def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()

    async def start(self) -> None:
        """Start the reader (reads any frame already pending)."""
        if self._reader is None and not self.closed:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # -- receiving --------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while not self.closed:
                self._wake.clear()  # cleared before the read so a notification racing it re-wakes us
                length = decode_length(await self.client.read_gatt_char(self._chars[RX_CTL_UUID]))
                if length == 0:
                    if self.notifying:
                        await self._wake.wait()
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), self.poll_s)
                    continue
                asm = FrameReassembler(length, max_frame_size=MAX_INCOMING_FRAME)  # too large: fatal
                try:
                    frame = None
                    while frame is None and not self.closed:
                        frame = asm.feed(await self.client.read_gatt_char(self._chars[DATA_UUID]))
                except GattProtocolError as e:
                    # The device dropped or restarted the frame; reading rx_ctl again rewinds it.
                    log.warning("BLE: bad frame transfer from %s: %s", self.target, e)
                    await asyncio.sleep(self.poll_s)
                    continue
                if frame is not None and not self.closed:
                    self.deliver_bytes(frame)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self.closed:
                log.warning("BLE: reading from %s failed: %s", self.target, e)
                await self._disconnect()

    # -- sending ----------------------------------------------------------------------------------
    async def send(self, frame: Frame) -> None:
        """Write the length to ``tx_ctl`` and the frame to ``data``; one frame at a time."""
        data = self.encode(frame)
        if self._reader is None:
            await self.start()
        async with self._tx_lock:
            if self.closed or not self.client.is_connected:
                raise ChannelClosed(f"BLE link to {self.target} is closed")
            try:
                await self.client.write_gatt_char(self._chars[TX_CTL_UUID], encode_length(len(data)), response=True)
                for chunk in write_chunks(data, mtu=self.mtu):
                    await self.client.write_gatt_char(self._chars[DATA_UUID], chunk, response=True)
            except Exception as e:
                if self.closed:
                    raise ChannelClosed(f"BLE link to {self.target} closed while sending") from e
                raise _bleak_error(e, f"sending a {len(data)}-byte frame to {self.target}") from e

    async def _disconnect(self) -> None:
        self.mark_closed()
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    async def close(self) -> None:
        """Disconnect from the device.

        The reader is let finish a GATT read in flight (bounded) before it is cancelled: cancelling
        a read whose response is already on its way upsets some stacks (bumble logs an error).
        """
        reader = self._reader
        self.mark_closed()
        self._wake.set()
        if reader is not None and reader is not asyncio.current_task():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reader), READER_STOP_TIMEOUT_S)
        self._stop_reader()
        await self._disconnect()


def _hci_backends(spec: str) -> tuple[type[BaseBleakClient], type[BaseBleakScanner]]:
    """bleak backends running bumble's host stack on the HCI controller ``spec``."""
    if not spec.strip():
        raise UsageError("hci= needs a bumble transport spec, e.g. usb:0 or serial:/dev/ttyACM0,1000000")
    try:
        from transports.ble_bumble import HciHost
    except ImportError as e:
        raise TransportError("the ble:// client with hci= needs bleak and bumble: pip install 'mgrpc[ble]'") from e
    return HciHost(spec).backends()


def _is_address(target: str) -> bool:
    # A MAC address (Linux, Windows) or a CoreBluetooth device UUID (macOS).
    return bool(_MAC_RE.match(target) or _CB_UUID_RE.match(target))


async def open_client(
    url: TransportURL,
    *,
    bleak_backend: type[BaseBleakClient] | None = None,
    bleak_scanner_backend: type[BaseBleakScanner] | None = None,
    timeout_s: float | None = None,
    poll_s: float | None = None,
    hci: str | None = None,
    **opts: Any,
) -> GattChannel:
    """Connect to the rpc-gatts device at ``ble://ADDRESS`` or ``ble://NAME`` (a name is scanned for).

    ``hci`` (or the URL's ``?hci=``) is a bumble transport spec: the client then uses bumble as its
    host stack on that controller instead of the OS's (see the module docstring).
    """
    if opts:
        raise UsageError(f"unknown option(s) for ble:// client: {', '.join(sorted(opts))}")
    _json_only(url)
    hci = url.option("hci") or hci
    if hci is not None:
        if bleak_backend is not None or bleak_scanner_backend is not None:
            raise UsageError("ble:// client: give either hci= or a bleak backend, not both")
        bleak_backend, bleak_scanner_backend = _hci_backends(hci)
    try:
        from bleak import BleakClient, BleakScanner
    except ImportError as e:
        raise TransportError("the ble:// client needs bleak; install it with: pip install 'mgrpc[ble]'") from e
    target = url.raw.split("://", 1)[1].split("?", 1)[0].strip("/") if "://" in url.raw else (url.host + url.path)
    if not target:
        raise UsageError("ble:// needs a device address or name, e.g. ble://AA:BB:CC:DD:EE:FF or ble://esp32_0A1B2C")
    timeout = timeout_s if timeout_s is not None else _float_option(url, "timeout_s", DEFAULT_CONNECT_TIMEOUT_S)
    poll = poll_s if poll_s is not None else _float_option(url, "poll_s", DEFAULT_POLL_S)

    device: Any = target
    if not _is_address(target):
        try:
            scan_opts: dict[str, Any] = {} if bleak_scanner_backend is None else {"backend": bleak_scanner_backend}
            device = await BleakScanner.find_device_by_name(target, timeout=timeout, **scan_opts)
        except Exception as e:
            raise _bleak_error(e, f"scanning for {target!r}") from e
        if device is None:
            raise TransportError(f"no BLE device named {target!r} found within {timeout:g} s")

    holder: list[GattChannel] = []

    def on_disconnect(_client: BleakClient) -> None:
        if holder:
            holder[0].disconnected()

    client = BleakClient(device, on_disconnect, timeout=timeout, backend=bleak_backend)
    try:
        await client.connect()
    except Exception as e:
        raise _bleak_error(e, f"connecting to {target}") from e
    channel = GattChannel(client, target=target, poll_s=poll)
    holder.append(channel)
    try:
        await channel.setup()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.disconnect()
        raise
    return channel
