"""Tests for ``mgrpc fw build | inspect | keygen`` (mgrpc/cli/fw.py)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mgrpc.cli import fw
from updater.firmware import FirmwareImage
from updater.manifest import Manifest

REPO = Path(__file__).parents[2]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mgrpc")
    sub = parser.add_subparsers(dest="command")
    fw.register(sub)
    args = parser.parse_args(argv)
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "app.bin").write_bytes(b"\xe9" + bytes(range(256)) * 20)
    (tmp_path / "fs.img").write_bytes(b"\xff" * 4096)
    return tmp_path


def build_simple(files: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> Path:
    out = files / "fw.zip"
    rc, _, err = run(
        [
            "fw", "build", "-o", str(out), "--platform", "esp32", "--name", "demo", "--version", "1.0",
            "--build-id", "b1", "--attr", "foo=bar", "--attr", "num=0x10",
            f"app:src={files / 'build' / 'app.bin'},type=app,ptn=app_0",
            f"fs:src={files / 'fs.img'},type=fs,ptn=fs_0,fs_size=4096",
            "nvs:type=nvs,fill=255,size=16384,flash=false",
            *extra,
        ],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert "Wrote" in err
    return out


def test_parse_prop_value() -> None:
    p = fw.parse_prop_value
    assert p("") == ""
    assert p("true") is True and p("false") is False
    assert p("123") == 123 and p("0x1000") == 4096 and p("0755") == 0o755 and p("-5") == -5
    assert p("0") == 0
    assert p("4294967296") == "4294967296"  # beyond 32 bits: kept as a string, like mos
    assert p("'a,b'") == "a,b" and p('"q\\"x"') == 'q"x'
    assert p("app_0") == "app_0" and p("1.5") == "1.5"


def test_parse_part_spec() -> None:
    assert fw.parse_part_spec("app:src=a.bin,type=app,addr=0x10000") == (
        "app",
        {"src": "a.bin", "type": "app", "addr": 65536},
    )
    assert fw.parse_part_spec("x:") == ("x", {})
    from updater.errors import UpdaterError

    with pytest.raises(UpdaterError, match="must be 'name:prop=value"):
        fw.parse_part_spec("noprops")
    with pytest.raises(UpdaterError, match="must be 'prop=value'"):
        fw.parse_part_spec("x:src")


def test_build_and_inspect(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = build_simple(files, capsys)
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == ["manifest.json", "app.bin", "fs.img"]
        m = Manifest.parse(z.read("manifest.json"), require_build_id=True)
    assert m.obj["foo"] == "bar" and m.obj["num"] == 16
    assert m.parts["app"].src == "app.bin" and m.parts["app"].size == 5121
    assert m.parts["nvs"].get("flash") is False and m.parts["nvs"].get("fill") == 255
    rc, stdout, err = run(["fw", "inspect", str(out), "--arch", "ESP32"], capsys)
    assert rc == 0, err
    assert '"platform": "esp32"' in stdout
    assert "part app: size ok, sha1 ok, sha256 ok, crc ok" in stdout
    assert "part fs: size ok, sha1 ok, sha256 ok, crc ok" in stdout
    assert "signatures: none" in stdout
    assert stdout.rstrip().endswith("OK")


def test_inspect_wrong_arch(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = build_simple(files, capsys)
    rc, _, err = run(["fw", "inspect", str(out), "--arch", "esp8266"], capsys)
    assert rc == 1 and "Error: Wrong platform" in err


def _rewrite_member(src: Path, dst: Path, name: str, data: bytes) -> None:
    """Copy a stored zip replacing one member's data (CRC updated, manifest untouched)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename == name else zin.read(info))


