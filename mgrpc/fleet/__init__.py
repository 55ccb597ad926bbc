"""Fleet updates: the dashboard web app (:mod:`mgrpc.fleet.app`), its model
(:mod:`mgrpc.fleet.model`) and the staged-rollout logic (:mod:`mgrpc.fleet.rollout`)."""

from mgrpc.fleet.app import FleetApp
from mgrpc.fleet.model import BundleInfo, DeviceRecord, FleetDB, FleetError, bundle_info
from mgrpc.fleet.rollout import METHODS, InvalidTransition, Job, Rollout

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
