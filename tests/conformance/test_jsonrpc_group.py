"""The conformance suite's jsonrpc group (docs/protocol/jsonrpc.md): it passes against our device over
every transport it applies to, and is skipped against a device that speaks mgRPC only."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

import transports
from conformance import runner
from conformance.checks.jsonrpc import NOT_OFFERED
from conformance.model import CHECKS, Outcome
from conformance.session import Options
from rpc.channel import Channel
from rpc.frame import Frame
from rpc.node import Node
from services.device import VirtualDevice
from tests.real_device import real_device  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)

GROUP = sorted(name for name in CHECKS if name.startswith("jsonrpc."))


def _options() -> Options:
    return Options(timeout_s=5.0, quiet_s=0.2)


def _assert_group_passes(report: runner.Report, scheme: str) -> None:
    by_name = report.by_name()
    bad = [(r.name, r.outcome.value, r.message, r.seen, r.expected) for r in report.results if r.outcome is not Outcome.PASS
           and not (r.outcome is Outcome.SKIP and "not applicable" in r.message)]  # fmt: skip
    assert not bad, bad
    passed = {n for n in GROUP if by_name[n].outcome is Outcome.PASS}
    expected = set(GROUP) if scheme in ("http", "https") else set(GROUP) - {"jsonrpc.http"}
    assert passed == expected


@pytest.mark.parametrize("scheme", ["http", "ws", "tcp"])
async def test_group_passes_on_our_device(tmp_path: Path, scheme: str) -> None:
    listen = {"http": "http://127.0.0.1:0/rpc", "ws": "ws://127.0.0.1:0/rpc", "tcp": "tcp://127.0.0.1:0"}[scheme]
    async with AsyncExitStack() as stack:
        dev = VirtualDevice(id="jr-conf", state_dir=tmp_path, listen=[listen], listen_fn=transports.listen)
        await dev.start()
        stack.push_async_callback(dev.stop)
        report = await runner.run(dev.urls[0], options=_options(), only=["jsonrpc"])
    _assert_group_passes(report, scheme)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs ptys")
async def test_group_passes_over_serial(tmp_path: Path) -> None:
    from transports.linkemu import LinkEmulator

    with LinkEmulator(baud=None) as link:
        async with AsyncExitStack() as stack:
            dev = VirtualDevice(id="jr-conf", state_dir=tmp_path, listen=[f"serial://{link.a_path}"],
                                listen_fn=transports.listen)  # fmt: skip
            await dev.start()
            stack.push_async_callback(dev.stop)
            # the mgRPC checks first, so the device has learned mos's framing and CRCs (sticky on a UART)
            report = await runner.run(f"serial://{link.b_path}", options=_options(), only=["rpc", "jsonrpc"])
    _assert_group_passes(report, "serial")


class MgrpcOnly(Node):
    """A device without the dialect: a ``jsonrpc`` member is an unknown member, ignored, as mgos does."""

    def frame_received(self, channel: Channel, frame: Frame) -> None:
        if frame.extra:
            frame = frame.replace(extra={})
        super().frame_received(channel, frame)

    def jsonrpc_received(self, channel: Channel, data: bytes) -> None:
        return None  # junk


@pytest.mark.parametrize("scheme", ["ws", "tcp"])
async def test_group_skipped_on_an_mgrpc_only_device(scheme: str) -> None:
    node = MgrpcOnly(id="mgos-like")
    lst = await transports.listen({"ws": "ws://127.0.0.1:0/rpc", "tcp": "tcp://127.0.0.1:0"}[scheme], node)
    try:
        report = await runner.run(lst.url, options=_options(), only=["jsonrpc"])
    finally:
        await lst.close()
        await node.close()
    results = [r for r in report.results if r.name in GROUP and r.name != "jsonrpc.http"]
    assert results and all(r.outcome is Outcome.SKIP and NOT_OFFERED in r.message for r in results), [
        (r.name, r.outcome, r.message) for r in results
    ]


def test_every_check_cites_the_jsonrpc_doc() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol" / "jsonrpc.md").read_text()
    for name in GROUP:
        section = CHECKS[name].section
        assert section.startswith("jsonrpc.md §"), name
        number = section.split("§", 1)[1]
        assert f"\n## {number}. " in doc, (name, section)


def test_group_skipped_on_the_real_device(real_device: Callable[..., Any]) -> None:  # noqa: F811
    import asyncio

    dev = real_device()
    for url in (dev.ws_url, dev.http_url):
        report = asyncio.run(runner.run(url, options=_options(), only=["jsonrpc"]))
        results = [r for r in report.results if r.name in GROUP and "not applicable" not in r.message]
        assert results and all(r.outcome is Outcome.SKIP and NOT_OFFERED in r.message for r in results), [
            (r.name, r.outcome, r.message, r.seen) for r in results
        ]
