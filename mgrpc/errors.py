"""The one exception base of the application (DESIGN.md "Errors and bad input")."""

from __future__ import annotations

__all__ = ["AppError"]


class AppError(Exception):
    """Base of every error the ``mgrpc`` application raises (the fleet dashboard, the shadow server, ...);
    a subclass also inherits the builtin that matches its meaning, e.g. ``ValueError`` for bad input."""
