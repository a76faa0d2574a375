"""The web app (sample/app.py) as a person uses it: headless Chromium (Debian's, driven by
playwright without a browser download of its own) types a prompt, presses Generate and waits for
the result in the gallery. The screenshot goes to the test's tmp folder, and also to
$CASCADE_APP_SCREENSHOT when that is set. Skipped when chromium is not installed (CI's .ci/run
installs it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import app_testing

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 300_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason="chromium is not installed here (apt-get install chromium; CI installs it)")


@pytest.fixture(scope="module")
def app(request, tmp_path_factory):
    yield from app_testing.shared_app(request, tmp_path_factory)


def test_type_a_prompt_press_generate_and_see_the_image(app, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 1100})
        try:
            page = browser.new_page()
            page.goto(app.url, wait_until="networkidle")
            page.locator("#prompt textarea").fill("a blue square on a white background")
            page.locator("#text_to_image").click()
            image = page.locator("#gallery img").first
            image.wait_for(timeout=WAIT_MS)
            page.get_by_text("Done: 1 image(s)").wait_for(timeout=WAIT_MS)
            size = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert size == [128, 128]
    assert shot.stat().st_size > 10_000
    if os.environ.get("CASCADE_APP_SCREENSHOT"):
        target = Path(os.environ["CASCADE_APP_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    print(f"\nscreenshot: {shot}")
