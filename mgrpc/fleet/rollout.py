"""Rollout logic, sans-I/O: per-device job state machine and the staged rollout that drives it.

A :class:`Job` is one device's update in a rollout. Its legal moves are the :data:`TRANSITIONS`
table; an unknown move raises :class:`InvalidTransition` (callers ask :meth:`Job.can` first when an
event may be stale, e.g. a progress message arriving after the result).

A :class:`Rollout` updates ``stage_size`` devices first (0 = all at once); when they have all
finished it stops, skipping the rest, if more than ``max_failures`` of them failed or rolled back;
otherwise it goes on with the others, still stopping as soon as the failures exceed
``max_failures``. ``concurrency`` bounds the jobs between start and result (0 = no bound).

The operator may :meth:`Rollout.pause` (no job starts; those under way go on), :meth:`Rollout.resume`
and :meth:`Rollout.abort` (queued jobs are skipped; a running rollout never restarts).
Rollout states: ``running``, ``paused``, ``halted`` (too many failures), ``aborted``, ``finished``.
A :class:`Rollout` built from bad input (an unknown method, no devices, ...) raises
:class:`~mgrpc.fleet.errors.FleetError`; :class:`InvalidTransition` is a FleetError too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mgrpc.fleet.errors import FleetError

__all__ = [
    "FAILED_STATES",
    "METHODS",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "InvalidTransition",
    "Job",
    "Rollout",
]

METHODS = ("push", "url", "shadow", "poll")

# (state, event) -> new state.
#   start     the dashboard began the job (push/url call sent, shadow desired set, poll assigned)
#   progress  the device reported download/write progress
#   applied   the update was applied; the device reboots into it
#   online_new / online_old   the device is online running the target / another version
#   committed the device runs the target version committed
#   error     the device or the transport reported a failure
#   timeout   no result in time
#   skip      the rollout stopped before this job started
#   abort     the operator aborted the rollout while the device had not begun (shadow/poll waiting)
#   requeue   the worker that started the job stopped before the device began: another starts it
TRANSITIONS: dict[tuple[str, str], str] = {
    ("queued", "start"): "sending",
    ("queued", "skip"): "skipped",
    ("sending", "progress"): "updating",
    ("sending", "applied"): "rebooting",
    ("sending", "online_new"): "committing",
    ("sending", "committed"): "done",
    ("sending", "error"): "failed",
    ("sending", "timeout"): "failed",
    ("updating", "progress"): "updating",
    ("updating", "applied"): "rebooting",
    ("updating", "online_new"): "committing",
    ("updating", "error"): "failed",
    ("updating", "timeout"): "failed",
    ("rebooting", "progress"): "rebooting",
    ("rebooting", "online_new"): "committing",
    ("rebooting", "committed"): "done",
    ("rebooting", "online_old"): "rolled_back",
    ("rebooting", "error"): "failed",
    ("rebooting", "timeout"): "failed",
    ("committing", "committed"): "done",
    ("committing", "online_new"): "committing",
    ("committing", "online_old"): "rolled_back",
    ("committing", "uncommitted_ok"): "done",
    ("committing", "error"): "failed",
    ("committing", "timeout"): "failed",
    ("done", "online_old"): "rolled_back",  # left uncommitted and the commit timeout reverted it
    ("sending", "abort"): "skipped",  # the operator aborted before the device took the update
    ("sending", "requeue"): "queued",  # the worker that started it died before the device took it
}

TERMINAL_STATES = frozenset({"done", "failed", "rolled_back", "skipped"})
FAILED_STATES = frozenset({"failed", "rolled_back"})


class InvalidTransition(FleetError):
    """A job or a rollout was asked to make a move its rules do not allow."""


@dataclass
class Job:
    """One device's update within a rollout."""

    device: str
    state: str = "queued"
    done_bytes: int = 0
    total_bytes: int | None = None
    message: str = ""
    error: str = ""
    started_at: float = 0.0
    changed_at: float = field(default_factory=time.time)
    result_version: str = ""
    applied_boots: int = -1  # the device's boot counter when the update was applied
    owner: str = ""  # the worker (dashboard process) that started it

    def can(self, event: str) -> bool:
        """Whether ``event`` is a legal move now."""
        return (self.state, event) in TRANSITIONS

    def fire(self, event: str, *, now: float | None = None) -> str:
        """Make the move; returns the new state (raises :class:`InvalidTransition`)."""
        try:
            new = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidTransition(f"job {self.device}: no move {event!r} from {self.state!r}") from None
        t = time.time() if now is None else now
        if self.state == "queued":
            self.started_at = t
        if new != self.state:
            self.changed_at = t
        self.state = new
        return new

    @property
    def terminal(self) -> bool:
        """Finished (successfully or not)."""
        return self.state in TERMINAL_STATES

    @property
    def percent(self) -> int:
        """Progress of the transfer in percent (100 once applied)."""
        if self.state in ("rebooting", "committing", "done", "rolled_back"):
            return 100
        if self.total_bytes:
            return min(100, int(self.done_bytes * 100 / self.total_bytes))
        return 0

    def to_json(self) -> dict[str, Any]:
        """For the dashboard and the database."""
        return {
            "device": self.device, "state": self.state, "done": self.done_bytes, "total": self.total_bytes,
            "percent": self.percent, "message": self.message, "error": self.error,
            "started_at": self.started_at, "changed_at": self.changed_at, "result_version": self.result_version,
            "applied_boots": self.applied_boots, "owner": self.owner,
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Job:
        """Inverse of :meth:`to_json`."""
        return cls(device=obj["device"], state=obj.get("state", "queued"), done_bytes=obj.get("done", 0),
                   total_bytes=obj.get("total"), message=obj.get("message", ""), error=obj.get("error", ""),
                   started_at=obj.get("started_at", 0.0), changed_at=obj.get("changed_at", 0.0),
                   result_version=obj.get("result_version", ""),
                   applied_boots=obj.get("applied_boots", -1), owner=obj.get("owner", ""))  # fmt: skip


@dataclass
class Rollout:
    """A bundle going to a set of devices by one method, possibly staged."""

    id: str
    bundle: str
    version: str
    method: str
    devices: list[str]
    commit_timeout_s: int = 300
    autocommit: bool = True
    stage_size: int = 0
    max_failures: int = -1  # -1: never stop
    concurrency: int = 0
    state: str = "running"  # running, paused, halted, aborted, finished
    created_at: float = field(default_factory=time.time)
    jobs: dict[str, Job] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FleetError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.stage_size < 0:
            raise FleetError("stage_size must be >= 0")
        if not self.devices:
            raise FleetError("no devices selected")
        if len(set(self.devices)) != len(self.devices):
            raise FleetError("a device is selected twice")
        for d in self.devices:
            self.jobs.setdefault(d, Job(d))

    def _count(self, states: Iterable[str], ids: Iterable[str] | None = None) -> int:
        st = set(states)
        return sum(1 for d in (self.devices if ids is None else ids) if self.jobs[d].state in st)

    @property
    def failures(self) -> int:
        """Jobs that failed or rolled back."""
        return self._count(FAILED_STATES)

    def _too_many_failures(self) -> bool:
        return self.max_failures >= 0 and self.failures > self.max_failures

    def startable(self) -> list[str]:
        """Devices whose jobs may start now (and settle halting/finishing); call after every event."""
        if self.state != "running":
            return []
        if self._too_many_failures():
            self._halt()
            return []
        first = self.devices[: self.stage_size] if self.stage_size else self.devices
        queued_first = [d for d in first if self.jobs[d].state == "queued"]
        pool = queued_first
        if not queued_first and self.stage_size:
            if any(not self.jobs[d].terminal for d in first):
                return []  # the first stage is still running
            pool = [d for d in self.devices if self.jobs[d].state == "queued"]
        if not pool:
            if all(j.terminal for j in self.jobs.values()):
                self.state = "finished"
            return []
        if self.concurrency > 0:
            active = sum(1 for j in self.jobs.values() if j.state != "queued" and not j.terminal)
            pool = pool[: max(0, self.concurrency - active)]
        return pool

    def _halt(self, state: str = "halted", message: str = "") -> None:
        self.state = state
        for j in self.jobs.values():
            if j.state == "queued":
                j.fire("skip")
                j.message = message or "not started: the rollout halted (too many failures)"

    def pause(self) -> None:
        """Start no more jobs until :meth:`resume` (those under way go on); InvalidTransition if not running."""
        if self.state != "running":
            raise InvalidTransition(f"rollout {self.id} is {self.state}, not running: it cannot be paused")
        self.state = "paused"

    def resume(self) -> None:
        """Go on after :meth:`pause`."""
        if self.state != "paused":
            raise InvalidTransition(f"rollout {self.id} is {self.state}, not paused: it cannot be resumed")
        self.state = "running"

    def abort(self) -> list[str]:
        """Stop for good: queued jobs are skipped; returns the devices whose started jobs the caller
        should abort if the device has not begun (state ``sending``)."""
        if self.state in ("finished", "aborted", "halted"):
            raise InvalidTransition(f"rollout {self.id} is already {self.state}")
        self._halt("aborted", "not started: the operator aborted the rollout")
        return [d for d in self.devices if self.jobs[d].state == "sending"]

    @property
    def settled(self) -> bool:
        """No job is between start and result any more."""
        return all(j.terminal or j.state == "queued" for j in self.jobs.values())

    def summary(self) -> dict[str, int]:
        """Job count per state."""
        out: dict[str, int] = {}
        for j in self.jobs.values():
            out[j.state] = out.get(j.state, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        """For the dashboard and the database."""
        return {
            "id": self.id, "bundle": self.bundle, "version": self.version, "method": self.method,
            "devices": self.devices, "commit_timeout": self.commit_timeout_s, "autocommit": self.autocommit,
            "stage_size": self.stage_size, "max_failures": self.max_failures, "concurrency": self.concurrency,
            "state": self.state, "created_at": self.created_at, "failures": self.failures,
            "summary": self.summary(), "jobs": {d: j.to_json() for d, j in self.jobs.items()},
        }  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Rollout:
        """Inverse of :meth:`to_json`."""
        r = cls(id=obj["id"], bundle=obj["bundle"], version=obj.get("version", ""), method=obj["method"],
                devices=list(obj["devices"]), commit_timeout_s=obj.get("commit_timeout", 300),
                autocommit=obj.get("autocommit", True), stage_size=obj.get("stage_size", 0),
                max_failures=obj.get("max_failures", -1), concurrency=obj.get("concurrency", 0),
                state=obj.get("state", "running"), created_at=obj.get("created_at", 0.0))  # fmt: skip
        for d, j in (obj.get("jobs") or {}).items():
            r.jobs[d] = Job.from_json(j)
        return r
