"""Fleet updates: the dashboard web app (:mod:`mgrpc.fleet.app`), its model
(:mod:`mgrpc.fleet.model`) and the staged-rollout logic (:mod:`mgrpc.fleet.rollout`).

The model and the rollout logic need only the standard library; :class:`FleetApp` needs aiohttp
(``pip install 'mgrpc[http]'``) and is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mgrpc.fleet.model import BundleInfo, DeviceRecord, FleetDB, FleetError, bundle_info
from mgrpc.fleet.rollout import METHODS, InvalidTransition, Job, Rollout

if TYPE_CHECKING:
    from mgrpc.fleet.app import FleetApp

__all__ = [
    "METHODS",
    "BundleInfo",
    "DeviceRecord",
    "FleetApp",
    "FleetDB",
    "FleetError",
    "InvalidTransition",
    "Job",
    "Rollout",
    "bundle_info",
]


def __getattr__(name: str) -> Any:
    if name == "FleetApp":
        from mgrpc.fleet.app import FleetApp

        return FleetApp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
