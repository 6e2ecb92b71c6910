"""The live web page: in a real headless browser (Debian's /usr/bin/chromium, driven by playwright),
and its script under node with a stub DOM (what the server fills in, checked without a browser).

Each is skipped cleanly when its tools are missing. Set UNMASK_WEB_SCREENSHOT to keep the screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

import unmask
from serve_fixtures import live_server
from unmask.serve import ServeConfig, create_app

CHROMIUM = Path("/usr/bin/chromium")
NODE = shutil.which("node")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return unmask.load(tiny_checkpoint)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")
def test_page_shows_both_generations(loaded, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    app = create_app(*loaded, ServeConfig(model_name="tiny"))
    shot = tmp_path / "unmask_web.png"
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            assert not page.is_checked("#chat")          # "tiny" is not a chat model: plain completion
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


# The page's script, run by node against just enough of a DOM: element lookups and event hooks.
STUB_DOM = """
const elements = {};
const element = (id) => elements[id] ??= {id, checked: false, hidden: false, value: "", textContent: "",
  addEventListener() {}, querySelector: (sel) => element(id + " " + sel)};
globalThis.document = {getElementById: element, querySelector: element,
  querySelectorAll: (sel) => sel === ".needs-key" ? [element("key")] : []};
"""


def page_state(html: str) -> dict:
    """Run the page's script under node; what it set up from the server's PAGE config."""
    script = re.search(r"<script>(.*)</script>", html, re.DOTALL).group(1)
    report = ("console.log(JSON.stringify({chat: elements.chat.checked, keyHidden: elements.key.hidden, "
              "stepsLabel: element('steps-label').textContent}));")
    out = subprocess.run([NODE, "-e", STUB_DOM + script + report], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("name, api_key, chat", [("tiny", None, False), ("LLaDA-8B-Instruct", "k", True)])
def test_page_script_starts_from_the_served_model(loaded, name, api_key, chat):
    """The chat template box starts ticked only for a chat model; the key box shows only with --api-key."""
    with live_server(create_app(*loaded, ServeConfig(model_name=name, api_key=api_key))) as url:
        html = httpx.get(url + "/").text
    assert page_state(html) == {"chat": chat, "keyHidden": api_key is None, "stepsLabel": ""}


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_page_labels_steps_per_block_for_a_block_diffusion_model(tiny_llada2_checkpoint):
    with live_server(create_app(*unmask.load(tiny_llada2_checkpoint), ServeConfig(model_name="tiny"))) as url:
        html = httpx.get(url + "/").text
    assert page_state(html)["stepsLabel"] == "steps per block"


# What the running-rows panel needs beyond STUB_DOM: a window that loads, fetch answering /rows,
# and elements that hold children.
ROWS_STUB = """
const answer = {queued: 2, rows: [
  {id: 7, step: 3, steps: 48, block: 0, blocks: 3, max_tokens: 48, cfg_scale: 1, temperature: 0, seconds: 0.5},
  {id: 8, step: 5, steps: null, block: 1, blocks: 2, max_tokens: 16, cfg_scale: 0, temperature: 0.7, seconds: 0.2},
  {id: 9, step: null, steps: null, max_tokens: 8, cfg_scale: 0, temperature: 0, whole_call: true}]};
let onLoad = null;
const polled = [];
globalThis.window = {addEventListener: (name, f) => { if (name === "load") onLoad = f; }};
globalThis.fetch = async (url) => { polled.push(url); return {json: async () => answer}; };
globalThis.setInterval = () => 0;
document.createElement = (tag) => ({tag, children: [], appendChild(c) { this.children.push(c); }});
element("rows").tBodies = [{children: [], replaceChildren(...c) { this.children = c; }}];
"""
ROWS_REPORT = """
const before = element("rows").tBodies[0].children.length;
onLoad();
setTimeout(() => console.log(JSON.stringify({before, polled, stats: element("rows-stats").textContent,
  cells: element("rows").tBodies[0].children.map((tr) => tr.children.map((td) => String(td.textContent)))})), 0);
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_page_lists_the_running_rows_from_the_server(loaded):
    """Once loaded, the page polls GET /rows and shows each running row's step of its total."""
    with live_server(create_app(*loaded, ServeConfig(model_name="tiny"))) as url:
        html = httpx.get(url + "/").text
    script = re.search(r"<script>(.*)</script>", html, re.DOTALL).group(1)
    out = subprocess.run([NODE, "-e", STUB_DOM + ROWS_STUB + script + ROWS_REPORT], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    state = json.loads(out.stdout)
    assert state["before"] == 0 and state["polled"] == ["/rows"] and state["stats"] == "3 running, 2 waiting"
    assert state["cells"] == [["7", "3/48", "1/3", "48", "1", "0", "0.5"], ["8", "5", "2/2", "16", "0", "0.7", "0.2"],
                              ["9", "whole call", "", "8", "0", "0", ""]]
