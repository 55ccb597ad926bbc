"""The device checks as pytest tests (collected by ``pytest --pyargs conformance --rpc-url URL``)."""

from __future__ import annotations

from typing import Any

import pytest

from conformance.model import CheckSpec, Outcome, checks_for
from conformance.runner import run_check  # noqa: F401  (registers the checks)

_SPECS = [s for s in checks_for(None) if s.group != "client"]


@pytest.mark.mgrpc_conformance
@pytest.mark.parametrize("spec", _SPECS, ids=[s.name for s in _SPECS])
def test_check(spec: CheckSpec, mgrpc_conformance_runner: Any) -> None:
    """One conformance check against the device at ``--rpc-url``."""
    r = mgrpc_conformance_runner.run(spec)
    if r.outcome is Outcome.SKIP:
        pytest.skip(r.message)
    if r.outcome is not Outcome.PASS:
        pytest.fail(
            f"{r.name} ({r.section}) {r.outcome.value}: {r.message}\n  seen:     {r.seen}\n  expected: {r.expected}",
            pytrace=False,
        )
