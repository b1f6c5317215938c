"""An HTTP/1.1 connection: parsing with httptools, requests in order, the client limits (see the
package's docstring)."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from .exchange import _STATUS_LINES, Exchange, access_logger, logger

# A request body buffered beyond this pauses reading until the application takes it.
_HIGH_WATER = 64 * 1024
_PLAIN = b"content-type: text/plain; charset=utf-8\r\n"


@dataclass(frozen=True)
class ClientLimits:
    head_timeout: float = 10.0
    max_head_size: int = 64 * 1024
    body_timeout: float = 60.0

    ENV = {
        "head_timeout": "DURABLE_STREAMS_HEAD_TIMEOUT",
        "max_head_size": "DURABLE_STREAMS_MAX_HEAD_SIZE",
        "body_timeout": "DURABLE_STREAMS_BODY_TIMEOUT",
    }

    @classmethod
    def from_environment(cls) -> ClientLimits:
        """The limits the CLI set for every worker process (through the environment)."""
        defaults = cls()
        values: dict[str, Any] = {}
        for name, variable in cls.ENV.items():
            raw = os.environ.get(variable)
            if raw:
                values[name] = type(getattr(defaults, name))(float(raw))
        return cls(**values)


_limits: ClientLimits | None = None


def client_limits() -> ClientLimits:
    global _limits
    if _limits is None:
        _limits = ClientLimits.from_environment()
    return _limits


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, (list, tuple)) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


class HTTP11Protocol(asyncio.Protocol):
    """One client connection: parses requests, runs the application for each in order, and
    writes the responses. Constructed by uvicorn's Server with the arguments it gives every
    HTTP protocol class."""

    __slots__ = (
        "access_log",
        "app",
        "awaiting_head",
        "client",
        "connections",
        "current",
        "deadline",
        "draining",
        "expect_continue",
        "expiry",
        "forwarded",
        "head_parts",
        "head_size",
        "heads_ended",
        "held",
        "keep_alive_timeout",
        "limit_concurrency",
        "limits",
        "loop",
        "next_headers",
        "next_url",
        "parser",
        "pipeline",
        "proxied_app",
        "read_paused",
        "refused",
        "root_path",
        "scheme",
        "server",
        "server_state",
        "state",
        "tasks",
        "timer",
        "transport",
        "upgrade_body",
        "why",
        "writable",
    )

    def __init__(
        self, config: Any, server_state: Any, app_state: dict[str, Any] | None = None, _loop: Any = None
    ) -> None:
        if not config.loaded:
            config.load()
        app = config.loaded_app
        # uvicorn wraps the application, outermost, in its ProxyHeadersMiddleware (--proxy-headers,
        # on by default), which changes a request's scope only where X-Forwarded-For or -Proto is
        # present. Requests with neither skip it (a coroutine and a scan of the headers less per
        # request); those with one go through it as before, so what they mean is uvicorn's.
        self.proxied_app: Any = None
        inner = getattr(app, "app", None) if type(app) is ProxyHeadersMiddleware else None
        if inner is not None:
            self.proxied_app, app = app, inner
        self.app = app
        self.forwarded = False  # the request head under way has an X-Forwarded-* header
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.connections: set[Any] = server_state.connections
        self.tasks: set[asyncio.Task[None]] = server_state.tasks
        self.state = app_state if app_state is not None else {}
        self.root_path: str = config.root_path
        self.keep_alive_timeout: float = config.timeout_keep_alive
        self.limit_concurrency: int | None = config.limit_concurrency
        self.access_log = bool(config.access_log) and access_logger.hasHandlers()
        self.limits = client_limits()
        self.parser = httptools.HttpRequestParser(self)
        if hasattr(self.parser, "set_dangerous_leniencies"):  # (data after "connection: close")
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.current: Exchange | None = None  # the request being answered
        self.pipeline: list[Exchange] = []  # parsed requests waiting their turn
        self.next_url = b""
        self.next_headers: list[tuple[bytes, bytes]] = []
        self.expect_continue = False
        self.head_size = 0  # bytes received of the request head under way
        self.awaiting_head = True
        self.heads_ended = 0
        self.refused = False
        self.draining = False
        self.read_paused = False
        self.writable: asyncio.Future[None] | None = None  # set while the transport's buffer is full
        # One timer for every limit: it stays armed at or before the deadline and, when it fires
        # early, re-arms for what is due then (a timer made and cancelled per request is ~1.5-3 us).
        self.deadline: float | None = None
        self.why = b""  # what to answer when the deadline passes (empty: close without a word)
        self.timer: asyncio.TimerHandle | None = None
        self.expiry = 0.0
        # While this side does not read (a pipelined request waits its turn, a body waits for the
        # application), the client cannot send: the head or body clock stops, holding what was left.
        self.held: float | None = None
        self.head_parts = 0  # bytes of the URL and headers the parser has handed over
        self.upgrade_body = 0  # body bytes still to come of a request httptools took for an upgrade

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport)
        self.connections.add(self)
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        if transport.get_extra_info("sslcontext"):
            self.scheme = "https"
        # Connected and silent is a head that does not come either.
        self._limit(self.limits.head_timeout, b"request head not received in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._unlimit()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for exchange in (self.current, *self.pipeline):
            if exchange is not None:
                exchange.lost()
        self.pipeline.clear()
        self.resume_writing()  # a send waiting for room learns of the loss
        self.parser = None  # type: ignore[assignment]

    def eof_received(self) -> None:
        pass  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        writable, self.writable = self.writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)
        if self.parser is not None:  # (not after connection_lost)
            self._next()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
            if self.deadline is not None:
                self.held = max(self.deadline - self.loop.time(), 0.0)
                self.deadline = None

    def resume_reading(self) -> None:
        if self.read_paused and not self.refused:
            self.read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
            held, self.held = self.held, None
            if held is not None:
                self._limit(held, self.why)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close when idle, else after the response under way."""
        self.draining = True
        if self.current is None:
            self.transport.close()
        else:
            self.current.keep_alive = False

    # -- limits ------------------------------------------------------------------------------

    def _limit(self, seconds: float, why: bytes) -> None:
        if self.read_paused:  # the clock starts when reading does
            self.held, self.why = seconds, why
            return
        deadline = self.loop.time() + seconds
        self.deadline, self.why = deadline, why
        timer = self.timer
        if timer is None or self.expiry > deadline:
            if timer is not None:
                timer.cancel()
            self.expiry = deadline
            self.timer = self.loop.call_at(deadline, self._check)

    def _check(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None:
            return
        if deadline > self.loop.time():  # moved on since the timer was armed
            self.expiry = deadline
            self.timer = self.loop.call_at(deadline, self._check)
            return
        self.deadline = None
        if not self.why:
            self.transport.close()  # idle past keep-alive: nothing to say
        else:
            self._refuse(408, self.why)

    def _unlimit(self) -> None:
        self.deadline = self.held = None

    def _refuse(self, status: int, why: bytes) -> None:
        """Answer ``status`` with ``why`` and close; the application's request ends as if the
        client had gone (its receive() says so, its sends are dropped)."""
        self._unlimit()
        self.refused = True
        current = self.current
        speaking = current is not None and current.started and not current.complete
        if current is not None:
            current.lost()
        if not speaking:  # (mid-response, its bytes would land inside the response under way)
            head = _STATUS_LINES[status] + _PLAIN + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(why)
            self.transport.write(head + why)
        self.transport.close()

    # -- parsing -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.upgrade_body:
            self._upgrade_body(data)
            return
        if self.refused:
            return
        counting = self.awaiting_head
        heads_ended = self.heads_ended
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0] if exc.args else len(data) :])
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        # Bytes of a head still incomplete (httptools buffers a header until it ends, so its
        # callbacks cannot bound one that never ends); a head that ended is measured by what the
        # parser handed over (on_headers_complete), since the rest of its read may be body.
        if counting and self.heads_ended == heads_ended and self.awaiting_head and not self.refused:
            self.head_size += len(data)
            if self.head_size > self.limits.max_head_size:
                self._refuse(431, b"request head too large")

    def _upgrade(self, rest: bytes) -> None:
        """httptools stops at a request asking to switch protocols, which this server does not
        (no websockets, no h2c): the request is answered as plain HTTP/1.1, with its body, and
        the connection closes after it. httptools hands over no body for such a request: what
        follows the head is read here, by its Content-Length."""
        self._unlimit()
        self.refused = True  # no further request is parsed on this connection
        exchange = self.pipeline[-1] if self.pipeline else self.current
        if exchange is None:
            self.transport.close()
            return
        exchange.keep_alive = False
        headers = dict(exchange.scope["headers"])
        if b"transfer-encoding" in headers:
            self._refuse(400, b"a request asking for an upgrade must give its body a Content-Length")
            return
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0  # (httptools refuses a malformed Content-Length before this)
        if length > 0:
            exchange.more_body = True
            exchange.has_news = False
            self.upgrade_body = length
            self.refused = False  # (for the body clock; data_received reads only the body now)
            self._limit(self.limits.body_timeout, b"request body not received in time")
            self._upgrade_body(rest)
        else:
            self.pause_reading()

    def _upgrade_body(self, data: bytes) -> None:
        exchange = self.pipeline[-1] if self.pipeline else self.current
        data = data[: self.upgrade_body]
        self.upgrade_body -= len(data)
        if exchange is None or exchange.complete:
            return
        if data:
            exchange.body += data
        if not self.upgrade_body:
            exchange.more_body = False
            self._unlimit()
            self.pause_reading()
            self.refused = True
        exchange.notify()

    def _bad_request(self) -> None:
        logger.warning("Invalid HTTP request received.")
        current = self.current
        if current is not None and current.started and not current.complete:
            current.keep_alive = False  # the response under way ends first; then the connection
            self.pipeline.clear()
            self.pause_reading()
            return
        self._refuse(400, b"Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        self.head_parts = 0
        self.next_url = b""
        self.next_headers = []
        self.expect_continue = False
        self.forwarded = False
        if self.deadline is None or not self.why:  # idle (or kept alive): now the head's clock
            self._limit(self.limits.head_timeout, b"request head not received in time")

    def on_url(self, url: bytes) -> None:
        self.head_parts += len(url)
        self.next_url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_parts += len(name) + len(value) + 4
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps trailing whitespace, which is not the value's
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        elif name.startswith(b"x-forwarded-"):
            self.forwarded = True
        self.next_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.awaiting_head, self.head_size = False, 0
        self.heads_ended += 1
        if self.refused:
            return
        if self.head_parts > self.limits.max_head_size:
            self._refuse(431, b"request head too large")
            return
        self._limit(self.limits.body_timeout, b"request body not received in time")
        parser = self.parser
        version = parser.get_http_version()
        url = httptools.parse_url(self.next_url)
        raw_path: bytes = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root = self.root_path
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": parser.get_method().decode("ascii"),
            "root_path": root,
            "path": root + path if root else path,
            "raw_path": root.encode("ascii") + raw_path if root else raw_path,
            "query_string": url.query or b"",
            "headers": self.next_headers,
            "state": self.state.copy(),
            "extensions": {"durable_streams.respond": {}},
        }
        keep_alive = version != "1.0" and parser.should_keep_alive() and not self.draining
        exchange = Exchange(self, scope, keep_alive, self.expect_continue)
        if self.forwarded and self.proxied_app is not None:
            exchange.app = self.proxied_app
        if self.current is None:
            self._start(exchange)
        else:  # pipelined: its turn comes when the one before has answered
            self.pipeline.append(exchange)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        exchange = self.pipeline[-1] if self.pipeline else self.current
        if exchange is None or exchange.complete:
            return
        exchange.body += body
        if len(exchange.body) > _HIGH_WATER:
            self.pause_reading()
        exchange.notify()

    def on_message_complete(self) -> None:
        self._unlimit()  # the request is whole: nothing to time until its response ends
        self.awaiting_head = True
        if self.refused:
            return
        exchange = self.pipeline[-1] if self.pipeline else self.current
        if exchange is None or exchange.complete:
            if self.current is None and not self.pipeline:  # answered before its body ended
                self._limit(self.keep_alive_timeout, b"")
            return
        exchange.more_body = False
        exchange.notify()

    # -- requests ----------------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self.current = exchange
        limit = self.limit_concurrency
        app = exchange.app
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            logger.warning("Exceeded concurrency limit.")
            app = _service_unavailable
        task = self.loop.create_task(exchange.run(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def answered(self, exchange: Exchange) -> None:
        """``exchange``'s response is complete: start the next request, or wait for one."""
        self.server_state.total_requests += 1
        if self.current is exchange:
            self.current = None
        if not exchange.keep_alive:
            self.transport.close()
            return
        self._next()

    def _next(self) -> None:
        if self.transport.is_closing() or self.current is not None:
            return
        if self.writable is not None:
            # The client is not reading what it was sent: no further request is read or
            # answered until it does (resume_writing comes back here), so that a client
            # pipelining reads of a large stream cannot pile their responses up in memory.
            return
        if self.pipeline:
            self._start(self.pipeline.pop(0))
            if not self.pipeline:
                self.resume_reading()
            return
        self.resume_reading()
        if self.deadline is None and self.held is None:  # no head or body under way: keep-alive
            self._limit(self.keep_alive_timeout, b"")


async def _service_unavailable(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": b"Service Unavailable"})
