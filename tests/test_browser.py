"""The FastAPI example's chat page (useChat of the AI SDK over @durable-streams/aisdk-transport,
built from examples/chat_page) in a real browser: headless Chromium (Debian's package)
driven by Playwright.

One conversation, as a person would have it: ask, open a second tab on the chat's URL and reload
the first while the answer is written (both end with the whole answer, once); ask again and press
Stop mid-answer (both tabs end with the same partial answer); reload (both turns, each once).
On memory storage with one process, and on Redis with two processes behind a round-robin proxy,
so consecutive requests of the page land on different workers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from .conftest import example_answer, free_port, spawn, spawn_proxy, stop, unique_prefix

if TYPE_CHECKING:
    from playwright.sync_api import Page

# The first run installs the page's npm packages (npm ci) before building it.
pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fastapi_app"
WEB = ROOT / "examples" / "chat_page"
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
TOKENS = 60
# ~75 tokens at 0.08 s: six seconds per answer, time enough to open a tab and reload mid-answer.
TOKEN_DELAY = "0.08"
WAIT_MS = 30_000


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is required for the browser test: apt-get install chromium (see README)")
    return path


def expected_answer(prompt: str, tokens: int) -> str:
    return example_answer(prompt, tokens)


def npm(*args: str) -> None:
    """``npm ARGS --prefix examples/chat_page``; its output in the failure if it fails."""
    binary = shutil.which("npm")
    if binary is None:
        pytest.fail("npm (Node.js >= 20) is required to build the chat page: apt-get install nodejs npm")
    done = subprocess.run([binary, *args, "--prefix", str(WEB)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"npm {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@pytest.fixture(scope="session")
def chat_bundle() -> Path:
    """The page's bundle, examples/chat_page/dist/chat.js, built from the sources once per run.
    ``npm ci`` only when node_modules is missing or older than the lock file (npm writes
    node_modules/.package-lock.json at every install)."""
    installed = WEB / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (WEB / "package-lock.json").stat().st_mtime:
        npm("ci", "--no-audit", "--no-fund")
    npm("run", "build")
    bundle = WEB / "dist" / "chat.js"
    assert bundle.is_file(), "npm run build made no dist/chat.js"
    return bundle


@pytest.fixture(params=["memory", "redis"])
def example_url(request: pytest.FixtureRequest, tmp_path: Path, chat_bundle: Path) -> Iterator[str]:
    """The example started with its documented command, ``uvicorn main:app``, from its folder: one
    process on memory storage, or two on one Redis behind tests/roundrobin.py."""
    env = {
        **os.environ,
        "DEMO_TOKENS": str(TOKENS),
        "DEMO_TOKEN_DELAY": TOKEN_DELAY,
        "DURABLE_STREAMS_LONG_POLL_TIMEOUT": "5",
    }
    env.pop("REDIS_URL", None)
    processes = 1
    if request.param == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
        env["DURABLE_STREAMS_KEY_PREFIX"] = unique_prefix()  # shared by both processes
        processes = 2
    started: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        upstreams = []
        for i in range(processes):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            logs.append(tmp_path / f"example{i}.log")
            started.append(
                spawn(["uvicorn", "main:app", "--port", str(port)], logs[-1], f"{url}/healthz", cwd=EXAMPLE, env=env)
            )
            upstreams.append(url)
        if processes == 1:
            yield upstreams[0]
        else:
            logs.append(tmp_path / "proxy.log")
            proxy, url = spawn_proxy(upstreams, logs[-1])
            started.append(proxy)
            yield url
    finally:
        for process in started:
            stop(process)
    for log in logs:
        assert "Traceback" not in log.read_text(), log.read_text()[-5000:]


# -- what the page shows, read through its test hooks ------------------------------------------

# True when the page is idle (useChat's status ready, no Stop button) and shows `count` messages,
# the last one an assistant's at least `min_length` characters long.
SETTLED = """([count, minLength]) => {
  const status = document.querySelector('#status');
  const messages = document.querySelectorAll('#messages .message');
  const last = messages[messages.length - 1];
  return status?.dataset.status === 'ready' && !document.querySelector('#stop')
    && messages.length === count && last.dataset.role === 'assistant'
    && last.querySelector('.text').textContent.length >= minLength;
}"""

# True when the last message is an assistant's whose text includes `part`.
ANSWER_INCLUDES = """(part) => {
  const messages = document.querySelectorAll('#messages .message');
  const last = messages[messages.length - 1];
  return last?.dataset.role === 'assistant' && last.querySelector('.text').textContent.includes(part);
}"""


def conversation(page: Page) -> list[tuple[str, str]]:
    """(role, text) of every message the page shows, in order."""
    rows = page.eval_on_selector_all(
        "#messages .message", "els => els.map(e => [e.dataset.role, e.querySelector('.text').textContent])"
    )
    return [tuple(row) for row in rows]


def message_ids(page: Page) -> list[str]:
    return page.eval_on_selector_all("#messages .message", "els => els.map(e => e.dataset.id)")


def settled(page: Page, count: int, min_length: int = 0) -> None:
    page.wait_for_function(SETTLED, arg=[count, min_length], timeout=WAIT_MS)


def answering(base_url: str, chat_id: str) -> bool:
    """Whether the server still has the chat's answer running (any worker may say)."""
    response = httpx.get(f"{base_url}/api/chat/{chat_id}/stream", timeout=10)
    assert response.status_code in (200, 204), (response.status_code, response.text)
    return response.status_code == 200


