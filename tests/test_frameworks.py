"""Durable streams in every ASGI framework, mounted and as middleware, on memory and Redis.

- The core protocol (tests/frameworks/protocol.py) through Starlette, FastAPI, Litestar, Quart,
  Falcon and Django, each in its natural shape(s) (tests/frameworks/apps.py), served by a real
  uvicorn; and after each run the host's lifespan has run, the storage is closed (on Redis: no
  connection of ours is left) and no task is left behind.
- Mount paths: nested mounts, a proxy that strips a path prefix (uvicorn ``root_path``), both at
  once; one stream reached through both shapes over one storage.
- The middleware's routing and its lifespan relay, over raw ASGI, against hosts that speak
  lifespan, do not, or fail in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from redis.asyncio import Redis

from durable_streams_asgi import DurableStreams, DurableStreamsMiddleware, MemoryStorage, StreamNotFound, streams_mount
from durable_streams_asgi.storage.base import Storage

from .conftest import free_port, spawn, unique_prefix
from .frameworks.apps import BUILDERS, PREFIX, SHAPES, Log, hello_text
from .frameworks.env import CLOSED_MARKER
from .frameworks.protocol import TEXT, ParkedReaders, check_protocol
from .roundrobin import RoundRobinProxy

ROOT = Path(__file__).resolve().parent.parent
OPTIONS: dict[str, Any] = {"long_poll_timeout": 10.0, "sse_max_duration": 20.0}


# -- helpers ---------------------------------------------------------------------------------------


@dataclass
class Backend:
    """A storage for one test, instrumented: its closing is logged, and on Redis every connection
    carries ``client_name`` so the server can list them."""

    storage: Storage
    redis_url: str | None
    client_name: str
    key_prefix: str

    async def connections(self) -> int:
        assert self.redis_url is not None
        admin = Redis.from_url(self.redis_url)
        try:
            return sum(1 for c in await admin.client_list() if c.get("name") == self.client_name)
        finally:
            await admin.aclose()


def make_backend(backend: str, request: pytest.FixtureRequest, log: Log | None = None, **kw: Any) -> Backend:
    name = f"fw-{uuid.uuid4().hex[:10]}"
    prefix = kw.get("key_prefix") or unique_prefix()
    url: str | None = None
    if backend == "memory":
        storage: Storage = MemoryStorage()
    else:
        from durable_streams_asgi.storage.redis import RedisStorage

        url = request.getfixturevalue("redis_url")
        storage = RedisStorage.from_url(url, key_prefix=prefix, client_name=name)
    if log is not None:
        aclose = storage.aclose

        async def logged_aclose() -> None:
            log.append("streams-closed")
            await aclose()

        storage.aclose = logged_aclose  # type: ignore[method-assign]
    return Backend(storage, url, name, prefix)


@contextlib.asynccontextmanager
async def serving(app: Any, *, root_path: str = "") -> AsyncIterator[str]:
    """``app`` under uvicorn on a free port in this event loop, lifespan on, as deployed."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", root_path=root_path)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError("uvicorn stopped during startup")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def other_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks started since ``before`` that are still running, but for sse-starlette's watcher
    (one per event loop, by design, for as long as the loop runs)."""
    return {
        t
        for t in asyncio.all_tasks()
        if t not in before
        and t is not asyncio.current_task()
        and not t.done()
        and getattr(t.get_coro(), "__qualname__", "") != "_shutdown_watcher"
    }


# -- the protocol through every framework ------------------------------------------------------------


@pytest.mark.parametrize(("framework", "shape"), SHAPES, ids=[f"{f}-{s}" for f, s in SHAPES])
async def test_protocol_through_framework(
    framework: str, shape: str, backend: str, request: pytest.FixtureRequest
) -> None:
    log: Log = []
    b = make_backend(backend, request, log)
    streams = DurableStreams(b.storage, **OPTIONS)
    parked = ParkedReaders(b.storage)
    app = BUILDERS[framework](streams, shape, log)
    before = asyncio.all_tasks()
    async with serving(app) as url:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(f"{url}/hello")
            assert r.status_code == 200 and r.text == hello_text(framework)  # the host's own route
            assert (await client.get(f"{url}/v1/streamer")).status_code == 404  # the host's 404
            await check_protocol(client, f"{url}{PREFIX}", parked=parked, streams=streams)
        if b.redis_url is not None:
            assert await b.connections() >= 2  # a pooled connection and the pub/sub one
        assert log == ["host-startup"]
    # The host's shutdown ran, then the streams closed; nothing is left open or running.
    assert log == ["host-startup", "host-shutdown", "streams-closed"]
    if b.redis_url is not None:
        assert await b.connections() == 0
    assert not other_tasks(before)


# -- Django, in a subprocess, as `uvicorn mysite.asgi:application` --------------------------------


@dataclass
class Subprocess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> str:
        """SIGTERM (a graceful shutdown, lifespan included), then the server's log."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log.read_text()


