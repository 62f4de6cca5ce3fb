"""The web page end to end in headless Chromium: text search, then classification of an uploaded image.

Uses Debian's `chromium` (apt-get install chromium) through the Python `playwright` package; Playwright's own
browser download is never used. The server is the real uvicorn on a free loopback port. Without chromium the
tests fail (never skip) with the command that installs it.
"""
import os
import shutil

import pytest

from inference import index as search_index
from inference import serve
from inference.encoder import Encoder
from tools.screenshot import serve_in_thread

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LABELS = "circle, square, triangle, star"



@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("browser") / "index"
    search_index.build_index(Encoder(str(tiny["checkpoint"]), "cpu"), str(tiny["images"]), str(index_dir),
                             progress=False)
    server, thread, url = serve_in_thread(serve.create_app(str(tiny["checkpoint"]), str(index_dir), device="cpu"))
    yield {"url": url, "images": tiny["images"]}
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is needed for the browser tests: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package playwright is needed: pip install playwright (no browser download)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_search_and_classify_in_the_browser(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server["url"])
    page.wait_for_function("document.querySelector('#info').textContent.includes('24 images')")

    # text -> image: the grid fills with 16 images that all load
    page.fill("#query", "a big red circle in the top left")
    page.press("#query", "Enter")
    page.wait_for_function("document.querySelectorAll('#results img').length === 16")
    page.wait_for_function("[...document.querySelectorAll('#results img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)", timeout=15_000)
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)

    # image -> image: the uploaded image comes back first
    upload = sorted(server["images"].iterdir())[4]
    page.set_input_files("#file", str(upload))
    page.click("#similar")
    page.wait_for_function(f"document.querySelector('#results figcaption .path')?.textContent === '{upload.name}'")

    # zero-shot classification: one bar per label, widths adding up to the whole track
    page.fill("#labels", LABELS)
    page.click("#classify")
    page.wait_for_function("document.querySelectorAll('#chart .bar').length === 4")
    names = page.locator("#chart .name").all_inner_texts()
    assert sorted(names) == sorted(x.strip() for x in LABELS.split(","))
    widths = page.eval_on_selector_all("#chart .bar", "bars => bars.map(b => parseFloat(b.style.width))")
    assert sum(widths) == pytest.approx(100, abs=0.5) and widths == sorted(widths, reverse=True)
    assert "best label" in page.inner_text("#status")

    # a bad upload shows the server's message and the page keeps working
    page.set_input_files("#file", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not an image"}])
    page.click("#similar")
    page.wait_for_function("document.querySelector('#status').classList.contains('error')")
    assert "not an image" in page.inner_text("#status")
    page.set_input_files("#file", str(upload))
    page.click("#classify")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('best label')")

    page.evaluate("window.scrollTo(0, 0)")
    shot = tmp_path / "screenshot.png"  # the README's picture comes from the trained demo: tools/screenshot.py
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert errors == []
    page.close()


def test_page_fits_a_phone(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page.goto(server["url"])
    page.fill("#query", "a small blue star")
    page.press("#query", "Enter")
    page.wait_for_function("document.querySelectorAll('#results img').length === 16")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    columns = page.evaluate("getComputedStyle(document.querySelector('#results'))"
                            ".gridTemplateColumns.split(' ').length")
    assert 2 <= columns <= 4
    page.close()
