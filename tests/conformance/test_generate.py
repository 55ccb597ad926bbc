"""``--ota-generate`` builds what a device of the reported arch accepts (issue 11 point 5)."""

from __future__ import annotations

import io
import zipfile

import pytest

from conformance.checks.ota import GENERATED_FS_SIZE, bundle_manifest, generate_bundle
from updater.flash import Flash
from updater.fs import FlashFS
from updater.partitions import Partition


def _entry(bundle: bytes, name: str) -> bytes:
    return zipfile.ZipFile(io.BytesIO(bundle)).read(name)


@pytest.mark.parametrize("arch", ["esp32", "ESP32", "esp8266"])
def test_esp_bundles_carry_app_and_fs_with_checksums(arch: str) -> None:
    bundle = generate_bundle(arch, "1.2.3")
    m = bundle_manifest(bundle)
    assert m["platform"] == arch and m["version"] == "1.2.3"
    app = "fw" if arch == "esp8266" else "app"
    assert set(m["parts"]) == {app, "fs"}
    for part in m["parts"].values():
        assert len(part["cs_sha1"]) == 40 and part["src"]  # ESP32/ESP8266 require src and cs_sha1
        assert len(_entry(bundle, part["src"])) == part["size"]
    assert m["parts"]["fs"]["type"] == "fs"
    if arch == "esp8266":
        assert m["parts"]["fs"]["addr"] != 0  # updater.md §3: parts.fs.addr must not be 0


def test_the_fs_part_is_a_littlefs_image_the_virtual_device_mounts() -> None:
    bundle = generate_bundle("esp32", "2.0")
    image = _entry(bundle, bundle_manifest(bundle)["parts"]["fs"]["src"])
    assert len(image) == GENERATED_FS_SIZE
    flash = Flash(None, size=len(image), sector_size=4096)
    flash.write(0, image)
    fs = FlashFS(flash, Partition("fs", 0, len(image)))
    assert fs.read("conf0.json") == b"{}"


def test_other_archs_get_app_and_fs_too() -> None:
    assert set(bundle_manifest(generate_bundle("ubuntu", "1"))["parts"]) == {"app", "fs"}