@pytest.fixture
def django_site(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Subprocess, Backend]]:
    b = make_backend(backend, request)
    env = {**os.environ, "DURABLE_STREAMS_LONG_POLL_TIMEOUT": str(OPTIONS["long_poll_timeout"])}
    env.pop("REDIS_URL", None)
    if b.redis_url is not None:
        env.update(
            REDIS_URL=b.redis_url, DURABLE_STREAMS_KEY_PREFIX=b.key_prefix, DURABLE_STREAMS_CLIENT_NAME=b.client_name
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "django.log"
    args = ["uvicorn", "tests.frameworks.django_site:application", "--port", str(port), "--no-access-log"]
    server = Subprocess(url, spawn(args, log, f"{url}/hello", cwd=ROOT, env=env), log)
    try:
        yield server, b
    finally:
        server.stop()


async def test_protocol_through_django_middleware(django_site: tuple[Subprocess, Backend]) -> None:
    server, b = django_site
    # On Redis, the in-process API over the same keys sees the streams the Django server writes.
    streams = DurableStreams(b.storage) if b.redis_url is not None else None
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(f"{server.url}/hello")
            assert r.status_code == 200 and r.text == hello_text("django")
            assert (await client.get(f"{server.url}/v1/streamer")).status_code == 404  # Django's 404
            await check_protocol(client, f"{server.url}{PREFIX}", streams=streams)
        if b.redis_url is not None:
            assert await b.connections() >= 2
        log = await asyncio.to_thread(server.stop)
    finally:
        await b.storage.aclose()
    # uvicorn re-raises the signal it stopped on, once its shutdown is complete.
    assert server.process.returncode in (0, -signal.SIGTERM), log
    # Django's handler does not speak lifespan: the middleware answered it, and closed the storage.
    assert "Application startup complete." in log and "Application shutdown complete." in log, log
    assert log.count(CLOSED_MARKER) == 1, log
    assert log.index(CLOSED_MARKER) < log.index("Application shutdown complete."), log
    assert "Traceback" not in log and "unsupported" not in log and "was destroyed" not in log, log
    if b.redis_url is not None:
        assert await b.connections() == 0


# -- mount paths: nested mounts, a proxy prefix, one stream through both shapes --------------------


class StripPrefix:
    """A reverse proxy that serves ``prefix`` by forwarding to ``upstream`` without it (keeping
    the Host header), like nginx's ``location /prefix/ { proxy_pass http://upstream/; }``."""

    def __init__(self, prefix: str, upstream: str) -> None:
        self.prefix = prefix
        self.proxy = RoundRobinProxy([upstream])

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if not scope["path"].startswith(self.prefix + "/"):
                await send({"type": "http.response.start", "status": 502, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            cut = len(self.prefix)
            scope = {**scope, "path": scope["path"][cut:], "raw_path": scope["raw_path"][cut:]}
        await self.proxy(scope, receive, send)


@contextlib.asynccontextmanager
async def behind_proxy(app: Any, proxy_prefix: str) -> AsyncIterator[str]:
    """``app`` served as the proxy's ``proxy_prefix``: uvicorn runs it with that root_path."""
    async with serving(app, root_path=proxy_prefix) as upstream:
        async with serving(StripPrefix(proxy_prefix, upstream)) as proxy:
            yield proxy + proxy_prefix


MOUNT_SHAPES = [("starlette", "mount"), ("starlette", "middleware"), ("litestar", "mount"), ("litestar", "middleware")]
LAYOUTS = {"nested": ("/api", ""), "proxy": ("", "/proxy"), "nested-under-proxy": ("/api", "/edge/proxy")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("framework", "shape"), MOUNT_SHAPES, ids=[f"{f}-{s}" for f, s in MOUNT_SHAPES])
async def test_mount_paths(framework: str, shape: str, layout: str) -> None:
    """Stream paths are the URL below the mount point, and Location is the URL the client used,
    whatever lies above the mount point: enclosing mounts, or a proxy's path prefix."""
    nest, proxy_prefix = LAYOUTS[layout]
    log: Log = []
    storage = MemoryStorage()
    streams = DurableStreams(storage, **OPTIONS)
    app = BUILDERS[framework](streams, shape, log, nest=nest)
    server = behind_proxy(app, proxy_prefix) if proxy_prefix else serving(app)
    async with server as url, httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{url}{nest}/hello")
        assert r.status_code == 200 and r.text == hello_text(framework)
        await check_protocol(client, f"{url}{nest}{PREFIX}", parked=ParkedReaders(storage), streams=streams)
        r = await client.put(f"{url}{nest}{PREFIX}/deep/x", headers=TEXT)
        assert r.headers["location"] == f"{url}{nest}{PREFIX}/deep/x"
        assert r.headers["location"].startswith(f"http://127.0.0.1:{r.url.port}{proxy_prefix}{nest}{PREFIX}/")
        assert (await streams.head("/deep/x")).content_type == "text/plain"
    assert log == ["host-startup", "host-shutdown"]


async def test_one_stream_through_both_shapes(backend: str, request: pytest.FixtureRequest) -> None:
    """A FastAPI app mounting the streams at /v1/stream and a Falcon app wrapped by the middleware
    at /streams, over one storage (on Redis: two storages sharing the key prefix, as two
    processes would): the same stream, written through one, read and awaited through the other."""
    one = make_backend(backend, request)
    two = make_backend(backend, request, key_prefix=one.key_prefix) if backend == "redis" else one
    mounted = DurableStreams(one.storage, **OPTIONS)
    wrapped = DurableStreams(two.storage, mount_path="/streams", **OPTIONS)
    fastapi_app = BUILDERS["fastapi"](mounted, "mount", [])
    falcon_app = BUILDERS["falcon"](wrapped, "middleware", [])
    parked = ParkedReaders(two.storage)
    async with serving(fastapi_app) as a, serving(falcon_app) as f, httpx.AsyncClient(timeout=10) as client:
        at_a, at_f = f"{a}/v1/stream/shared/s1", f"{f}/streams/shared/s1"
        r = await client.put(at_a, headers=TEXT, content=b"from fastapi;")
        assert r.status_code == 201 and r.headers["location"] == at_a
        r = await client.put(at_f, headers=TEXT)
        assert r.status_code == 200 and "location" not in r.headers  # it exists already
        r = await client.get(at_f)
        assert r.content == b"from fastapi;"
        tail = r.headers["stream-next-offset"]
        # A long-poll parked on the Falcon side is woken by an append through FastAPI.
        waiting = parked("/shared/s1")
        poll = asyncio.create_task(client.get(at_f, params={"offset": tail, "live": "long-poll"}))
        await asyncio.wait_for(waiting.wait(), 10)
        assert (await client.post(at_a, headers=TEXT, content=b"more")).status_code == 204
        r = await asyncio.wait_for(poll, 10)
        assert r.status_code == 200 and r.content == b"more"
        # A fork made through Falcon (naming its source as Falcon's clients do), read through FastAPI.
        r = await client.put(f"{f}/streams/shared/fork", headers={**TEXT, "Stream-Forked-From": at_f})
        assert r.status_code == 201, r.text
        assert (await client.get(f"{a}/v1/stream/shared/fork")).content == b"from fastapi;more"
        assert (await client.delete(at_f)).status_code == 204
        assert (await client.get(at_a)).status_code == 410  # deleted, kept for its fork
        assert (await mounted.head("/shared/fork")).tail == len(b"from fastapi;more")


# -- the middleware over raw ASGI --------------------------------------------------------------------


class Recorder:
    """A raw ASGI host that records what reaches it and answers HTTP with 200 ``host``."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Any, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append((scope, receive, send))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"host"})


def http_scope(path: str, root_path: str = "", method: str = "GET", raw: bool = True) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"example.com"), (b"content-type", b"text/plain")],
        "server": ("example.com", 80),
    }
    if raw:
        scope["raw_path"] = path.encode()
    return scope


async def call(app: Any, scope: dict[str, Any], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # pragma: no cover - never reached by these requests
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


async def test_middleware_routes_only_its_prefix() -> None:
    host = Recorder()
    mw = DurableStreamsMiddleware(host, prefix="v1/stream/")  # normalized to /v1/stream
    assert mw.prefix == "/v1/stream" and mw.streams.mount_path == "/v1/stream"
    for path in ("/", "/v1", "/v1/streamer", "/v1/streams/x", "/other/v1/stream/x"):
        scope = http_scope(path)
        status, _, body = await call(mw, scope)
        assert (status, body) == (200, b"host"), path
        assert host.calls[-1][0] is scope  # the very same scope, untouched
    assert len(host.calls) == 5
    # Under the prefix: the streams, not the host.
    status, headers, _ = await call(mw, http_scope("/v1/stream/a/b", method="PUT"))
    assert status == 201 and headers["location"] == "http://example.com/v1/stream/a/b"
    assert await mw.streams.head("/a/b")
    status, _, body = await call(mw, http_scope("/v1/stream/"))
    assert (status, body) == (404, b"no stream path given")
    status, _, body = await call(mw, http_scope("/v1/stream"))  # the streams app's 404 (or its 307 to /)
    assert status in (307, 404) and body != b"host"
    assert len(host.calls) == 5
    # Websockets, even under the prefix, and unknown scope types belong to the host.
    for scope in ({"type": "websocket", "path": "/v1/stream/a/b", "root_path": ""}, {"type": "custom"}):
        receive, send = object(), object()
        await mw(scope, receive, send)  # type: ignore[arg-type]
        assert host.calls[-1] == (scope, receive, send)


async def test_middleware_honours_root_path() -> None:
    mw = DurableStreamsMiddleware(Recorder(), prefix="/v1/stream")
    # root_path in front of path (the ASGI convention), and not (tolerated): the same stream.
    status, headers, _ = await call(mw, http_scope("/api/v1/stream/s", root_path="/api", method="PUT"))
    assert status == 201 and headers["location"] == "http://example.com/api/v1/stream/s"
    status, headers, _ = await call(mw, http_scope("/v1/stream/s", root_path="/api", raw=False))
    assert status == 200 and headers["content-type"] == "text/plain"
    assert await mw.streams.head("/s")
    # A fork names its source by the path the client uses, root_path included.
    scope = http_scope("/api/v1/stream/f", root_path="/api", method="PUT")
    scope["headers"].append((b"stream-forked-from", b"/api/v1/stream/s"))
    assert (await call(mw, scope))[0] == 201
    # A root_path alone does not make the host's paths the streams'.
    assert (await call(mw, http_scope("/api/other", root_path="/api")))[2] == b"host"


async def test_middleware_arguments() -> None:
    streams = DurableStreams(mount_path="/events")
    assert DurableStreamsMiddleware(Recorder(), streams=streams).prefix == "/events"
    assert DurableStreamsMiddleware(Recorder(), streams=streams, prefix="/x").prefix == "/x"
    built = DurableStreamsMiddleware(Recorder(), prefix="/x", long_poll_timeout=1.0)
    assert built.streams.mount_path == "/x" and isinstance(built.streams.storage, MemoryStorage)
    with pytest.raises(TypeError):
        DurableStreamsMiddleware(Recorder(), streams=streams, storage=MemoryStorage())
    with pytest.raises(TypeError):
        DurableStreamsMiddleware(Recorder(), streams=streams, long_poll_timeout=1.0)
    for prefix in ("", "/", "//"):
        with pytest.raises(ValueError):
            DurableStreamsMiddleware(Recorder(), prefix=prefix)
    with pytest.raises(ValueError):
        streams_mount(streams, "/")


async def test_streams_mount_needs_the_full_mount_path() -> None:
    mount = streams_mount(DurableStreams(), "/v1/stream")
    # What Litestar passes for /api/v1/stream/x mounted at /v1/stream in Router("/api").
    scope = http_scope("/x/", method="PUT")
    scope["raw_path"] = b"/api/v1/stream/x"
    with pytest.raises(RuntimeError, match="full path"):
        await call(mount, scope)
    scope["raw_path"] = b"/v1/stream/x%2Fy"  # raw_path is decoded like a server decodes path
    status, headers, _ = await call(mount, scope)
    assert status == 201 and headers["location"] == "http://example.com/v1/stream/x%2Fy"


# -- the lifespan relay ------------------------------------------------------------------------------


class LifespanDriver:
    """Plays an ASGI server's side of the lifespan protocol against ``app``."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def run(self, app: Any) -> list[str]:
        """Startup; then shutdown if startup completed. The message types the server got."""

        async def receive() -> dict[str, Any]:
            return await self.inbox.get()

        async def send(message: dict[str, Any]) -> None:
            await self.sent.put(message)

        seen: list[str] = []
        task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
        try:
            await self.inbox.put({"type": "lifespan.startup"})
            seen.append(await self._next(task))
            if seen[-1] == "lifespan.startup.complete":
                await self.inbox.put({"type": "lifespan.shutdown"})
                seen.append(await self._next(task))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        return seen

    async def _next(self, task: asyncio.Task[None]) -> str:
        getter = asyncio.ensure_future(self.sent.get())
        await asyncio.wait({getter, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            return "app returned" if task.done() else "timeout"
        message = getter.result()
        if message["type"].endswith(".failed"):
            return f"{message['type']}: {message.get('message', '')}"
        return message["type"]


async def speaks_lifespan(scope: dict[str, Any], receive: Any, send: Any, log: Log) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            log.append("host-startup")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            log.append("host-shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return


async def raises_at_once(scope: dict[str, Any], receive: Any, send: Any, log: Log) -> None:
    raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")


async def returns_at_once(scope: dict[str, Any], receive: Any, send: Any, log: Log) -> None:
    return


async def raises_after_receiving(scope: dict[str, Any], receive: Any, send: Any, log: Log) -> None:
    await receive()
    raise RuntimeError("what is this message?")


async def startup_fails(scope: dict[str, Any], receive: Any, send: Any, log: Log) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})
    raise RuntimeError("no database")  # as Starlette does after reporting it


async def shutdown_fails(scope: dict[str, Any], receive: Any, send: Any, log: Log) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await send({"type": "lifespan.shutdown.failed", "message": "flush failed"})


async def raises_in_shutdown(scope: dict[str, Any], receive: Any, send: Any, log: Log) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    raise RuntimeError("boom in shutdown")


async def crashes_after_startup(scope: dict[str, Any], receive: Any, send: Any, log: Log) -> None:
    await receive()
    await send({"type": "lifespan.startup.complete"})
    raise RuntimeError("lifespan task crashed")


LIFESPAN_HOSTS = {
    # host: what the server gets in answer to startup (and then shutdown)
    speaks_lifespan: ["lifespan.startup.complete", "lifespan.shutdown.complete"],
    raises_at_once: ["lifespan.startup.complete", "lifespan.shutdown.complete"],
    returns_at_once: ["lifespan.startup.complete", "lifespan.shutdown.complete"],
    raises_after_receiving: ["lifespan.startup.complete", "lifespan.shutdown.complete"],
    startup_fails: ["lifespan.startup.failed: no database"],
    shutdown_fails: ["lifespan.startup.complete", "lifespan.shutdown.failed: flush failed"],
    raises_in_shutdown: ["lifespan.startup.complete", "lifespan.shutdown.failed: RuntimeError('boom in shutdown')"],
    crashes_after_startup: [
        "lifespan.startup.complete",
        "lifespan.shutdown.failed: RuntimeError('lifespan task crashed')",
    ],
}


@pytest.mark.parametrize("host", list(LIFESPAN_HOSTS), ids=[h.__name__ for h in LIFESPAN_HOSTS])
async def test_lifespan_relay(host: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the host does with lifespan, the server gets a well-formed answer, the host's
    own shutdown runs first, and the storage is closed exactly once."""
    log: Log = []
    storage = MemoryStorage()
    aclose = storage.aclose

    async def logged_aclose() -> None:
        log.append("streams-closed")
        await aclose()

    storage.aclose = logged_aclose  # type: ignore[method-assign]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await host(scope, receive, send, log)

    mw = DurableStreamsMiddleware(app, storage=storage)
    with caplog.at_level(logging.DEBUG, logger="durable_streams_asgi"):
        seen = await LifespanDriver().run(mw)
    assert seen == LIFESPAN_HOSTS[host]
    assert log.count("streams-closed") == 1
    if host is speaks_lifespan:
        assert log == ["host-startup", "host-shutdown", "streams-closed"]
    if host in (raises_at_once, raises_after_receiving):
        assert "does not support lifespan" in caplog.text


async def test_lifespan_reports_a_storage_that_fails_to_close() -> None:
    storage = MemoryStorage()

    async def broken() -> None:
        raise OSError("connection reset")

    storage.aclose = broken  # type: ignore[method-assign]
    log: Log = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await speaks_lifespan(scope, receive, send, log)

    seen = await LifespanDriver().run(DurableStreamsMiddleware(app, storage=storage))
    assert seen == [
        "lifespan.startup.complete",
        "lifespan.shutdown.failed: closing durable streams: OSError('connection reset')",
    ]


async def test_host_shutdown_can_still_write_to_the_streams() -> None:
    """The host's shutdown runs before the streams close: a last record written there lands."""
    streams = DurableStreams()
    await streams.create("/audit", content_type="text/plain")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await streams.append("/audit", "shutting down", content_type="text/plain")
        written.extend([c.data async for c in streams.read("/audit")])
        await send({"type": "lifespan.shutdown.complete"})

    written: list[bytes] = []
    seen = await LifespanDriver().run(DurableStreamsMiddleware(app, streams=streams))
    assert seen == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert written == [b"shutting down"]
    with pytest.raises(StreamNotFound):  # closed afterwards (memory storage forgets everything)
        await streams.head("/audit")
