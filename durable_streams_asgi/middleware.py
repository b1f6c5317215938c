"""Serving durable streams from any ASGI application: a middleware, and a mount for path-rewriting routers.

``DurableStreamsMiddleware`` wraps a whole ASGI application (Django's, Quart's, Falcon's, Litestar's,
or any other): requests under its prefix are served by the streams app, everything else (other
HTTP paths, websockets) goes to the wrapped app untouched, and the lifespan protocol is passed on
to the wrapped app with the streams' shutdown added after the app's own::

    from django.core.asgi import get_asgi_application
    from durable_streams_asgi import DurableStreamsMiddleware

    application = DurableStreamsMiddleware(get_asgi_application(), prefix="/v1/stream")

``streams_mount`` is for routers that mount an ASGI app by rewriting ``scope["path"]`` without
setting ``root_path`` (Litestar's ``@asgi(..., is_mount=True)``): it rebuilds the request path from
``raw_path`` so that stream paths and ``Location`` headers are the same as in every other shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import DurableStreamsApp
from .storage.base import Storage
from .streams import DurableStreams

__all__ = ["DurableStreamsMiddleware", "streams_mount"]

logger = logging.getLogger("durable_streams_asgi")

DEFAULT_PREFIX = "/v1/stream"


def _normalize_prefix(prefix: str) -> str:
    stripped = prefix.strip("/")
    if not stripped:
        raise ValueError(f"prefix must name a path below the root, such as {DEFAULT_PREFIX!r} (got {prefix!r})")
    return "/" + stripped


class DurableStreamsMiddleware:
    """Serve durable streams at ``prefix`` in front of any ASGI application.

    ``streams`` is a :class:`~durable_streams_asgi.DurableStreams` to serve (its in-process API then
    works on the same streams); without it, one is made from ``storage`` (default: a new
    ``MemoryStorage``) and ``options`` (those of :func:`~durable_streams_asgi.durable_streams_app`,
    plus ``authorize`` and ``shutdown_timeout``), and is available as :attr:`streams`.
    ``prefix`` defaults to ``streams.mount_path`` (``/v1/stream``); keep the two equal, since
    ``streams.url_for`` builds URLs with ``mount_path``.

    - HTTP requests for ``prefix`` and below (relative to the server's ``root_path``) go to the
      streams app, with ``root_path`` extended by ``prefix`` as Starlette's ``Mount`` does: stream
      ``/chat/42`` is at ``{root_path}{prefix}/chat/42`` and ``Location`` carries that URL.
    - Everything else, websockets included, goes to the wrapped app with the scope untouched.
    - Lifespan messages go to the wrapped app; once it has completed its shutdown, the streams are
      closed (running generations finish, then the storage's connections close) before the server
      is told. A wrapped app that does not speak lifespan (it raises, or returns, before answering
      startup, as Django's does) is fine: the middleware then answers the server itself.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        prefix: str | None = None,
        streams: DurableStreams | None = None,
        storage: Storage | None = None,
        **options: Any,
    ) -> None:
        if streams is not None and (storage is not None or options):
            raise TypeError("give either streams or storage and options, not both")
        if streams is None:
            streams = DurableStreams(storage, mount_path=prefix or DEFAULT_PREFIX, **options)
        self.app = app
        self.streams = streams
        self.prefix = _normalize_prefix(prefix if prefix is not None else (streams.mount_path or DEFAULT_PREFIX))
        self._below = self.prefix + "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            root = scope.get("root_path", "")
            path = scope["path"]
            # ASGI servers put root_path in front of path (Starlette relies on it); tolerate those
            # that do not.
            relative = path[len(root) :] if root and path.startswith(root) else path
            if relative == self.prefix or relative.startswith(self._below):
                # In place, as Starlette's Mount does: the request is the streams' from here on,
                # and a copy of the scope would live as long as the connection (thousands of
                # idle live readers each hold theirs).
                scope["path"] = root + relative
                scope["root_path"] = root + self.prefix
                app = self.streams.app
                if isinstance(app, DurableStreamsApp) and not app.user_middleware:
                    # What DurableStreamsApp.__call__ does, one frame less: every open live
                    # connection holds its frames for its whole life.
                    scope["app"] = app
                    await app.handler(scope, receive, send)
                else:
                    await app(scope, receive, send)
                return
        elif kind == "lifespan":
            await _Lifespan(self.app, self.streams.aclose, self.streams.startup).run(scope, receive, send)
            return
        await self.app(scope, receive, send)


_STARTUP = "lifespan.startup"
_SHUTDOWN = "lifespan.shutdown"


class _Lifespan:
    """One run of the lifespan protocol, relayed to the wrapped app, with ``close`` after its shutdown."""

    def __init__(
        self, app: ASGIApp, close: Callable[[], Awaitable[None]], startup: Callable[[], None] = lambda: None
    ) -> None:
        self.app = app
        self.close = close
        self.startup = startup
        self.startup_received = False  # the wrapped app has received lifespan.startup
        self.startup_answered = False  # ... and answered it
        self.startup_failed = False
        self.shutdown_received = False
        self.shutdown_answered = False

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def app_receive() -> Message:
            message = await receive()
            if message["type"] == _STARTUP:
                self.startup_received = True
            elif message["type"] == _SHUTDOWN:
                self.shutdown_received = True
            return message

        async def app_send(message: Message) -> None:
            kind = message["type"]
            if kind in (f"{_STARTUP}.complete", f"{_STARTUP}.failed"):
                self.startup_answered = True
                if kind == f"{_STARTUP}.complete":
                    self.startup()
                if kind == f"{_STARTUP}.failed":
                    # The server stops without a shutdown: close now.
                    self.startup_failed = True
                    await self._close()
            elif kind in (f"{_SHUTDOWN}.complete", f"{_SHUTDOWN}.failed"):
                # The wrapped app is done with its shutdown (which may still have used the
                # streams); close them before the server hears that shutdown is complete.
                self.shutdown_answered = True
                error = await self._close()
                if error is not None and kind == f"{_SHUTDOWN}.complete":
                    message = {"type": f"{_SHUTDOWN}.failed", "message": f"closing durable streams: {error!r}"}
            await send(message)

        error: Exception | None = None
        try:
            await self.app(scope, app_receive, app_send)
        except Exception as exc:
            if self.startup_failed or self.shutdown_answered:
                raise  # the server has its answer; the exception is the app's to report
            if not self.startup_answered:
                # Like an ASGI server's "auto" lifespan mode: an app that fails before answering
                # startup does not speak lifespan (Django raises at once).
                log = logger.warning if self.startup_received else logger.debug
                log("the wrapped app does not support lifespan (%r); answering the server here", exc)
            else:
                logger.error("the wrapped app's lifespan failed; closing durable streams at shutdown", exc_info=exc)
                error = exc
        else:
            if self.startup_failed or self.shutdown_answered:
                return
        # The wrapped app stopped taking part (or never did): finish the protocol here.
        await self._finish(receive, send, error)

    async def _finish(self, receive: Receive, send: Send, error: Exception | None) -> None:
        """Answer the rest of the protocol for a wrapped app that stopped taking part."""
        if not self.startup_answered:
            if not self.startup_received:
                await receive()  # lifespan.startup
            self.startup()
            await send({"type": f"{_STARTUP}.complete"})
        if not self.shutdown_received:
            while (await receive())["type"] != _SHUTDOWN:
                pass
        failure = await self._close()
        if error is not None or failure is not None:
            reason = error if error is not None else failure
            await send({"type": f"{_SHUTDOWN}.failed", "message": repr(reason)})
        else:
            await send({"type": f"{_SHUTDOWN}.complete"})

    async def _close(self) -> Exception | None:
        try:
            await self.close()
        except Exception as exc:
            logger.error("closing durable streams failed", exc_info=exc)
            return exc
        return None


def streams_mount(streams: DurableStreams, prefix: str | None = None) -> ASGIApp:
    """The streams app for routers that mount by rewriting ``scope["path"]`` (Litestar).

    Litestar's ``@asgi(path, is_mount=True)`` hands the mounted app the path below the mount point,
    normalized and with a slash appended, and leaves ``root_path`` alone, so the streams app alone
    would see ``/chat/42/`` for ``/v1/stream/chat/42``. This app takes the path the client sent
    from ``raw_path`` and gives the streams app the Starlette convention (full ``path``,
    ``root_path`` ending at the mount point). ``prefix`` is the mount point's full path from the
    application root (including the paths of enclosing routers), by default ``streams.mount_path``::

        streams = DurableStreams()
        mount = asgi("/v1/stream", is_mount=True, copy_scope=True)(streams_mount(streams, "/v1/stream"))
        app = Litestar(route_handlers=[mount], on_shutdown=[streams.aclose])

    Requests the router sends here that are not below the mount point (Litestar matches mount
    paths as string prefixes: ``/v1/streamer``) get a 404. Every common ASGI server sets
    ``raw_path``; without it the rewritten ``path`` is all there is, and a mismatch is an error.
    """
    mount_path = _normalize_prefix(prefix if prefix is not None else (streams.mount_path or DEFAULT_PREFIX))
    streams_app = streams.app

    async def durable_streams_mount(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await streams_app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        raw = scope.get("raw_path")
        # raw_path is the request target's path as sent (percent-encoded, no query string).
        path = unquote(raw.decode("latin-1").split("?", 1)[0]) if raw else scope["path"]
        if root and not path.startswith(root):
            path = root + path
        mounted_at = root + mount_path
        if path != mounted_at and not path.startswith(mounted_at + "/"):
            if path.startswith(mounted_at):
                # Litestar matches mount paths as plain string prefixes: /v1/streamer lands here.
                await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)
                return
            raise RuntimeError(
                f"streams_mount: request path {path!r} is not below {mounted_at!r}; give streams_mount "
                "the mount point's full path from the application root as prefix"
            )
        await streams_app({**scope, "path": path, "root_path": mounted_at}, receive, send)

    return durable_streams_mount
