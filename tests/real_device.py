"""The real Mongoose OS device (``../shared/mgos-ubuntu``) as a test fixture.

Tests that use it are skipped with a clear reason when the folder is absent or we are not root
(``run-device`` chroot()s). Use the fixture factory from any test module::

    from tests.real_device import real_device  # noqa: F401  (a pytest fixture)

    def test_x(real_device):
        dev = real_device()                           # ws + http + serial (pty)
        dev = real_device(mqtt=broker)                # also MQTT through a tests.mosquitto broker
        dev = real_device(auth=("user", "pass"), acl='[{"method":"*","acl":"+user"}]')
        dev.ws_url, dev.http_url, dev.tty, dev.mqtt_url, dev.id

Every instance gets its own ``--state`` dir, ``--http 127.0.0.1:0``, ``--tty`` path and ``--id``,
and is stopped with SIGTERM when the test ends. :class:`RealDevice` can also be used directly
(``start()``/``stop()``; also a context manager).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "REAL_DEVICE_DIR",
    "RealDevice",
    "RealDeviceError",
    "real_device",
    "real_device_missing",
    "require_real_device",
]

# ``../shared/mgos-ubuntu`` next to the repository; ``$MGRPC_REAL_DEVICE`` overrides it (a worktree
# lives one level deeper than the checkout CI uses).
REAL_DEVICE_DIR = Path(
    os.environ.get("MGRPC_REAL_DEVICE") or Path(__file__).resolve().parents[1].parent / "shared" / "mgos-ubuntu"
)
_counter = itertools.count(1)


class RealDeviceError(RuntimeError):
    """The device did not come up (its log is in the message)."""


def real_device_missing() -> str | None:
    """Why the real device cannot run here, or None when it can."""
    if not (REAL_DEVICE_DIR / "run-device").exists():
        return f"the real Mongoose OS device is not here ({REAL_DEVICE_DIR} is absent)"
    if os.geteuid() != 0:
        return "the real Mongoose OS device needs root (run-device chroot()s)"
    return None


def require_real_device() -> Path:
    """The device folder, or skip the calling test with the reason."""
    why = real_device_missing()
    if why is not None:
        pytest.skip(why)
    return REAL_DEVICE_DIR


def htdigest_line(user: str, realm: str, password: str) -> str:
    """One htdigest line ``user:realm:md5(user:realm:pass)``."""
    return f"{user}:{realm}:{hashlib.md5(f'{user}:{realm}:{password}'.encode()).hexdigest()}\n"


class RealDevice:
    """One running instance of the real device.

    ``mqtt`` is a broker address ``HOST:PORT`` (or an object with ``host``/``port``, such as
    :class:`tests.mosquitto.Mosquitto`); ``auth`` a ``(user, password)`` pair written to an htdigest
    file for ``--auth-file`` (realm ``auth_domain``); ``acl`` the ``--acl`` JSON; ``conf`` extra
    ``--conf`` objects (JSON text).
    """

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        device_id: str | None = None,
        tty: bool = True,
        mqtt: Any = None,
        auth: tuple[str, str] | None = None,
        auth_domain: str = "mgrpc-test",
        acl: str | None = None,
        conf: tuple[str, ...] = (),
        ready_timeout_s: float = 30.0,
    ) -> None:
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="mgrpc-realdev-")
            workdir = Path(self._own_dir.name)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        n = next(_counter)
        self.id = device_id or f"mgos-t{os.getpid()}-{n}"
        self.tty: str | None = str(self.workdir / "tty") if tty else None
        if mqtt is not None and not isinstance(mqtt, str):
            mqtt = f"{mqtt.host}:{mqtt.port}"
        self.mqtt_broker: str | None = mqtt
        self.auth = auth
        self.auth_domain = auth_domain
        self.acl = acl
        self.conf = conf
        self.ready_timeout_s = ready_timeout_s
        self.log_path = self.workdir / "device.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws_url = ""
        self.mqtt_url: str | None = None

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT/rpc``."""
        return "http" + self.ws_url[2:]

    @property
    def serial_url(self) -> str:
        """The tty path (a port for ``--port``)."""
        if self.tty is None:
            raise RealDeviceError("started without a tty")
        return self.tty

    def command(self) -> list[str]:
        """The ``run-device`` command line."""
        cmd = [
            str(REAL_DEVICE_DIR / "run-device"),
            "--state", str(self.workdir / "state"),
            "--id", self.id,
            "--http", "127.0.0.1:0",
            "--log", str(self.log_path),
            "--ready-timeout", str(self.ready_timeout_s),
        ]  # fmt: skip
        if self.tty:
            cmd += ["--tty", self.tty]
        if self.mqtt_broker:
            cmd += ["--mqtt", self.mqtt_broker]
        if self.auth is not None:
            f = self.workdir / "htdigest"
            f.write_text(htdigest_line(self.auth[0], self.auth_domain, self.auth[1]))
            cmd += ["--auth-file", str(f), "--auth-domain", self.auth_domain]
        if self.acl is not None:
            cmd += ["--acl", self.acl]
        for c in self.conf:
            cmd += ["--conf", c]
        return cmd

    def log(self) -> str:
        """The device log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> RealDevice:
        """Start the device and wait for its READY line."""
        if self.proc is not None:
            return self
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        ready: list[str] = []
        got = threading.Event()

        def reader() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("READY") and not ready:
                    ready.append(line)
                    got.set()
            got.set()

        threading.Thread(target=reader, daemon=True).start()
        if not got.wait(self.ready_timeout_s + 5) or not ready:
            log = self.log()[-3000:]
            self.stop()
            raise RealDeviceError(f"the real device did not get ready:\n{log}")
        for word in ready[0].split()[1:]:
            if word.startswith("ws://"):
                self.ws_url = word
            elif word.startswith("mqtt="):
                self.mqtt_url = word[len("mqtt=") :]
        if not self.ws_url:
            self.stop()
            raise RealDeviceError(f"READY line without a ws:// URL: {ready[0]!r}")
        self._make_fs_writable()
        return self

    def _make_fs_writable(self) -> None:
        """run-device copies the fs template with its modes, and the shared template is read-only;
        a device's flash fs is writable, so give the device's user write access to its directory."""
        fs = self.workdir / "state" / "fs"
        if fs.is_dir():
            fs.chmod(fs.stat().st_mode | 0o200)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM the launcher and wait for it (SIGKILL as the last resort)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def wait_port(self, timeout_s: float = 10.0) -> None:
        """Wait until the HTTP port accepts connections again (after a reboot)."""
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(self.ws_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RealDeviceError("the device's HTTP port did not come back")

    def cleanup(self) -> None:
        """Stop the device and remove its working directory if we made it."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> RealDevice:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RealDevice(id={self.id!r}, ws={self.ws_url!r}, tty={self.tty!r}, mqtt={self.mqtt_url!r})"


RealDeviceFactory = Callable[..., RealDevice]


@pytest.fixture
def real_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealDeviceFactory]:
    """A factory starting real devices (keyword arguments of :class:`RealDevice`); all stopped at the end."""
    require_real_device()
    started: list[RealDevice] = []

    def factory(**kw: Any) -> RealDevice:
        kw.setdefault("workdir", tmp_path_factory.mktemp("realdev"))
        dev = RealDevice(**kw)
        started.append(dev)
        return dev.start()

    yield factory
    for dev in started:
        dev.cleanup()
