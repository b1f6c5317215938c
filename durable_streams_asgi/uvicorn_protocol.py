"""A leaner uvicorn HTTP protocol for the standalone server's many idle live connections.

uvicorn's httptools protocol gives every connection three ``collections.deque`` objects: the
request pipeline's, and one in each of two ``asyncio.Event`` (flow control's "writable" and the
request's "message arrived"). An empty deque allocates a 64-slot block, 632 bytes, so they are
about a fifth of what an idle SSE connection costs. Each is only ever used by one waiter at a
time, or holds a pipelined request or two. This subclass swaps them for small equivalents with the
same interface; everything else is uvicorn's.

It also writes a response's head together with the first piece of its body. uvicorn writes each
as it comes, so a small response costs two system calls and reaches the client as two packets
(and two wake-ups of the client's event loop); a long-poll fan-out answers hundreds at once.

And it bounds what one client can hold: a request head must arrive whole within
``head_timeout`` seconds (from the connection's first byte, or the first byte of the next
request) and within ``max_head_size`` bytes of URL and headers (else 408 or 431 and the
connection is closed; uvicorn itself waits for a head forever and takes one of any size), and a
request body within ``body_timeout`` seconds of its head. The CLI sets them (``serve
--head-timeout``, ...) through the environment, which every worker process inherits.

It leans on uvicorn's internals, so the CLI uses it only with the uvicorn versions it was checked
against (:func:`lean_protocol`), and the conformance suite runs against the CLI.
"""

from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Checked against these: the attributes replaced below, and where uvicorn makes them.
_TESTED = ((0, 30), (0, 55))


class _Signal:
    """``asyncio.Event``'s interface (``set``, ``clear``, ``is_set``, ``wait``) without its
    deque: waiters are kept in a list made on the first wait, which is all one waiter needs."""

    __slots__ = ("_value", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._value = value
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)


class _FlowControl(FlowControl):
    """uvicorn's flow control with a :class:`_Signal` for "writable"."""

    def __init__(self, transport: asyncio.Transport) -> None:  # (not calling super: no Event)
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event = _Signal(True)  # type: ignore[assignment]


class _Pipeline(list):  # type: ignore[type-arg]
    """The queue of pipelined requests: uvicorn uses ``appendleft``, ``pop`` and truthiness."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


# Bodies up to this size are copied behind their head for a single write; larger ones go in a
# write of their own rather than being copied.
_JOIN_LIMIT = 64 * 1024
# Responses that never have a body: their head goes out at once.
_BODILESS = (b"HTTP/1.1 204 ", b"HTTP/1.1 304 ", b"HTTP/1.1 1")


class _Coalescing:
    """The connection's transport, holding back a response head until its body's first write
    (or the end of the event loop's current pass, whichever comes first)."""

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if len(data) <= _JOIN_LIMIT:
                self._transport.write(head + data)
                return
            self._transport.write(head)
        elif data.startswith(b"HTTP/1.") and data.endswith(b"\r\n\r\n") and not data.startswith(_BODILESS):
            self._head = data
            self._loop.call_soon(self.flush)  # a response that sends no body, or not yet
            return
        self._transport.write(data)

    def flush(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


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


@functools.lru_cache(maxsize=1)
def client_limits() -> ClientLimits:
    """The limits this process's connections get (from the environment the CLI set)."""
    defaults = ClientLimits()
    values: dict[str, Any] = {}
    for name, variable in ClientLimits.ENV.items():
        raw = os.environ.get(variable)
        if raw:
            values[name] = type(getattr(defaults, name))(float(raw))
    return ClientLimits(**values)


_REFUSALS = {
    408: b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n",
}


class LeanHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with small stand-ins for its per-connection queues, a
    response head written with its body, and limits on slow and oversized requests. For servers
    without websockets (``ws="none"``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = _Pipeline()  # type: ignore[assignment]
        self.limits = client_limits()
        self.head_size = 0  # bytes received of the request head under way
        self.awaiting_head = True
        self.guard: asyncio.TimerHandle | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _FlowControl(transport)
        self.transport = _Coalescing(transport, self.loop)  # type: ignore[assignment]
        # Connected and silent is a head that does not come either.
        self._guard(self.limits.head_timeout, b"request head not received in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._unguard()
        super().connection_lost(exc)

    # -- limits ----------------------------------------------------------------------------------

    def _guard(self, seconds: float, why: bytes) -> None:
        self._unguard()
        self.guard = self.loop.call_later(seconds, self._expired, why)

    def _unguard(self) -> None:
        if self.guard is not None:
            self.guard.cancel()
            self.guard = None

    def _expired(self, why: bytes) -> None:
        self.guard = None
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started:
            self.transport.close()  # a response is under way: nothing else can be said
        else:
            self._refuse(408, why)

    def _refuse(self, status: int, why: bytes) -> None:
        self._unguard()
        self.refused = True
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's receive() says so; its sends are dropped
            self.cycle.message_event.set()
        length = b"content-length: %d\r\nconnection: close\r\n\r\n" % len(why)
        self.transport.write(_REFUSALS[status] + length + why)
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.guard is None:  # the next request on a kept-alive connection: its head's clock
            self._guard(self.limits.head_timeout, b"request head not received in time")

    def on_message_complete(self) -> None:
        self._unguard()
        self.awaiting_head, self.head_size = True, 0
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        counting = self.awaiting_head
        super().data_received(data)
        # Bytes that arrived while the head was still incomplete (httptools buffers a header
        # until it ends, so its callbacks cannot bound this; a read is at most 256 KiB).
        if counting and self.awaiting_head and not self.refused:
            self.head_size += len(data)
            if self.head_size > self.limits.max_head_size:
                self._refuse(431, b"request head too large")

    def on_headers_complete(self) -> None:
        # The head is whole: now its body has body_timeout seconds (on_message_complete ends it).
        self.awaiting_head = False
        self._guard(self.limits.body_timeout, b"request body not received in time")
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        # A new request cycle (not an upgrade): nothing has waited on or set its event yet.
        if cycle is not before and cycle is not None and not cycle.message_event.is_set():
            cycle.message_event = _Signal()  # type: ignore[assignment]


def lean_protocol() -> type[asyncio.Protocol] | None:
    """The lean protocol class, or None where this uvicorn was not checked (then use uvicorn's)."""
    try:
        version = tuple(int(part) for part in uvicorn.__version__.split(".")[:2])
    except ValueError:
        return None
    low, high = _TESTED
    if not (low <= version < high):
        return None
    return LeanHttpToolsProtocol
