"""BLE GATT length-protocol checks on raw characteristic operations (docs/protocol/transports.md §5)."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from conformance.golden import load
from conformance.model import CheckFailed, CheckSkipped, check, expect
from conformance.probe import Probe
from conformance.rawjson import show
from conformance.session import Session

BLE = ("ble",)
_UUIDS = load("ble")["uuids"]
SERVICE_UUID: str = _UUIDS["service"]
DATA_UUID: str = _UUIDS["data"]
RX_CTL_UUID: str = _UUIDS["rx_ctl"]
TX_CTL_UUID: str = _UUIDS["tx_ctl"]


class _Gatt:
    """A raw GATT client on the device (bleak; the session's ``bleak_backend`` option if any)."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.client: Any = None

    async def __aenter__(self) -> Any:
        try:
            from bleak import BleakClient
        except ImportError:
            raise CheckSkipped("needs bleak (pip install 'mgrpc[ble]')") from None
        await self.s.close()  # one connection at a time keeps simple stacks happy
        target = self.s.url.split("://", 1)[1].split("?", 1)[0].strip("/")
        backend = self.s.options.transport_opts.get("bleak_backend")
        self.client = BleakClient(target, timeout=self.s.options.timeout_s, backend=backend)
        await self.client.connect()
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.disconnect()


def _request(method: str = "RPC.Ping") -> tuple[int, bytes]:
    fid = Probe.new_id()
    return fid, json.dumps({"src": "mos", "id": fid, "method": method}, separators=(",", ":")).encode()


async def _read_frame(s: Session, client: Any) -> bytes:
    """Poll ``rx_ctl`` for a pending length, then read ``data`` until that many bytes arrived."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + s.options.timeout_s
    n = 0
    while loop.time() < deadline:
        value = bytes(await client.read_gatt_char(RX_CTL_UUID))
        expect(len(value) == 4, "rx_ctl must read as a 4-byte length", seen=value.hex(), expected="4 bytes, big-endian")
        n = struct.unpack(">I", value)[0]
        if n:
            break
        await asyncio.sleep(0.05)
    if not n:
        raise CheckFailed("no frame announced on rx_ctl", seen="length 0", expected="a non-zero length")
    data = b""
    while len(data) < n:
        chunk = bytes(await client.read_gatt_char(DATA_UUID))
        expect(bool(chunk), "data read returned nothing before the announced length", seen=len(data), expected=n)
        data += chunk
    expect(len(data) == n, "data must total exactly the announced length", seen=len(data), expected=n)
    return data


@check(
    "ble.length_protocol",
    section="transports.md §5",
    title="BE length to tx_ctl, chunks to data, reply via rx_ctl/data",
    only=BLE,
)
async def _ble_length_protocol(s: Session) -> str | None:
    async with _Gatt(s) as client:
        fid, req = _request()
        await client.write_gatt_char(TX_CTL_UUID, struct.pack(">I", len(req)), response=True)
        for i in range(0, len(req), 20):  # small chunks: any number of writes must work
            await client.write_gatt_char(DATA_UUID, req[i : i + 20], response=True)
        data = await _read_frame(s, client)
        doc = json.loads(data)
        expect(
            doc.get("id") == fid and "result" in doc,
            "the reply frame must answer the request",
            seen=show(data),
            expected=f'{{"id":{fid},...}}',
        )
    return None


@check(
    "ble.notify_length", section="transports.md §5", title="rx_ctl notification carries the 4-byte BE length", only=BLE
)
async def _ble_notify_length(s: Session) -> str | None:
    async with _Gatt(s) as client:
        got: asyncio.Queue[bytes] = asyncio.Queue()
        await client.start_notify(RX_CTL_UUID, lambda _c, value: got.put_nowait(bytes(value)))
        _, req = _request()
        await client.write_gatt_char(TX_CTL_UUID, struct.pack(">I", len(req)), response=True)
        await client.write_gatt_char(DATA_UUID, req, response=True)
        try:
            value = await asyncio.wait_for(got.get(), s.options.timeout_s)
        except TimeoutError:
            raise CheckFailed("no rx_ctl notification", seen="nothing", expected="4-byte length") from None
        data = await _read_frame(s, client)
        expect(
            len(value) == 4 and struct.unpack(">I", value)[0] == len(data),
            "the notification must carry the frame's big-endian length",
            seen=value.hex(),
            expected=struct.pack(">I", len(data)).hex(),
        )
    return None


async def _gatt_error(coro: Any) -> str | None:
    try:
        await coro
    except Exception as e:  # bleak reports ATT errors with backend-specific exception types
        return f"{type(e).__name__}: {e}"
    return None


@check("ble.bad_lengths", section="transports.md §5", title="short tx_ctl write and overlong data rejected", only=BLE)
async def _ble_bad_lengths(s: Session) -> str | None:
    async with _Gatt(s) as client:
        err = await _gatt_error(client.write_gatt_char(TX_CTL_UUID, b"\x00\x00\x10", response=True))
        expect(
            err is not None,
            "a tx_ctl write shorter than 4 bytes must be a GATT error",
            seen="accepted",
            expected="request not supported",
        )
        await client.write_gatt_char(TX_CTL_UUID, struct.pack(">I", 4), response=True)
        err2 = await _gatt_error(client.write_gatt_char(DATA_UUID, b"{}{}{}", response=True))
        expect(
            err2 is not None,
            "writing more data than announced must be a GATT error",
            seen="accepted",
            expected="invalid offset",
        )
        # The device must still work: a fresh length resets the partial frame.
        fid, req = _request()
        await client.write_gatt_char(TX_CTL_UUID, struct.pack(">I", len(req)), response=True)
        await client.write_gatt_char(DATA_UUID, req, response=True)
        data = await _read_frame(s, client)
        expect(
            b'"id":%d' % fid in data,
            "device must answer after the rejected writes",
            seen=show(data),
            expected=f'{{"id":{fid},...}}',
        )
    return f"{err}; {err2}"
