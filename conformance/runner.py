"""Runs selected checks against a device URL and returns result objects (no printing).

Reports: :func:`to_json` and :func:`to_junit_xml` turn a :class:`Report` into text; the CLI prints
the table and writes the files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import conformance.checks  # noqa: F401  (registers the checks)
from conformance.model import (
    CheckFailed,
    CheckResult,
    CheckSkipped,
    CheckSpec,
    Outcome,
    checks_for,
    cite,
)
from conformance.session import Options, PreflightError, Session
from rpc.errors import MgrpcError

__all__ = [
    "PREFLIGHT_SECTION",
    "FailedChecks",
    "Report",
    "check_deadline",
    "run",
    "run_check",
    "to_json",
    "to_junit_xml",
]

log = logging.getLogger("mgrpc.conformance")

PREFLIGHT_SECTION = "transports.md §0; frames.md §4, §6"


def _describe(r: CheckResult) -> str:
    line = f"{r.name} ({r.section}, {r.outcome.value}): {r.message or r.title}"
    if r.seen or r.expected:
        line += f"\n    seen:     {r.seen}\n    expected: {r.expected}"
    return line


class FailedChecks(list[CheckResult]):
    """The failed and errored results; printed (``repr``/``str``) as one readable line per check, so
    ``assert report.ok, report.failed()`` says what failed instead of dumping dataclass reprs."""

    def __repr__(self) -> str:
        if not self:
            return "no check failed"
        head = f"{len(self)} check{'s' if len(self) != 1 else ''} failed:"
        return "\n".join([head, *(f"  {_describe(r)}" for r in self)])

    __str__ = __repr__


@dataclass(frozen=True, slots=True, repr=False)
class Report:
    """The results of one run, in run order (its ``repr`` is a one-line summary, for test output)."""

    target: str
    results: tuple[CheckResult, ...]
    duration_s: float = 0.0
    kind: str = "device"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no selected check failed or errored (skips are fine)."""
        return all(r.ok for r in self.results)

    def count(self, outcome: Outcome) -> int:
        """How many results have ``outcome``."""
        return sum(1 for r in self.results if r.outcome is outcome)

    def __repr__(self) -> str:
        counts = ", ".join(f"{self.count(o)} {o.value}" for o in Outcome if self.count(o))
        return f"<Report {self.target}: {len(self.results)} checks ({counts or 'none'})>"

    def failed(self) -> FailedChecks:
        """Failed and errored results (a list whose text is a readable summary)."""
        return FailedChecks(r for r in self.results if not r.ok)

    def by_name(self) -> dict[str, CheckResult]:
        """Results keyed by check name."""
        return {r.name: r for r in self.results}


def _result(spec: CheckSpec, outcome: Outcome, t0: float, **kw: Any) -> CheckResult:
    return CheckResult(spec.name, spec.group, spec.section, spec.title, outcome, duration_s=time.monotonic() - t0, **kw)


def check_deadline(spec: CheckSpec, options: Options) -> float:
    """The deadline of one check: the per-check deadline times its budget; reboots get their own time."""
    base = options.check_deadline_s * spec.budget
    if spec.destructive:
        base += 3 * options.reboot_timeout_s
    return base


async def run_check(spec: CheckSpec, session: Session, *, timeout_s: float | None = None) -> CheckResult:
    """Run one check and turn its ending into a :class:`CheckResult`.

    ``timeout_s`` (default :func:`check_deadline`) bounds it: a check still waiting then FAILs with
    "no answer within N s" (silence is a verdict, not a hang).
    """
    t0 = time.monotonic()
    limit = check_deadline(spec, session.options) if timeout_s is None else timeout_s
    if spec.destructive and not session.options.destructive:
        return _result(
            spec,
            Outcome.SKIP,
            t0,
            message="destructive; run with --destructive (or --ota/--ota-generate) to include it",
        )
    if not spec.applies_to(session.scheme):
        return _result(spec, Outcome.SKIP, t0, message=f"not applicable over {session.scheme}://")
    missing = sorted(m for m in spec.needs if not session.offers(m))
    if missing:
        return _result(
            spec, Outcome.SKIP, t0, message=f"not offered: {', '.join(missing)} is not in the device's RPC.List"
        )
    session.begin_check()
    try:
        note = await asyncio.wait_for(spec.func(session), limit)
    except CheckFailed as e:
        return _result(
            spec,
            Outcome.FAIL,
            t0,
            message=e.message,
            seen=e.seen,
            expected=e.expected,
            sent=e.sent or session.sent_text(),
        )
    except CheckSkipped as e:
        return _result(spec, Outcome.SKIP, t0, message=str(e))
    except TimeoutError:
        return _result(
            spec,
            Outcome.FAIL,
            t0,
            message=f"no answer within {limit:g} s (the check's deadline)",
            seen="no answer",
            expected="an answer (or a clear refusal) in time",
            sent=session.sent_text(),
        )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # Something inside a transport was cancelled (not this run): an error of this check only.
        return _result(spec, Outcome.ERROR, t0, message="an operation was cancelled inside the transport")
    except Exception as e:
        log.debug("check %s raised", spec.name, exc_info=True)
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return _result(spec, Outcome.ERROR, t0, message=tb, sent=session.sent_text())
    return _result(spec, Outcome.PASS, t0, message=note or "")


