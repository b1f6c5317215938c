"""One request and its response on an HTTP/1.1 connection: the application's ``receive`` and
``send``, the response head and the body's framing (see the package's docstring)."""

from __future__ import annotations

import asyncio
import http
import logging
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import HTTP11Protocol

# Response header names may not hold these (RFC 9110 tokens), values not these controls.
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode())


_STATUS_LINES = {code: _status_line(code) for code in range(100, 600)}
# Bodies up to this size are copied behind their head for one write; larger ones get their own.
_JOIN_LIMIT = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Checked response header lines, by (name, value): most of a response's headers are the same in
# every response (security, CORS, content type), and a line once checked needs no second check.
_LINES: dict[tuple[bytes, bytes], bytes] = {}
_LINES_MAX = 4096
# Headers whose values change from one response to the next: not worth remembering.
_VARYING = frozenset({b"stream-next-offset", b"etag", b"stream-cursor", b"location", b"date", b"last-modified"})
_CHUNKED, _CLOSES = 1, 2
# Header names already checked, by what they are to the response: a plain header (its lines are
# remembered), one of _VARYING, or one that frames the body or the connection.
_PLAIN, _VARIES, _LENGTH, _ENCODING, _CONNECTION = range(5)
_KINDS = {
    b"content-length": _LENGTH,
    b"transfer-encoding": _ENCODING,
    b"connection": _CONNECTION,
    **dict.fromkeys(_VARYING, _VARIES),
}
_NAMES: dict[bytes, int] = {}
# The server's default headers (date, server), as lines: uvicorn replaces the list every second.
_defaults: tuple[object, bytes] = (None, b"")


def _default_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    global _defaults
    if _defaults[0] is not headers:
        _defaults = (headers, b"".join(b"%s: %s\r\n" % header for header in headers))
    return _defaults[1]


logger = logging.getLogger("uvicorn.error")
access_logger = logging.getLogger("uvicorn.access")


