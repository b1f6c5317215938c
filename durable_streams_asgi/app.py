"""The ASGI application: routing of stream requests to the storage.

``durable_streams_app()`` returns a Starlette application that serves a stream at every path below
where it is mounted. The handlers speak raw ASGI (headers as byte pairs, one ``send`` per
response) because they are the hot path; all decisions about what is valid and which status
answers what live in :mod:`durable_streams_asgi.protocol`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, quote

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from . import offsets, protocol, sse
from .jsonmode import InvalidJSON, join_messages, split_messages
from .protocol import ProtocolError
from .storage.base import (
    AppendRequest,
    ContentTypeMismatch,
    ReadResult,
    Storage,
    StorageError,
    StreamClosed,
    StreamConfig,
    StreamInfo,
)
from .storage.common import DEFAULT_CONTENT_TYPE, is_json_content_type, same_content_type
from .storage.memory import MemoryStorage

logger = logging.getLogger("durable_streams_asgi")

Headers = list[tuple[bytes, bytes]]

#: ``authorize(request, action, path)``: sync or async; ``action`` is one of ``read``, ``create``,
#: ``append``, ``close``, ``delete``. Return True (or None) to allow, False to answer 403, or raise
#: :class:`AccessDenied` to choose the status (401 to ask for credentials) and message.
Authorize = Callable[[Request, str, str], "bool | Awaitable[bool | None] | None"]


class AccessDenied(Exception):
    """Raised by an ``authorize`` hook to refuse a request with ``status`` (401 or 403)."""

    def __init__(self, status: int = 403, message: str = "forbidden", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


EXPOSED_HEADERS = (
    "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, Stream-TTL, "
    "Stream-Expires-At, ETag, Location, Content-Type, Producer-Epoch, Producer-Seq, "
    "Producer-Expected-Seq, Producer-Received-Seq, stream-sse-data-encoding, Retry-After"
)
ALLOWED_HEADERS = (
    "Content-Type, Authorization, If-None-Match, Stream-TTL, Stream-Expires-At, Stream-Seq, "
    "Stream-Closed, Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, "
    "Producer-Id, Producer-Epoch, Producer-Seq, Cache-Control, Last-Event-ID"
)
ALLOWED_METHODS = "GET, HEAD, PUT, POST, DELETE, OPTIONS"


@dataclass(frozen=True)
class Options:
    """Server behaviour that a host application may tune. See ``durable_streams_app``."""

    long_poll_timeout: float = 30.0
    sse_max_duration: float = 60.0
    sse_keepalive: float = 15.0
    max_body_size: int = 16 * 1024 * 1024
    max_read_bytes: int = 4 * 1024 * 1024
    cors_origins: str | Sequence[str] = "*"
    cache_visibility: Literal["public", "private"] = "public"
    authorize: Authorize | None = None


class _Request:
    """What a handler needs of one request, decoded once."""

    __slots__ = ("headers", "method", "path", "query", "receive", "repeated", "scope")

    def __init__(self, scope: Scope, receive: Receive, path: str) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path = path
        # ASGI header names are lower-case; HTTP header values are latin-1 on the wire.
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.query: dict[str, str] = {}
        # Parameters given more than once: ambiguous, so refused where they matter.
        self.repeated: set[str] = set()
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key in self.query:
                self.repeated.add(key)
            self.query[key] = value

    def url(self) -> str:
        """The stream's absolute URL as the client addressed it (for ``Location``)."""
        scheme = self.scope.get("scheme", "http")
        host = self.headers.get("host")
        if host is None:
            server = self.scope.get("server") or ("localhost", None)
            host = server[0] if server[1] in (None, 80, 443) else f"{server[0]}:{server[1]}"
        raw = self.scope.get("raw_path")
        path = raw.decode("latin-1").split("?", 1)[0] if raw else quote(self.scope["path"])
        return f"{scheme}://{host}{path}"

    async def body(self, limit: int) -> bytes:
        length = self.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise protocol.bad_request("Content-Length is not valid")
            if int(length) > limit:
                raise ProtocolError(413, f"body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise ProtocolError(413, f"body exceeds {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Disconnected(Exception):
    """The client went away before its request body arrived: nothing to answer."""


def _h(name: str, value: str) -> tuple[bytes, bytes]:
    return (name.encode("latin-1"), value.encode("latin-1"))


class DurableStreamsASGI:
    """The raw ASGI handler. Use :func:`durable_streams_app` unless you need it bare."""

    def __init__(self, storage: Storage, options: Options) -> None:
        self.storage = storage
        self.options = options
        self._catchup_cache_control = f"{options.cache_visibility}, max-age=60, stale-while-revalidate=300"
        self._security: Headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"cross-origin-resource-policy", b"cross-origin"),
        ]
        origins = options.cors_origins
        self._any_origin = origins == "*" or (not isinstance(origins, str) and "*" in origins)
        self._origins = frozenset([origins] if isinstance(origins, str) else origins)

    # -- plumbing ----------------------------------------------------------------------------

    def _base_headers(self, request: _Request) -> Headers:
        headers = list(self._security)
        if self._any_origin:
            headers.append((b"access-control-allow-origin", b"*"))
        else:
            origin = request.headers.get("origin")
            if origin is not None and origin in self._origins:
                headers.append(_h("access-control-allow-origin", origin))
            headers.append((b"vary", b"Origin"))
        headers.append(_h("access-control-expose-headers", EXPOSED_HEADERS))
        return headers

    async def _send(self, send: Send, request: _Request, status: int, headers: Headers, body: bytes = b"") -> None:
        all_headers = self._base_headers(request) + headers
        if request.method == "HEAD" or status in (204, 304):
            body = b""
        elif not any(name == b"content-type" for name, _ in headers):
            all_headers.append((b"content-type", b"text/plain; charset=utf-8"))
        if status not in (204, 304):
            all_headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route_path = scope["path"]
        root = scope.get("root_path", "")
        if root and route_path.startswith(root):
            route_path = route_path[len(root) :]
        request = _Request(scope, receive, route_path)
        try:
            if request.method == "OPTIONS":
                await self._preflight(send, request)
                return
            request.path = protocol.validate_path(route_path)
            handler = self._handlers.get(request.method)
            if handler is None:
                raise ProtocolError(405, "method not allowed", {"Allow": ALLOWED_METHODS})
            if self.options.authorize is not None:
                await self._authorize(request)
            await handler(self, send, request)
        except ProtocolError as exc:
            await self._error(send, request, exc)
        except StorageError as exc:
            await self._error(send, request, protocol.storage_error(exc))
        except _Disconnected:
            return

    async def _authorize(self, request: _Request) -> None:
        """Ask the host application's hook, before any body is read."""
        h = request.headers
        method = request.method
        if method in ("GET", "HEAD"):
            action = "read"
        elif method == "PUT":
            action = "create"
        elif method == "DELETE":
            action = "delete"
        else:
            bodiless = h.get("content-length", "0").strip() == "0" and "transfer-encoding" not in h
            action = "close" if protocol.parse_closed(h.get("stream-closed")) and bodiless else "append"
        checks = [(action, request.path)]
        if method == "PUT" and "stream-forked-from" in h:
            # Forking reads the source: the caller must be allowed to read it.
            source = protocol.fork_source_path(h["stream-forked-from"], request.scope.get("root_path", ""))
            checks.append(("read", source))
        hook = self.options.authorize
        assert hook is not None
        starlette_request = Request(request.scope)  # no receive: the hook cannot consume the body
        for check_action, path in checks:
            try:
                verdict = hook(starlette_request, check_action, path)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
            except AccessDenied as exc:
                raise ProtocolError(exc.status, exc.message, exc.headers) from exc
            if verdict is False:
                raise ProtocolError(403, "forbidden")

    async def _error(self, send: Send, request: _Request, exc: ProtocolError) -> None:
        headers = [_h(k, v) for k, v in exc.headers.items()]
        if exc.status == 503:
            logger.warning("storage unavailable: %s %s", request.method, request.path)
        await self._send(send, request, exc.status, headers, exc.message.encode())

    async def _preflight(self, send: Send, request: _Request) -> None:
        headers = [
            _h("access-control-allow-methods", ALLOWED_METHODS),
            _h("access-control-allow-headers", ALLOWED_HEADERS),
            (b"access-control-max-age", b"86400"),
        ]
        await self._send(send, request, 204, headers)

    # -- metadata headers --------------------------------------------------------------------

    @staticmethod
    def _stream_headers(info: StreamInfo, *, next_position: int | None = None) -> Headers:
        headers = [
            _h("content-type", info.content_type),
            _h("stream-next-offset", offsets.encode_offset(info.tail if next_position is None else next_position)),
        ]
        if info.closed and (next_position is None or next_position >= info.tail):
            headers.append((b"stream-closed", b"true"))
        return headers

    # -- PUT: create ---------------------------------------------------------------------------

    async def _put(self, send: Send, request: _Request) -> None:
        h = request.headers
        content_type = h.get("content-type", "").strip() or None
        fork_from = h.get("stream-forked-from")
        ttl, expires_at = protocol.parse_expiry(h.get("stream-ttl"), h.get("stream-expires-at"))
        fork_offset = protocol.parse_fork_offset(h.get("stream-fork-offset"))
        fork_sub_offset = protocol.parse_fork_sub_offset(h.get("stream-fork-sub-offset"))
        if fork_from is None:
            if "stream-fork-offset" in h or "stream-fork-sub-offset" in h:
                raise protocol.bad_request("Stream-Fork-Offset and Stream-Fork-Sub-Offset require Stream-Forked-From")
            content_type = content_type or DEFAULT_CONTENT_TYPE
        elif fork_sub_offset and fork_offset is None:
            raise protocol.bad_request("Stream-Fork-Sub-Offset requires Stream-Fork-Offset")
        config = StreamConfig(
            # A fork without a Content-Type inherits its source's (None tells the storage).
            content_type=content_type,
            ttl_seconds=ttl,
            expires_at=expires_at,
            closed=protocol.parse_closed(h.get("stream-closed")),
            fork_from=protocol.fork_source_path(fork_from, request.scope.get("root_path", ""))
            if fork_from is not None
            else None,
            fork_offset=fork_offset,
            fork_sub_offset=fork_sub_offset,
        )
        body = await request.body(self.options.max_body_size)
        items = await self._create_items(request.path, config, body) if body else []
        result = await self.storage.create(request.path, config, items)
        headers = self._stream_headers(result.info)
        if result.created:
            headers.append(_h("location", request.url()))
        await self._send(send, request, 201 if result.created else 200, headers)

    async def _create_items(self, path: str, config: StreamConfig, body: bytes) -> list[bytes]:
        content_type = config.content_type
        if content_type is None and config.fork_from is not None:
            # The body of a fork that inherits its type is parsed by the source's type.
            content_type = (await self.storage.head(config.fork_from)).content_type
        return self._items(content_type, body)

    @staticmethod
    def _items(content_type: str | None, body: bytes) -> list[bytes]:
        if is_json_content_type(content_type):
            try:
                return split_messages(body)
            except InvalidJSON as exc:
                raise protocol.bad_request(str(exc)) from exc
        return [body]

    # -- POST: append / close ------------------------------------------------------------------

    async def _post(self, send: Send, request: _Request) -> None:
        h = request.headers
        close = protocol.parse_closed(h.get("stream-closed"))
        producer = protocol.parse_producer(h.get("producer-id"), h.get("producer-epoch"), h.get("producer-seq"))
        seq = protocol.parse_stream_seq(h.get("stream-seq"))
        content_type = h.get("content-type", "").strip() or None
        body = await request.body(self.options.max_body_size)
        items: list[bytes] = []
        if body:
            if content_type is None:
                raise protocol.bad_request("Content-Type is required")
            try:
                items = self._items(content_type, body)
                if not items:
                    raise protocol.bad_request("an empty JSON array appends nothing")
            except ProtocolError:
                await self._explain_rejected_body(request.path, content_type)
                raise
        elif not close:
            raise protocol.bad_request("empty body (send Stream-Closed: true to close)")
        result = await self.storage.append(
            request.path, AppendRequest(content_type=content_type, items=items, close=close, seq=seq, producer=producer)
        )
        headers = [_h("stream-next-offset", offsets.encode_offset(result.info.tail))]
        if result.info.closed:
            headers.append((b"stream-closed", b"true"))
        if result.producer_epoch is not None:
            headers.append(_h("producer-epoch", str(result.producer_epoch)))
            headers.append(_h("producer-seq", str(result.producer_seq)))
        # A producer's new data is 200; duplicates, close-only requests and plain appends 204.
        status = 200 if producer is not None and items and not result.duplicate else 204
        await self._send(send, request, status, headers)

    async def _explain_rejected_body(self, path: str, content_type: str) -> None:
        """Report a missing, closed or differently typed stream before a body it would never parse.

        The storage decides these for valid bodies; for a body that fails validation we look the
        stream up, so that the precedence matches (404, then 409 closed, then 409 type, then 400).
        """
        info = await self.storage.head(path)
        if info.closed:
            raise StreamClosed(info.tail)
        if not same_content_type(content_type, info.content_type):
            raise ContentTypeMismatch(content_type)

    # -- HEAD / DELETE -------------------------------------------------------------------------

    async def _head(self, send: Send, request: _Request) -> None:
        info = await self.storage.head(request.path)
        headers = self._stream_headers(info)
        headers.append((b"cache-control", b"no-store"))
        if info.ttl_seconds is not None:
            headers.append(_h("stream-ttl", str(info.ttl_seconds)))
        if info.expires_at is not None:
            headers.append(_h("stream-expires-at", _rfc3339(info.expires_at)))
        await self._send(send, request, 200, headers)

    async def _delete(self, send: Send, request: _Request) -> None:
        await self.storage.delete(request.path)
        await self._send(send, request, 204, [])

    # -- GET: catch-up, long-poll, SSE ---------------------------------------------------------

    async def _get(self, send: Send, request: _Request) -> None:
        q = request.query
        for name in ("offset", "live", "cursor"):
            if name in request.repeated:
                raise protocol.bad_request(f"{name} given more than once")
        live = protocol.parse_live(q.get("live"))
        if live is not None and "offset" not in q:
            raise protocol.bad_request("live reads require an offset")
        start = protocol.parse_read_offset(q.get("offset"))
        if live == "sse":
            await self._sse(send, request, start)
            return
        result = await self.storage.read(request.path, start, self.options.max_read_bytes)
        if live == "long-poll" and not result.items and not result.info.closed:
            result = await self._long_poll(request, result)
            if not result.items:
                headers = self._stream_headers(result.info, next_position=result.next)
                headers += [(b"stream-up-to-date", b"true"), (b"cache-control", b"no-store")]
                if not result.info.closed:
                    headers.append(_h("stream-cursor", offsets.next_cursor(q.get("cursor"))))
                await self._send(send, request, 204, headers)
                return
        if live == "long-poll" and not result.items:
            # Closed and at the end: EOF at once, never wait.
            headers = self._stream_headers(result.info, next_position=result.next)
            headers += [(b"stream-up-to-date", b"true"), (b"cache-control", b"no-store")]
            await self._send(send, request, 204, headers)
            return
        await self._send_read(send, request, result, now=start is None, live=live is not None)

    async def _long_poll(self, request: _Request, result: ReadResult) -> ReadResult:
        deadline = time.monotonic() + self.options.long_poll_timeout
        position = result.next
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return result
            if not await self.storage.wait_for_data(request.path, position, remaining):
                return result
            result = await self.storage.read(request.path, position, self.options.max_read_bytes)
            if result.items or result.info.closed:
                return result

    async def _send_read(self, send: Send, request: _Request, result: ReadResult, *, now: bool, live: bool) -> None:
        info = result.info
        headers = self._stream_headers(info, next_position=result.next)
        if result.up_to_date:
            headers.append((b"stream-up-to-date", b"true"))
        if live and not result.at_end:
            headers.append(_h("stream-cursor", offsets.next_cursor(request.query.get("cursor"))))
        if now:
            # offset=now names a moving position: never cache it, and no ETag (section 10).
            headers.append((b"cache-control", b"no-store"))
        else:
            etag = f'"{info.stream_id}:{result.start}:{result.next}{":c" if result.at_end else ""}"'
            headers.append(_h("etag", etag))
            headers.append(_h("cache-control", self._catchup_cache_control))
            if _etag_matches(request.headers.get("if-none-match"), etag):
                await self._send(send, request, 304, headers)
                return
        body = join_messages(result.items) if info.is_json else b"".join(result.items)
        await self._send(send, request, 200, headers, body)

    async def _sse(self, send: Send, request: _Request, start: int | None) -> None:
        # The first read happens before the response starts, so that a missing stream or a
        # bad offset is a plain 404/400 and not an event stream that ends at once.
        first = await self.storage.read(request.path, start, self.options.max_read_bytes)
        encode = sse.uses_base64(first.info.content_type)
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            **{k.decode(): v.decode("latin-1") for k, v in self._base_headers(request)},
        }
        if encode:
            headers["stream-sse-data-encoding"] = "base64"
        response = EventSourceResponse(
            self._sse_events(request, first, encode), headers=headers, ping=0, send_timeout=30
        )
        await response(request.scope, request.receive, send)

    async def _sse_events(self, request: _Request, result: ReadResult, encode: bool) -> AsyncIterator[bytes]:
        options = self.options
        client_cursor = request.query.get("cursor")
        deadline = time.monotonic() + options.sse_max_duration
        told_up_to_date = False
        while True:
            # A control event follows every data event, in the same write so that no reader
            # ever sees one without the other; with no data, a control event goes out only the
            # first time the reader is caught up (or at EOF): a wake-up that found nothing new
            # says nothing.
            chunk = b""
            if result.items:
                payload = join_messages(result.items) if result.info.is_json else b"".join(result.items)
                chunk = sse.data_event(payload, base64_encode=encode)
            if result.items or result.at_end or (result.up_to_date and not told_up_to_date):
                told_up_to_date = result.up_to_date
                cursor = offsets.next_cursor(client_cursor)
                client_cursor = cursor
                chunk += sse.control_event(
                    offsets.encode_offset(result.next),
                    cursor=cursor,
                    up_to_date=result.up_to_date,
                    closed=result.at_end,
                )
            if chunk:
                yield chunk
            if result.at_end:
                return
            position = result.next
            if result.up_to_date:
                # Caught up: wait for a change, sending a comment now and then to keep the
                # connection (and any proxy) alive, and end after the connection lifetime so
                # CDNs can collapse reconnecting clients.
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    try:
                        changed = await self.storage.wait_for_data(
                            request.path, position, min(remaining, options.sse_keepalive)
                        )
                    except StorageError:
                        return  # storage unavailable: end the stream; the client reconnects
                    if changed:
                        break
                    if deadline - time.monotonic() > 0:
                        yield sse.KEEPALIVE
            elif time.monotonic() >= deadline:
                return
            try:
                result = await self.storage.read(request.path, position, options.max_read_bytes)
            except StorageError:
                return  # deleted or expired while we were reading: the reconnect will tell

    _handlers = {
        "GET": _get,
        "HEAD": _head,
        "PUT": _put,
        "POST": _post,
        "DELETE": _delete,
    }


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def _rfc3339(timestamp: float) -> str:
    seconds, millis = divmod(round(timestamp * 1000), 1000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{millis:03d}Z" if millis else f"{text}Z"


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
                await handler.storage.aclose()

    return lifespan


def durable_streams_app(
    storage: Storage | None = None,
    *,
    long_poll_timeout: float = 30.0,
    sse_max_duration: float = 60.0,
    max_body_size: int = 16 * 1024 * 1024,
    max_read_bytes: int = 4 * 1024 * 1024,
    cors_origins: str | Sequence[str] = "*",
    cache_visibility: Literal["public", "private"] = "public",
    authorize: Authorize | None = None,
) -> Starlette:
    """A Starlette app serving durable streams at every path below where it is mounted.

    ``storage`` defaults to a fresh :class:`MemoryStorage`. ``long_poll_timeout`` is how long a
    long-poll waits for data (seconds); ``sse_max_duration`` how long an SSE connection lives
    before the server closes it so clients reconnect; ``max_body_size`` the largest append or
    create body (413 past it); ``max_read_bytes`` roughly how much one catch-up response holds;
    ``cors_origins`` ``"*"`` or a list of allowed origins; ``cache_visibility`` whether catch-up
    reads are ``public`` or ``private`` in ``Cache-Control``; ``authorize`` a hook
    ``(request, action, path)`` that lets the host application allow or refuse each request
    (see :data:`Authorize`).
    """
    if cache_visibility not in ("public", "private"):
        raise ValueError("cache_visibility must be 'public' or 'private'")
    options = Options(
        long_poll_timeout=long_poll_timeout,
        sse_max_duration=sse_max_duration,
        max_body_size=max_body_size,
        max_read_bytes=max_read_bytes,
        cors_origins=cors_origins,
        cache_visibility=cache_visibility,
        authorize=authorize,
    )
    handler = DurableStreamsASGI(storage if storage is not None else MemoryStorage(), options)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Runs when this app is the top-level ASGI app (not when mounted: see
        # durable_streams_lifespan).
        try:
            yield
        finally:
            await handler.storage.aclose()

    app = Starlette(routes=[Mount("", app=handler)], lifespan=lifespan)
    app.state.durable_streams = handler
    return app
