"""The full conformance suite (OTA included) against the virtual device over every transport."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

import transports
from conformance import runner
from conformance.model import CHECKS, Outcome
from conformance.session import Options
from services.device import VirtualDevice
from tests.mosquitto import mosquitto_broker  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(240)

DEVICE_ID = "esp32_C0NF01"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _options(**transport_opts: Any) -> Options:
    return Options(
        timeout_s=5.0,
        quiet_s=0.2,
        destructive=True,
        ota_generate=True,
        ota_chunk_size=2048,
        reboot_timeout_s=20.0,
        ota_serve_host="127.0.0.1",  # the virtual device downloads from this machine (the pull checks)
        transport_opts=transport_opts,
    )


async def _device(stack: AsyncExitStack, tmp_path: Path, listen: str, listen_fn: Any = None) -> VirtualDevice:
    dev = VirtualDevice(id=DEVICE_ID, state_dir=tmp_path, listen=[listen], listen_fn=listen_fn or transports.listen)
    await dev.start()
    stack.push_async_callback(dev.stop)
    return dev


def _assert_all_pass(report: runner.Report, *, expect_groups: set[str]) -> None:
    bad = [(r.name, r.outcome.value, r.message, r.seen, r.expected) for r in report.failed()]
    assert report.ok, bad
    ran = {r.group for r in report.results if r.outcome is Outcome.PASS}
    assert expect_groups <= ran, ran
    unexpected_skips = [
        r.name for r in report.results if r.outcome is Outcome.SKIP and "not applicable" not in r.message
    ]
    # Without credentials the auth checks skip (tests/conformance/test_auth.py runs them).
    auth = {n for n in CHECKS if n.startswith("auth.")} | {"http.auth_challenge", "http.auth_notification"}
    assert set(unexpected_skips) <= auth, unexpected_skips


BASE = {"frame", "rpc", "sys", "ota"}


async def test_loop(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        await _device(stack, tmp_path, "loop://conf-vd")
        report = await runner.run("loop://conf-vd", options=_options())
    _assert_all_pass(report, expect_groups=BASE)
    assert report.by_name()["ota.revert"].outcome is Outcome.PASS


async def test_tcp(tmp_path: Path) -> None:
    url = f"tcp://127.0.0.1:{_free_port()}"
    async with AsyncExitStack() as stack:
        await _device(stack, tmp_path, url)
        report = await runner.run(url, options=_options())
    _assert_all_pass(report, expect_groups=BASE | {"tcp"})


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs ptys")
async def test_serial_pty(tmp_path: Path) -> None:
    from transports.linkemu import LinkEmulator

    with LinkEmulator(baud=None) as link:
        async with AsyncExitStack() as stack:
            await _device(stack, tmp_path, f"serial://{link.a_path}")
            report = await runner.run(f"serial://{link.b_path}", options=_options())
    _assert_all_pass(report, expect_groups=BASE | {"serial"})


async def test_websocket(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{_free_port()}/rpc"
    async with AsyncExitStack() as stack:
        await _device(stack, tmp_path, url)
        report = await runner.run(url, options=_options())
    _assert_all_pass(report, expect_groups=BASE | {"ws"})


async def test_http(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/rpc"
    async with AsyncExitStack() as stack:
        await _device(stack, tmp_path, url)
        report = await runner.run(url, options=_options())
    _assert_all_pass(report, expect_groups=BASE | {"http"})
    by = report.by_name()
    for name in ("ota.update_pull", "ota.update_pull_errors", "ota.http_pull", "ota.http_push", "ota.http_push_bad"):
        assert by[name].outcome is Outcome.PASS, by[name]


async def test_mqtt(tmp_path: Path, mosquitto_broker: Callable[..., Any]) -> None:  # noqa: F811
    broker = mosquitto_broker()
    url = broker.url(DEVICE_ID)
    async with AsyncExitStack() as stack:
        await _device(stack, tmp_path, url)
        report = await runner.run(url, options=_options())
    _assert_all_pass(report, expect_groups=BASE | {"mqtt"})


@pytest.fixture
async def ble_device(tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    pytest.importorskip("bumble")
    pytest.importorskip("bleak")
    from transports.ble_testing import BumbleAir

    air = BumbleAir()

    async def listen_fn(url: str, node: Any) -> Any:
        return await transports.listen(url, node, link=air.link)

    async with AsyncExitStack() as stack:
        await _device(stack, tmp_path, "ble://?address=C0:11:22:33:44:55", listen_fn)
        yield "ble:///C0:11:22:33:44:55", air


async def test_ble(ble_device: tuple[str, Any]) -> None:
    url, air = ble_device
    report = await runner.run(url, options=_options(bleak_backend=air.client_backend))
    _assert_all_pass(report, expect_groups=BASE | {"ble"})
    assert report.by_name()["ota.revert"].outcome is Outcome.PASS
