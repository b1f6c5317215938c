"""The Django example (examples/django_app): the streams protocol through its ASGI router, the
durable chat endpoints, and the authorize hook on Django sessions.

The example chooses its storage from the environment when it is imported, and Django's settings
can be configured once per process, so the HTTP tests run the example as its README says
(``uvicorn asgi:application`` in its folder) in a subprocess per storage. One test also imports
``application`` into this process (twice, under two module names) and drives it over ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from durable_streams_asgi import DurableStreams
from durable_streams_asgi.storage.redis import RedisStorage

from .conftest import free_port, spawn, sse_events, stop, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "django_app"
USER = {"username": "alice", "password": "wonderland"}
TEXT = {"Content-Type": "text/plain"}
JSON_CT = {"Content-Type": "application/json"}
TOKEN_DELAY = 0.05
LONG_POLL_TIMEOUT = 1.5

ENV = {
    "DJANGO_SECRET_KEY": "test-secret-key-for-the-django-example-0123456789",
    "DEMO_USERNAME": USER["username"],
    "DEMO_PASSWORD": USER["password"],
    "CHAT_TOKEN_DELAY": str(TOKEN_DELAY),
    "DURABLE_STREAMS_LONG_POLL_TIMEOUT": str(LONG_POLL_TIMEOUT),
}


def reply_for(prompt: str) -> str:
    """What the example's fake model answers (a copy, so that a change there fails here)."""
    return f"You said: {prompt}. This answer was written token by token into a durable stream."


def expected_chunks(prompt: str) -> list[dict[str, str]]:
    """The answer's chunks, less the message id that the chat puts on ``start`` (see without_id)."""
    words = reply_for(prompt).split(" ")
    deltas = [{"type": "text-delta", "id": "t1", "delta": w + " "} for w in words[:-1]]
    deltas.append({"type": "text-delta", "id": "t1", "delta": words[-1]})
    return [
        {"type": "start"},
        {"type": "text-start", "id": "t1"},
        *deltas,
        {"type": "text-end", "id": "t1"},
        {"type": "finish"},
    ]