def server_conversation(base_url: str, chat_id: str) -> tuple[list[tuple[str, str]], object]:
    body = httpx.get(f"{base_url}/api/chat/{chat_id}/messages", timeout=10).json()
    rows = [
        (m["role"], "".join(p.get("text", "") for p in m["parts"] if p.get("type") == "text")) for m in body["messages"]
    ]
    return rows, body["active"]


def test_chat_survives_reloads_second_tabs_and_stop(example_url: str) -> None:
    from playwright.sync_api import sync_playwright

    first, second = "what makes a stream durable?", "and what if the server restarts?"
    whole_first, whole_second = expected_answer(first, TOKENS), expected_answer(second, TOKENS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, chromium_sandbox=False)
        try:
            context = browser.new_context()
            errors: list[str] = []
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(f"page: {error}"))
            page.goto(example_url)
            # The page made a chat id and put it in the URL: the URL is the chat.
            page.wait_for_function("document.querySelector('#status')?.dataset.status === 'ready'", timeout=WAIT_MS)
            chat_id = parse_qs(urlparse(page.url).query)["chat"][0]
            chat_url = page.url

            # Turn 1: ask; once part of the answer shows, a second tab opens the chat's URL...
            page.fill("#prompt", first)
            page.click("#send")
            page.wait_for_function(ANSWER_INCLUDES, arg="t5 ", timeout=WAIT_MS)
            watcher = context.new_page()
            watcher.on("pageerror", lambda error: errors.append(f"watcher: {error}"))
            watcher.goto(chat_url)
            # ...and the first tab reloads while the answer is still being written.
            assert answering(example_url, chat_id), "the answer ended before the reload"
            page.reload()
            for tab in (page, watcher):
                settled(tab, 2, len(whole_first))
                assert conversation(tab) == [("user", first), ("assistant", whole_first)]
            assert server_conversation(example_url, chat_id) == ([("user", first), ("assistant", whole_first)], None)

            # Turn 2: ask again and press Stop mid-answer. The second tab, idle until now, notices
            # the new turn and follows it; both end with the same partial answer, the one the server
            # kept.
            page.fill("#prompt", second)
            page.click("#send")
            page.wait_for_function(ANSWER_INCLUDES, arg="t5 ", timeout=WAIT_MS)
            watcher.wait_for_function(ANSWER_INCLUDES, arg="t5 ", timeout=WAIT_MS)
            page.click("#stop")
            for tab in (page, watcher):
                settled(tab, 4)
            partial = conversation(page)[3][1]
            assert whole_second.startswith(partial) and "t5 " in partial and len(partial) < len(whole_second), partial
            both_turns = [("user", first), ("assistant", whole_first), ("user", second), ("assistant", partial)]
            assert conversation(page) == both_turns
            assert conversation(watcher) == both_turns
            assert not answering(example_url, chat_id)
            assert server_conversation(example_url, chat_id) == (both_turns, None)

            # A reload shows both turns, each message once.
            for tab in (page, watcher):
                tab.reload()
                settled(tab, 4)
                assert conversation(tab) == both_turns
                assert len(set(message_ids(tab))) == 4, message_ids(tab)

            # "New chat" opens an empty chat of its own.
            with page.expect_navigation():
                page.click("#new-chat")
            page.wait_for_function(
                "(old) => ![null, old].includes(new URLSearchParams(location.search).get('chat'))",
                arg=chat_id,
                timeout=WAIT_MS,
            )
            page.wait_for_function("document.querySelector('#status')?.dataset.status === 'ready'", timeout=WAIT_MS)
            assert conversation(page) == []
            assert errors == []
        finally:
            browser.close()


def test_stored_html_never_runs_in_the_servers_origin(tmp_path: Path) -> None:
    """Anyone who may write a stream may store a page with a script; opened in a browser from the
    server's origin (a link to the stream), it must not run there (stored XSS)."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["durable_streams_asgi.cli", "serve", "--port", str(port), "--log-level", "warning"]
    server = spawn(args, tmp_path / "server.log", f"{url}/healthz", cwd=ROOT)
    try:
        page_html = (
            b"<html><body><h1 id=t>stored</h1><script>document.title='ran';window.ran=true</script></body></html>"
        )
        created = httpx.put(f"{url}/v1/stream/xss", headers={"Content-Type": "text/html"}, content=page_html)
        assert created.status_code == 201
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, chromium_sandbox=False)
            try:
                page = browser.new_page()
                page.goto(f"{url}/v1/stream/xss?offset=-1")
                assert page.text_content("#t") == "stored"  # it is shown...
                assert page.title() != "ran" and page.evaluate("window.ran") is None  # ...but nothing ran
                # Sandboxed: the page is an opaque origin, with no access to the server's storage.
                assert page.evaluate("self.origin") == "null"
            finally:
                browser.close()
    finally:
        stop(server)
