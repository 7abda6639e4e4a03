"""The preview driven in a real headless browser: Debian's chromium through playwright.

A person's path through the page: it opens on digits-sd with an erased run selected, they type a
prompt, press Generate, and the base model's and the run's images appear side by side and differ;
a bad request shows its message in the page. The screenshot is saved as a test artefact
(ERASURE_TEST_ARTIFACTS, default build/test-artifacts/); the README's picture is that screenshot
taken with a real run: ERASURE_PREVIEW_RUN=runs/esd-seven pytest tests/test_preview_browser.py.

Skipped, with the reason, only when no browser can be started (playwright or chromium missing).
"""

import io
import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from erasure.api import erase

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PROMPTS = ["a red seven", "a blue three"]  # the erased concept, and a digit that must survive
SEEDS = 4


def _chromium() -> str | None:
    return os.environ.get("ERASURE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser: the playwright package is not installed (pip install -e '.[dev]')")
    executable = _chromium()
    if executable is None:
        pytest.skip("no browser: chromium is not installed (apt-get install chromium)")
    home = tmp_path_factory.mktemp("browser-home")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache"), "XDG_DATA_HOME": str(home / "data")}  # fmt: skip
    playwright = sync_playwright().start()
    try:
        # launch() gives chromium a fresh temporary profile of its own.
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, env=env, timeout=60_000)
    except Exception as exc:
        playwright.stop()
        pytest.skip(f"no browser: {executable} did not start: {str(exc).splitlines()[0]}")
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    """The app on a free local port, opened on digits-sd with one erased run selected."""
    from ui.app import Preview, launch

    runs = tmp_path_factory.mktemp("browser") / "runs"
    run = os.environ.get("ERASURE_PREVIEW_RUN")
    if run is None:  # two large ESD steps: a different model, made in seconds
        quick = ["steps=2", "ddim_steps=3", "batch_size=1", "lr=1e-2"]
        run = str(erase("esd", ["seven"], "digits", out=runs / "esd-seven", sets=quick, progress=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(Preview(model="digits", erased=[run], runs_dir=runs), port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _gallery_images(page, elem_id: str) -> list[Image.Image]:
    sources = page.locator(f"#{elem_id} .grid-wrap img").evaluate_all("els => els.map(e => e.src)")
    return [Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB") for src in sources]


@pytest.mark.slow
def test_page_generates_base_and_erased_images_that_differ(browser, page_url):
    page = browser.new_page(viewport={"width": 1280, "height": 1040})
    page.goto(page_url, timeout=60_000)
    prompts = page.locator("#prompts textarea")
    prompts.fill("\n".join(PROMPTS))
    page.get_by_label("steps", exact=True).fill("10")
    page.locator("#generate").click()
    for elem_id in ("base-images", "erased-images"):
        page.locator(f"#{elem_id} .grid-wrap img").nth(len(PROMPTS) * SEEDS - 1).wait_for(timeout=180_000)
    page.get_by_text(f"base · {PROMPTS[1]} · seed 3").first.wait_for()
    base, erased = _gallery_images(page, "base-images"), _gallery_images(page, "erased-images")
    assert len(base) == len(erased) == len(PROMPTS) * SEEDS
    assert all(a.size == b.size for a, b in zip(base, erased))
    assert any(a.tobytes() != b.tobytes() for a, b in zip(base, erased))  # the erasure shows

    artefacts = Path(os.environ.get("ERASURE_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artefacts / "preview.png"))
    print(f"screenshot: {artefacts / 'preview.png'}")

    # A bad request is a message in the page, and the page goes on working.
    prompts.fill("")
    page.locator("#generate").click()
    page.get_by_text("type at least one prompt").first.wait_for(timeout=30_000)
    page.close()
