"""Makes ``pytest --pyargs conformance --rpc-url URL`` work: the plugin's hooks and fixtures."""

from conformance.plugin import (  # noqa: F401  (pytest finds hooks and fixtures by name)
    mgrpc_conformance,
    mgrpc_conformance_runner,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
)
