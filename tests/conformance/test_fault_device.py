"""The suite judged by a device it was not written against: tests/faultdev (stdlib only, no project code).

Every named fault of the independent fault device must make its named check FAIL; the correct device
must pass every applicable check on every transport. Each fault runs only the checks it names, so
the whole module stays well under two minutes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance import runner
from conformance.model import CHECKS, Outcome, citations
from conformance.session import Options
from rpc.auth import Credentials
from tests.conformance.test_citations import DOCS, _anchors
from tests.faultdev import AUTH_DENIED_METHOD, AUTH_USER, FAULTS, TRANSPORTS, FaultDevice
from tests.mosquitto import Mosquitto, find_mosquitto

ROOT = Path(__file__).resolve().parents[2]
FAULTDEV = ROOT / "tests" / "faultdev"
RUN_LEVEL = {"preflight", "connect"}  # verdicts of the run itself, before any check
OURS = {"rpc", "transports", "services", "updater", "conformance", "mgrpc"}


def _options(destructive: bool, auth: bool = False) -> Options:
    creds = {"creds": Credentials(*AUTH_USER), "denied_method": AUTH_DENIED_METHOD} if auth else {}
    return Options(
        timeout_s=1.0, quiet_s=0.1, destructive=destructive, ota_generate=destructive, reboot_timeout_s=3.0, **creds
    )


@pytest.fixture(scope="module")
def broker() -> Iterator[tuple[str, int] | None]:
    """One mosquitto for the module's MQTT runs (None when mosquitto is not installed)."""
    if find_mosquitto() is None:
        yield None
        return
    m = Mosquitto()
    m.start()
    try:
        yield (m.host, m.port)
    finally:
        m.stop()


async def _run(
    fault: str | None, transport: str, broker: tuple[str, int] | None, only: list[str] | None, *, auth: bool = False
):
    if transport == "mqtt" and broker is None:
        pytest.skip("mosquitto is not installed (make system-deps)")
    auth = auth or (fault is not None and FAULTS[fault].auth)
    dev = await FaultDevice(fault, auth=auth).start(transport, broker=broker)
    destructive = fault is None or FAULTS[fault].destructive
    try:
        return await runner.run(dev.url, options=_options(destructive, auth), only=only)
    finally:
        await dev.close()


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_fails_its_check(fault: str, broker: tuple[str, int] | None) -> None:
    f = FAULTS[fault]
    report = await _run(fault, f.transport, broker, ["rpc.ping"] if f.check in RUN_LEVEL else list(f.checks))
    got = report.by_name().get(f.check)
    assert got is not None, [r.name for r in report.results]
    # A port that cannot be opened at all is an ERROR of the run ("cannot open ..."); the rest FAIL.
    want = Outcome.ERROR if f.check == "connect" else Outcome.FAIL
    assert got.outcome is want, (f.check, got.outcome, got.message, got.seen)
    assert got.section and got.message  # the verdict names the rule and says what was wrong


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_correct_device_passes_everything(transport: str, broker: tuple[str, int] | None) -> None:
    report = await _run(None, transport, broker, None)
    bad = [(r.name, r.outcome.value, r.message, r.seen) for r in report.failed()]
    assert not bad
    passed = {r.name for r in report.results if r.outcome is Outcome.PASS}
    # Every check whose fault shows on this transport ran and passed there.
    wanted = {c for f in FAULTS.values() if f.transport == transport and not f.auth for c in f.checks} - RUN_LEVEL
    assert wanted <= passed, sorted(wanted - passed)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_correct_device_with_auth_passes_everything(transport: str, broker: tuple[str, int] | None) -> None:
    """With digest auth and an ACL on, the correct device passes every check it is asked (the suite
    answers 401s as mos does), the auth checks included."""
    report = await _run(None, transport, broker, None, auth=True)
    bad = [(r.name, r.outcome.value, r.message, r.seen) for r in report.failed()]
    assert not bad
    passed = {r.name for r in report.results if r.outcome is Outcome.PASS}
    wanted = {c for f in FAULTS.values() if f.transport == transport and f.auth for c in f.checks}
    assert wanted <= passed, sorted(wanted - passed)


def test_faults_cover_every_section_and_transport() -> None:
    assert len(FAULTS) >= 60
    assert {f.transport for f in FAULTS.values()} == set(TRANSPORTS)
    docs = {f.section.split(" ", 1)[0] for f in FAULTS.values()}
    assert {"frames.md", "transports.md", "ota.md", "tool.md"} <= docs
    for f in FAULTS.values():
        cited = citations(f.section)
        assert cited, f"{f.name} cites no statement"
        for file, anchor in cited:  # each fault breaks a statement of docs/protocol
            assert anchor in _anchors(DOCS / file), f"{f.name} cites {file} §{anchor}, which does not exist"
        if f.check in RUN_LEVEL:  # the run stops before any check
            continue
        assert f.check in CHECKS, f"{f.name} names an unknown check {f.check}"
        assert f.check in f.checks
        assert CHECKS[f.check].applies_to(f.transport), f"{f.check} does not run over {f.transport}"


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FaultDevice("no_such_fault")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted(FAULTDEV.glob("*.py")), ids=lambda p: p.name)
def test_fault_device_uses_only_the_standard_library(path: Path) -> None:
    mods = _imports(path)
    foreign = {m for m in mods if m.split(".")[0] not in sys.stdlib_module_names and not m.startswith("tests.faultdev")}
    assert not foreign, f"{path.name} imports {sorted(foreign)}"
    assert not {m.split(".")[0] for m in mods} & OURS


def test_fault_device_loads_none_of_our_packages() -> None:
    code = (
        "import asyncio, sys\n"
        "from tests.faultdev import FaultDevice\n"
        "async def main():\n"
        "    dev = await FaultDevice().start('http')\n"
        "    await dev.close()\n"
        "asyncio.run(main())\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(OURS)!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
