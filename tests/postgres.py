"""A private PostgreSQL server for tests and benches, from Debian's packages (``postgresql``).

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/<ver>/bin`` on a
temporary data directory and a free 127.0.0.1 port, with trust authentication (the port is
reachable from this machine only) and fsync off (test data). PostgreSQL refuses to run as root:
as root the cluster runs as the ``postgres`` system user (which the Debian package creates).
The ``postgres_server`` fixture skips with the reason when it cannot start one.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mosquitto import free_port

__all__ = ["PostgresServer", "find_pg_bin", "postgres_server", "postgres_unavailable"]


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` holding initdb and pg_ctl (``$PG_BIN`` first)."""
    env = os.environ.get("PG_BIN")
    if env and (Path(env) / "initdb").exists():
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")])  # fmt: skip
    return Path(found[-1]).parent if found else None


def postgres_unavailable() -> str:
    """Why no server can be started here ("" if one can)."""
    if find_pg_bin() is None:
        return "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); `make system-deps` installs it"
    try:
        import psycopg  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed: pip install 'mgrpc[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as (it refuses root)"
    return ""


class PostgresServer:
    """One private cluster: ``start()``, ``url``, ``stop()`` (also a context manager)."""

    def __init__(self) -> None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError(postgres_unavailable())
        self.bin = bin_dir
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are private to root, and the server may run as postgres.
        self.dir = Path(tempfile.mkdtemp(prefix="mgrpc-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.user = "postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else []
            if not self._as:
                raise RuntimeError("running as root without runuser(1) to start PostgreSQL as postgres")

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:<port>/postgres``."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout_s: float = 60.0) -> None:
        p = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=timeout_s, cwd=self.dir)
        if p.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{Path(argv[0]).name} failed ({p.returncode}): {p.stderr.strip()}\n{log[-2000:]}")

    def start(self) -> PostgresServer:
        """initdb and start; returns when it accepts connections."""
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")  # fmt: skip
        opts = f"-p {self.port} -h 127.0.0.1 -k {self.dir} -F -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w", "-t", "60",
                  "start")  # fmt: skip
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres").close()
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def pid(self) -> int | None:
        """The server's main process (from ``postmaster.pid``), or None when it is not running."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def create_database(self, name: str) -> str:
        """A fresh database; returns its URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as c:  # fmt: skip
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop at once and delete the cluster."""
        if self.data.exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A running private PostgreSQL (skips with the reason when there is none to run)."""
    why = postgres_unavailable()
    if why:
        pytest.skip(why)
    srv = PostgresServer()
    try:
        srv.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        srv.stop()
        pytest.skip(f"PostgreSQL did not start: {e}")
    try:
        yield srv
    finally:
        srv.stop()
