"""app.py in a real browser: start it on 127.0.0.1, drive headless Chromium through the three tabs.

Slow (a server start-up and a browser): ``make test-slow`` or
``python -m pytest -m slow tests/test_app_browser.py``. Needs Debian's ``chromium``
(``apt-get install -y chromium``) and ``pip install -e ".[browser-test]"`` (Playwright, driving that
binary, so no browser download). Screenshots land in ``$BILINGUAL_GLM_SCREENSHOT_DIR`` (default
``outputs/app-browser-test/``, gitignored); ``$BILINGUAL_GLM_TEST_MODEL`` runs the page on a real model
folder instead of the tiny untrained one (how ``docs/app.png`` was taken).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .test_app import ROOT, make_model_folder

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api", reason='pip install -e ".[browser-test]"')
if not Path(CHROMIUM).exists():
    pytest.skip("needs Debian's chromium: apt-get install -y chromium", allow_module_level=True)
expect = playwright_api.expect
expect.set_options(timeout=120_000)  # CPU generation on a shared machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"app.py exited with {server.returncode}:\n{server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"app.py did not serve {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tokenizer_dir):
    model = os.environ.get("BILINGUAL_GLM_TEST_MODEL") or str(
        make_model_folder(tmp_path_factory.mktemp("browser-model"), tokenizer_dir)
    )
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--max_prompt_tokens", "128"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def page(app_url):
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(120_000)  # CPU generation on a shared machine
        page.goto(app_url)
        expect(page.get_by_role("tab", name="Chat")).to_be_visible()
        yield page
        browser.close()


@pytest.fixture(scope="module")
def screenshots() -> Path:
    folder = Path(os.environ.get("BILINGUAL_GLM_SCREENSHOT_DIR", ROOT / "outputs" / "app-browser-test"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def error_toast(page):
    return page.get_by_test_id("toast-body").last


def dismiss_toasts(page) -> None:
    """Close the error messages already checked, so later screenshots show only the current tab."""
    for button in page.get_by_test_id("toast-close").all():
        button.click()
    expect(page.get_by_test_id("toast-body")).to_have_count(0)


def settled_screenshot(page, path: Path) -> None:
    """Screenshot after the output's fade-in (Gradio fades outputs while a request runs)."""
    page.wait_for_timeout(1500)
    page.screenshot(path=str(path), full_page=True)


def test_page_shows_three_tabs(page):
    for name in ("Chat", "Blank infilling", "Sentiment"):
        expect(page.get_by_role("tab", name=name)).to_be_visible()


def test_chat_streams_an_answer_and_refuses_an_over_long_message(page, screenshots):
    page.get_by_role("tab", name="Chat").click()
    box = page.locator("#chat-input textarea")
    box.fill("你好")
    box.press("Enter")
    expect(page.get_by_test_id("user").first).to_contain_text("你好")
    answer = page.get_by_test_id("bot").first
    expect(answer).to_have_text(re.compile(r"\S"))  # some text streamed in (or the empty-answer note)
    settled_screenshot(page, screenshots / "chat.png")
    box.fill("long " * 300)
    box.press("Enter")
    expect(page.locator("#chat-input")).to_contain_text("too long")  # the box's validation message
    expect(page.get_by_test_id("user").first).to_contain_text("你好")  # the conversation is kept
    expect(page.get_by_test_id("user")).to_have_count(1)
    page.screenshot(path=str(screenshots / "chat-too-long.png"))


def test_infill_shows_a_message_without_a_mask_and_highlights_filled_spans(page, screenshots):
    page.get_by_role("tab", name="Blank infilling").click()
    text = page.locator("#infill-input textarea")
    text.fill("这句话没有空白。")
    page.locator("#infill-button").click()
    expect(error_toast(page)).to_contain_text("has no blank")
    dismiss_toasts(page)
    text.fill("新华社北京一月一日电，[MASK]发表了新年讲话。")
    page.locator("#infill-button").click()
    filled = page.locator("#infill-filled textarea")
    expect(filled).to_have_value(re.compile(r"^新华社北京一月一日电，.*发表了新年讲话。$"))
    assert "[MASK]" not in filled.input_value()
    expect(page.locator("#infill-output")).to_contain_text("[MASK]")  # the span's category label
    settled_screenshot(page, screenshots / "infill.png")


def test_sentiment_shows_both_class_probabilities(page, screenshots):
    page.get_by_role("tab", name="Sentiment").click()
    page.locator("#sentiment-input textarea").fill("")
    page.locator("#sentiment-button").click()
    expect(error_toast(page)).to_contain_text("text is empty")
    dismiss_toasts(page)
    page.locator("#sentiment-input textarea").fill("房间很干净，服务也很热情。")
    page.locator("#sentiment-button").click()
    output = page.locator("#sentiment-output")
    expect(output).to_contain_text("positive")
    expect(output).to_contain_text("negative")
    expect(output).to_contain_text(re.compile(r"\d+%"))
    settled_screenshot(page, screenshots / "sentiment.png")
