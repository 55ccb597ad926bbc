"""The one exception base of the device services (DESIGN.md "Errors and bad input").

Errors a handler answers with go through :class:`rpc.errors.HandlerError` (the wire's code and
message); :class:`ServiceError` is for what the services raise to their Python callers.
"""

from __future__ import annotations

__all__ = ["ServiceError"]


class ServiceError(Exception):
    """Base of every error the ``services`` package raises to its callers (a subclass also inherits
    the builtin that matches its meaning, e.g. ``ValueError`` for a bad request)."""
