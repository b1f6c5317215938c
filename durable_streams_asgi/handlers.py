"""The raw ASGI handler: request plumbing, access control, and the write and metadata operations.

It speaks raw ASGI (headers as byte pairs, one ``send`` per response) because it is the hot path;
all decisions about what is valid and which status answers what live in
:mod:`durable_streams_asgi.protocol`.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from . import metrics, offsets, protocol
from .drain import Drain
from .jsonmode import InvalidJSON, TooManyMessages, split_messages
from .options import ALLOWED_HEADERS, ALLOWED_METHODS, EXPOSED_HEADERS, AccessDenied, Options
from .protocol import Headers, ProtocolError
from .protocol import header as _h
from .reads import ReadHandlers
from .storage.base import (
    AppendRequest,
    ContentTypeMismatch,
    Storage,
    StorageError,
    StorageUnavailable,
    StreamClosed,
    StreamConfig,
    StreamInfo,
)
from .storage.common import DEFAULT_CONTENT_TYPE, is_json_content_type, same_content_type

if TYPE_CHECKING:
    from .subscriptions import Subscriptions

logger = logging.getLogger("durable_streams_asgi")


class _Request:
    """What a handler needs of one request, decoded once."""

    __slots__ = (
        "_query",
        "_repeated",
        "close_unconfirmed",
        "headers",
        "method",
        "path",
        "receive",
        "scope",
        "status",
    )

    def __init__(self, scope: Scope, receive: Receive, path: str) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path = path
        # ASGI header names are lower-case; HTTP header values are latin-1 on the wire.
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self._query: dict[str, str] | None = None
        self._repeated: set[str] = set()
        #: Authorized as a close-only POST before its body was read (see _authorize).
        self.close_unconfirmed = False
        #: The response's status, once it started (for metrics).
        self.status = 0

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, parsed on first use (writes have none)."""
        if self._query is None:
            self._query = {}
            raw = self.scope.get("query_string", b"").decode("latin-1")
            if "%" in raw or "+" in raw or ";" in raw:
                pairs = parse_qsl(raw, keep_blank_values=True)
            else:
                # The common case (offset, live, cursor: plain tokens) without parse_qsl's cost,
                # which is a measurable share of a long-poll round trip.
                pairs = [(part.partition("=")[0], part.partition("=")[2]) for part in raw.split("&") if part]
            for key, value in pairs:
                if key in self._query:
                    self._repeated.add(key)
                self._query[key] = value
        return self._query

    def forget(self) -> None:
        """Drop the decoded headers and query, for a response that outlives its parsing (SSE)."""
        self.headers = {}
        self._query = {}

    @property
    def repeated(self) -> set[str]:
        """Parameters given more than once: ambiguous, so refused where they matter."""
        self.query  # noqa: B018 - parses
        return self._repeated

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