class Exchange:
    """One request and its response: what the application's ``receive`` and ``send`` act on."""

    __slots__ = (
        "app",
        "body",
        "chunked",
        "complete",
        "continue_",
        "disconnected",
        "framing",
        "has_news",
        "head",
        "keep_alive",
        "length",
        "more_body",
        "protocol",
        "remaining",
        "scope",
        "started",
        "waiters",
    )

    def __init__(self, protocol: HTTP11Protocol, scope: dict[str, Any], keep_alive: bool, continue_: bool) -> None:
        self.protocol = protocol
        self.scope = scope
        self.app: Any = protocol.app  # what answers it (see HTTP11Protocol.__init__)
        self.keep_alive = keep_alive
        self.continue_ = continue_  # the client waits for "100 Continue" before sending the body
        self.body = b""
        self.more_body = True
        self.has_news = False  # body, its end, or the loss arrived since receive() last looked
        self.waiters: list[asyncio.Future[None]] | None = None  # receive() calls waiting
        self.disconnected = False
        self.started = False
        self.complete = False
        self.chunked = False
        self.remaining = 0  # body bytes the response's content-length still expects
        self.head: bytes | None = None  # a response head held back to go out with its body

    def notify(self) -> None:
        self.has_news = True
        for waiter in self.waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def lost(self) -> None:
        if not self.complete:
            self.disconnected = True
        self.notify()

    async def run(self, app: Any) -> None:
        try:
            result = await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError as exc:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)  # (Python 3.11+)
            if cancelling is None or cancelling():  # this task was cancelled: the server's shutdown
                self.protocol.transport.close()
                raise
            self._failed(exc)  # raised by the application itself: a failure like any other
        except BaseException as exc:
            self._failed(exc)
        else:
            if result is not None:
                logger.error("ASGI callable should return None, but returned '%s'.", result)
                self.protocol.transport.close()
            elif not self.started and not self.disconnected:
                logger.error("ASGI callable returned without starting response.")
                self._error_response()
            elif not self.complete and not self.disconnected:
                logger.error("ASGI callable returned without completing response.")
                self.protocol.transport.close()

    def _failed(self, exc: BaseException) -> None:
        logger.error("Exception in ASGI application\n", exc_info=exc)
        if not self.started:
            self._error_response()
        else:
            self.protocol.transport.close()

    def _error_response(self) -> None:
        if self.disconnected:
            return
        self.keep_alive = False
        self.respond(500, [(b"content-type", b"text/plain; charset=utf-8")], b"Internal Server Error")

    # -- the application's side ----------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        if self.continue_:
            self.continue_ = False
            if not self.protocol.transport.is_closing():
                self.protocol.transport.write(_CONTINUE)
        if not self.disconnected and not self.complete and not self.has_news:
            self.protocol.resume_reading()
            waiter = self.protocol.loop.create_future()
            if self.waiters is None:
                self.waiters = []
            self.waiters.append(waiter)  # (an application may receive() in two tasks at once)
            try:
                await waiter
            finally:
                self.waiters.remove(waiter)
        self.has_news = False
        if self.disconnected or self.complete:
            return {"type": "http.disconnect"}
        body, self.body = self.body, b""
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: dict[str, Any]) -> None:
        protocol = self.protocol
        if protocol.writable is not None and not self.disconnected:
            # Shielded: an application that gives up on a send (wait_for) must not cancel the
            # future every later send of the connection waits on.
            await asyncio.shield(protocol.writable)
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self.head = self._head(message["status"], message.get("headers", ()))
            if self.remaining == 0 and not self.chunked:  # nothing will follow the head
                self._write(b"")
            else:
                protocol.loop.call_soon(self._flush)  # should the body not come in this pass
            return
        if self.complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        self._body(message.get("body", b""), message.get("more_body", False))

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """``send`` of a response start and its whole body, in one call and without the
        messages: for an application that has the whole response at once (ours, see
        handlers.py). Not delayed by flow control: the transport buffers what a slow client
        has not read yet, as it would hold the same body passed to ``send``."""
        if self.disconnected:
            return
        if self.started:
            raise RuntimeError("Unexpected response start, after the response already started.")
        self.head = self._head(status, headers, len(body))
        self._body(body, False)

    # -- writing -------------------------------------------------------------------------------

    def _head(self, status: int, headers: Any, whole: int | None = None) -> bytes:
        """The response head, from the server's default headers and the application's; sets
        how the body is framed."""
        lines = _LINES
        parts = [_STATUS_LINES[status], _default_lines(self.protocol.server_state.default_headers)]
        self.length = None
        self.framing = 0
        try:
            for header in headers:
                line = lines.get(header) if type(header) is tuple else None
                parts.append(line if line is not None else self._line(header))
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        self.started = True
        if self.continue_ and self.more_body:
            # Answered before the client was told to send its body: it may send it or not, so
            # the connection cannot be read as a next request. It closes after this response.
            self.keep_alive = False
        self.continue_ = False
        if not self.keep_alive and not self.framing & _CLOSES:
            parts.append(b"connection: close\r\n")
        method = self.scope["method"]
        chunked = bool(self.framing & _CHUNKED)
        if status in (204, 304) or status < 200 or method == "HEAD":
            self.remaining, chunked = 0, False
        elif self.length is not None and not chunked:
            self.remaining = self.length
        elif whole is not None and not chunked:  # respond(): the body is known, and so its length
            self.remaining = whole
            parts.append(b"content-length: %d\r\n" % whole)
        elif not chunked:  # neither length nor chunked given: chunked it is
            chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        self.chunked = chunked
        parts.append(b"\r\n")
        if self.protocol.access_log:
            self._log(status)
        return b"".join(parts)

    def _line(self, header: tuple[bytes, bytes]) -> bytes:
        """A header's line, checked; remembered unless it frames the body or the connection, or
        is one whose value changes from one response to the next (_VARYING), whose names alone
        are remembered as checked."""
        name, value = header
        kind = _NAMES.get(name)
        if kind is None:
            if _BAD_NAME.search(name):
                raise ValueError("Invalid HTTP header name.")
            kind = _KINDS.get(name.lower(), _PLAIN)
            if len(_NAMES) >= _LINES_MAX:
                _NAMES.clear()
            _NAMES[name] = kind
        if _BAD_VALUE.search(value):
            raise ValueError("Invalid HTTP header value.")
        line = b"%s: %s\r\n" % (name, value)
        if kind == _PLAIN:
            if type(header) is tuple:
                if len(_LINES) >= _LINES_MAX:
                    _LINES.clear()
                _LINES[header] = line
        elif kind == _LENGTH:
            self.length = int(value)
        elif kind == _ENCODING:
            if value.lower() == b"chunked":
                self.framing |= _CHUNKED
        elif kind == _CONNECTION:
            if b"close" in [token.strip() for token in value.lower().split(b",")]:
                self.framing |= _CLOSES
                self.keep_alive = False
        return line

    def _log(self, status: int) -> None:
        scope = self.scope
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        client = "{}:{}".format(*scope["client"]) if scope["client"] else ""
        access_logger.info('%s - "%s %s HTTP/%s" %d', client, scope["method"], target, scope["http_version"], status)

    def _body(self, body: bytes, more: bool) -> None:
        if self.chunked:
            if body:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                body += b"0\r\n\r\n"
        elif self.remaining == 0 and (self.scope["method"] == "HEAD" or not body):
            body = b""  # HEAD, or bodiless: what the application passes is not sent
        elif len(body) > self.remaining:
            raise RuntimeError("Response content longer than Content-Length")
        else:
            self.remaining -= len(body)
        self._write(body)
        if not more:
            if self.remaining and self.scope["method"] != "HEAD":
                raise RuntimeError("Response content shorter than Content-Length")
            self._end()

    def _write(self, data: bytes) -> None:
        head = self.head
        transport = self.protocol.transport
        if head is not None:
            self.head = None
            if len(data) <= _JOIN_LIMIT:
                transport.write(head + data)
                return
            transport.write(head)
        if data:
            transport.write(data)

    def _flush(self) -> None:
        head, self.head = self.head, None
        if head is not None and not self.protocol.transport.is_closing():
            self.protocol.transport.write(head)

    def _end(self) -> None:
        self.complete = True
        self.notify()  # a receive() waiting for the client learns the exchange is over
        self.protocol.answered(self)
