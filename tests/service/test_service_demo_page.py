"""The demo page in headless Chromium (Debian's binary via Playwright): pick/upload, ground, see boxes.

Saves docs/images/demo_page.png. The page must work offline: every request it makes goes to the
service itself.
"""

from __future__ import annotations

import shutil
from urllib.parse import urlparse

import pytest
from service_testkit import REPO, encode, exif_rotated_jpeg, rgb_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = REPO / "docs" / "images" / "demo_page.png"

browser_test = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install -y chromium)")


@pytest.fixture
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is part of the dev extra")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1180, "height": 820})
        page = context.new_page()
        hosts: set[str] = set()
        page.on("request", lambda request: hosts.add(urlparse(request.url).netloc))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        assert hosts <= {f"127.0.0.1:{server.port}", ""}, f"the page reached out to {hosts}"
        assert errors == []
        context.close()
        browser.close()


@pytest.mark.slow
@browser_test
def test_pick_a_sample_and_ground(server, page):
    page.goto(server.url + "/")
    assert page.title() == "Diff-Prompt grounding demo"
    page.click("#samples button >> nth=2")
    page.wait_for_function("!document.getElementById('ground').disabled")
    page.fill("#expression", "the second square from the left")
    page.fill("#top_k", "3")
    page.click("#ground")
    page.wait_for_selector("#boxes li")
    items = page.locator("#boxes li")
    assert items.count() == 3
    assert "score" in items.first.inner_text()
    assert "xyxy_pixels" in page.inner_text("#meta") and "128×128" in page.inner_text("#meta")
    assert "3 box(es)" in page.inner_text("#status")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.mark.slow
@browser_test
def test_upload_an_image_and_see_errors(server, page, tmp_path):
    page.goto(server.url + "/")
    upload = tmp_path / "rotated.jpg"
    upload.write_bytes(exif_rotated_jpeg(120, 60))
    page.set_input_files("#file", str(upload))
    page.wait_for_function("!document.getElementById('ground').disabled")
    page.fill("#expression", "the red circle")
    page.click("#ground")
    page.wait_for_selector("#boxes li")
    assert "60×120" in page.inner_text("#meta")  # EXIF-rotated size, as the browser draws it
    canvas = page.eval_on_selector("#canvas", "c => [c.width, c.height]")
    assert canvas[1] > canvas[0]
    page.fill("#expression", "   ")
    page.click("#ground")
    page.wait_for_selector("#status.error")
    assert "expression_empty" in page.inner_text("#status")
    gif = tmp_path / "image.gif"
    gif.write_bytes(encode(rgb_image(20, 20), "GIF"))
    page.set_input_files("#file", str(gif))  # the browser reads GIFs, the service refuses them
    page.wait_for_function("!document.getElementById('ground').disabled")
    page.fill("#expression", "the red circle")
    page.click("#ground")
    page.wait_for_function("document.getElementById('status').textContent.includes('unsupported_image_format')")


def test_samples_are_served(server):
    for name in ("diamond_star.png", "blue_circle.png", "squares.png"):
        r = server.client.get(f"/static/samples/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    html = server.client.get("/").text
    assert "<script" in html and "http://" not in html and "https://" not in html  # nothing external
