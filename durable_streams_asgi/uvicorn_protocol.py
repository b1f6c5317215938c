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

It leans on uvicorn's internals, so the CLI uses it only with the uvicorn versions it was checked
against (:func:`lean_protocol`), and the conformance suite runs against the CLI.
"""

from __future__ import annotations

import asyncio
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


class LeanHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with small stand-ins for its per-connection queues and a
    response head written with its body. For servers without websockets (``ws="none"``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = _Pipeline()  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _FlowControl(transport)
        self.transport = _Coalescing(transport, self.loop)  # type: ignore[assignment]

    def on_headers_complete(self) -> None:
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
