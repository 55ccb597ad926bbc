"""pytest plugin: run the conformance checks as tests, or from your own tests.

Run the whole suite against a device::

    pytest --pyargs conformance --rpc-url tcp://192.168.1.10:8910 [--rpc-only frame,rpc] [--rpc-ota-generate]

Each check becomes one test named after it (``test_check[frame.id_numeric_bare]``); a failing check
fails with what was seen and expected, a check that does not apply is skipped. In your own suite,
load the plugin (``-p mgrpc_conformance``, the entry-point name pytest registers it under when mgrpc
is installed, and loads by itself unless plugin autoload is off; ``-p conformance.plugin`` only in a
source tree that is not installed, where the two names cannot clash) and use the
``mgrpc_conformance`` fixture::

    def test_my_board(mgrpc_conformance):
        report = mgrpc_conformance("ws://board.local/rpc", only=["frame"])
        assert report.ok, report.failed()

The plugin runs checks on its own event loop, so it does not need pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "mgrpc_conformance",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "run_conformance",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``--rpc-*`` options."""
    g = parser.getgroup("mgrpc-conformance", "mgRPC conformance suite")
    g.addoption("--rpc-url", default=os.environ.get("MGRPC_CONFORMANCE_URL"), help="device URL to check")
    g.addoption("--rpc-only", action="append", default=[], help="groups or checks to run (comma-separated)")
    g.addoption("--rpc-creds", default=None, help="user:pass for the auth checks")
    g.addoption("--rpc-denied-method", default=None, help="a method no rpc.acl entry matches (auth.acl_denied)")
    g.addoption("--rpc-ota", default=None, metavar="BUNDLE", help="fw.zip for the (destructive) OTA checks")
    g.addoption("--rpc-ota-generate", action="store_true", help="generate the OTA bundle for the device")
    g.addoption("--rpc-destructive", action="store_true", help="also run checks that reboot or reconfigure")
    g.addoption("--rpc-reply-timeout", type=float, default=5.0, help="seconds to wait for each reply")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker used on generated check tests."""
    config.addinivalue_line("markers", "mgrpc_conformance: a test generated from an mgRPC conformance check")


def _only(config: pytest.Config) -> list[str]:
    return [v.strip() for item in config.getoption("--rpc-only") or [] for v in item.split(",") if v.strip()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the generated check tests when no ``--rpc-url`` is given; apply ``--rpc-only``."""
    only = set(_only(config))
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.id if callspec is not None else None
        if item.get_closest_marker("mgrpc_conformance") is None or not name:
            keep.append(item)
            continue
        if only and name not in only and name.split(".", 1)[0] not in only:
            dropped.append(item)
            continue
        if not config.getoption("--rpc-url"):
            item.add_marker(pytest.mark.skip(reason="no device: give --rpc-url URL"))
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _options(config: pytest.Config | None = None, **kw: Any) -> Any:
    from conformance.session import Options
    from rpc.auth import parse_creds

    if config is not None:
        creds = config.getoption("--rpc-creds")
        ota = config.getoption("--rpc-ota")
        kw.setdefault("creds", parse_creds(creds) if creds else None)
        kw.setdefault("denied_method", config.getoption("--rpc-denied-method"))
        kw.setdefault("ota_bundle", Path(ota).read_bytes() if ota else None)
        kw.setdefault("ota_generate", bool(config.getoption("--rpc-ota-generate")))
        kw.setdefault("timeout_s", float(config.getoption("--rpc-reply-timeout")))
        if config.getoption("--rpc-destructive"):
            kw.setdefault("destructive", True)
    kw.setdefault("destructive", bool(kw.get("ota_bundle") or kw.get("ota_generate")))
    return Options(**kw)


class _Runner:
    """One event loop and one session for the whole test session."""

    def __init__(self, url: str, options: Any) -> None:
        from conformance.session import Session

        self.session = Session(url, options)  # first: a bad URL raises before a loop exists to leak
        self.loop = asyncio.new_event_loop()
        self._preflight: str | None = None  # None: not run yet; "": passed; else why the run cannot go on

    def run(self, spec: Any) -> Any:
        from conformance.model import CheckResult, Outcome
        from conformance.runner import _recover, run_check
        from conformance.session import PreflightError

        if self._preflight is None:
            try:
                self.loop.run_until_complete(self.session.preflight())
                self._preflight = ""
            except PreflightError as e:
                self._preflight = str(e)
        if self._preflight:
            return CheckResult(spec.name, spec.group, spec.section, spec.title, Outcome.FAIL, self._preflight)
        result = self.loop.run_until_complete(run_check(spec, self.session))
        if spec.upsets or result.outcome in (Outcome.FAIL, Outcome.ERROR):
            self.loop.run_until_complete(_recover(self.session))
        return result

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


@pytest.fixture(scope="session")
def mgrpc_conformance_runner(request: pytest.FixtureRequest) -> Iterator[_Runner]:
    """The session-wide runner for the generated check tests (needs ``--rpc-url``)."""
    url = request.config.getoption("--rpc-url")
    if not url:
        pytest.skip("no device: give --rpc-url URL")
    runner = _Runner(url, _options(request.config))
    yield runner
    runner.close()


def run_conformance(url: str, *, only: list[str] | None = None, **options: Any) -> Any:
    """Run the device checks against ``url`` (blocking) and return the :class:`~conformance.runner.Report`."""
    from conformance.runner import run

    opts = _options(None, **options)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run(url, options=opts, only=only))
    finally:
        loop.close()


@pytest.fixture
def mgrpc_conformance() -> Callable[..., Any]:
    """A function ``(url, *, only=None, **Options) -> Report`` running the suite from your own test."""
    return run_conformance