def without_id(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert chunks and chunks[0]["type"] == "start" and chunks[0]["messageId"].startswith("msg-"), chunks[:1]
    return [{k: v for k, v in c.items() if k != "messageId"} for c in chunks]


def chat_body(chat_id: str, prompt: str, **extra: Any) -> dict[str, Any]:
    """What useChat (through createDurableChatTransport) posts for a new user message."""
    message = {"id": f"u-{uuid.uuid4().hex[:8]}", "role": "user", "parts": [{"type": "text", "text": prompt}]}
    return {"id": chat_id, "messages": [message], "trigger": "submit-message", "messageId": None, **extra}


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


# -- the example under uvicorn, in a subprocess ------------------------------------------------


class Server:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log


@contextlib.contextmanager
def example_server(log: Path, **env: str) -> Iterator[Server]:
    """``uvicorn asgi:application`` in the example's folder, on a free port, with lifespan on
    (so a broken lifespan fails the start instead of being skipped)."""
    port = free_port()
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DJANGO_SETTINGS_MODULE", "DURABLE_STREAMS_KEY_PREFIX")
    }
    full_env.update(ENV, **env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    args = [
        "uvicorn",
        "asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "on",
        "--log-level",
        "warning",
    ]
    url = f"http://127.0.0.1:{port}"
    process = spawn(args, log, f"{url}/api/me", cwd=EXAMPLE, env=full_env)
    try:
        yield Server(url, process, log)
    finally:
        stop(process)


@pytest.fixture(scope="module", params=["memory", "redis"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {}
    if request.param == "redis":
        env = {"REDIS_URL": request.getfixturevalue("redis_url"), "DURABLE_STREAMS_KEY_PREFIX": unique_prefix()}
    log = tmp_path_factory.mktemp(f"django-{request.param}") / "server.log"
    with example_server(log, **env) as running:
        yield running
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text


@pytest.fixture
async def anon(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture
async def user(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """A client logged in as the demo user (the session cookie in its jar)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        r = await client.post("/login", json=USER)
        assert r.status_code == 200 and r.json() == {"user": USER["username"]}
        assert "sessionid" in client.cookies
        yield client


async def read_json_sse(client: httpx.AsyncClient, url: str) -> list[Any]:
    """Every message of a JSON stream, read with SSE from the start until the stream closes."""
    messages: list[Any] = []
    async with client.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event, data in sse_events(response):
            if event == "data":
                messages.extend(json.loads(data))
            elif event == "control" and json.loads(data).get("streamClosed"):
                return messages
    raise AssertionError(f"the SSE connection ended before the stream closed: {messages}")


# -- Django is still Django --------------------------------------------------------------------


async def test_django_pages_are_served_by_django(anon: httpx.AsyncClient) -> None:
    r = await anon.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "Durable chat" in r.text and '<script type="module" src="/static/chat.js"' in r.text
    assert (await anon.get("/api/me")).json() == {"user": None}
    assert (await anon.get("/api/chat")).status_code == 405  # POST only
    for path in ("/nope", "/v1/streams/x", "/v1/streamx", "/api/v1/stream/x"):
        r = await anon.get(path)
        # Django's 404 page, not the streams app's plain-text 404.
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), path
        assert "access-control-expose-headers" not in r.headers


# -- the protocol through the router ----------------------------------------------------------


async def test_create_append_read_head_delete(server: Server, user: httpx.AsyncClient) -> None:
    name = unique("doc")
    url = f"/v1/stream/{name}"
    r = await user.put(url, headers=TEXT, content=b"hello ")
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"{server.url}/v1/stream/{name}"
    assert r.headers["content-type"] == "text/plain"
    created = r.headers["stream-next-offset"]
    assert (await user.put(url, headers=TEXT)).status_code == 200  # idempotent create
    r = await user.post(url, headers=TEXT, content=b"world")
    assert r.status_code == 204 and r.headers["stream-next-offset"] > created
    r = await user.get(url, params={"offset": "-1"})
    assert r.status_code == 200 and r.content == b"hello world" and r.headers["stream-up-to-date"] == "true"
    assert (await user.get(url, params={"offset": created})).content == b"world"
    head = await user.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["stream-next-offset"] == r.headers["stream-next-offset"]
    assert head.headers["content-type"] == "text/plain" and "no-store" in head.headers["cache-control"]
    nested = await user.put(f"{url}/nested/deeper", headers=JSON_CT, content=b'[{"a":1}]')
    assert nested.status_code == 201 and nested.headers["location"].endswith(f"/v1/stream/{name}/nested/deeper")
    assert (await user.get(f"{url}/nested/deeper")).json() == [{"a": 1}]
    assert (await user.delete(url)).status_code == 204
    for method in ("GET", "HEAD", "DELETE"):
        assert (await user.request(method, url)).status_code == 404, method
    assert (await user.post(url, headers=TEXT, content=b"x")).status_code == 404
    missing = await user.get("/v1/stream/never-created")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/plain")
    assert missing.headers["x-content-type-options"] == "nosniff"
    # The mount point itself is no stream.
    bare = await user.get("/v1/stream")
    assert bare.status_code == 404 and bare.text == "no stream path given"
    bare = await user.get("/v1/stream/")
    assert bare.status_code == 404 and bare.text == "no stream path given"


async def test_long_poll_wakes_up_on_append(user: httpx.AsyncClient) -> None:
    url = f"/v1/stream/{unique('poll')}"
    r = await user.put(url, headers=TEXT, content=b"old")
    tail = r.headers["stream-next-offset"]
    started = time.monotonic()
    # From the tail, not "now": the poll returns the new data whether or not it was already
    # waiting when the append lands, so the test cannot race; the sleep only makes it likely
    # that the append is what wakes it.
    poll = asyncio.create_task(user.get(url, params={"offset": tail, "live": "long-poll"}))
    await asyncio.sleep(0.2)
    assert not poll.done()
    assert (await user.post(url, headers=TEXT, content=b"new")).status_code == 204
    r = await asyncio.wait_for(poll, LONG_POLL_TIMEOUT + 5)
    assert r.status_code == 200 and r.content == b"new"
    assert r.headers["stream-cursor"].isdigit()
    assert time.monotonic() - started < LONG_POLL_TIMEOUT  # woken, not timed out
    # Nothing new: the poll times out with 204 after the configured timeout.
    r = await user.get(url, params={"offset": r.headers["stream-next-offset"], "live": "long-poll"})
    assert r.status_code == 204 and r.headers["stream-up-to-date"] == "true"


async def test_sse_text_stream_live_until_closed(user: httpx.AsyncClient) -> None:
    url = f"/v1/stream/{unique('sse-text')}"
    await user.put(url, headers=TEXT, content=b"line1\nline2")
    seen: list[tuple[str, str]] = []
    async with user.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event, data in sse_events(response):
            seen.append((event, data))
            if event == "control" and len(seen) == 2:
                assert json.loads(data)["upToDate"] is True
                # Caught up: an append (and close) must now arrive on this connection.
                r = await user.post(url, headers={**TEXT, "Stream-Closed": "true"}, content=b"bye")
                assert r.status_code == 204
    assert [e for e, _ in seen] == ["data", "control", "data", "control"]
    assert seen[0][1] == "line1\nline2" and seen[2][1] == "bye"
    assert json.loads(seen[3][1])["streamClosed"] is True


async def test_sse_json_stream(user: httpx.AsyncClient) -> None:
    url = f"/v1/stream/{unique('sse-json')}"
    await user.put(url, headers=JSON_CT, content=b'[{"n":1},{"n":2}]')

    async def append_later() -> None:
        await user.post(url, headers=JSON_CT, content=b'{"n":3}')
        await user.post(url, headers={"Stream-Closed": "true"})

    messages: list[Any] = []
    appended: asyncio.Task[None] | None = None
    async with user.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response:
        async for event, data in sse_events(response):
            if event == "data":
                messages.extend(json.loads(data))
            elif appended is None:
                appended = asyncio.create_task(append_later())
    assert appended is not None
    await appended
    assert messages == [{"n": 1}, {"n": 2}, {"n": 3}]


# -- the durable chat --------------------------------------------------------------------------


async def test_chat_generation_and_reconnect(server: Server, anon: httpx.AsyncClient) -> None:
    chat_id = unique("chat")
    prompt = "What is a durable stream?"
    r = await anon.post("/api/chat", json=chat_body(chat_id, prompt))
    assert r.status_code == 201, r.text
    stream_url = r.json()["streamUrl"]
    assert r.json() == {"streamUrl": stream_url} and r.headers["location"] == stream_url
    assert stream_url.startswith(f"{server.url}/v1/stream/chats/{chat_id}/")
    # The stream exists the moment the client learns its URL.
    assert (await anon.head(stream_url)).status_code == 200
    # Still being written (about 15 tokens, TOKEN_DELAY apart): the reconnect endpoint says where.
    again = await anon.get(f"/api/chat/{chat_id}/stream")
    assert again.status_code == 200 and again.json() == {"streamUrl": stream_url}
    assert again.headers["location"] == stream_url

    assert without_id(await read_json_sse(anon, stream_url)) == expected_chunks(prompt)
    catch_up = await anon.get(stream_url, params={"offset": "-1"})
    assert without_id(catch_up.json()) == expected_chunks(prompt) and catch_up.headers["stream-closed"] == "true"
    # Once the answer is in the conversation, there is nothing to reconnect to.
    for _ in range(100):
        state = (await anon.get(f"/api/chat/{chat_id}/messages")).json()
        if len(state["messages"]) == 2:
            break
        await asyncio.sleep(0.02)  # the answer is recorded right after the stream closes
    assert state["active"] is None and state["messages"][1]["parts"][0]["text"] == reply_for(prompt)
    assert (await anon.get(f"/api/chat/{chat_id}/stream")).status_code == 204
    # Reading is open to anyone, writing the answer's stream is not.
    r = await anon.post(stream_url, headers=JSON_CT, content=b'{"type":"text-delta","delta":"forged"}')
    assert r.status_code == 401


async def test_chat_answers_are_separate_streams_and_bad_requests_are_refused(anon: httpx.AsyncClient) -> None:
    first = await anon.post("/api/chat", json=chat_body(unique("one"), "one"))
    second = await anon.post("/api/chat", json=chat_body(unique("two"), "two"))
    assert first.status_code == second.status_code == 201
    assert first.json()["streamUrl"] != second.json()["streamUrl"]
    assert without_id(await read_json_sse(anon, second.json()["streamUrl"])) == expected_chunks("two")
    assert (await anon.get(f"/api/chat/{unique('unknown')}/stream")).status_code == 204
    assert (await anon.post("/api/chat", content=b'{"id": "x"}', headers=TEXT)).status_code == 415
    assert (await anon.post("/api/chat", content=b"{nope", headers=JSON_CT)).status_code == 400
    assert (await anon.post("/api/chat", json={"id": "x", "messages": []})).status_code == 400
    assert (await anon.post("/api/chat", json=chat_body("../etc", "x"))).status_code == 400


# -- the authorize hook on Django sessions ------------------------------------------------------


async def test_writes_need_a_logged_in_django_user(server: Server, anon: httpx.AsyncClient) -> None:
    url = f"/v1/stream/{unique('auth')}"
    r = await anon.put(url, headers=TEXT, content=b"x")
    assert r.status_code == 401 and "log in" in r.text
    assert (await anon.head(url)).status_code == 404  # nothing was created

    bad = await anon.post("/login", json={**USER, "password": "wrong"})
    assert bad.status_code == 401 and "sessionid" not in anon.cookies
    assert (await anon.post("/login", json={"username": "demo", "password": "demo"})).status_code == 401

    assert (await anon.post("/login", json=USER)).status_code == 200
    assert (await anon.get("/api/me")).json() == {"user": USER["username"]}
    assert (await anon.put(url, headers=TEXT, content=b"a")).status_code == 201
    assert (await anon.post(url, headers=TEXT, content=b"b")).status_code == 204
    # A browser on another origin sends its Origin: refused even with the cookie.
    r = await anon.post(url, headers={**TEXT, "Origin": "https://evil.example"}, content=b"!")
    assert r.status_code == 403
    assert (await anon.post(url, headers={**TEXT, "Origin": server.url}, content=b"c")).status_code == 204
    # Chat answers belong to the server's generations, logged in or not.
    assert (await anon.put(f"/v1/stream/chats/{unique('c')}/x", headers=JSON_CT)).status_code == 403
    session = anon.cookies["sessionid"]

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as stranger:
        assert (await stranger.get(url)).content == b"abc"  # anyone reads
        assert (await stranger.post(url, headers=TEXT, content=b"x")).status_code == 401
        assert (await stranger.delete(url)).status_code == 401
        assert (await stranger.post(url, headers={"Stream-Closed": "true"})).status_code == 401
        forged = session[:-4] + ("AAAA" if not session.endswith("AAAA") else "BBBB")
        stranger.cookies.set("sessionid", forged)
        assert (await stranger.post(url, headers=TEXT, content=b"x")).status_code == 401
        stranger.cookies.set("sessionid", session)  # the real cookie works from anywhere
        assert (await stranger.post(url, headers=TEXT, content=b"d")).status_code == 204

    assert (await anon.post("/logout")).status_code == 204
    assert (await anon.get("/api/me")).json() == {"user": None}
    assert (await anon.post(url, headers={"Stream-Closed": "true"})).status_code == 401
    assert (await anon.get(url)).content == b"abcd"


# -- shutdown: the lifespan lets running generations finish ------------------------------------


async def test_shutdown_lets_running_generations_finish(redis_url: str, tmp_path: Path) -> None:
    prefix = unique_prefix()
    prompt = "finish this answer even though the server is asked to stop while it is being written"
    with example_server(tmp_path / "server.log", REDIS_URL=redis_url, DURABLE_STREAMS_KEY_PREFIX=prefix) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            r = await client.post("/api/chat", json=chat_body("bye", prompt))
            assert r.status_code == 201
            stream_url = r.json()["streamUrl"]
            assert (await client.get("/api/chat/bye/stream")).status_code == 200  # still running
        running.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then exits by re-raising the signal it caught.
        assert await asyncio.to_thread(running.process.wait, 15) in (0, -signal.SIGTERM)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    # The process is gone; the answer is complete and closed in Redis.
    streams = DurableStreams(RedisStorage.from_url(redis_url, key_prefix=prefix))
    try:
        path = stream_url.split("/v1/stream", 1)[1]
        messages = [m async for chunk in streams.read(path) for m in chunk.messages]
        assert without_id(messages) == expected_chunks(prompt)
        assert (await streams.head(path)).closed
    finally:
        await streams.aclose()


# -- in this process ----------------------------------------------------------------------------


def load_example(name: str) -> ModuleType:
    """Import the example's asgi.py as module ``name`` (once per name)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / "asgi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example imported here: memory storage, the test environment. Django configures its
    settings once per process, so this skips if something else configured them first; importing
    the example again (under another name) must reuse the same Django and the same streams."""
    from django.conf import settings

    if settings.configured:
        configured_as = settings.SETTINGS_MODULE  # None after settings.configure()
    else:
        configured_as = os.environ.get("DJANGO_SETTINGS_MODULE", "chatdemo.settings")
    if configured_as != "chatdemo.settings":
        pytest.skip(f"Django is already configured in this process, with {configured_as or 'settings.configure()'}")
    with monkeypatch.context() as env:  # the environment is what the example reads at import
        for name in ("REDIS_URL", "DURABLE_STREAMS_KEY_PREFIX"):
            env.delenv(name, raising=False)
        for name, value in ENV.items():
            env.setenv(name, value)
        first = load_example("django_example_asgi")
        second = load_example(f"django_example_asgi_{uuid.uuid4().hex}")
    assert second.streams is first.streams and callable(second.application)
    assert settings.SETTINGS_MODULE == "chatdemo.settings"
    return first


async def test_in_process_routing_root_path_and_lifespan(example: ModuleType) -> None:
    app = example.application
    sent: list[dict[str, Any]] = []
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            started.set()

    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await asyncio.wait_for(started.wait(), 5)

    # Served below a root path: both sides must see it.
    transport = httpx.ASGITransport(app=app, root_path="/prefix")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        assert (await client.get("/prefix/api/me")).json() == {"user": None}
        r = await client.put("/prefix/v1/stream/inproc", headers=TEXT, content=b"x")
        assert r.status_code == 401 and "log in" in r.text  # the streams app's hook answered
        assert (await client.post("/prefix/login", json=USER)).status_code == 200
        r = await client.put("/prefix/v1/stream/inproc", headers=TEXT, content=b"in-process")
        assert r.status_code == 201 and r.headers["location"] == "http://testserver/prefix/v1/stream/inproc"
        assert (await client.get("/prefix/v1/stream/inproc")).content == b"in-process"
        assert (await example.streams.head("/inproc")).tail == len(b"in-process")
        r = await client.post("/prefix/api/chat", json=chat_body("inproc", "hi"))
        assert r.status_code == 201
        answer_url = r.json()["streamUrl"]
        assert answer_url.startswith("http://testserver/prefix/v1/stream/chats/inproc/")
    [generation] = example.streams.generations.tasks()

    websocket: list[dict[str, Any]] = []

    async def ws_receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def ws_send(message: dict[str, Any]) -> None:
        websocket.append(message)

    await app({"type": "websocket", "path": "/ws", "root_path": "", "headers": []}, ws_receive, ws_send)
    assert websocket == [{"type": "websocket.close", "code": 1000}]

    # Shutdown waits for the running generation to finish (not interrupt it), then closes.
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(lifespan, 10)
    assert sent[-1] == {"type": "lifespan.shutdown.complete"}
    assert generation.done() and not generation.cancelled()
    # Finished, not interrupted: every chunk written (the final offset counts them).
    assert generation.result().endswith(str(len(expected_chunks("hi"))).zfill(16))
    assert example.streams.generations.running == 0
