"""What a conformance check is and what it produces: the check registry and result objects.

A check is an ``async def`` taking a :class:`conformance.session.Session`. It passes by returning
(optionally a short note), fails by raising :class:`CheckFailed` with what was *seen* and what was
*expected*, and is skipped by raising :class:`CheckSkipped` (not applicable to this transport, needs
an option that was not given, ...). Any other exception is an *error* of the check.

Every check names the spec section it enforces, so a failure report points at the rule.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conformance.session import Session

__all__ = [
    "CHECKS",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "CheckSpec",
    "ConformanceError",
    "Outcome",
    "check",
    "checks_for",
    "citations",
    "cite",
    "expect",
    "groups",
]

PROTOCOL_DOCS = "docs/protocol"

CheckFunc = Callable[["Session"], Awaitable[str | None]]


class ConformanceError(Exception):
    """Base of the exceptions of the conformance package."""


class CheckFailed(ConformanceError, AssertionError):
    """The peer broke the rule a check enforces; ``seen`` and ``expected`` say how."""

    def __init__(self, message: str, *, seen: Any = "", expected: Any = "", sent: Any = "") -> None:
        super().__init__(message)
        self.message = message
        self.seen = _text(seen)
        self.expected = _text(expected)
        self.sent = _text(sent)


class CheckSkipped(ConformanceError):
    """The check does not apply (transport, missing option, feature the device lacks)."""


def citations(section: str) -> list[tuple[str, str]]:
    """The (file, section) pairs a ``section`` string cites: ``"frames.md §1.2, §9; tool.md §4"`` ->
    ``[("frames.md", "1.2"), ("frames.md", "9"), ("tool.md", "4")]``; ranges give both ends, real-device
    observations their id (``("real-device.md", "RD-S7")``). Files are in :data:`PROTOCOL_DOCS`."""
    import re

    out: list[tuple[str, str]] = []
    current = ""
    for part in section.split(";"):
        m = re.match(r"\s*([a-z][\w-]*\.md)\b", part)
        if m:
            current = m.group(1)
        for num in re.findall(r"§(\d+(?:\.\d+)*)", part):
            out.append((current, num))
        for rd in re.findall(r"\bRD-[A-Z]\d+\b", part):
            out.append((current, rd))
    return out


def cite(section: str) -> str:
    """A section citation as repository paths: ``frames.md §1.2`` -> ``docs/protocol/frames.md §1.2``."""
    import re

    return re.sub(r"(?<![\w/.-])([a-z][\w-]*\.md)", PROTOCOL_DOCS + r"/\1", section)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value if isinstance(value, str) else repr(value)


def expect(condition: bool, message: str, *, seen: Any = "", expected: Any = "", sent: Any = "") -> None:
    """Raise :class:`CheckFailed` unless ``condition`` holds (``sent``: what provoked it, if not the
    last frame the session sent)."""
    if not condition:
        raise CheckFailed(message, seen=seen, expected=expected, sent=sent)


class Outcome(enum.StrEnum):
    """Result of one check."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """A registered check.

    ``name`` is ``<group>.<short name>``; ``section`` the spec section (``frames.md §1.2``);
    ``destructive`` checks (OTA, reboot, config writes) only run when asked for; ``only_schemes``
    limits a check to some URL schemes, ``not_schemes`` excludes some. ``needs`` names the methods
    the check calls: when the device's ``RPC.List`` lacks one, the check is skipped ("not offered").
    ``upsets``: the check sends what may leave the device or its channel in a bad state (oversized
    frames, junk), so the runner reconnects and waits for the device to answer before the next one.
    ``budget`` scales the check's deadline (a multiple of the per-check deadline).
    """

    name: str
    group: str
    section: str
    title: str
    func: CheckFunc
    destructive: bool = False
    only_schemes: frozenset[str] = frozenset()
    not_schemes: frozenset[str] = frozenset()
    order: int = 0
    needs: frozenset[str] = frozenset()
    upsets: bool = False
    budget: float = 1.0

    def applies_to(self, scheme: str) -> bool:
        """True if the check is meaningful over ``scheme``."""
        if self.only_schemes and scheme not in self.only_schemes:
            return False
        return scheme not in self.not_schemes


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What one check found. ``seen``/``expected`` are filled for failures (and notes for passes)."""

    name: str
    group: str
    section: str
    title: str
    outcome: Outcome
    message: str = ""
    seen: str = ""
    expected: str = ""
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    sent: str = ""

    @property
    def ok(self) -> bool:
        """Passed or skipped (a skip does not make a run fail)."""
        return self.outcome in (Outcome.PASS, Outcome.SKIP)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the JSON report."""
        return {
            "name": self.name,
            "group": self.group,
            "section": self.section,
            "title": self.title,
            "outcome": self.outcome.value,
            "message": self.message,
            "seen": self.seen,
            "expected": self.expected,
            "sent": self.sent,
            "duration_s": round(self.duration_s, 4),
        }


CHECKS: dict[str, CheckSpec] = {}
_counter = 0

# Run order of the groups: cheap, non-destructive wire checks first, reboots (OTA) last.
# serial first: its link modes are sticky, and the newline-style check wants a device not yet in compat mode.
GROUP_ORDER = (
    "serial", "tcp", "frame", "rpc", "sys", "config", "auth", "ws", "http", "jsonrpc", "mqtt", "ble", "ota", "client",
)  # fmt: skip


def _run_key(spec: CheckSpec) -> tuple[int, int]:
    g = GROUP_ORDER.index(spec.group) if spec.group in GROUP_ORDER else len(GROUP_ORDER)
    return g, spec.order


def check(
    name: str,
    *,
    section: str,
    title: str,
    destructive: bool = False,
    only: Iterable[str] = (),
    not_on: Iterable[str] = (),
    needs: Iterable[str] = (),
    upsets: bool = False,
    budget: float = 1.0,
) -> Callable[[CheckFunc], CheckFunc]:
    """Register a check function under ``name`` (``group.short``), in definition order.

    See :class:`CheckSpec` for ``needs`` (methods that must be in ``RPC.List``), ``upsets`` and
    ``budget``.
    """

    def deco(func: CheckFunc) -> CheckFunc:
        global _counter
        if name in CHECKS:
            raise ConformanceError(f"check {name!r} registered twice")
        group = name.split(".", 1)[0]
        _counter += 1
        CHECKS[name] = CheckSpec(
            name,
            group,
            section,
            title,
            func,
            destructive,
            frozenset(only),
            frozenset(not_on),
            _counter,
            frozenset(needs),
            upsets,
            budget,
        )
        return func

    return deco


def groups() -> list[str]:
    """Names of all check groups, in registration order."""
    seen: dict[str, None] = {}
    for spec in sorted(CHECKS.values(), key=_run_key):
        seen.setdefault(spec.group, None)
    return list(seen)


def checks_for(selected: Iterable[str] | None = None) -> list[CheckSpec]:
    """Checks in run order; ``selected`` names groups or single checks (None = all)."""
    specs = sorted(CHECKS.values(), key=_run_key)
    if not selected:
        return specs
    wanted = set(selected)
    unknown = {w for w in wanted if w not in CHECKS and w not in {s.group for s in specs}}
    if unknown:
        raise ConformanceError(
            f"unknown check group(s) {', '.join(sorted(unknown))}; valid groups: {', '.join(groups())}"
        )
    return [s for s in specs if s.group in wanted or s.name in wanted]
