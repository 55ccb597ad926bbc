"""A real mosquitto broker for tests: started on 127.0.0.1 on a free port, stopped by the test.

Use the fixture factory from any test module::

    from tests.mosquitto import mosquitto_broker  # noqa: F401  (a pytest fixture)

    async def test_x(mosquitto_broker):
        broker = mosquitto_broker()                 # plain, anonymous
        secure = mosquitto_broker(users={"u": "p"}, tls=True)
        url = broker.url("dev1")                    # mqtt://127.0.0.1:<port>/dev1

Every broker the factory started is stopped when the test ends. Tests using it are skipped with a
clear reason when the mosquitto binary is absent (``make system-deps`` installs it).
:class:`Mosquitto` can also be used directly (``start()``/``stop()``/``restart()``; also a context
manager). ``restart()`` keeps the port, so clients can be tested for reconnecting.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "MOSQUITTO_CANDIDATES",
    "Mosquitto",
    "MosquittoError",
    "TlsFiles",
    "find_mosquitto",
    "free_port",
    "make_tls_files",
    "mosquitto_broker",
    "require_mosquitto",
]

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")


class MosquittoError(RuntimeError):
    """The broker could not be started (its log is in the message)."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (``$MOSQUITTO``, the usual places, then ``$PATH``), or None."""
    env = os.environ.get("MOSQUITTO")
    if env and os.access(env, os.X_OK):
        return env
    for cand in MOSQUITTO_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("mosquitto")


def require_mosquitto() -> str:
    """The binary's path, or skip the calling test with the reason."""
    path = find_mosquitto()
    if path is None:
        pytest.skip("mosquitto is not installed (looked in /usr/sbin and $PATH); `make system-deps` installs it")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A throw-away CA, a server certificate for ``127.0.0.1``/``localhost`` and a client certificate (PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a CA and CA-signed server and client certificates into ``directory`` (needs ``cryptography``)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )

    ca_usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mgrpc test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ca_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    def leaf(common_name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    usages = x509.oid.ExtendedKeyUsageOID
    srv_cert, srv_key = leaf(
        "localhost", usages.SERVER_AUTH, [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cli_cert, cli_key = leaf("mgrpc test client", usages.CLIENT_AUTH, [])
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        directory / "ca.pem", directory / "server.pem", directory / "server.key",
        directory / "client.pem", directory / "client.key",
    )  # fmt: skip
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(srv_cert)
    files.server_key.write_bytes(srv_key)
    files.client_cert.write_bytes(cli_cert)
    files.client_key.write_bytes(cli_key)
    return files


def _password_line(user: str, password: str) -> str:
    # mosquitto 2.x "$6$" entries: base64(salt) and base64(sha512(password + salt)).
    salt = os.urandom(12)
    digest = hashlib.sha512(password.encode("utf-8") + salt).digest()
    return f"{user}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


class Mosquitto:
    """One mosquitto process listening on ``127.0.0.1:port`` with a generated config.

    ``users`` turns anonymous access off and writes a password file; ``tls`` (True, or prepared
    :class:`TlsFiles`) makes the listener TLS-only with a server certificate signed by a test CA
    (``tls_files.ca_cert`` is the CA clients verify with); ``require_client_cert`` then also asks
    clients for a certificate signed by that CA (``tls_files.client_cert``/``client_key``).
    """

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        port: int | None = None,
        users: dict[str, str] | None = None,
        tls: bool | TlsFiles = False,
        require_client_cert: bool = False,
        extra_config: str = "",
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise MosquittoError("mosquitto is not installed")
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="mgrpc-mosquitto-")
            workdir = Path(self._own_dir.name)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.users = dict(users or {})
        self.tls_files: TlsFiles | None
        if tls is True:
            self.tls_files = make_tls_files(self.workdir / "tls")
        elif isinstance(tls, TlsFiles):
            self.tls_files = tls
        else:
            self.tls_files = None
        self.require_client_cert = require_client_cert
        self.extra_config = extra_config
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return "127.0.0.1"

    @property
    def scheme(self) -> str:
        """``mqtts`` for a TLS broker, else ``mqtt``."""
        return "mqtts" if self.tls_files is not None else "mqtt"

    def url(self, device_id: str = "", *, user: str | None = None, password: str | None = None, **query: str) -> str:
        """A port URL for this broker, e.g. ``mqtt://127.0.0.1:1234/dev1?client_id=x``."""
        auth = ""
        if user is not None:
            auth = user + (f":{password}" if password is not None else "") + "@"
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{self.scheme}://{auth}{self.host}:{self.port}/{device_id}" + (f"?{q}" if q else "")

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "set_tcp_nodelay true",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto would switch to the "mosquitto" user, who cannot read our files.
            lines.append("user root")
        if self.users:
            pw = self.workdir / "passwd"
            pw.write_text("".join(_password_line(u, p) for u, p in self.users.items()))
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls_files is not None:
            lines += [
                f"certfile {self.tls_files.server_cert}",
                f"keyfile {self.tls_files.server_key}",
                f"cafile {self.tls_files.ca_cert}",
            ]
            if self.require_client_cert:
                lines.append("require_certificate true")
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")

    def log(self) -> str:
        """The broker's log so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _accepting(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self, *, timeout_s: float = 10.0) -> Mosquitto:
        """Start the broker and wait until it accepts TCP connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        assert self.binary is not None
        with open(self.workdir / "stderr.log", "ab") as err_file:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.workdir / "stderr.log").read_text(errors="replace")
                self.proc = None
                raise MosquittoError(f"mosquitto exited at start-up:\n{err}\n{self.log()}")
            if self._accepting():
                return self
            time.sleep(0.02)
        self.stop()
        raise MosquittoError(f"mosquitto did not accept connections on port {self.port} within {timeout_s} s")

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL) and wait until the port no longer accepts."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)

    def restart(self, *, timeout_s: float = 10.0) -> None:
        """Stop and start again on the same port (clients see the broker go away and come back)."""
        self.stop()
        self.start(timeout_s=timeout_s)

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        """Stop the broker and remove its temporary directory (if it made one)."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<Mosquitto {self.scheme}://{self.host}:{self.port} {'running' if self.running else 'stopped'}>"


BrokerFactory = Callable[..., Mosquitto]


@pytest.fixture
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerFactory]:
    """Fixture factory: ``mosquitto_broker(**kw)`` starts a :class:`Mosquitto` (same keywords).

    Skips the test when mosquitto is absent; stops every broker it started at teardown.
    """
    binary = require_mosquitto()
    started: list[Mosquitto] = []

    def factory(**kw: object) -> Mosquitto:
        workdir = tmp_path_factory.mktemp("mosquitto")
        broker = Mosquitto(workdir=workdir, binary=binary, **kw)  # type: ignore[arg-type]
        started.append(broker)
        return broker.start()

    yield factory
    for broker in started:
        with contextlib.suppress(Exception):
            broker.cleanup()
