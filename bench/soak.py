"""Reliability soak (run: ``make soak`` or ``.venv/bin/python bench/soak.py [--scale S] [--only a,b]``).

Sections, each printing its figures against the goal of issue #14 (the goal scales with ``--scale``):

* ``powercut``: 10,000 power cuts (plain, torn keeping old bytes, torn with random bytes) at seeded
  random flash operations across whole device lives: updates, commits, reverts, snapshots, config
  saves, file writes, first-boot merges (``bench/soaklib/powercut.py``). Prints tried / recovered / lost.
* ``fuzz``: 1,000,000 generated or mutated inputs through each decoder (serial, tcp, ws/http body,
  mqtt payload, ble writes, msgpack) and through the router of a virtual device
  (``bench/soaklib/fuzz.py``). Prints inputs / uncaught / hangs per target.
* ``bundles``: 100,000 malformed fw.zip bundles through the updater (``bench/soaklib/bundles.py``).
* ``kill9``: 100 runs of ``mgrpc ota`` against a virtual device process that is killed with SIGKILL at
  a random moment and restarted, over ws, tcp, serial (pty) and mqtt (``bench/soaklib/kill9.py``).
* ``listeners``: every listener of a virtual device process (tcp, udp, ws, http, serial, mqtt, ble)
  abused in turn -- idle connections, slowloris heads, oversized frames, invalid UTF-8, floods beyond
  ``max_queue_length``, peers that never read -- while a well-behaved client keeps calling
  (``bench/soaklib/listeners.py``). Prints per listener what was applied, the client's latency under
  abuse against its own baseline, the sockets held against the limit, and the device's memory.

The work is spread over ``--jobs`` processes (default: the CPU count). Exit status 1 on any loss,
uncaught exception, hang, bricked device, or if a section did not reach its goal.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# bench/ itself must not shadow the packages (bench/updater.py vs the updater package)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

GOALS = {"powercut": 10_000, "fuzz": 1_000_000, "bundles": 100_000, "kill9": 100, "listeners": 40_000}
SECTIONS = list(GOALS)


def _cpu_s() -> float:
    """CPU seconds used so far by this process, the children it has waited for (devices and clients
    of the kill -9 section) and the pool's workers (alive until the end: read from /proc)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + _worker_cpu_s()


_POOL_PIDS: list[int] = []


def _worker_cpu_s() -> float:
    total = 0.0
    for pid in _POOL_PIDS:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _init_worker() -> None:
    # The code under test logs every refused input; keep errors for the router's exception check,
    # but print nothing (a handler on the root logger stops logging's last-resort stderr output).
    logging.disable(logging.WARNING)
    logging.getLogger().addHandler(logging.NullHandler())


def _powercut_job(args: tuple[int, int]) -> Any:
    from bench.soaklib.powercut import run_cuts

    return run_cuts(*args)


def _fuzz_job(args: tuple[str, int, int]) -> Any:
    from bench.soaklib.fuzz import run_target

    return run_target(*args)


def _bundle_job(args: tuple[int, int]) -> Any:
    from bench.soaklib.bundles import run_bundles

    return run_bundles(*args)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts) if base + (i < extra) > 0]