def _preflight_result(url: str, outcome: Outcome, message: str) -> CheckResult:
    return CheckResult("preflight", "preflight", PREFLIGHT_SECTION, "open the port; RPC.List", outcome, message)


async def run(
    url: str,
    *,
    options: Options | None = None,
    only: Iterable[str] | None = None,
    check_timeout_s: float | None = None,
) -> Report:
    """Run the device checks (``only``: group or check names) against ``url``.

    One preflight first opens the port and reads ``RPC.List`` (checks of methods not listed SKIP);
    a 401 without ``--rpc-creds`` or a silent device stops the run with one clear result. Each check
    has its own deadline (``check_timeout_s`` overrides :func:`check_deadline`), the run
    ``options.deadline_s``; checks that may upset the device are followed by a reconnect.
    """
    t0 = time.monotonic()
    specs = [s for s in checks_for(list(only) if only else None) if s.group != "client"]
    session = Session(url, options)
    opts = session.options
    end = None if opts.deadline_s is None else t0 + opts.deadline_s
    results: list[CheckResult] = []
    meta: dict[str, Any] = {}
    try:
        try:
            pre = session.preflight()
            meta["preflight"] = await (asyncio.wait_for(pre, opts.deadline_s) if opts.deadline_s else pre)
        except PreflightError as e:
            results.append(_preflight_result(url, Outcome.FAIL, str(e)))
            return Report(url, tuple(results), time.monotonic() - t0, meta=meta)
        except (MgrpcError, OSError) as e:
            # Nothing can be checked; one clear error instead of one per check.
            msg = f"cannot open {url}: {e}"
            results.append(CheckResult("connect", "connect", PREFLIGHT_SECTION, "open the port", Outcome.ERROR, msg))
            return Report(url, tuple(results), time.monotonic() - t0, meta=meta)
        for spec in specs:
            limit = check_timeout_s if check_timeout_s is not None else check_deadline(spec, opts)
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    results.append(
                        CheckResult(
                            spec.name,
                            spec.group,
                            spec.section,
                            spec.title,
                            Outcome.ERROR,
                            f"not run: the run's deadline ({opts.deadline_s:g} s, --deadline) had passed",
                        )
                    )
                    continue
                limit = min(limit, left)
            result = await run_check(spec, session, timeout_s=limit)
            results.append(result)
            if result.outcome in (Outcome.PASS, Outcome.FAIL, Outcome.ERROR) and (
                spec.upsets or result.outcome is not Outcome.PASS
            ):
                await _recover(session)
    finally:
        await session.close()
    return Report(url, tuple(results), time.monotonic() - t0, meta=meta)


async def _recover(session: Session) -> None:
    """Reconnect and wait until the device answers again (bounded; a dead device fails later checks)."""
    try:
        await session.recover()
    except (CheckFailed, MgrpcError, OSError) as e:
        log.info("device did not answer after the check: %s", e)


def to_json(report: Report) -> str:
    """The report as a JSON document (summary plus one object per check)."""
    doc = {
        "target": report.target,
        "kind": report.kind,
        "ok": report.ok,
        "duration_s": round(report.duration_s, 3),
        "summary": {o.value: report.count(o) for o in Outcome},
        "results": [r.to_json() for r in report.results],
        **({"meta": report.meta} if report.meta else {}),
    }
    return json.dumps(doc, indent=2) + "\n"


def to_junit_xml(report: Report) -> str:
    """The report as JUnit XML: one ``testsuite`` per check group, one ``testcase`` per check."""
    root = ET.Element("testsuites", name=f"mgrpc conformance {report.kind}: {report.target}")
    by_group: dict[str, list[CheckResult]] = {}
    for r in report.results:
        by_group.setdefault(r.group, []).append(r)
    for group, results in by_group.items():
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"conformance.{group}",
            tests=str(len(results)),
            failures=str(sum(r.outcome is Outcome.FAIL for r in results)),
            errors=str(sum(r.outcome is Outcome.ERROR for r in results)),
            skipped=str(sum(r.outcome is Outcome.SKIP for r in results)),
            time=f"{sum(r.duration_s for r in results):.3f}",
        )
        for r in results:
            case = ET.SubElement(
                suite, "testcase", classname=f"conformance.{group}", name=r.name, time=f"{r.duration_s:.3f}"
            )
            props = ET.SubElement(case, "properties")
            ET.SubElement(props, "property", name="section", value=cite(r.section))
            detail = f"{r.message}\nsent: {r.sent}\nseen: {r.seen}\nexpected: {r.expected}\nspec: {cite(r.section)}"
            if r.outcome is Outcome.FAIL:
                ET.SubElement(case, "failure", message=r.message).text = detail
            elif r.outcome is Outcome.ERROR:
                ET.SubElement(case, "error", message=r.message).text = detail
            elif r.outcome is Outcome.SKIP:
                ET.SubElement(case, "skipped", message=r.message)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
