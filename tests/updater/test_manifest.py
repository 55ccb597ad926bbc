"""Tests for updater.manifest: parsing, checks and mos-style serialisation."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from updater.errors import UpdaterError
from updater.manifest import Manifest, Part, dumps_manifest, go_json

VECTORS = Path(__file__).parents[2].parent / "shared" / "vectors"

SHA1 = "3fe36826a8c4fa628903ee897182b78e8e2b9590"
SHA256 = "89f4ff56a25dd1db06a4ce6033603775d705fb96f30f8693733fef602a1ca532"


def manifest(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "name": "demo",
        "platform": "esp32",
        "version": "1.0",
        "build_id": "20200101-000000/test",
        "parts": {
            "app": {"type": "app", "src": "demo.bin", "size": 10, "cs_sha1": SHA1, "ptn": "app_0"},
            "fs": {"type": "fs", "src": "build/fs.img", "size": 5, "cs_sha256": SHA256, "fs_size": 8192},
            "nvs": {"type": "nvs", "fill": 255, "size": 4096},
        },
    }
    for k, v in over.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    return obj


def parse(obj: Any, **kw: Any) -> Manifest:
    return Manifest.parse(json.dumps(obj).encode(), **kw)


def test_parse_fields() -> None:
    m = parse(manifest(extra_attr={"x": 1}))
    assert (m.name, m.platform, m.version, m.build_id) == ("demo", "esp32", "1.0", "20200101-000000/test")
    assert set(m.parts) == {"app", "fs", "nvs"}
    app = m.parts["app"]
    assert app == Part(
        name="app",
        type="app",
        src="demo.bin",
        size=10,
        cs_sha1=SHA1,
        cs_sha256=None,
        attrs={"type": "app", "src": "demo.bin", "size": 10, "cs_sha1": SHA1, "ptn": "app_0"},
    )
    assert app.get("ptn") == "app_0"
    assert m.parts["fs"].src_basename == "fs.img"
    assert m.parts["nvs"].src is None and m.parts["nvs"].src_basename is None
    assert m.obj["extra_attr"] == {"x": 1}
    assert json.loads(m.raw) == m.obj


def test_parse_accepts_str() -> None:
    assert Manifest.parse(json.dumps(manifest())).platform == "esp32"


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'"x"', b"null", b"\xff\xfe", b"[" * 100000])
def test_failed_to_parse(data: bytes) -> None:
    with pytest.raises(UpdaterError) as exc:
        Manifest.parse(data)
    assert exc.value.message == "Failed to parse manifest"
    assert exc.value.code < 0


@pytest.mark.parametrize("field", ["platform", "version", "parts"])
def test_required_field_missing(field: str) -> None:
    with pytest.raises(UpdaterError) as exc:
        parse(manifest(**{field: None}))
    assert exc.value.message == "Required manifest field missing"


@pytest.mark.parametrize(
    "over",
    [
        {"platform": 5},
        {"version": 1.0},
        {"parts": []},
        {"name": ["x"]},
        {"build_id": 3},
        {"parts": {"app": "x"}},
        {"parts": {"app": {"type": 1}}},
        {"parts": {"app": {"src": 1}}},
        {"parts": {"app": {"size": -1}}},
        {"parts": {"app": {"size": "10"}}},
        {"parts": {"app": {"size": True}}},
    ],
)
def test_wrong_types(over: dict[str, Any]) -> None:
    with pytest.raises(UpdaterError, match=r"^Failed to parse manifest$"):
        parse(manifest(**over))


def test_build_id_missing_accepted_by_default() -> None:
    """Decision: a mos bundle built without --build-info (no build_id) is accepted, build_id = ""."""
    m = parse(manifest(build_id=None))
    assert m.build_id == ""
    assert m.is_same_version("1.0", "")
    assert not m.is_same_version("1.0", "20200101-000000/test")


def test_build_id_missing_refused_when_required() -> None:
    """The 2018 device's strict rule, available as an option."""
    with pytest.raises(UpdaterError, match=r"^Required manifest field missing$"):
        parse(manifest(build_id=None), require_build_id=True)
    assert parse(manifest(), require_build_id=True).build_id == "20200101-000000/test"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cs_sha1", SHA1[:-1]),
        ("cs_sha1", SHA1 + "0"),
        ("cs_sha1", "g" * 40),
        ("cs_sha1", SHA256),
        ("cs_sha256", SHA1),
        ("cs_sha256", SHA256[:-1] + "z"),
        ("cs_sha1", 123),
        ("cs_sha256", ""),
    ],
)
def test_invalid_checksum_format(key: str, value: Any) -> None:
    obj = manifest()
    obj["parts"]["app"][key] = value
    with pytest.raises(UpdaterError, match=r"^Invalid checksum format$"):
        parse(obj)


def test_checksums_case_insensitive_stored_lowercase() -> None:
    obj = manifest()
    obj["parts"]["app"]["cs_sha1"] = SHA1.upper()
    obj["parts"]["app"]["cs_sha256"] = SHA256.upper()
    app = parse(obj).parts["app"]
    assert app.cs_sha1 == SHA1 and app.cs_sha256 == SHA256


