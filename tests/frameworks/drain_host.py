"""A host app with a generation endpoint, for the graceful-drain tests (tests/test_drain.py).

Served by uvicorn, hypercorn or gunicorn (``tests.frameworks.drain_host:app``), with
``DurableStreams.lifespan`` as its lifespan: the drain on SIGTERM is the library's default, not
anything this app does. ``POST /generate?path=/x`` starts a generation that writes a token
every 20 ms and never ends by itself; ``DRAIN_SHUTDOWN_TIMEOUT`` sets how long generations get.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from durable_streams_asgi import DurableStreams

options: dict[str, float] = {}
if os.environ.get("DRAIN_SHUTDOWN_TIMEOUT"):
    options["shutdown_timeout"] = float(os.environ["DRAIN_SHUTDOWN_TIMEOUT"])
storage = None
if os.environ.get("REDIS_URL"):
    from durable_streams_asgi.storage.redis import RedisStorage

    storage = RedisStorage.from_url(os.environ["REDIS_URL"], key_prefix=os.environ["DURABLE_STREAMS_KEY_PREFIX"])
streams = DurableStreams(storage, **options)


async def tokens() -> AsyncIterator[str]:
    n = 0
    while True:
        yield f"token {n} "
        n += 1
        await asyncio.sleep(0.02)


async def generate(request: Request) -> Response:
    generation = await streams.start_generation(request.query_params["path"], tokens(), content_type="text/plain")
    return PlainTextResponse(generation.path, status_code=201)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


routes = [Route("/generate", generate, methods=["POST"]), Route("/healthz", healthz), Mount("/v1/stream", streams.app)]
app = Starlette(routes=routes, lifespan=streams.lifespan)
