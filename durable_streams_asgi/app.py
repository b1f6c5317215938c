"""The public entry points: ``durable_streams_app()`` and the lifespan helper for host apps.

``durable_streams_app()`` returns a Starlette application that serves a stream at every path below
where it is mounted; the work is done by :class:`~durable_streams_asgi.handlers.DurableStreamsASGI`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from .handlers import DurableStreamsASGI
from .options import AccessDenied, Authorize, Options
from .storage.base import Storage
from .storage.memory import MemoryStorage

__all__ = [
    "AccessDenied",
    "Authorize",
    "DurableStreamsASGI",
    "Options",
    "durable_streams_app",
    "durable_streams_lifespan",
    "streams_handler",
]


class DurableStreamsApp(Starlette):
    """The Starlette application :func:`durable_streams_app` returns.

    Every path below the mount point is a stream, so there is nothing to route: HTTP requests go
    straight to the handler, skipping the router and middleware layers (a measurable share of an
    append's cost). Middleware added with ``add_middleware`` is honoured: then requests take the
    ordinary Starlette path. Lifespan events always do.
    """

    handler: DurableStreamsASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.user_middleware:
            scope["app"] = self
            await self.handler(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def streams_handler(app: Any) -> DurableStreamsASGI:
    """The handler inside an app made by :func:`durable_streams_app`."""
    handler = getattr(getattr(app, "state", None), "durable_streams", None)
    if not isinstance(handler, DurableStreamsASGI):
        raise TypeError("not an app made by durable_streams_app()")
    return handler


def durable_streams_lifespan(*streams_apps: Any) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """A lifespan for the host application that closes the streams apps' storages on shutdown.

    Starlette's ``Mount`` (and so FastAPI's ``app.mount``) does not run a mounted app's lifespan,
    so the host app owns it::

        streams = durable_streams_app(RedisStorage.from_url("redis://localhost:6379/0"))
        app = FastAPI(lifespan=durable_streams_lifespan(streams))
        app.mount("/v1/stream", streams)

    Connections are opened lazily on first use, so startup does nothing.
    """
    handlers = [streams_handler(app) for app in streams_apps]

    @contextlib.asynccontextmanager
    async def lifespan(host_app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for handler in handlers:
                await handler.aclose()

    return lifespan


def durable_streams_app(
    storage: Storage | None = None,
    *,
    long_poll_timeout: float = 30.0,
    sse_max_duration: float = 60.0,
    max_body_size: int = 16 * 1024 * 1024,
    max_read_bytes: int = 4 * 1024 * 1024,
    max_messages: int = 10_000,
    cors_origins: str | Sequence[str] = "*",
    cache_visibility: Literal["public", "private"] = "public",
    authorize: Authorize | None = None,
    subscriptions: bool = True,
    allow_loopback_webhooks: bool = False,
) -> DurableStreamsApp:
    """A Starlette app serving durable streams at every path below where it is mounted.

    ``storage`` defaults to a fresh :class:`MemoryStorage`. ``long_poll_timeout`` is how long a
    long-poll waits for data (seconds); ``sse_max_duration`` how long an SSE connection lives
    before the server closes it so clients reconnect; ``max_body_size`` the largest append or
    create body (413 past it); ``max_read_bytes`` roughly how much one catch-up response holds;
    ``max_messages`` the most JSON messages one create or append holds (413 past it: each is a
    stream entry written by one atomic script, so this bounds how long one request holds Redis);
    ``cors_origins`` ``"*"`` or a list of allowed origins; ``cache_visibility`` whether catch-up
    reads are ``public`` or ``private`` in ``Cache-Control``; ``authorize`` a hook
    ``(request, action, path)`` that lets the host application allow or refuse each request
    (see :data:`Authorize`); ``subscriptions`` whether to serve the subscription API at
    ``__ds/subscriptions/`` (PROTOCOL.md sections 6 and 7); ``allow_loopback_webhooks`` whether
    webhooks may go to loopback addresses over http (development and tests only).
    """
    if max_messages < 1:
        raise ValueError("max_messages must be at least 1")
    if cache_visibility not in ("public", "private"):
        raise ValueError("cache_visibility must be 'public' or 'private'")
    options = Options(
        long_poll_timeout=long_poll_timeout,
        sse_max_duration=sse_max_duration,
        max_body_size=max_body_size,
        max_read_bytes=max_read_bytes,
        max_messages=max_messages,
        cors_origins=cors_origins,
        cache_visibility=cache_visibility,
        authorize=authorize,
        subscriptions=subscriptions,
        allow_loopback_webhooks=allow_loopback_webhooks,
    )
    handler = DurableStreamsASGI(storage if storage is not None else MemoryStorage(), options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Runs when this app is the top-level ASGI app (not when mounted: see
        # durable_streams_lifespan).
        try:
            if handler.options.subscriptions:
                handler.start_subscriptions()
            yield
        finally:
            await handler.aclose()

    app = DurableStreamsApp(routes=[Mount("", app=handler)], lifespan=lifespan)
    app.handler = handler
    app.state.durable_streams = handler
    return app
