"""The suite catches wrong devices: each deliberately broken device fails the check named for it."""

from __future__ import annotations

import pytest

import transports
from conformance import runner
from conformance.faults import FAULTS, make_faulty_node
from conformance.model import CHECKS, Outcome
from conformance.refdevice import make_node
from conformance.session import Options

NODE_FAULTS = [name for name, f in FAULTS.items() if not f.transport]
OPTS = Options(timeout_s=2.0, quiet_s=0.1, destructive=True, ota_generate=True, reboot_timeout_s=5.0)


async def _run(node, name: str, only: list[str]) -> runner.Report:
    lst = await transports.listen(f"loop://{name}", node)
    try:
        return await runner.run(f"loop://{name}", options=OPTS, only=only)
    finally:
        await lst.close()


async def test_reference_device_passes_everything() -> None:
    report = await _run(make_node(), "ref-ok", [])
    bad = [(r.name, r.message, r.seen) for r in report.failed()]
    assert report.ok, bad
    assert report.count(Outcome.PASS) >= 25
    skipped = {
        r.name
        for r in report.results
        if r.outcome is Outcome.SKIP and "not applicable" not in r.message and not r.message.startswith("not offered")
    }
    # The auth checks need --rpc-creds and a device that asks for them (tests/conformance/test_auth.py).
    assert skipped == {name for name in CHECKS if name.startswith("auth.")}


def test_at_least_twelve_distinct_faults() -> None:
    assert len(FAULTS) >= 12
    assert len({f.caught_by for f in FAULTS.values()}) >= 12


@pytest.mark.parametrize("fault", NODE_FAULTS)
async def test_fault_is_caught_by_its_check(fault: str) -> None:
    f = FAULTS[fault]
    group = f.caught_by.split(".", 1)[0]
    report = await _run(make_faulty_node([fault]), f"bad-{fault}", [group])
    results = report.by_name()
    assert results[f.caught_by].outcome is Outcome.FAIL, results[f.caught_by]
    assert not report.ok
    failing = results[f.caught_by]
    assert failing.message and failing.section  # the report says what rule was broken, and where


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        make_faulty_node(["no_such_fault"])


SERIAL_FAULTS = [name for name, f in FAULTS.items() if f.transport == "serial"]


@pytest.mark.skipif(not hasattr(__import__("os"), "openpty"), reason="needs ptys")
@pytest.mark.parametrize("fault", [None, *SERIAL_FAULTS])
async def test_serial_framing_faults_are_caught(fault: str | None) -> None:
    from conformance.serialdev import PtySerialDevice

    dev = await PtySerialDevice(make_node(), faults=[fault] if fault else []).start()
    try:
        report = await runner.run(f"serial://{dev.path}", options=OPTS, only=["serial"])
    finally:
        await dev.close()
    results = report.by_name()
    if fault is None:
        assert report.ok, [(r.name, r.message, r.seen) for r in report.failed()]
        assert report.count(Outcome.PASS) == len(results)
    else:
        assert results[FAULTS[fault].caught_by].outcome is Outcome.FAIL