class DurableStreamsASGI(ReadHandlers):
    """The raw ASGI handler. Use :func:`durable_streams_app` unless you need it bare.

    Writes, metadata and plumbing are here; reads (catch-up, long-poll, SSE) in
    :class:`~durable_streams_asgi.reads.ReadHandlers`.
    """

    def __init__(self, storage: Storage, options: Options) -> None:
        self.storage = storage
        self.options = options
        #: Set when the server is stopping: live reads end (see :mod:`durable_streams_asgi.drain`).
        self.drain = Drain()
        self._catchup_cache_control = f"{options.cache_visibility}, max-age=60, stale-while-revalidate=300"
        self._security: Headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"cross-origin-resource-policy", b"cross-origin"),
            # A stream is data, never a page of the host's origin: a stream created as text/html
            # holding a script is shown (if at all) sandboxed, with nothing allowed to run or load.
            (b"content-security-policy", b"sandbox; default-src 'none'"),
        ]
        origins = options.cors_origins
        self._any_origin = origins == "*" or (not isinstance(origins, str) and "*" in origins)
        self._origins = frozenset([origins] if isinstance(origins, str) else origins)
        self._sse_event_cache = {}
        #: The subscriptions of this storage, started by the first request or by startup().
        self.subscriptions: Subscriptions | None = None
        # Every response carries these; built once.
        self._common_headers: Headers = [
            *self._security,
            (b"access-control-allow-origin", b"*"),
            _h("access-control-expose-headers", EXPOSED_HEADERS),
        ]

    # -- plumbing ----------------------------------------------------------------------------

    def _base_headers(self, request: _Request) -> Headers:
        if self._any_origin:
            return list(self._common_headers)
        headers = list(self._security)
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
        request.status = status
        # Under this package's own HTTP/1.1 protocol (http11/), and with nothing between it and
        # this handler that wraps send(): the whole response in one call, without the messages.
        respond = getattr(getattr(send, "__self__", None), "respond", None)
        if respond is not None and "durable_streams.respond" in request.scope.get("extensions", ()):
            respond(status, all_headers, body)
            return
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        measure = metrics.current.enabled
        began = time.perf_counter() if measure and metrics.current.timed else 0.0
        route_path = scope["path"]
        root = scope.get("root_path", "")
        if root and route_path.startswith(root):
            route_path = route_path[len(root) :]
        request = _Request(scope, receive, route_path)
        if self.subscriptions is None and self.options.subscriptions:
            self.start_subscriptions()
        try:
            if request.method == "OPTIONS":
                await self._preflight(send, request)
                return
            if route_path.startswith("/__ds") and (len(route_path) == 5 or route_path[5] == "/"):
                await self._control(send, request)
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
            if isinstance(exc, StorageUnavailable):
                logger.warning("storage unavailable: %s %s: %s", request.method, request.path, exc)
            await self._error(send, request, protocol.storage_error(exc))
        except _Disconnected:
            return
        finally:
            if measure:
                # Counted here, by the status the response started with (0: none was sent).
                operation = _operation(request)
                timed = began and operation != "long_poll" and operation != "sse"
                metrics.current.request(operation, request.status, time.perf_counter() - began if timed else None)

    def start_subscriptions(self) -> Subscriptions:
        """Start serving subscriptions over this storage (idempotent; needs a running loop)."""
        if self.subscriptions is None:
            from .subscriptions import Subscriptions  # cryptography and httpx: loaded when used

            self.subscriptions = Subscriptions(
                self.storage, allow_loopback_webhooks=self.options.allow_loopback_webhooks
            )
            self.subscriptions.start()
        return self.subscriptions

    async def aclose(self) -> None:
        """Stop the subscriptions' work, then close the storage."""
        if self.subscriptions is not None:
            await self.subscriptions.aclose()
        await self.storage.aclose()

    async def _control(self, send: Send, request: _Request) -> None:
        """``{root}/__ds/...``: the reserved control API (subscriptions), never a stream."""
        if not self.options.subscriptions:
            raise ProtocolError(404, "subscriptions are not served here")
        from .subscriptions import routes

        full = request.url()
        root_url = full[: full.find("/__ds")]
        raw = request.scope.get("raw_path")
        raw_path = raw.decode("latin-1").split("?", 1)[0] if raw else quote(request.scope["path"])
        tail = raw_path[raw_path.find("/__ds") + 5 :]

        async def authorize(action: str, path: str) -> None:
            if self.options.authorize is not None:
                await self._ask(request, [(action, path)])

        status, headers, body = await routes.handle(
            self.start_subscriptions(), request.method, tail, request.headers, request.body, root_url, authorize
        )
        await self._send(send, request, status, headers, body)

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
            # A close-only POST has no body. Only Content-Length: 0 promises that; without a length
            # (chunked, HTTP/2) the request is taken for a close here, and if a body does come,
            # _post asks again, for "append", before anything is written.
            if _close_only(h):
                action = "close"
                request.close_unconfirmed = h.get("content-length", "").strip() == ""
            else:
                action = "append"
        checks = [(action, request.path)]
        if method == "PUT" and "stream-forked-from" in h:
            # Forking reads the source: the caller must be allowed to read it.
            source = protocol.fork_source_path(h["stream-forked-from"], request.scope.get("root_path", ""))
            checks.append(("read", source))
        await self._ask(request, checks)

    async def _ask(self, request: _Request, checks: list[tuple[str, str]]) -> None:
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

    def _items(self, content_type: str | None, body: bytes) -> list[bytes]:
        if is_json_content_type(content_type):
            try:
                return split_messages(body, self.options.max_messages)
            except InvalidJSON as exc:
                raise protocol.bad_request(str(exc)) from exc
            except TooManyMessages as exc:
                raise ProtocolError(413, f"{exc}: send them in several appends") from exc
        return [body]

    # -- POST: append / close ------------------------------------------------------------------

    async def _post(self, send: Send, request: _Request) -> None:
        h = request.headers
        close = protocol.parse_closed(h.get("stream-closed"))
        producer = protocol.parse_producer(h.get("producer-id"), h.get("producer-epoch"), h.get("producer-seq"))
        seq = protocol.parse_stream_seq(h.get("stream-seq"))
        content_type = h.get("content-type", "").strip() or None
        body = await request.body(self.options.max_body_size)
        if body and request.close_unconfirmed:
            # Authorized as a close, but it carries data: that is an append.
            await self._ask(request, [("append", request.path)])
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

    _handlers = {
        "GET": ReadHandlers._get,
        "HEAD": _head,
        "PUT": _put,
        "POST": _post,
        "DELETE": _delete,
    }


_OPERATIONS = {"HEAD": "head", "PUT": "create", "POST": "append", "DELETE": "delete", "OPTIONS": "preflight"}


def _close_only(headers: dict[str, str]) -> bool:
    """A POST that closes the stream and, as far as its head says, carries no body (only
    ``Content-Length: 0`` promises that; without a length a body may still come)."""
    length = headers.get("content-length", "").strip()
    return protocol.parse_closed(headers.get("stream-closed")) and length in ("", "0")


def _operation(request: _Request) -> str:
    """The metrics' name for what a request does."""
    method = request.method
    if method == "GET":
        # From the raw query: an SSE response has let go of its parsed one by now.
        query: bytes = request.scope.get("query_string", b"")
        if b"live=sse" in query:
            return "sse"
        return "long_poll" if b"live=long-poll" in query else "read"
    if method == "POST":
        # Counted as a close only when its head promised no body: one without a length may
        # have carried data, which made it an append.
        h = request.headers
        if "stream-closed" not in h:
            return "append"
        return "close" if _close_only(h) and h.get("content-length", "").strip() == "0" else "append"
    return _OPERATIONS.get(method, "other")


def _rfc3339(timestamp: float) -> str:
    seconds, millis = divmod(round(timestamp * 1000), 1000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{text}.{millis:03d}Z" if millis else f"{text}Z"