def test_inspect_detects_tampered_part(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = build_simple(files, capsys)
    bad = files / "bad.zip"
    _rewrite_member(out, bad, "fs.img", b"\x00" * 4096)
    rc, stdout, err = run(["fw", "inspect", str(bad)], capsys)
    assert rc == 1
    assert "sha1 MISMATCH" in stdout
    assert err.startswith("Error: part fs: sha1") and "; part fs: sha256" in err and err.count("\n") == 1
    _rewrite_member(out, bad, "fs.img", b"\x00" * 10)
    rc, _, err = run(["fw", "inspect", str(bad)], capsys)
    assert rc == 1 and "size 10 != manifest size 4096" in err


def test_inspect_detects_bad_crc_and_truncation(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = build_simple(files, capsys)
    data = bytearray(out.read_bytes())
    pos = data.index(b"\xe9\x00\x01\x02")  # app data
    data[pos + 100] ^= 0xFF
    bad = files / "bad.zip"
    bad.write_bytes(bytes(data))
    rc, _, err = run(["fw", "inspect", str(bad)], capsys)
    assert (rc, err.strip()) == (1, "Error: Invalid CRC")
    bad.write_bytes(out.read_bytes()[:3000])
    rc, _, err = run(["fw", "inspect", str(bad)], capsys)
    assert rc == 1 and "truncated" in err


def test_inspect_missing_part_file(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = build_simple(files, capsys)
    bad = files / "bad.zip"
    with zipfile.ZipFile(out) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if info.filename != "fs.img":
                zout.writestr(info, zin.read(info))
    rc, _, err = run(["fw", "inspect", str(bad)], capsys)
    assert rc == 1 and "file fs.img is missing" in err


def test_inspect_not_a_zip_and_missing_file(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "x.zip").write_bytes(b"hello world, not a zip")
    rc, _, err = run(["fw", "inspect", str(files / "x.zip")], capsys)
    assert (rc, err.strip()) == (1, "Error: Malformed archive (invalid file header)")
    rc, _, err = run(["fw", "inspect", str(files / "nope.zip")], capsys)
    assert rc == 1 and err.startswith("Error:")


def test_inspect_manifest_not_first(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = files / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("a.bin", b"x")
        z.writestr("manifest.json", b"{}")
    rc, _, err = run(["fw", "inspect", str(bad)], capsys)
    assert rc == 1 and "manifest.json must be the first entry" in err


def test_compressed_build_needs_allow(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = build_simple(files, capsys, "--compress")
    rc, _, err = run(["fw", "inspect", str(out)], capsys)
    assert (rc, err.strip()) == (1, "Error: Cannot handle compressed .zip")
    rc, stdout, err = run(["fw", "inspect", str(out), "--allow-compressed"], capsys)
    assert rc == 0, err
    assert "deflated" in stdout


def test_keygen_sign_and_verify(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("cryptography")
    k0, k1 = files / "k0.pem", files / "k1.pem"
    rc, pub0, _ = run(["fw", "keygen", "-o", str(k0)], capsys)
    assert rc == 0 and pub0.strip().startswith("MFkw")
    assert (k0.stat().st_mode & 0o777) == 0o600
    rc, pub1, _ = run(["fw", "keygen", "-o", str(k1), "--pub-out", str(files / "k1.pub")], capsys)
    assert rc == 0 and (files / "k1.pub").read_text().strip() == pub1.strip()
    rc, _, err = run(["fw", "keygen", "-o", str(k0)], capsys)
    assert rc == 1 and "exists" in err

    out = build_simple(files, capsys, "--sign-key", str(k0))
    rc, stdout, err = run(["fw", "inspect", str(out), "--key", pub0.strip()], capsys)
    assert rc == 0, err
    assert "signatures: sig0" in stdout and "sig0 with key0: valid" in stdout
    rc, stdout, err = run(["fw", "inspect", str(out), "--key", str(k0)], capsys)  # PEM file works too
    assert rc == 0, err
    rc, stdout, err = run(["fw", "inspect", str(out), "--key", str(k1)], capsys)
    assert rc == 1 and "sig0 with key0: NOT VALID" in stdout and "Signature check failed" in err
    rc, stdout, err = run(["fw", "inspect", str(out), "--key", f"1={pub1.strip()}"], capsys)
    assert rc == 1 and "missing or invalid sig1" in err
    # Only key0 required although key1 is given.
    rc, _, err = run(["fw", "inspect", str(out), "--key", str(k0), "--key", str(k1), "--sig-req-mask", "1"], capsys)
    assert rc == 0, err
    rc, _, err = run(["fw", "inspect", str(out), "--key", "garbage!"], capsys)
    assert rc == 1 and "Invalid public key" in err


def test_build_virtual(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = files / "conf1.json"
    conf.write_text('{"x": 1}')
    out = files / "v.zip"
    argv = ["fw", "build", "-o", str(out), "--virtual", "--arch", "esp32", "--fw-version", "1.1"]
    argv += ["--behavior", "hang", "--app-size", "16k", "--fs-size", "16k", "--fs-file", f"conf1.json={conf}"]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    with zipfile.ZipFile(out) as z:
        m = Manifest.parse(z.read("manifest.json"))
        app = z.read(str(m.parts["app"].src))
    assert (m.platform, m.version) == ("esp32", "1.1")
    assert m.parts["fs"].get("fs_size") == 16384
    im = FirmwareImage.parse(app)
    assert (im.behavior, im.version, len(app)) == ("hang", "1.1", 16384)
    rc, _, err = run(["fw", "inspect", str(out)], capsys)
    assert rc == 0, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--version", "1"], "--platform is required"),
        (["--platform", "esp32"], "--version is required"),
        (["--platform", "esp32", "--version", "1", "bad-spec"], "invalid part spec"),
        (["--platform", "esp32", "--version", "1", "a:src=/nonexistent/x.bin"], "Cannot read"),
        (["--virtual", "--arch", "esp32"], "--virtual needs --arch and --fw-version"),
        (["--virtual", "--arch", "esp32", "--fw-version", "1", "a:src=x"], "give no part specs"),
        (["--virtual", "--arch", "esp32", "--fw-version", "1", "--fs-size", "5000"], "fs_size"),
    ],
)
def test_build_errors(files: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    out = files / "out.zip"
    rc, _, err = run(["fw", "build", "-o", str(out), *argv], capsys)
    assert rc == 1 and message in err and err.startswith("Error: ")
    assert not out.exists()
    assert not list(files.glob("out.zip.tmp*"))  # nothing half-written left behind


def test_build_info_file(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bi = files / "bi.json"
    bi.write_text(
        json.dumps({"build_id": "20260101/x", "build_timestamp": "2026-01-01T00:00:00Z", "build_version": "2.0"})
    )
    out = files / "o.zip"
    rc, _, err = run(
        ["fw", "build", "-o", str(out), "--platform", "esp32", "--build-info", str(bi), "a:src=" + str(bi)], capsys
    )
    assert rc == 0, err
    with zipfile.ZipFile(out) as z:
        m = Manifest.parse(z.read("manifest.json"), require_build_id=True)
    assert (m.version, m.build_id, m.obj["build_timestamp"]) == ("2.0", "20260101/x", "2026-01-01T00:00:00Z")


def test_fw_without_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["fw"], capsys)
    assert rc == 1 and "build" in err and "inspect" in err


def test_via_python_m_rpc_cli(files: Path) -> None:
    import mgrpc.cli

    if "mgrpc.cli.fw" not in getattr(mgrpc.cli, "COMMANDS", ()):
        pytest.skip("mgrpc.cli.fw is not wired into the top-level parser yet")
    out = files / "m.zip"
    cmd = [sys.executable, "-m", "mgrpc", "fw", "build", "-o", str(out), "--virtual", "--arch", "esp32"]
    cmd += ["--fw-version", "1.0", "--app-size", "8k", "--fs-size", "8k"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "mgrpc", "fw", "inspect", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("OK")
    with zipfile.ZipFile(io.BytesIO(out.read_bytes())) as z:
        assert z.testzip() is None


def test_with_top_level_parser(
    files: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """register() works under the real top-level parser (global flags added to every sub-parser)."""
    import mgrpc.cli

    commands = tuple(mgrpc.cli.COMMANDS)
    if "mgrpc.cli.fw" not in commands:
        monkeypatch.setattr(mgrpc.cli, "COMMANDS", (*commands, "mgrpc.cli.fw"))
    out = files / "t.zip"
    argv = ["fw", "build", "-o", str(out), "--virtual", "--arch", "esp8266", "--fw-version", "3"]
    assert mgrpc.cli.main([*argv, "--app-size", "8k", "--fs-size", "8k"]) == 0
    assert mgrpc.cli.main(["fw", "inspect", str(out), "--arch", "esp8266"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")
    assert mgrpc.cli.main(["fw", "inspect", str(files / "missing.zip")]) == 1


def test_build_from_input_bundle(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-i: rebuild an existing bundle with a new version and an extra part (like mos -i)."""
    src = build_simple(files, capsys)
    (files / "extra.bin").write_bytes(b"extra")
    out = files / "re.zip"
    argv = ["fw", "build", "-o", str(out), "-i", str(src), "--version", "2.0", "--src-dir", str(files)]
    rc, _, err = run([*argv, "extra:src=extra.bin,type=data"], capsys)
    assert rc == 0, err
    with zipfile.ZipFile(out) as z:
        m = Manifest.parse(z.read("manifest.json"))
        assert z.read("extra.bin") == b"extra"
        assert z.read("app.bin") == (files / "build" / "app.bin").read_bytes()
    assert (m.name, m.platform, m.version, m.build_id) == ("demo", "esp32", "2.0", "b1")
    assert set(m.parts) == {"app", "fs", "nvs", "extra"} and m.obj["foo"] == "bar"
    rc, _, err = run(["fw", "inspect", str(out)], capsys)
    assert rc == 0, err


def test_build_from_manifest_file(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    man = files / "build" / "m.json"
    man.write_text(
        json.dumps(
            {"name": "x", "platform": "esp32", "version": "1.5", "parts": {"app": {"type": "app", "src": "app.bin"}}}
        )
    )
    out = files / "m.zip"
    rc, _, err = run(["fw", "build", "-o", str(out), "--manifest", str(man), "--attr", "build_id=from-attr"], capsys)
    assert rc == 0, err
    with zipfile.ZipFile(out) as z:
        m = Manifest.parse(z.read("manifest.json"), require_build_id=True)
    assert (m.name, m.version, m.build_id, m.parts["app"].size) == ("x", "1.5", "from-attr", 5121)


def test_build_input_errors(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "junk.zip").write_bytes(b"junk")
    rc, _, err = run(["fw", "build", "-o", str(files / "o.zip"), "-i", str(files / "junk.zip")], capsys)
    assert rc == 1 and "failed to read input bundle" in err
    bad = files / "nomanifest.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("a.bin", b"x")
    rc, _, err = run(["fw", "build", "-o", str(files / "o.zip"), "-i", str(bad)], capsys)
    assert rc == 1 and "no manifest.json" in err
    (files / "m.json").write_text("[1]")
    rc, _, err = run(["fw", "build", "-o", str(files / "o.zip"), "--manifest", str(files / "m.json")], capsys)
    assert rc == 1 and "not a JSON object" in err


def test_keygen_key_signs_bundles(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("cryptography")
    key = files / "k.pem"
    rc, pub, _ = run(["fw", "keygen", "-o", str(key)], capsys)
    assert rc == 0 and key.read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")
    out = files / "s.zip"
    argv = ["fw", "build", "-o", str(out), "--virtual", "--arch", "esp32", "--fw-version", "1", "--fs-size", "8k"]
    rc, _, err = run([*argv, "--sign-key", "", "--sign-key", str(key), "--attr", "color=blue"], capsys)
    assert rc == 0, err
    with zipfile.ZipFile(out) as z:
        assert json.loads(z.read("manifest.json"))["color"] == "blue"
    rc, stdout, err = run(["fw", "inspect", str(out), "--key", f"1={pub.strip()}"], capsys)
    assert rc == 0, err
    assert "signatures: sig1" in stdout
