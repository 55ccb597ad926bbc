"""The mgRPC wire-conformance suite: check any device (by URL) or host tool against ``docs/protocol/``.

``await run(url, options=Options(...), only=[...])`` returns a :class:`Report`; the CLI is
``mgrpc conformance``; the pytest plugin is :mod:`conformance.plugin`. See ``README.md``.
"""

from conformance.model import CHECKS, CheckFailed, CheckResult, CheckSkipped, ConformanceError, Outcome
from conformance.runner import Report, run, to_json, to_junit_xml
from conformance.session import Options

__all__ = [
    "CHECKS",
    "CheckFailed",
    "CheckResult",
    "CheckSkipped",
    "ConformanceError",
    "Options",
    "Outcome",
    "Report",
    "run",
    "to_json",
    "to_junit_xml",
]
