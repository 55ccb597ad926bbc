"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright; no browser
download): select devices, upload a bundle, watch progress reach 100 % and the new version appear
(pushed by server-sent events: the page does not poll); a rollback shows its reason; a rollout is
paused, resumed and aborted from its buttons; at 1000 px nothing overflows.

The screenshots go to ``tmp_path``; with ``MGRPC_UPDATE_SCREENSHOT=1`` they also replace
``docs/dashboard.png`` and ``docs/dashboard-1000px.png`` (the README's pictures).
"""

from __future__ import annotations

import asyncio
import os
import re
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
DOCS = Path(__file__).resolve().parents[2] / "docs"
SCREENSHOT = DOCS / "dashboard.png"


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


@pytest.mark.timeout(120)
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
                page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))  # the Abort confirmation
                state_fetches: list[str] = []
                page.on("request", lambda req: state_fetches.append(req.url) if "/api/state" in req.url else None)
                await page.goto(fleet.url + "/")
                await expect(page.locator("#live")).to_have_text("live")
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
                # all of that arrived by server push: the page fetched the state at load (and at most
                # once more, if the stream was reconnecting when its 5 s fallback looked), not every 0.5 s
                assert 1 <= len(state_fetches) <= 2, state_fetches

                # a firmware that hangs: the device rolls back, and the page says why
                hang = fleet.app.db.add_bundle(make_virtual_bundle("esp32", "1.4", behavior="hang"))
                fleet.app.start_rollout(devices=["esp32-01"], bundle=hang.sha, method="url", commit_timeout_s=2)
                row = page.locator('tr[data-id="esp32-01"]')
                await expect(row.locator("td.jobstate")).to_have_text("rolled back", timeout=30_000)
                await expect(row.locator("td.message")).to_contain_text("rolled back to 1.0: 1.4 never came online")
                await expect(row.locator("td.message")).to_have_class(re.compile("reason"))

                # pause, resume, abort: devices 04 and 05 never poll, so the poll jobs wait
                r = fleet.app.start_rollout(devices=["esp32-04", "esp32-05"], bundle=hang.sha, method="poll",
                                            concurrency=1)  # fmt: skip
                ctl = page.locator(f'#rollouts tr[data-rollout="{r.id}"]')
                await expect(ctl.locator(".rstate")).to_have_text("running")
                await ctl.locator('button[data-action="pause"]').click()
                await expect(ctl.locator(".rstate")).to_have_text("paused")
                assert r.state == "paused"
                await ctl.locator('button[data-action="resume"]').click()
                await expect(ctl.locator(".rstate")).to_have_text("running")
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                await ctl.locator('button[data-action="abort"]').click()
                await expect(ctl.locator(".rstate")).to_have_text("aborted")
                await expect(ctl.locator(".summary")).to_have_text("2 skipped")
                await expect(ctl.locator("button")).to_have_count(0)
                await expect(page.locator('tr[data-id="esp32-05"] td.message')).to_contain_text("aborted")
                assert r.summary() == {"skipped": 2}

                # 1000 px: no horizontal overflow, progress text readable (not clipped, >= 12 px)
                await page.set_viewport_size({"width": 1000, "height": 760})
                await expect(page.locator('tr[data-id="esp32-00"] .pct')).to_be_visible()
                overflow = await page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
                assert overflow <= 0, f"the page is {overflow} px wider than 1000 px"
                for sel in ('tr[data-id="esp32-00"] .pct', 'tr[data-id="esp32-01"] td.jobstate',
                            'tr[data-id="esp32-01"] td.message', "#devices th:nth-child(5)"):  # fmt: skip
                    # A pushed update may re-render the row between two reads: measure again then.
                    box = None
                    for _ in range(50):
                        box = await page.locator(sel).bounding_box()
                        if box is not None:
                            break
                        await asyncio.sleep(0.1)
                    assert box is not None and box["x"] + box["width"] <= 1000, (sel, box)
                    clipped = await page.locator(sel).evaluate("e => e.scrollWidth > e.clientWidth + 1")
                    assert not clipped, f"{sel} is cut off at 1000 px"
                size = await page.locator('tr[data-id="esp32-00"] .pct').evaluate(
                    "e => parseFloat(getComputedStyle(e).fontSize)")
                assert size >= 12
                narrow = tmp_path / "dashboard-1000px.png"
                await page.screenshot(path=str(narrow), full_page=True)
                if os.environ.get("MGRPC_UPDATE_SCREENSHOT") == "1":
                    DOCS.mkdir(exist_ok=True)
                    shutil.copyfile(shot, SCREENSHOT)
                    shutil.copyfile(narrow, DOCS / "dashboard-1000px.png")
            finally:
                await ctx.close()
        for d in devices:
            assert d.fw.version == ("1.1" if d.id in chosen else "1.0")  # 01 rolled back, 04/05 aborted
    finally:
        for d in devices:
            await d.stop()
        await fleet.close()
