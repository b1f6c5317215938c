"""A host application per framework and mounting shape, written the way that framework's users would.

Every host answers ``GET /hello`` itself (``hello from <framework>``), serves durable streams at
``/v1/stream`` and records its own startup and shutdown in ``log``, so a test can check that the
host keeps its routes and lifespan and that the streams close after the host's shutdown.

- ``mount``: the framework's own mount API, with the streams' lifespan composed into the host's.
- ``middleware``: :class:`DurableStreamsMiddleware` around the host, in that framework's idiom.

Django (no lifespan, settings once per process) runs in a subprocess: see ``django_site.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.types import ASGIApp

from durable_streams_asgi import DurableStreams, DurableStreamsMiddleware, streams_mount

PREFIX = "/v1/stream"
Log = list[str]
Lifespan = Callable[[Any], contextlib.AbstractAsyncContextManager[None]]


def hello_text(framework: str) -> str:
    return f"hello from {framework}"


# -- Starlette and FastAPI -----------------------------------------------------------------------


def _host_lifespan(log: Log, streams: DurableStreams | None) -> Lifespan:
    """The host's own lifespan, with the streams' lifespan composed in when it is given."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if streams is not None:
                await stack.enter_async_context(streams.lifespan(app))
            log.append("host-startup")
            yield
            log.append("host-shutdown")

    return lifespan


def starlette_app(streams: DurableStreams, shape: str, log: Log, nest: str = "") -> ASGIApp:
    """``nest`` puts everything one level down, in a ``Mount(nest, ...)``."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import BaseRoute, Mount, Route

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(hello_text("starlette"))

    if shape == "mount":
        routes: list[BaseRoute] = [Route("/hello", hello), Mount(PREFIX, app=streams.app)]
        if nest:
            routes = [Mount(nest, routes=routes)]
        return Starlette(routes=routes, lifespan=_host_lifespan(log, streams))
    if nest:
        # The middleware around a sub-application mounted under the host.
        inner = DurableStreamsMiddleware(Starlette(routes=[Route("/hello", hello)]), streams=streams)
        return Starlette(routes=[Mount(nest, app=inner)], lifespan=_host_lifespan(log, None))
    return Starlette(
        routes=[Route("/hello", hello)],
        middleware=[Middleware(DurableStreamsMiddleware, streams=streams)],
        lifespan=_host_lifespan(log, None),
    )


def fastapi_app(streams: DurableStreams, shape: str, log: Log) -> ASGIApp:
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI(lifespan=_host_lifespan(log, streams if shape == "mount" else None))

    @app.get("/hello", response_class=PlainTextResponse)
    async def hello() -> str:
        return hello_text("fastapi")

    if shape == "mount":
        app.mount(PREFIX, streams.app)
    else:
        app.add_middleware(DurableStreamsMiddleware, streams=streams)
    return app


# -- Litestar --------------------------------------------------------------------------------------


def litestar_app(streams: DurableStreams, shape: str, log: Log, nest: str = "") -> ASGIApp:
    """``nest`` puts everything in a ``Router(path=nest)``."""
    from litestar import Litestar, Router, asgi, get
    from litestar.types import ControllerRouterHandler

    @get("/hello", sync_to_thread=False)
    def hello() -> str:
        return hello_text("litestar")

    async def startup() -> None:
        log.append("host-startup")

    async def shutdown() -> None:
        log.append("host-shutdown")

    handlers: list[ControllerRouterHandler] = [hello]
    if shape == "mount":
        # Litestar hands mounted apps a rewritten path: streams_mount restores it from raw_path.
        handlers.append(asgi(PREFIX, is_mount=True, copy_scope=True)(streams_mount(streams, nest + PREFIX)))
    if nest:
        handlers = [Router(path=nest, route_handlers=handlers)]
    app = Litestar(
        route_handlers=handlers,
        on_startup=[startup],
        # Litestar runs on_shutdown hooks in order, after exiting its lifespan managers: closing
        # the streams in the last hook (rather than in lifespan=[streams.lifespan]) lets every
        # other shutdown step still use them.
        on_shutdown=[shutdown, streams.aclose] if shape == "mount" else [shutdown],
        logging_config=None,
    )
    return app if shape == "mount" else DurableStreamsMiddleware(app, streams=streams, prefix=nest + PREFIX)


# -- Quart, Falcon: no mount API, so the middleware --------------------------------------------


def quart_app(streams: DurableStreams, shape: str, log: Log) -> ASGIApp:
    assert shape == "middleware"
    from quart import Quart

    app = Quart(__name__)

    @app.get("/hello")
    async def hello() -> str:
        return hello_text("quart")

    @app.before_serving
    async def startup() -> None:
        log.append("host-startup")

    @app.after_serving
    async def shutdown() -> None:
        log.append("host-shutdown")

    # Quart's documented place for ASGI middleware: around app.asgi_app (lifespan included).
    app.asgi_app = DurableStreamsMiddleware(app.asgi_app, streams=streams)  # type: ignore[method-assign]
    return app


def falcon_app(streams: DurableStreams, shape: str, log: Log) -> ASGIApp:
    assert shape == "middleware"
    import falcon.asgi

    class Hello:
        async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
            resp.content_type = falcon.MEDIA_TEXT
            resp.text = hello_text("falcon")

    class Lifecycle:
        async def process_startup(self, scope: dict[str, Any], event: dict[str, Any]) -> None:
            log.append("host-startup")

        async def process_shutdown(self, scope: dict[str, Any], event: dict[str, Any]) -> None:
            log.append("host-shutdown")

    app = falcon.asgi.App(middleware=[Lifecycle()])
    app.add_route("/hello", Hello())
    return DurableStreamsMiddleware(app, streams=streams)


BUILDERS: dict[str, Callable[..., ASGIApp]] = {
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "litestar": litestar_app,
    "quart": quart_app,
    "falcon": falcon_app,
}

#: Every in-process (framework, shape); Django's is in test_frameworks.py, over a subprocess.
SHAPES = [
    ("starlette", "mount"),
    ("starlette", "middleware"),
    ("fastapi", "mount"),
    ("fastapi", "middleware"),
    ("litestar", "mount"),
    ("litestar", "middleware"),
    ("quart", "middleware"),
    ("falcon", "middleware"),
]