def test_check_platform() -> None:
    m = parse(manifest(platform="ESP32"))
    m.check_platform("esp32")
    m.check_platform("Esp32")
    for arch in ("esp8266", "esp32c3", "esp3", ""):
        with pytest.raises(UpdaterError) as exc:
            m.check_platform(arch)
        assert exc.value.message == "Wrong platform"


def test_no_prefix_quirk() -> None:
    """Decision: device esp32 does NOT accept an esp32c3 manifest (the 2018 prefix quirk is dropped)."""
    with pytest.raises(UpdaterError, match="Wrong platform"):
        parse(manifest(platform="esp32c3")).check_platform("esp32")


def test_is_same_version() -> None:
    m = parse(manifest())
    assert m.is_same_version("1.0", "20200101-000000/test")
    assert not m.is_same_version("1.1", "20200101-000000/test")
    assert not m.is_same_version("1.0", "other")


def test_part_for_file() -> None:
    m = parse(manifest())
    assert m.part_for_file("demo.bin") is m.parts["app"]
    assert m.part_for_file("fs.img") is m.parts["fs"]  # src had a directory
    assert m.part_for_file("demo.bin.old") is None
    assert m.part_for_file("demo") is None
    assert m.part_for_file("manifest.json") is None


def test_real_esp32_manifest() -> None:
    path = VECTORS / "manifest_esp32_ccm_fwbundle_test.json"
    if not path.exists():
        pytest.skip("../shared/vectors not present")
    m = Manifest.parse(path.read_bytes(), require_build_id=True)
    assert (m.name, m.platform, m.version) == ("ccm", "esp32", "1.0")
    assert m.build_id == "20181126-182907/2.8.0-47-g7db8cdacf-dirty-mos9"
    assert set(m.parts) == {"app", "boot"}
    app, boot = m.parts["app"], m.parts["boot"]
    assert (app.type, app.src, app.size, app.get("ptn"), app.get("addr")) == ("app", "ccm.bin", 1375120, "app_0", 65536)
    assert app.cs_sha1 == "3fe36826a8c4fa628903ee897182b78e8e2b9590"
    assert (boot.type, boot.size, boot.get("update"), boot.get("encrypt")) == ("boot", 21088, False, True)
    assert m.part_for_file("bootloader.bin") is boot
    m.check_platform("ESP32")
    assert m.obj["build_timestamp"] == "2018-11-26T18:29:07Z"


def test_vector_manifest_roundtrips_byte_exact() -> None:
    path = VECTORS / "fw_minimal_generated.zip"
    if not path.exists():
        pytest.skip("../shared/vectors not present")
    with zipfile.ZipFile(path) as z:
        raw = z.read("manifest.json")
    m = Manifest.parse(raw)
    assert m.to_bytes() == raw


def test_dumps_manifest_order_and_omitempty() -> None:
    obj = {
        "zz_extra": 1,
        "parts": {
            "b": {"zeta": "z", "size": 0, "type": "fs", "flash": False, "fill": 0, "addr": 0, "alpha": 1},
            "a": {"src": "x", "type": "app", "encrypt": False, "ptn": "app_0"},
        },
        "version": "1.0",
        "description": "",
        "platform": "esp32",
        "build_id": "b",
        "name": "n",
        "aa_extra": "<&>",
    }
    text = dumps_manifest(obj).decode()
    assert text == (
        "{\n"
        ' "name": "n",\n'
        ' "platform": "esp32",\n'
        ' "version": "1.0",\n'
        ' "build_id": "b",\n'
        ' "parts": {\n'
        '  "a": {\n'
        '   "type": "app",\n'
        '   "src": "x",\n'
        '   "ptn": "app_0"\n'
        "  },\n"
        '  "b": {\n'
        '   "type": "fs",\n'
        '   "fill": 0,\n'
        '   "flash": false,\n'
        '   "alpha": 1,\n'
        '   "zeta": "z"\n'
        "  }\n"
        " },\n"
        ' "aa_extra": "\\u003c\\u0026\\u003e",\n'
        ' "zz_extra": 1\n'
        "}"
    )
    assert json.loads(text)["aa_extra"] == "<&>"


def test_go_json_escapes_and_compact() -> None:
    assert go_json('a"\\\n\t\x01é\u2028', indent=None) == '"a\\"\\\\\\n\\t\\u0001é\\u2028"'
    assert go_json({"sig0": "AB==", "sig1": "CD"}, indent=None) == '{"sig0":"AB==","sig1":"CD"}'
    assert go_json({"a": [], "b": {}, "c": [1, 2.5, 3.0, None]}, indent=None) == '{"a":[],"b":{},"c":[1,2.5,3,null]}'
    assert go_json([1, {"x": True}], indent=" ") == '[\n 1,\n {\n  "x": true\n }\n]'
    with pytest.raises(TypeError):
        go_json(object())


def test_manifest_from_bundle():
    from updater.bundle import make_virtual_bundle
    from updater.manifest import manifest_version, read_manifest

    fw = make_virtual_bundle("esp32", "4.5.6", app_size=4096)
    assert manifest_version(fw) == "4.5.6"
    assert read_manifest(fw)["platform"] == "esp32"
    assert manifest_version(b"not a zip") is None
