"""Run ``python -m mgrpc`` as a user does: a subprocess, its stdout, stderr and exit status.

:func:`run_cli` runs one command (environment cleaned of ``MGRPC_*``/``MOS_*``, this checkout first
on ``PYTHONPATH``); :class:`DeviceProc` runs ``mgrpc device`` (or any long-running command that
prints URLs) and stops it with SIGTERM.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ROOT", "CliResult", "DeviceProc", "cli_env", "run_cli"]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: no stray MGRPC_/MOS_ settings, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MGRPC_", "MOS_"))}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("COLUMNS", "120")
    env.update(extra or {})
    return env


@dataclass
class CliResult:
    """What a CLI run produced."""

    rc: int
    out: str
    err: str

    def error_line(self, rc: int = 1) -> str:
        """Assert the run failed with ``rc``, printed nothing on stdout and exactly one ``Error:`` line
        on stderr; return that line."""
        assert self.rc == rc, (self.rc, self.out, self.err)
        assert self.out == "", self.out
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("Error: "), lines[0]
        return lines[0]


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout_s: float = 60.0, stdin: str = "") -> CliResult:
    """Run ``python -m mgrpc ARGV...`` and return its exit status and output."""
    p = subprocess.run(
        [sys.executable, "-m", "mgrpc", *argv], capture_output=True, text=True, timeout=timeout_s,
        env=cli_env(env), cwd=ROOT, input=stdin,
    )  # fmt: skip
    return CliResult(p.returncode, p.stdout, p.stderr)


def _pump(stream: IO[str], q: queue.Queue[str | None], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)
        q.put(line)
    q.put(None)


class DeviceProc:
    """A long-running ``mgrpc`` command (``device``, ``bridge``) whose first stdout lines are URLs."""

    def __init__(self, argv: Sequence[str], *, n_urls: int, env: dict[str, str] | None = None,
                 timeout_s: float = 30.0) -> None:  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mgrpc", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=cli_env(env), cwd=ROOT,
        )  # fmt: skip
        self.out_lines: list[str] = []
        self.err_lines: list[str] = []
        self._out: queue.Queue[str | None] = queue.Queue()
        self._err: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, q, sink in ((self.proc.stdout, self._out, self.out_lines), (self.proc.stderr, self._err, self.err_lines)):
            threading.Thread(target=_pump, args=(stream, q, sink), daemon=True).start()
        self.urls = [self.next_line(timeout_s) for _ in range(n_urls)]

    def next_line(self, timeout_s: float = 30.0) -> str:
        """The next stdout line (fails the test if none comes in time)."""
        try:
            line = self._out.get(timeout=timeout_s)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"no output within {timeout_s} s; stderr: {''.join(self.err_lines)}") from None
        if line is None:
            self.stop()
            raise AssertionError(f"the process ended; stderr: {''.join(self.err_lines)}")
        return line.strip()

    def stop(self) -> int:
        """SIGTERM, then wait (SIGKILL after 10 s); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> DeviceProc:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @classmethod
    def device(cls, state: Path, *listen: str, id: str = "dev1", extra: Sequence[str] = (),
               env: dict[str, str] | None = None) -> DeviceProc:  # fmt: skip
        """``mgrpc device --id ID --state STATE --listen URL...``."""
        argv = ["device", "--id", id, "--state", str(state)]
        for url in listen:
            argv += ["--listen", url]
        return cls([*argv, *extra], n_urls=len(listen), env=env)
