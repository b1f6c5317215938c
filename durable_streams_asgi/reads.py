"""Reads: catch-up, long-poll and SSE (PROTOCOL.md sections 5.6-5.8)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.types import Send

from . import metrics, offsets, protocol, sse
from .drain import Drain
from .jsonmode import join_messages
from .options import Options
from .protocol import Headers
from .protocol import header as _h
from .sse_session import SSESession
from .storage.base import ReadResult, Storage, StreamInfo

if TYPE_CHECKING:
    from .handlers import _Request


class ReadHandlers:
    """The GET side of :class:`~durable_streams_asgi.handlers.DurableStreamsASGI`."""

    storage: Storage
    options: Options
    drain: Drain
    _catchup_cache_control: str
    _sse_event_cache: dict[tuple[str, int, int, bool], bytes]

    if TYPE_CHECKING:  # provided by the handler

        async def _send(
            self, send: Send, request: _Request, status: int, headers: Headers, body: bytes = b""
        ) -> None: ...
        def _base_headers(self, request: _Request) -> Headers: ...
        @staticmethod
        def _stream_headers(info: StreamInfo, *, next_position: int | None = None) -> Headers: ...

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
            del q
            session = await self._sse(send, request, start)
            # An SSE response may live for minutes, and idle ones are most of a busy server's
            # connections: what its frames hold must be little.
            request.forget()
            await session.serve(request.receive)
            return
        result = await self.storage.read(request.path, start, self.options.max_read_bytes)
        woken = 0.0
        if live == "long-poll" and not result.items:
            if not result.info.closed:  # closed and at the end: EOF at once, never wait
                result, woken = await self._long_poll(request, result)
            if not result.items:
                headers = self._stream_headers(result.info, next_position=result.next)
                headers += [(b"stream-up-to-date", b"true"), (b"cache-control", b"no-store")]
                if not result.info.closed:
                    headers.append(_h("stream-cursor", offsets.next_cursor(q.get("cursor"))))
                await self._send(send, request, 204, headers)
                return
        await self._send_read(send, request, result, now=start is None, live=live is not None)
        if woken:
            metrics.current.delivered("long_poll", time.monotonic() - woken)

    async def _long_poll(self, request: _Request, result: ReadResult) -> tuple[ReadResult, float]:
        """Wait for data past ``result``; returns the read that found it (or the last empty one)
        and, for metrics, when the wake-up that found it arrived (0 if none did)."""
        drain = self.drain
        deadline = time.monotonic() + self.options.long_poll_timeout
        position = result.next
        measure = metrics.current.enabled
        if measure:
            metrics.current.live_reader("long_poll", 1)
        try:
            while not drain.started:  # draining: answer now, so the client reconnects elsewhere
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not await self.storage.wait_for_data(request.path, position, remaining):
                    break
                woken = time.monotonic()
                if measure:
                    metrics.current.woken("long_poll")
                result = await self.storage.read(request.path, position, self.options.max_read_bytes)
                if result.items or result.info.closed:
                    return result, woken if measure else 0.0
            return result, 0.0
        finally:
            if measure:
                metrics.current.live_reader("long_poll", -1)

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

    def _sse_data_event(self, result: ReadResult, encode: bool) -> bytes:
        """The framed data event for a read: built once, shared by every reader at that position
        (an append to a stream with many live readers wakes them all for the same range)."""
        key = (result.info.stream_id, result.start, result.next, encode)
        cache = self._sse_event_cache
        event = cache.get(key)
        if event is None:
            payload = join_messages(result.items) if result.info.is_json else b"".join(result.items)
            event = sse.data_event(payload, base64_encode=encode)
            if len(event) <= _SSE_CACHE_MAX_EVENT:
                cache[key] = event
                if len(cache) > _SSE_CACHE_ENTRIES:
                    del cache[next(iter(cache))]  # oldest first: dicts keep insertion order
        return event

    async def _sse(self, send: Send, request: _Request, start: int | None) -> SSESession:
        """Start an SSE response; the session returned writes the rest."""
        # The first read happens before the response starts, so that a missing stream or a
        # bad offset is a plain 404/400 and not an event stream that ends at once.
        first = await self.storage.read(request.path, start, self.options.max_read_bytes)
        encode = sse.uses_base64(first.info.content_type)
        headers = self._base_headers(request)
        headers += _SSE_HEADERS_BASE64 if encode else _SSE_HEADERS
        request.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        return SSESession(
            self.storage,
            send,
            request.path,
            first,
            encode=encode,
            first_cursor=int(offsets.next_cursor(request.query.get("cursor"))),
            options=self.options,
            data_event=self._sse_data_event,
            drain=self.drain,
        )


# The shared data-event cache: a few hundred recent ranges, each at most 256 KiB.
_SSE_CACHE_ENTRIES = 256
_SSE_CACHE_MAX_EVENT = 256 * 1024

_SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    # nginx and some proxies buffer responses unless told not to.
    (b"x-accel-buffering", b"no"),
]
_SSE_HEADERS_BASE64: Headers = [*_SSE_HEADERS, (b"stream-sse-data-encoding", b"base64")]


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
