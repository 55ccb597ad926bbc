"""One exception base per package (DESIGN.md "Errors and bad input"): every public exception a
package defines derives from that package's base, so a caller can catch one package's errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

BASES = {
    "rpc": "rpc.errors.MgrpcError",
    "transports": "rpc.errors.MgrpcError",  # transports raise the core's TransportError family
    "services": "services.errors.ServiceError",
    "updater": "updater.errors.UpdaterError",
    "conformance": "conformance.model.ConformanceError",
    "mgrpc": "mgrpc.errors.AppError",
}
# Not errors: the emulated flash's power cut is an event that ends the simulated device's run.
NOT_ERRORS = {"updater.errors.PowerCut"}


def _exceptions(pkg: str) -> list[type[BaseException]]:
    root = importlib.import_module(pkg)
    found = []
    for info in pkgutil.walk_packages(root.__path__, pkg + "."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name
                and not name.startswith("_") and f"{info.name}.{name}" not in NOT_ERRORS
            ):  # fmt: skip
                found.append(obj)
    return found


def _resolve(dotted: str) -> type[BaseException]:
    mod, _, name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    assert issubclass(cls, BaseException)
    return cls


@pytest.mark.parametrize("pkg", sorted(BASES))
def test_every_exception_derives_from_the_package_base(pkg: str) -> None:
    base = _resolve(BASES[pkg])
    found = _exceptions(pkg)
    assert found, f"{pkg} defines no exceptions?"
    bad = [f"{c.__module__}.{c.__qualname__}" for c in found if not issubclass(c, base)]
    assert not bad, f"not derived from {BASES[pkg]}: {bad}"


def test_bad_input_errors_are_also_value_errors() -> None:
    from mgrpc.fleet import FleetError, InvalidTransition
    from services.shadow import ShadowError

    for cls in (ShadowError, FleetError, InvalidTransition):
        assert issubclass(cls, ValueError), cls
