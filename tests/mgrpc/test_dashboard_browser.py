"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright; no browser
download): select devices, upload a bundle, watch progress reach 100 % and the new version appear.

The screenshot goes to ``tmp_path``; with ``MGRPC_UPDATE_SCREENSHOT=1`` it also replaces
``docs/dashboard.png`` (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from mgrpc.wiring import start_fleet, start_fleet_device
from tests.mosquitto import mosquitto_broker  # noqa: F401  (fixture)
from tests.services.test_shadow import wait_for
from updater.bundle import make_virtual_bundle
from updater.storage import DeviceStorage

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"


def find_chromium() -> str | None:
    """The system Chromium (``$CHROMIUM`` first), or None."""
    env = os.environ.get("CHROMIUM")
    if env and os.access(env, os.X_OK):
        return env
    for cand in CHROMIUM_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which("chromium")


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("chromium is not installed (looked for /usr/bin/chromium); `make system-deps` installs it")
    return path


@pytest.mark.timeout(60)
async def test_select_upload_progress_new_version(mosquitto_broker, chromium: str, tmp_path) -> None:  # noqa: F811
    from playwright.async_api import async_playwright, expect

    broker = mosquitto_broker().url()
    fleet = await start_fleet(broker=broker, db_path=tmp_path / "fleet.sqlite")
    devices: list[Any] = []
    bundle_path = tmp_path / "fw-1.1.zip"
    bundle_path.write_bytes(make_virtual_bundle("esp32", "1.1"))
    try:
        for i in range(6):
            devices.append(await start_fleet_device(broker, f"esp32-{i:02d}", storage=DeviceStorage.in_memory()))
        await wait_for(lambda: sum(d.online for d in fleet.app.devices.values()) == 6, what="devices online")
        chosen = ["esp32-00", "esp32-02", "esp32-03", "esp32-05"]
        async with async_playwright() as pw:
            ctx = await pw.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="mgrpc-chromium-", dir=tmp_path), executable_path=chromium,
                headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 760},
            )  # fmt: skip
            try:
                page = await ctx.new_page()
                await page.goto(fleet.url + "/")
                rows = page.locator("#devices tbody tr")
                await expect(rows).to_have_count(6)
                await expect(page.locator('tr[data-id="esp32-00"] td.version')).to_have_text("1.0")
                await expect(page.locator('tr[data-id="esp32-00"] td.online')).to_have_text("online")
                for dev_id in chosen:
                    await page.locator(f'input.sel[data-id="{dev_id}"]').check()
                await page.set_input_files("#file", str(bundle_path))
                await page.select_option("#method", "push")
                await page.fill("#commit-timeout", "60")
                await page.click("#start")
                await expect(page.locator("#form-msg")).to_contain_text("1.1 to 4 devices by push")
                for dev_id in chosen:
                    row = page.locator(f'tr[data-id="{dev_id}"]')
                    await expect(row.locator(".pct")).to_have_text("100%", timeout=20_000)
                    await expect(row.locator("td.version")).to_have_text("1.1", timeout=20_000)
                    await expect(row.locator("td.jobstate")).to_have_text("done", timeout=20_000)
                    await expect(row.locator("td.committed")).to_have_text("yes")
                # the others were not touched
                await expect(page.locator('tr[data-id="esp32-01"] td.version')).to_have_text("1.0")
                await expect(page.locator("#rollouts tbody tr").first.locator(".summary")).to_have_text("4 done")
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                if os.environ.get("MGRPC_UPDATE_SCREENSHOT") == "1":
                    SCREENSHOT.parent.mkdir(exist_ok=True)
                    shutil.copyfile(shot, SCREENSHOT)
            finally:
                await ctx.close()
        for d in devices:
            assert d.fw.version == ("1.1" if d.id in chosen else "1.0")
    finally:
        for d in devices:
            await d.stop()
        await fleet.close()
