"""The README's screenshot: the search page over a trained checkpoint's index, after a text search and a zero-shot
classification, taken by headless Chromium (Debian's `chromium`, driven by Playwright; no browser download).

    python -m tools.screenshot --model-path checkpoints/demo/best.pt --images datasets/demo/valid/images \
        --query "a big red circle in the top left" --image datasets/demo/valid/images/00042.jpg \
        --labels "circle,square,triangle,star" --output docs/screenshot.png

It prints what the page shows (the top results and the label probabilities), so the picture can be checked
against the numbers before it goes into the README.
"""
import argparse
import shutil
import socket
import tempfile
import threading
import time

from engine.errors import UserError, run_entry
from inference.encoder import Encoder
from inference.index import build_index
from inference.serve import create_app


class ScreenshotError(UserError):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app):
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise ScreenshotError("the server did not start within 60 s")
        time.sleep(0.1)
    return server, thread, f"http://127.0.0.1:{port}/"


def shoot(url, a):
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise ScreenshotError("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        page.wait_for_function("document.querySelector('#info').textContent.includes('images')")
        page.fill("#query", a.query)
        page.press("#query", "Enter")
        page.wait_for_function("document.querySelectorAll('#results img').length > 0")
        page.wait_for_function("[...document.querySelectorAll('#results img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
        top = page.locator("#results figcaption .path").all_inner_texts()[:4]
        page.set_input_files("#file", a.image)
        page.fill("#labels", a.labels)
        page.click("#classify")
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('best label')")
        names = page.locator("#chart .name").all_inner_texts()
        widths = page.eval_on_selector_all("#chart .bar", "bars => bars.map(b => b.style.width)")
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=a.output, full_page=True)
        browser.close()
    return top, list(zip(names, widths, strict=True))


def run(a):
    with tempfile.TemporaryDirectory(prefix="screenshot-") as folder:
        encoder = Encoder(a.model_path, "cpu")
        build_index(encoder, a.images, folder, progress=False)
        server, thread, url = serve_in_thread(create_app(a.model_path, folder, device="cpu"))
        try:
            top, labels = shoot(url, a)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    print(f"query {a.query!r}: top results {', '.join(top)}")
    print(f"labels for {a.image}: " + ", ".join(f"{n} {w}" for n, w in labels))
    print(f"screenshot written to {a.output}")
    return {"top": top, "labels": labels}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", required=True, help="checkpoint written by train.py")
    p.add_argument("--images", required=True, help="folder of images to index and search")
    p.add_argument("--query", required=True, help="text query typed into the page")
    p.add_argument("--image", required=True, help="image uploaded for zero-shot classification")
    p.add_argument("--labels", required=True, help="comma-separated labels for the classification")
    p.add_argument("--output", default="docs/screenshot.png", help="PNG to write")
    return run_entry(run, p.parse_args(argv))


if __name__ == "__main__":
    main()
