"""``ble://…?hci=``: the BLE client on bumble's host stack over an HCI controller, from another process.

The device is a bumble GATT server on :class:`~transports.ble_testing.BumbleAir`'s in-process link;
:meth:`BumbleAir.hci_bridge` exposes the link as HCI over TCP, so ``mgrpc`` in a subprocess, with
``--port "ble://dev1?hci=tcp-client:127.0.0.1:PORT"``, runs bumble's host (HCI reset, scanning,
connecting, ATT) against a controller on the same link: the code path a USB or UART dongle takes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rpc.client import AsyncClient
from rpc.errors import TransportError, UsageError
from rpc.node import Context, Node
from transports import ble
from transports.ble_bumble import BumbleBleakClient, BumbleBleakScanner, HciHost
from transports.ble_testing import BumbleAir, HciBridge
from transports.registry import parse_url

pytestmark = pytest.mark.timeout(90)


class Setup:
    """A BLE device "dev1" on an air, and an HCI-over-TCP bridge onto the same air."""

    def __init__(self, air: BumbleAir, node: Node, listener: ble.BleListener, bridge: HciBridge) -> None:
        self.air = air
        self.node = node
        self.listener = listener
        self.bridge = bridge
        self.seen: list[str] = []  # channel info of each Test.Echo call

    def url(self, target: str = "dev1", **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"hci": self.bridge.spec, "timeout_s": "10", **options}.items())
        return f"ble://{target}?{query}"


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    air = BumbleAir()
    node = Node(id="dev1")
    lst = await ble.listen(parse_url("ble://"), node, link=air.link, advertising_interval_ms=20)
    bridge = await air.hci_bridge()
    s = Setup(air, node, lst, bridge)

    def echo(ctx: Context, params: Any) -> Any:
        s.seen.append(ctx.channel.info())
        return {"params": params, "type": ctx.channel.type}

    node.add_handler("Test.Echo", echo)
    yield s
    await bridge.close()
    await lst.close()
    await node.close()


async def run_cli(*args: str, timeout_s: float = 60) -> tuple[int | None, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mgrpc", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def wait_until(cond: Any, what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_cli_in_a_subprocess_calls_a_ble_device_through_hci(setup: Setup) -> None:
    rc, out, err = await run_cli("--port", setup.url(), "call", "Test.Echo", '{"a": 1}')
    assert rc == 0, err
    assert json.loads(out) == {"params": {"a": 1}, "type": "GATTS"}
    # the call came over a BLE connection from the bridge's controller, which left when the process did
    assert len(setup.seen) == 1 and setup.seen[0].startswith("conn ")
    await wait_until(lambda: not setup.listener.channels, "the device to see the disconnection")
    await wait_until(lambda: not setup.bridge.connections, "the bridge to see the host leave")
    assert len(setup.air.link.controllers) == 1  # only the device's: the host's controller left the air
    rc, out, err = await run_cli("--port", setup.url(), "call", "RPC.List")
    assert rc == 0, err
    assert "Test.Echo" in json.loads(out)


async def test_cli_by_address_through_hci(setup: Setup) -> None:
    rc, out, err = await run_cli("--port", setup.url(f"/{setup.listener.address}"), "call", "Test.Echo", "[7]")
    assert rc == 0, err
    assert json.loads(out)["params"] == [7]


async def test_in_process_client_with_hci_option(setup: Setup) -> None:
    channel = await ble.open_client(parse_url(setup.url()))
    client = AsyncClient(channel, timeout_s=10)
    await client.start()
    try:
        assert channel.notifying and channel.mtu == 247
        assert (await client.call("Test.Echo", "x" * 2000))["params"] == "x" * 2000
    finally:
        await client.close()
    # hci= as a keyword, and a controller killed mid-connection: the device sees the disconnection
    channel = await ble.open_client(parse_url("ble://dev1?timeout_s=10"), hci=setup.bridge.spec)
    client = AsyncClient(channel, timeout_s=10)
    await client.start()
    try:
        assert (await client.call("Test.Echo", 1))["params"] == 1
        await wait_until(lambda: len(setup.listener.channels) == 1, "the device channel")
        for conn in list(setup.bridge.connections):
            assert conn.transport is not None
            conn.transport.abort()
        await wait_until(lambda: not setup.listener.channels, "the device to drop the connection")
    finally:
        await client.close()


async def test_hci_errors(setup: Setup) -> None:
    with pytest.raises(TransportError, match="cannot open HCI transport 'serial:/nonexistent/tty'"):
        await ble.open_client(parse_url("ble://dev1?hci=serial:/nonexistent/tty&timeout_s=2"))
    with pytest.raises(TransportError, match="no BLE device named 'nobody'"):
        await ble.open_client(parse_url(setup.url("nobody", timeout_s="0.5")))
    with pytest.raises(TransportError, match="connecting to C0:99:99:99:99:99"):
        await ble.open_client(parse_url(setup.url("/C0:99:99:99:99:99", timeout_s="0.5")))
    with pytest.raises(UsageError, match="not both"):
        await ble.open_client(parse_url(setup.url()), bleak_backend=setup.air.client_backend)
    with pytest.raises(UsageError, match="transport spec"):
        await ble.open_client(parse_url("ble://dev1"), hci=" ")
    # the failures left nothing behind on the air, and the device still answers
    await wait_until(lambda: not setup.bridge.connections, "the failed hosts to leave")
    rc, out, err = await run_cli("--port", setup.url(), "call", "Test.Echo", "2")
    assert rc == 0, err
    assert json.loads(out)["params"] == 2


async def test_cli_reports_a_bad_hci_spec() -> None:
    rc, out, err = await run_cli("--port", "ble://dev1?hci=serial:/nonexistent/tty&timeout_s=1", "call", "RPC.List")
    assert rc != 0
    assert "cannot open HCI transport" in out + err


def test_hci_host_backends_are_bound_to_the_host() -> None:
    host = HciHost("usb:0")
    client, scanner = host.backends()
    assert host.backends() == (client, scanner)
    assert issubclass(client, BumbleBleakClient) and issubclass(scanner, BumbleBleakScanner)
    assert client.host is host and scanner.host is host
    assert HciHost("usb:1").backends()[0] is not client


async def test_missing_bumble_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transports.ble_bumble", None)  # as if bumble were not installed
    with pytest.raises(TransportError, match=r"hci= needs bleak and bumble.*mgrpc\[ble\]"):
        await ble.open_client(parse_url("ble://dev1?hci=usb:0"))
