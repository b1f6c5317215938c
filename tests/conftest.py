"""Shared fixtures: storages parametrised over every backend, the app, and real servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from durable_streams_asgi import MemoryStorage, durable_streams_app
from durable_streams_asgi.storage.base import Storage

BACKENDS = ["memory"]

StorageFactory = Callable[[], Awaitable[Storage]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def storage_factory(backend: str) -> AsyncIterator[StorageFactory]:
    """Makes storages of the parametrised backend (several share data where the backend can)."""
    made: list[Storage] = []

    async def make() -> Storage:
        if backend == "memory":
            storage: Storage = MemoryStorage()
        else:  # pragma: no cover - extended by the Redis backend
            raise AssertionError(backend)
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
async def running_server(app: Starlette) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port inside this event loop."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
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
