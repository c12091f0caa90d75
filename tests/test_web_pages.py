"""The web UI (sdfc/web) in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

The browser talks to server B, which runs no tasks (SDFC_TASK_WORKER=off, as FC's web function); server A
shares the database and outputs folder and runs them, so progress and results cross processes as in FC.
Every flow asserts that the page logged no console error and no request failed.
"""
from __future__ import annotations

import base64
import io
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from playwright import sync_api  # a test dependency (pyproject's test extra); never `playwright install`

from .live_server import PASSWORD, USER, start_server

CHROMIUM = "/usr/bin/chromium"
ALICE = (USER, PASSWORD)
SCREENSHOTS = Path(__file__).resolve().parents[1] / "bench" / "out" / "screenshots"
DESKTOP, PHONE = {"width": 1440, "height": 900}, {"width": 390, "height": 844}
TIMEOUT_MS = 20_000


def shared_env(tmp: Path, name: str, **extra) -> dict:
    env = {"SDFC_DATABASE_URL": f"sqlite:///{tmp / 'shared.db'}", "SDFC_OUTPUTS_DIR": str(tmp / "outputs"),
           "SDFC_SPOOL_DIR": str(tmp / f"spool-{name}")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    runner = start_server(tmp, env=shared_env(tmp, "a"))
    web = start_server(tmp, env=shared_env(tmp, "b", SDFC_TASK_WORKER="off"))
    yield runner, web
    web.stop()
    runner.stop()


@pytest.fixture(scope="module")
def browser():
    # Missing Chromium is a failure, not a skip: .ci/run installs Debian's package.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield b
        b.close()


class Watched:
    """A logged-in page that records console errors and failed requests."""

    def __init__(self, browser, viewport=DESKTOP, credentials=ALICE):
        self.context = browser.new_context(viewport=viewport, accept_downloads=True, http_credentials={
            "username": credentials[0], "password": credentials[1]})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"pageerror: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))

    def open(self, url: str):
        response = self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]")
        return response

    def close(self):
        self.context.close()
        assert self.problems == []


def newest(server, **params) -> dict:
    return requests.get(server.url + "/gallery/api/images", params={"page_size": 1, **params}, auth=ALICE,
                        timeout=10).json()


def wait_for_record(server, prompt: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        items = newest(server, q=prompt)["items"]
        if items:
            return items[0]
        time.sleep(0.1)
    raise AssertionError(f"no record for {prompt!r}")


def generate(page, prompt: str, steps: int = 6) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Negative prompt").fill("blurry")
    page.get_by_label("Sampling steps").fill(str(steps))
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_role("button", name="Generate", exact=True).click()


def test_wrong_or_missing_credentials_get_the_login_challenge(servers, browser):
    _, web = servers
    for credentials in ((USER, "Wrong-pass99"), None):
        context = browser.new_context(http_credentials=None if credentials is None else {
            "username": credentials[0], "password": credentials[1]})
        page = context.new_page()
        challenges = []
        page.on("response", lambda r: challenges.append((r.url, r.status, r.headers.get("www-authenticate", ""))))
        for path in ("/", "/images", "/static/web/generate.js"):
            try:
                assert page.goto(web.url + path).status == 401, path  # the browser shows the 401 page
            except sync_api.Error as exc:  # or, headless, gives up on the challenge it cannot answer
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc), exc
            assert not [c for c in challenges if c[1] != 401], challenges
            assert (web.url + path, 401, 'Basic realm="sdfc", charset="UTF-8"') in challenges, path
        context.close()


