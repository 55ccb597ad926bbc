"""The error tree of the Layer-1 updater.

Every failure carries the spec's message (spec/updater.md, spec/ota.md §8) and a negative result
code, as the device's ``updater_process()`` reports them (``< 0`` = failure).
"""

from __future__ import annotations

__all__ = ["BootError", "BootStateError", "FlashError", "MissingExtra", "PowerCut", "SnapshotError", "UpdaterError"]


class UpdaterError(Exception):
    """An update failed. ``message`` is the device's status text, ``code`` its negative result."""

    def __init__(self, message: str, *, code: int = -1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class FlashError(UpdaterError, OSError):
    """A flash operation the chip would refuse (programming a 0 back to 1, out of range, ...)."""

    def __init__(self, message: str, *, code: int = -11) -> None:
        super().__init__(message, code=code)


class MissingExtra(UpdaterError, ImportError):
    """An optional package is not installed; the message names the extra that brings it."""

    def __init__(self, what: str, package: str, extra: str) -> None:
        super().__init__(f"{what} need the '{package}' package: pip install 'mgrpc[{extra}]'", code=-1)
        self.extra = extra


class PowerCut(Exception):  # an event, not an error: the power went away
    """Raised by the emulated flash when an injected power cut happens; the device is "off"."""


class BootError(UpdaterError):
    """The boot loader found nothing bootable (unprovisioned flash, or both slots' images invalid)."""


class BootStateError(UpdaterError):
    """OTA.SetBootState / GetBootState failure; ``code`` is the spec's -1..-4 (ota.md §1.10)."""


class SnapshotError(UpdaterError):
    """OTA.CreateSnapshot failure with the spec's code and message (ota.md §1.8)."""
