"""The live web page in a real headless browser (Debian's /usr/bin/chromium, driven by playwright).

Skipped cleanly when either is missing. Set UNMASK_WEB_SCREENSHOT to keep the screenshot somewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import unmask
from serve_fixtures import live_server
from unmask.serve import ServeConfig, create_app

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


def test_page_shows_both_generations(tiny_checkpoint, tmp_path):
    model, tokenizer = unmask.load(tiny_checkpoint)
    app = create_app(model, tokenizer, ServeConfig(model_name="tiny"))
    shot = tmp_path / "unmask_web.png"
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.fill("#gen", "48")
            page.fill("#steps", "48")
            page.fill("#block", "16")
            page.fill("#cfg", "2")
            page.click("#run")
            for panel in ("#plain", "#guided"):
                page.wait_for_function(f"document.querySelector('{panel} .stats').textContent.includes('finish')",
                                       timeout=60_000)
            page.screenshot(path=str(shot), full_page=True)
            for panel in ("#plain", "#guided"):
                assert page.locator(f"{panel} .tok").count() == 48
                assert "tok/s" in page.locator(f"{panel} .stats").inner_text()
            assert not errors, errors
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("UNMASK_WEB_SCREENSHOT"):
        shutil.copy(shot, os.environ["UNMASK_WEB_SCREENSHOT"])
