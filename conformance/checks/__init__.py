"""The check groups; importing this package registers every check in run order."""

from conformance.checks import auth, frame, rpcsvc

__all__ = ["auth", "frame", "rpcsvc"]
