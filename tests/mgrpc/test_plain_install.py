"""A plain ``pip install .`` (no extras) gives a working ``mgrpc``: help, version, a call over tcp://,
and a one-line hint naming the extra for a command that needs one (no traceback).

The package is installed from a copy of this tree into a fresh venv in a temporary folder (pip's
cache is reused, so only the first run downloads anything); the virtual device it talks to runs
from the full environment. Skipped only when a venv cannot be created at all.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from mgrpc import __version__

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mgrpc", "rpc", "transports", "services", "updater", "conformance")
PIP_TIMEOUT_S = 300
RUN_TIMEOUT_S = 60

pytestmark = pytest.mark.timeout(900)


def _pip_version() -> tuple[int, ...]:
    try:
        import pip
    except ImportError:
        return ()
    return tuple(int(p) for p in pip.__version__.split(".")[:2] if p.isdigit())


def _can_build_in_place() -> bool:
    """setuptools >= 68 and wheel here: the wheel can be built without an isolated build env.

    Asked through the metadata: importing setuptools into the test process would patch distutils.
    """
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    try:
        major = version("setuptools").split(".")[0]
    except PackageNotFoundError:
        return False
    return major.isdigit() and int(major) >= 68 and find_spec("wheel") is not None


def _run(cmd: list[str], *, timeout_s: float, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, **kw)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh venv with mgrpc installed without extras."""
    tmp = tmp_path_factory.mktemp("plain")
    env_dir = tmp / "venv"
    # Without pip when this pip can install into another interpreter (--python, pip >= 22.3): faster.
    outer_pip = _pip_version() >= (22, 3)
    try:
        venv.EnvBuilder(with_pip=not outer_pip, clear=True).create(env_dir)
    except Exception as e:  # any failure here means: no venv on this machine
        pytest.skip(f"cannot create a venv here ({type(e).__name__}: {e})")
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / ("python.exe" if os.name == "nt" else "python")
    if not py.exists():
        pytest.skip(f"venv creation left no interpreter at {py}")

    src = tmp / "src"  # a copy: pip builds in the source tree, and other tests may run in this one
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    wheels = tmp / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)]
    if _can_build_in_place():
        build.insert(4, "--no-build-isolation")
    res = _run(build, timeout_s=PIP_TIMEOUT_S)
    assert res.returncode == 0, f"building the wheel failed:\n{res.stdout}\n{res.stderr}"
    (wheel_file,) = wheels.glob("mgrpc-*.whl")
    pip = [sys.executable, "-m", "pip", "--python", str(py)] if outer_pip else [str(py), "-m", "pip"]
    res = _run([*pip, "install", "-q", "--disable-pip-version-check", str(wheel_file)], timeout_s=PIP_TIMEOUT_S)
    assert res.returncode == 0, f"pip install failed:\n{res.stdout}\n{res.stderr}"
    # The point of the test: none of the optional packages is there.
    probe = "import importlib.util as u; print([m for m in ('littlefs', 'aiohttp', 'paho', 'serial', " \
        "'bleak', 'bumble', 'msgpack', 'cryptography') if u.find_spec(m)])"  # fmt: skip
    res = _run([str(py), "-c", probe], timeout_s=RUN_TIMEOUT_S, env=_plain_env(), cwd=tmp)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
    return bindir


def _plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MGRPC_", "MOS_", "VIRTUAL_ENV"))}
    return env


def mgrpc(bindir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the plain venv's ``mgrpc`` (its own installed copy: no PYTHONPATH, not in the repo)."""
    return _run([str(bindir / "mgrpc"), *args], timeout_s=RUN_TIMEOUT_S, env=_plain_env(), cwd=cwd)


def test_help_and_version(plain: Path, tmp_path: Path) -> None:
    res = mgrpc(plain, "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: mgrpc") and "call" in res.stdout and "Traceback" not in res.stderr
    res = mgrpc(plain, "--version", cwd=tmp_path)
    assert (res.returncode, res.stdout.strip()) == (0, f"mgrpc {__version__}")


def test_call_over_tcp(plain: Path, tmp_path: Path) -> None:
    # The device runs from the full environment (it needs the fs extra).
    dev = subprocess.Popen(
        [sys.executable, "-m", "mgrpc", "device", "--id", "x", "--state", str(tmp_path / "dev"),
         "--listen", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert dev.stdout is not None
        url = dev.stdout.readline().strip()  # the device prints its URL once it listens
        assert url.startswith("tcp://127.0.0.1:"), (url, dev.poll())
        res = mgrpc(plain, "--port", url, "call", "RPC.Ping", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert '"channel_info"' in res.stdout
    finally:
        dev.send_signal(signal.SIGTERM)
        try:
            dev.wait(timeout=20)
        except subprocess.TimeoutExpired:
            dev.kill()
            dev.wait(timeout=10)


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["device", "--id", "y", "--state", "{tmp}/dev", "--listen", "tcp://127.0.0.1:0"], "pip install 'mgrpc[fs]'"),
        (["dashboard", "--db", "{tmp}/fleet.db", "--listen", "http://127.0.0.1:0"], "pip install 'mgrpc[http]'"),
        (["--port", "http://127.0.0.1:9/rpc", "call", "RPC.Ping"], "pip install 'mgrpc[http]'"),
        (["demo"], "pip install 'mgrpc[device]'"),  # before its first step prints anything
        # The ws:// client is our own (transports._wsclient): without aiohttp it still dials.
        (["--port", "ws://127.0.0.1:9/rpc", "call", "RPC.Ping"], "cannot connect to ws://127.0.0.1:9/rpc"),
    ],
    ids=["device-needs-fs", "dashboard-needs-http", "http-needs-http", "demo-needs-device", "ws-client-needs-nothing"],
)
def test_missing_extra_is_one_line_naming_it(plain: Path, tmp_path: Path, args: list[str], hint: str) -> None:
    res = mgrpc(plain, *(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1 and hint in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    if args == ["demo"]:
        assert res.stdout == "", "the demo must stop before printing its first step"