def test_generate_watch_browse_download_and_reuse(servers, browser):
    runner, web = servers
    w = Watched(browser)
    page = w.page
    w.open(web.url + "/")
    assert page.get_by_label("Sampling method").locator("option").count() > 3
    assert page.get_by_label("Model").locator("option").first.inner_text() == "tiny-sd"
    generate(page, "a lighthouse at dusk, web page")
    result = page.locator("img[alt^='Generated image']").first
    result.wait_for()
    assert page.get_by_role("progressbar").get_attribute("aria-valuenow") == "100"
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=result.element_handle())
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    infotext = page.locator(".results .infotext").first.inner_text()
    assert infotext.startswith("a lighthouse at dusk, web page\nNegative prompt: blurry\nSteps: 6,")
    assert "Size: 64x64" in infotext
    page.screenshot(path=str(SCREENSHOTS / "generate-1440.png"), full_page=True)

    record = wait_for_record(web, "web page")
    page.get_by_role("link", name="Images").click()
    page.wait_for_url("**/images")
    page.wait_for_selector("body[data-ready=true]")
    first = page.locator("#grid li").first
    assert first.get_attribute("data-id") == str(record["id"])
    assert first.locator(".caption").inner_text() == "a lighthouse at dusk, web page"
    assert "1" in page.locator("#usage-total").inner_text()

    # Another client writes a record meanwhile; Refresh shows it first.
    other = requests.post(web.url + "/sdapi/v1/txt2img", auth=ALICE, timeout=60, json={
        "prompt": "written by another client", "steps": 2, "width": 64, "height": 64})
    assert other.status_code == 200, other.text
    other_record = wait_for_record(web, "another client")
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_function("id => document.querySelector('#grid li')?.dataset.id === id", arg=str(other_record["id"]))
    assert page.get_by_label("Search prompts").count() == 1
    page.screenshot(path=str(SCREENSHOTS / "images-1440.png"), full_page=True)

    # Download: the PNG with the record's infotext in its parameters chunk.
    target = page.locator(f"#grid li[data-id='{record['id']}']")
    with page.expect_download() as download:
        target.get_by_role("link", name="Download").click()
    png = Path(download.value.path()).read_bytes()
    detail = requests.get(f"{web.url}/gallery/api/images/{record['id']}", auth=ALICE, timeout=10).json()
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (64, 64)
    assert image.text["parameters"] == detail["infotext"] == infotext

    # Search narrows the grid to matching prompts.
    page.get_by_label("Search prompts").fill("lighthouse")
    page.get_by_label("Search prompts").press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#grid li').length === 1")

    # Model and date filters (the dates are UTC days, as the gallery API takes them).
    assert page.get_by_label("Model").locator("option").all_inner_texts() == ["All models", "tiny-sd"]
    page.get_by_label("Model").select_option("tiny-sd")
    page.get_by_label("From").fill("2999-01-01")
    page.wait_for_function("() => document.querySelectorAll('#grid li').length === 0")
    assert page.locator("#summary").inner_text() == "No images yet"
    page.get_by_label("From").fill("")
    page.wait_for_function("() => document.querySelectorAll('#grid li').length === 1")

    # Details, then "Reuse these parameters" opens the generate page filled in.
    target.get_by_role("button", name=f"Details of image {record['id']}").click()
    dialog = page.locator("#details")
    dialog.wait_for()
    assert "model_hash" in dialog.locator("table").inner_text()
    dialog.get_by_role("link", name="Reuse these parameters").click()
    page.wait_for_url(re.compile(r".*/\?.*"))
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_by_label("Prompt", exact=True).input_value() == "a lighthouse at dusk, web page"
    assert page.get_by_label("Negative prompt").input_value() == "blurry"
    assert page.get_by_label("Sampling steps").input_value() == "6"
    assert page.get_by_label("Width").input_value() == "64"
    assert page.get_by_label("Seed").input_value() == str(detail["seed"])
    assert page.get_by_label("Sampling method").input_value() == detail["sampler"]
    w.close()


def test_interrupt_cancels_the_running_task(servers, browser):
    _, web = servers
    w = Watched(browser)
    page = w.page
    w.open(web.url + "/")
    generate(page, "interrupt me", steps=150)
    page.wait_for_function("() => /Step [1-9]/.test(document.getElementById('progress-text').textContent)")
    page.get_by_role("button", name="Interrupt").click()
    page.wait_for_function("() => document.getElementById('progress-text').textContent === 'Interrupted'")
    assert int(page.get_by_role("progressbar").get_attribute("aria-valuenow")) < 100
    assert page.get_by_role("button", name="Generate", exact=True).is_enabled()
    w.close()


