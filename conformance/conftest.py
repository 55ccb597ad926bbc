"""Makes ``pytest --pyargs conformance --rpc-url URL`` work: the plugin's hooks and fixtures.

If the plugin is also loaded another way (``-p conformance.plugin`` or an entry point), its options
already exist; registering them again is skipped.
"""

from __future__ import annotations

import pytest

from conformance import plugin as _plugin
from conformance.plugin import (  # noqa: F401  (pytest finds fixtures by name)
    mgrpc_conformance,
    mgrpc_conformance_runner,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``--rpc-*`` options, unless the plugin already added them."""
    try:
        _plugin.pytest_addoption(parser)
    except ValueError:  # "option names already added": the plugin is loaded as well
        pass


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker."""
    _plugin.pytest_configure(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip without ``--rpc-url``; apply ``--rpc-only``."""
    _plugin.pytest_collection_modifyitems(config, items)