def _pieces(total: int, jobs: int, *, at_most: int) -> list[int]:
    """Work pieces: at least one per job, none larger than ``at_most`` (so the pool balances)."""
    n = max(jobs, -(-total // at_most))
    return _split(total, n)


class Soak:
    """Runs the sections and keeps the verdict."""

    def __init__(self, scale: float, jobs: int, seed: int) -> None:
        self.scale = scale
        self.jobs = jobs
        self.seed = seed
        self.failed: list[str] = []
        self.pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_init_worker)
        workers = getattr(self.pool, "_pool", [])  # multiprocessing keeps its processes there
        _POOL_PIDS[:] = [p.pid for p in workers if p.pid is not None]  # for the CPU figures

    def goal(self, section: str) -> int:
        return max(1, round(GOALS[section] * self.scale))

    def verdict(self, ok: bool, what: str) -> None:
        if not ok:
            self.failed.append(what)

    def show_failures(self, failures: list[str], limit: int = 8) -> None:
        for f in failures[:limit]:
            print(f"    ! {f[:600]}")
        if len(failures) > limit:
            print(f"    ! ... and {len(failures) - limit} more")

    # -- sections ------------------------------------------------------------------------------------

    def powercut(self) -> None:
        from bench.soaklib.powercut import PowerCutResult

        goal = self.goal("powercut")
        pieces = _pieces(goal, self.jobs, at_most=500)
        total = PowerCutResult()
        for res in self.pool.imap_unordered(_powercut_job, [(self.seed * 1000 + i, n) for i, n in enumerate(pieces)]):
            total.add(res)
        modes = ", ".join(f"{k} {v}" for k, v in sorted(total.by_mode.items()))
        steps = ", ".join(f"{k} {v}" for k, v in sorted(total.by_step.items()))
        print(f"  power cuts: tried {total.tried} (goal {goal}), recovered {total.recovered}, lost {total.lost}")
        print(f"    by mode: {modes}")
        print(f"    by step: {steps}")
        self.show_failures(total.failures)
        self.verdict(total.lost == 0 and total.tried >= goal, "power cuts")

    def fuzz(self) -> None:
        from bench.soaklib.fuzz import TARGETS, FuzzResult

        goal = self.goal("fuzz")
        work = [
            (name, self.seed * 1000 + i, n)
            for name in TARGETS
            for i, n in enumerate(_pieces(goal, self.jobs, at_most=100_000))
        ]
        totals = {name: FuzzResult(name) for name in TARGETS}
        for res in self.pool.imap_unordered(_fuzz_job, work):
            totals[res.target].add(res)
        for name, r in totals.items():
            after = f", afterwards: {r.after}" if r.after else (", afterwards: ping answered, running slot untouched"
                                                                if name == "router" else "")  # fmt: skip
            print(f"  fuzz {name:8s}: inputs {r.inputs} (goal {goal}), uncaught {r.uncaught}, hangs {r.hangs}, "
                  f"slowest {r.slowest_s * 1000:.1f} ms{after}")  # fmt: skip
            self.show_failures(r.failures)
            self.verdict(r.uncaught == 0 and r.hangs == 0 and not r.after and r.inputs >= goal, f"fuzz {name}")

    def bundles(self) -> None:
        from bench.soaklib.bundles import BundleResult

        goal = self.goal("bundles")
        total = BundleResult()
        pieces = _pieces(goal, self.jobs, at_most=10_000)
        for res in self.pool.imap_unordered(_bundle_job, [(self.seed * 1000 + i, n) for i, n in enumerate(pieces)]):
            total.add(res)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(total.by_kind.items()))
        print(f"  malformed bundles: tried {total.tried} (goal {goal}), refused {total.refused}, "
              f"accepted as harmless {total.accepted}, uncaught {total.uncaught}, hangs {total.hangs}, "
              f"running slot or boot config written {total.running_written}, "
              f"boot checks {total.boot_checks} failed {total.boot_failures}, "
              f"slowest {total.slowest_s * 1000:.0f} ms")  # fmt: skip
        print(f"    by kind: {kinds}")
        self.show_failures(total.failures)
        self.verdict(total.bad == 0 and total.tried >= goal, "bundles")

    def kill9(self) -> None:
        from bench.soaklib.kill9 import run_kill9

        goal = self.goal("kill9")
        res = run_kill9(goal, seed=self.seed, parallel=self.jobs)
        per = ", ".join(f"{k} {v}" for k, v in sorted(res.by_transport.items()))
        print(f"  kill -9: runs {res.runs} (goal {goal}), completed {res.completed}, left on committed firmware "
              f"{res.kept_old}, bricked {res.bricked}")  # fmt: skip
        phases = ", ".join(f"{k} {v}" for k, v in sorted(res.by_phase.items()))
        print(f"    killed after: {phases}")
        print(f"    by transport: {per}; kills {res.kills} ({res.kills_mid_update} while mgrpc ota ran), "
              f"mgrpc ota run again after a failure {res.resumed}")  # fmt: skip
        self.show_failures(res.failures)
        self.verdict(res.bricked == 0 and res.runs >= goal and not res.failures, "kill -9")

    def listeners(self) -> None:
        from bench.soaklib.listeners import LATENCY_ALLOWANCE_S, LATENCY_RATIO, MEM_SLACK_MIB, ROUNDS, run_listeners

        goal = self.goal("listeners")
        res = run_listeners(self.scale)
        failed = sum(len(f.calls_failed) for f in res.listeners.values())
        print(f"  listeners: abusive connections and inputs {res.total} (goal {goal}) in {len(ROUNDS)} rounds "
              f"(x{', x'.join(map(str, ROUNDS))}); the well-behaved clients' calls failed {failed}")  # fmt: skip
        for f in res.listeners.values():
            held = f"held {f.held_max} sockets (max_conns {f.limit})" if f.limit else "one socket (no connections)"
            print(f"  {f.name:6s}: applied {f.total}; client median {f.base_median * 1000:.2f} ms -> "
                  f"{f.abused_median * 1000:.2f} ms under abuse ({f.ratio:.2f}x; {len(f.abused_s)} calls), "
                  f"failed {len(f.calls_failed)}; {held}; {f.seconds:.0f} s")  # fmt: skip
            print(f"          p95 {f.p95(f.base_s) * 1000:.2f} -> {f.p95(f.abused_s) * 1000:.2f} ms, "
                  f"slowest {max(f.abused_s, default=0) * 1000:.1f} ms under abuse")  # fmt: skip
            print(f"          {', '.join(f'{k} {v}' for k, v in sorted(f.applied.items()))}")
            if f.notes:
                print(f"          device: {', '.join(f'{k} {v}' for k, v in sorted(f.notes.items()))}")
            self.show_failures(f.failures + f.calls_failed[:3], limit=4)
            if not f.latency_ok:
                print(f"    ! latency over {LATENCY_RATIO:g}x the baseline + {LATENCY_ALLOWANCE_S * 1000:g} ms")
        r = res.rss_mib
        rounds = ", ".join(
            f"{r[i + 1]:.1f} after round {i + 1} (x{t}, {r[i + 1] - r[i]:+.1f})"
            for i, t in enumerate(ROUNDS)
            if i + 1 < len(r)
        )
        print(f"  device memory (RSS): {r[0]:.1f} MiB after warm-up, {rounds}; the repeated round: "
              f"{r[-1] - r[-2]:+.1f} MiB (bound +{MEM_SLACK_MIB:g}); peak {res.peak_rss_mib:.1f} MiB")  # fmt: skip
        self.show_failures(res.failures)
        self.verdict(res.ok and res.total >= goal, "listeners")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=float(os.environ.get("SCALE", "1") or 1),
                    help="fraction of the issue's goals to run (default 1; SCALE in the environment)")  # fmt: skip
    ap.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="worker processes")
    ap.add_argument("--seed", type=int, default=1, help="base seed (every figure is reproducible)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or SECTIONS
    unknown = set(only) - set(SECTIONS)
    if unknown or args.scale <= 0:
        ap.error(f"unknown section {', '.join(sorted(unknown))}" if unknown else "--scale must be > 0")
    print(f"soak: scale {args.scale}, {args.jobs} jobs, seed {args.seed}, sections {', '.join(only)}")
    soak = Soak(args.scale, args.jobs, args.seed)
    started = time.monotonic()
    cpu_total = 0.0
    try:
        for name in only:
            t0, c0 = time.monotonic(), _cpu_s()
            print(f"== {name}", flush=True)
            section: Callable[[], None] = getattr(soak, name)
            section()
            cpu = _cpu_s() - c0
            cpu_total += cpu
            print(f"  ({time.monotonic() - t0:.0f} s, {cpu:.0f} CPU-s)", flush=True)
    finally:
        soak.pool.close()
        soak.pool.join()
    elapsed = time.monotonic() - started
    # The CPU time says what the wall time would be on an idle machine: the pool keeps every core busy.
    print(f"CPU time {cpu_total:.0f} s over {args.jobs} jobs (>= {cpu_total / args.jobs:.0f} s of wall time)")
    if soak.failed:
        print(f"soak FAILED in {elapsed:.0f} s: {', '.join(soak.failed)}")
        return 1
    print(f"soak passed in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
