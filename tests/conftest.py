"""Shared fixtures: storages parametrised over every backend, the app, and real servers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from durable_streams_asgi import MemoryStorage, durable_streams_app
from durable_streams_asgi.storage.base import Storage

BACKENDS = ["memory", "redis"]
# The storage contract tests run on a Redis Cluster too (their modules override ``backend``).
STORAGE_BACKENDS = [*BACKENDS, "cluster"]

StorageFactory = Callable[[], Awaitable[Storage]]


def spawn(
    args: list[str], log: Path, ready_url: str, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``python -m <args>`` and wait until ``ready_url`` answers 200 (or fail the test)."""
    process = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=cwd, env=env
    )
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            pytest.fail(f"{args[0]} exited with {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{args[0]} did not start within 30 s: {log.read_text()}")
        time.sleep(0.1)


def spawn_proxy(upstreams: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """tests/roundrobin.py on a free port in front of ``upstreams``: the process and its URL."""
    port = free_port()
    args = ["tests.roundrobin", "--port", str(port)]
    for upstream in upstreams:
        args += ["--upstream", upstream]
    url = f"http://127.0.0.1:{port}"
    root = Path(__file__).resolve().parent.parent
    return spawn(args, log, f"{url}/healthz", cwd=root), url


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate, and kill what does not exit within 15 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30) -> None:
    """Until ``condition()`` (a server's own state, read over its socket) holds; a server that
    does not answer yet counts as not yet."""
    from redis.exceptions import RedisError

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, RedisError):
            if condition():
                return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the tests: ``REDIS_URL`` when set, else a throwaway ``redis-server`` of our own
    on a free port in a temp dir. Tests use unique key prefixes and never flush anything."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster for the tests: ``REDIS_CLUSTER_URL`` when set, else 3 masters and 3
    replicas of our own (see ``redis_cluster.py``), shared by the session like ``redis_url``."""
    if os.environ.get("REDIS_CLUSTER_URL"):
        yield os.environ["REDIS_CLUSTER_URL"]
        return
    from .redis_cluster import local_cluster

    with local_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster.url


class RedisServer:
    """A ``redis-server`` of the tests' own, on a free port in ``directory``. ``persistent``: it
    writes every command to its append-only file before answering (``appendfsync always``), so
    that a SIGKILL loses nothing and a restart on the same port and directory has the same data."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for the Redis tests: see README, Prerequisites")
        log = self.directory / "redis.log"
        persistence = ("yes", "always") if self.persistent else ("no", "everysec")
        self.process = subprocess.Popen(
            [
                binary,
                *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
                *("--save", "", "--appendonly", persistence[0], "--appendfsync", persistence[1]),
                *("--protected-mode", "no", "--logfile", str(log)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # ready when PING answers PONG (not LOADING)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last write."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def example_answer(prompt: str, tokens: int) -> str:
    """The whole answer of the FastAPI example's fake model to ``prompt`` with DEMO_TOKENS=tokens
    (its own function, imported, so that a change there is a change here)."""
    main = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app" / "main.py"
    spec = importlib.util.spec_from_file_location("fastapi_example_main", main)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with environment(DEMO_TOKENS=str(tokens), REDIS_URL=None):
        spec.loader.exec_module(module)
        return "".join(module.fake_answer(prompt))


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def storage_factory(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[StorageFactory]:
    """Makes storages of the parametrised backend. Redis storages made by one factory share one
    key prefix, like several processes serving the same streams."""
    made: list[Storage] = []
    prefix = unique_prefix()

    async def make() -> Storage:
        if backend == "memory":
            storage: Storage = MemoryStorage()
        else:
            from durable_streams_asgi.storage.redis import RedisStorage

            url = request.getfixturevalue("redis_cluster_url" if backend == "cluster" else "redis_url")
            storage = RedisStorage.from_url(url, key_prefix=prefix)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        await storage.aclose()


@pytest.fixture
async def storage(storage_factory: StorageFactory) -> Storage:
    return await storage_factory()


def make_host_app(storage: Storage, **options: object) -> Starlette:
    """A host application with the streams app mounted where the README says."""
    return Starlette(routes=[Mount("/v1/stream", app=durable_streams_app(storage, **options))])  # type: ignore[arg-type]


@pytest.fixture
def app_options() -> dict[str, object]:
    """Override in a module to tune the app (timeouts, limits)."""
    return {"long_poll_timeout": 2.0, "sse_max_duration": 10.0}


@pytest.fixture
async def client(storage: Storage, app_options: dict[str, object]) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client: requests go straight into the ASGI app (no sockets)."""
    transport = httpx.ASGITransport(app=make_host_app(storage, **app_options))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver/v1/stream") as c:
        yield c


@contextlib.asynccontextmanager
async def running_server(app: Any, lifespan: str = "off", http: Any = "auto", **config: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn (``http``: its protocol; ``config``: more of uvicorn.Config's
    settings) on a free loopback port inside this event loop."""
    port = free_port()
    settings = {"host": "127.0.0.1", "port": port, "log_level": "warning", "lifespan": lifespan, "http": http}
    config = uvicorn.Config(app, **{**settings, **config})
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def live_client(storage: Storage, app_options: dict[str, object]) -> AsyncIterator[httpx.AsyncClient]:
    """A client talking HTTP to a real uvicorn server: needed for streaming (SSE) responses."""
    async with running_server(make_host_app(storage, **app_options)) as url:
        async with httpx.AsyncClient(base_url=f"{url}/v1/stream", timeout=10) as c:
            yield c


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of an SSE response, parsed as an EventSource does."""
    event, data = None, []
    async for line in response.aiter_lines():
        if line == "":
            if event is not None:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` (async) until it returns something truthy, and return it: for state that
    offers no event to wait on from outside (a subscription's record, behind HTTP)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)
