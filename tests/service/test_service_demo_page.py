"""The demo page and /docs in headless Chromium (Debian's binary via Playwright): pick/upload, ground,
see boxes whose labels do not cover each other; the OpenAPI docs render their operations.

Saves runs/test-artifacts/demo_page.png (docs/images/demo_page.png is a copy) and demo_page_labels.png.
Both pages must work offline: every request goes to the service itself; any other is refused and fails the test.
"""

from __future__ import annotations

import io
import itertools
import shutil
from urllib.parse import urlparse

import pytest
from PIL import Image
from service_testkit import REPO, encode, exif_rotated_jpeg, rgb_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = REPO / "runs" / "test-artifacts" / "demo_page.png"  # docs/images/demo_page.png is a copy of it
ARTIFACTS = REPO / "runs" / "test-artifacts"
# No sandbox (root in a container), no GPU, and none of Chromium's own traffic (updates, sync, ...).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

browser_test = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install -y chromium)")


@pytest.fixture
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is part of the dev extra")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1180, "height": 820})
        own_host = f"127.0.0.1:{server.port}"
        outside: list[str] = []

        def only_the_service(route) -> None:  # every request of the page passes here: others never leave
            if urlparse(route.request.url).netloc in (own_host, ""):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_the_service)
        page = context.new_page()
        page.requested = []  # every URL the page asked for, in order
        page.on("request", lambda request: page.requested.append(request.url))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        assert outside == [], f"the page reached out to {outside}"
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


def _label_rects(page) -> list[dict]:
    return page.eval_on_selector_all(".box-label", """els => els.map(e => {
        const r = e.getBoundingClientRect();
        return {rank: +e.dataset.rank, x: r.x, y: r.y, w: r.width, h: r.height}; })""")


def _overlap(a: dict, b: dict) -> bool:
    return min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"]) > 0.5 and \
        min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"]) > 0.5


@pytest.mark.slow
@browser_test
def test_box_labels_do_not_cover_each_other(server, page):
    """20 boxes of a random model crowd each other: every label is shown, inside the image, over no other."""
    page.goto(server.url + "/")
    page.click("#samples button >> nth=2")
    page.wait_for_function("!document.getElementById('ground').disabled")
    page.fill("#top_k", "20")
    page.click("#ground")
    page.wait_for_function("document.getElementById('status').textContent.includes('box(es)')")
    boxes = page.locator("#boxes li").count()
    labels = _label_rects(page)
    canvas = page.eval_on_selector("#canvas", "c => { const r = c.getBoundingClientRect(); "
                                              "return {x: r.x, y: r.y, w: r.width, h: r.height, width: c.width}; }")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_page_labels.png"), full_page=True)
    assert boxes == 20 and sorted(label["rank"] for label in labels) == list(range(1, 21))
    for label in labels:
        assert canvas["x"] - 0.5 <= label["x"] and label["x"] + label["w"] <= canvas["x"] + canvas["w"] + 0.5
        assert canvas["y"] - 0.5 <= label["y"] and label["y"] + label["h"] <= canvas["y"] + canvas["h"] + 0.5
    clashes = [(a["rank"], b["rank"]) for a, b in itertools.combinations(labels, 2) if _overlap(a, b)]
    assert clashes == [], clashes

    # the case is a real one: at their boxes' top-left corners (the old layout) these labels would collide
    px = canvas["w"] / canvas["width"]
    result = page.evaluate("shown.result")
    k = canvas["width"] / result["width"]
    at_corners = [{"x": canvas["x"] + b["xyxy"][0] * k * px, "w": label["w"], "h": label["h"],
                   "y": canvas["y"] + max(b["xyxy"][1] * k * px - label["h"], 0)}
                  for b, label in zip(result["boxes"], sorted(labels, key=lambda r: r["rank"]))]
    assert any(_overlap(a, b) for a, b in itertools.combinations(at_corners, 2))


@pytest.mark.slow
@browser_test
def test_docs_render_offline(server, page):
    """/docs shows every operation of the schema, with Swagger UI's files served by the service itself."""
    spec = server.client.get("/openapi.json").json()
    operations = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
    page.goto(server.url + "/docs")
    page.wait_for_function(f"document.querySelectorAll('.opblock').length === {len(operations)}")
    shown = list(zip(page.locator(".opblock-summary-method").all_inner_texts(),
                     page.locator(".opblock-summary-path").all_inner_texts()))
    assert sorted(shown) == sorted(operations)
    assert "Diff-Prompt grounding service" in page.inner_text(".info")
    assets = {urlparse(u).path for u in page.requested}
    assert {"/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css",
            "/openapi.json"} <= assets


def test_favicon_is_served_and_linked(server):
    r = server.client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    icon = Image.open(io.BytesIO(r.content))
    assert icon.format == "ICO" and {(16, 16), (32, 32)} <= set(icon.info["sizes"])
    assert '<link rel="icon" href="/favicon.ico">' in server.client.get("/").text
    assert 'href="/favicon.ico"' in server.client.get("/docs").text
