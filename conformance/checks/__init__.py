"""The check groups; importing this package registers every check (run order: model.GROUP_ORDER)."""

from conformance.checks import auth, frame, ota, rpcsvc, stream

__all__ = ["auth", "frame", "ota", "rpcsvc", "stream"]
