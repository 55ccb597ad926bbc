"""Fleet updates: the dashboard web app (:mod:`services.fleet.app`), its model
(:mod:`services.fleet.model`) and the staged-rollout logic (:mod:`services.fleet.rollout`)."""

from services.fleet.app import FleetApp
from services.fleet.model import BundleInfo, DeviceRecord, FleetDB, FleetError, bundle_info
from services.fleet.rollout import METHODS, InvalidTransition, Job, Rollout

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