def test_img2img_from_an_upload_and_from_a_result(servers, browser):
    _, web = servers
    w = Watched(browser)
    page = w.page
    w.open(web.url + "/")
    upload = io.BytesIO()
    Image.new("RGB", (80, 40), (200, 120, 40)).save(upload, format="PNG")
    page.get_by_role("tab", name="Image to image").click()
    page.get_by_label("Image", exact=True).set_input_files(
        files=[{"name": "upload.png", "mimeType": "image/png", "buffer": upload.getvalue()}])
    page.get_by_label("Denoising strength").fill("0.6")
    page.get_by_label("Prompt", exact=True).fill("img2img upload")
    page.get_by_label("Sampling steps").fill("3")
    page.get_by_label("Width").fill("48")
    page.get_by_label("Height").fill("32")
    page.get_by_role("button", name="Generate", exact=True).click()
    result = page.locator("img[alt^='Generated image']").first
    result.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=result.element_handle())
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [48, 32]
    assert "Denoising strength: 0.6" in page.locator(".results .infotext").first.inner_text()

    page.get_by_role("button", name="Send to img2img").click()
    assert page.get_by_label("Image", exact=True).evaluate("input => input.files[0].size") > 0
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.getElementById('progress-text').textContent.startsWith('Done')")
    result = page.locator("img[alt^='Generated image']").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=result.element_handle())
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    w.close()



def test_a_drawn_mask_inpaints_only_the_painted_part(servers, browser):
    _, web = servers
    w = Watched(browser)
    page = w.page
    w.open(web.url + "/")
    original = Image.new("RGB", (64, 64), (30, 160, 220))
    upload = io.BytesIO()
    original.save(upload, format="PNG")
    page.get_by_role("tab", name="Image to image").click()
    page.get_by_label("Image", exact=True).set_input_files(
        files=[{"name": "upload.png", "mimeType": "image/png", "buffer": upload.getvalue()}])
    canvas = page.get_by_role("img", name="Mask")
    canvas.wait_for()
    box = canvas.bounding_box()
    page.get_by_label("Brush size").fill("64")
    page.get_by_label("Mask blur").fill("0")
    # One stroke down the left quarter of the image.
    page.mouse.move(box["x"] + box["width"] * 0.12, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.12, box["y"] + box["height"] - 2, steps=8)
    page.mouse.up()
    sent = []
    page.on("request", lambda r: r.url.endswith("/sdapi/v2/tasks/img2img") and sent.append(r.post_data_json))
    page.get_by_label("Denoising strength").fill("1")
    page.get_by_label("Prompt", exact=True).fill("inpaint from the page")
    page.get_by_label("Sampling steps").fill("3")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("64")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.getElementById('progress-text').textContent.startsWith('Done')")
    mask_url = sent[0]["mask"]
    assert mask_url.startswith("data:image/png;base64,") and sent[0]["mask_blur"] == 0
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask_url.split(",", 1)[1]))).convert("L"))
    assert mask.shape == (64, 64) and mask[:, :8].min() > 127 and mask[:, 40:].max() < 128
    result = page.locator("img[alt^='Generated image']").first
    png = base64.b64decode(result.get_attribute("src").split(",", 1)[1])
    out = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    untouched = np.abs(out[:, 40:] - np.asarray(original)[:, 40:]).max()
    assert untouched <= 2, untouched  # the original is laid back outside the mask
    assert np.abs(out[:, :8] - np.asarray(original)[:, :8]).mean() > 10  # the painted part was redrawn
    w.close()


def test_language_switch_is_remembered_and_pages_fit_a_phone(servers, browser):
    _, web = servers
    w = Watched(browser, viewport=PHONE)
    page = w.page
    w.open(web.url + "/")
    page.get_by_role("button", name="切换到中文").click()
    assert page.get_by_label("提示词", exact=True).count() == 1
    assert page.get_by_role("button", name="生成", exact=True).count() == 1
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_by_label("反向提示词").count() == 1
    page.get_by_role("button", name="Switch to English").click()
    assert page.get_by_label("Prompt", exact=True).count() == 1
    for name, path in (("generate", "/"), ("images", "/images")):
        w.open(web.url + path)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], name
        page.screenshot(path=str(SCREENSHOTS / f"{name}-390.png"), full_page=True)
    w.close()


@pytest.fixture(autouse=True, scope="module")
def _screenshots_folder():
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
