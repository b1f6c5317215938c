"""The FastAPI example in a real browser: headless Chromium (Debian's package) driven by Playwright.

A generation is started from the chat page, the page is reloaded mid-generation, and the final
text must be the whole answer exactly once; a second tab on the share link sees the same.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, spawn, stop, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fastapi_app"
# What the machine's own Chromium needs to run headless as root on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is required for the browser test: apt-get install chromium (see README)")
    return path


def expected_answer(prompt: str, tokens: int) -> str:
    spec = importlib.util.spec_from_file_location("fastapi_example_main", EXAMPLE / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("DEMO_TOKENS")
    os.environ["DEMO_TOKENS"] = str(tokens)
    try:
        spec.loader.exec_module(module)
        return "".join(module.fake_answer(prompt))
    finally:
        if previous is None:
            del os.environ["DEMO_TOKENS"]
        else:
            os.environ["DEMO_TOKENS"] = previous


TOKENS = 60


@pytest.fixture(params=["memory", "redis"])
def example_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The example started with its documented command, ``uvicorn main:app``, from its folder."""
    port = free_port()
    env = {
        **os.environ,
        "DEMO_TOKENS": str(TOKENS),
        "DEMO_TOKEN_DELAY": "0.05",
        "DURABLE_STREAMS_LONG_POLL_TIMEOUT": "5",
    }
    env.pop("REDIS_URL", None)
    if request.param == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
        env["DURABLE_STREAMS_KEY_PREFIX"] = unique_prefix()
    log = tmp_path / "example.log"
    url = f"http://127.0.0.1:{port}"
    process = spawn(["uvicorn", "main:app", "--port", str(port)], log, url, cwd=EXAMPLE, env=env)
    try:
        yield url
    finally:
        stop(process)
    assert "Traceback" not in log.read_text(), log.read_text()


def test_reload_mid_generation_shows_the_whole_answer_exactly_once(example_url: str) -> None:
    from playwright.sync_api import sync_playwright

    prompt = "what makes a stream durable?"
    expected = expected_answer(prompt, TOKENS)
    answer_js = "document.getElementById('answer')"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, chromium_sandbox=False)
        try:
            page = browser.new_page()
            page.goto(example_url)
            page.fill("#prompt", prompt)
            page.click("#send")
            # Part of the answer has arrived...
            page.wait_for_function(f"{answer_js}.textContent.includes('t5 ')", timeout=20_000)
            stream_url = page.evaluate("localStorage.getItem('durable-chat:current')")
            assert stream_url and stream_url.startswith(f"{example_url}/v1/stream/chats/")
            # ...a second tab opens the share link and watches the same generation live...
            watcher = browser.new_page()
            watcher.goto(page.get_attribute("#share", "href") or "")
            # ...and the first tab reloads while the generation is still running.
            assert "stream-closed" not in httpx.head(stream_url).headers, "generation ended before the reload"
            page.reload()
            page.wait_for_function(f"{answer_js}.dataset.done === 'true'", timeout=30_000)
            assert page.text_content("#answer") == expected
            watcher.wait_for_function(f"{answer_js}.dataset.done === 'true'", timeout=30_000)
            assert watcher.text_content("#answer") == expected
            # The server has the same, once.
            chunks = httpx.get(stream_url, params={"offset": "-1"}).json()
            assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == expected
            assert chunks[-1] == {"type": "finish"}
        finally:
            browser.close()
