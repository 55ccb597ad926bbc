"""The fleet's error type, in a module of its own so that both :mod:`mgrpc.fleet.rollout` and
:mod:`mgrpc.fleet.model` (which imports the rollout logic) can raise it without an import cycle."""

from __future__ import annotations

from mgrpc.errors import AppError

__all__ = ["FleetError"]


class FleetError(AppError, ValueError):
    """Bad input to the fleet (a bundle that is not a fw.zip, an unknown device or bundle, a rollout
    without devices, ...)."""
