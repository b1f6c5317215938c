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

It leans on uvicorn's internals, so the CLI uses it only with the uvicorn releases it was checked
against (``SUPPORTED_UVICORN``), and only when those internals are where it expects them
(:func:`lean_protocol_status` says why not, for the CLI to warn). Anything that only a live
connection shows is checked on first use: a missing piece turns the lean parts off for the rest of
the process (one warning), leaving uvicorn's own protocol underneath, rather than failing requests.
The conformance suite runs against the CLI.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http import flow_control, httptools_impl
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# The uvicorn releases the internals below were checked against, as a requirement (for messages
# and pip) and as (low, high) for comparing; tests/test_uvicorn_protocol.py keeps them in step.
SUPPORTED_UVICORN = ">=0.30,<0.56"
_TESTED = ((0, 30), (0, 56))

# What is taken from uvicorn beyond its public interface. Methods overridden (calling uvicorn's):
_PROTOCOL_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "on_message_complete",
    "on_response_complete",  # pops the pipeline: _Pipeline's interface
)
# Set by HttpToolsProtocol.__init__ and read or replaced here (checked on the first connection).
_PROTOCOL_ATTRIBUTES = ("loop", "cycle", "pipeline", "transport", "flow")
# A request cycle's, read by the limits and replaced (message_event) per request.
_CYCLE_ATTRIBUTES = ("message_event", "response_started", "response_complete", "disconnected")
# Everything FlowControl.__init__ sets: _FlowControl sets the same without calling it.
_FLOW_ATTRIBUTES = frozenset({"_transport", "read_paused", "write_paused", "_is_writable_event"})
# The methods the stand-ins have, against those uvicorn's source calls on what they replace.
_SIGNAL_METHODS = frozenset({"set", "clear", "is_set", "wait"})
_PIPELINE_METHODS = frozenset({"appendleft", "pop"})

_OFF_EFFECT = (
    "the server runs on uvicorn's own HTTP protocol, which does not enforce --head-timeout, "
    "--body-timeout or --max-head-size (a slow or oversized request head is held as long as the "
    "client likes) and costs more memory per idle connection"
)


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
    without websockets (``ws="none"``).

    What it relies on is checked on first use (the first connection, and its first request for
    what a request cycle has): should anything be missing, the lean parts turn off for the rest of
    the process, with one warning, and connections are uvicorn's own protocol's."""

    # Why the lean parts are off in this process (None: on); set once, by the first check to fail.
    off_reason: ClassVar[str | None] = None
    _checked_connection: ClassVar[bool] = False
    _checked_cycle: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = client_limits()
        self.head_size = 0  # bytes received of the request head under way
        self.awaiting_head = True
        self.heads_ended = 0  # heads parsed whole on this connection: which reads ended one
        # The limit under way (loop time, and what to answer), and the timer that checks it. The
        # timer is not moved with every request (two timers made and cancelled per request cost
        # about 3 us on uvloop, measured alone): it stays armed at or before the deadline and,
        # when it fires early, re-arms for what is due then.
        self.deadline: float | None = None
        self.why = b""
        self.guard: asyncio.TimerHandle | None = None
        self.refused = False
        self.lean = LeanHttpToolsProtocol.off_reason is None
        if self.lean and not LeanHttpToolsProtocol._checked_connection:
            LeanHttpToolsProtocol._checked_connection = True
            missing = list(_missing_internals())  # where lean_protocol_status() was not asked
            missing += [f"HttpToolsProtocol().{name}" for name in _PROTOCOL_ATTRIBUTES if not hasattr(self, name)]
            if not missing and not isinstance(self.pipeline, collections.deque):
                missing.append(f"HttpToolsProtocol().pipeline as a deque (it is a {type(self.pipeline).__name__})")
            if missing:
                self._turn_off(f"lacks what it relies on: {'; '.join(missing)}")
        if self.lean:
            self.pipeline = _Pipeline()  # type: ignore[assignment]

    def _turn_off(self, why: str) -> None:
        """This connection goes on as uvicorn's, and so does every later one; said once."""
        self._unguard()
        self.lean = False
        if LeanHttpToolsProtocol.off_reason is None:
            LeanHttpToolsProtocol.off_reason = why
            logging.getLogger("uvicorn.error").warning("%s", _off(f"uvicorn {uvicorn.__version__} {why}"))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.lean:
            return
        self.flow = _FlowControl(transport)
        self.transport = _Coalescing(transport, self.loop)  # type: ignore[assignment]
        # Connected and silent is a head that does not come either.
        self._guard(self.limits.head_timeout, b"request head not received in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._unguard()
        if self.guard is not None:  # (nothing left to check: let the protocol go now)
            self.guard.cancel()
            self.guard = None
        super().connection_lost(exc)

    # -- limits ----------------------------------------------------------------------------------

    def _guard(self, seconds: float, why: bytes) -> None:
        deadline = self.loop.time() + seconds
        self.deadline, self.why = deadline, why
        guard = self.guard
        if guard is None or guard.when() > deadline:
            if guard is not None:
                guard.cancel()
            self.guard = self.loop.call_at(deadline, self._check)

    def _unguard(self) -> None:
        self.deadline = None  # the timer finds nothing due, and lapses

    def _check(self) -> None:
        self.guard = None
        deadline = self.deadline
        if deadline is None:
            return
        if deadline > self.loop.time():  # moved on since the timer was armed
            self.guard = self.loop.call_at(deadline, self._check)
            return
        self.deadline = None
        self._expired(self.why)

    def _expired(self, why: bytes) -> None:
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
        if self.lean and self.deadline is None:  # the next request on a kept-alive connection: its head's clock
            self._guard(self.limits.head_timeout, b"request head not received in time")

    def on_message_complete(self) -> None:
        self._unguard()
        self.awaiting_head, self.head_size = True, 0
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        counting = self.lean and self.awaiting_head
        heads_ended = self.heads_ended
        super().data_received(data)
        # Bytes that arrived while the head was still incomplete (httptools buffers a header
        # until it ends, so its callbacks cannot bound this; a read is at most 256 KiB). A read
        # in which a head ended is not counted: most of it may be that request's body (and a
        # whole small request can end in it, which makes awaiting_head true again).
        if counting and self.heads_ended == heads_ended and self.lean and self.awaiting_head and not self.refused:
            self.head_size += len(data)
            if self.head_size > self.limits.max_head_size:
                self._refuse(431, b"request head too large")

    def on_headers_complete(self) -> None:
        if not self.lean:
            super().on_headers_complete()
            return
        # The head is whole: now its body has body_timeout seconds (on_message_complete ends it).
        self.awaiting_head = False
        self.heads_ended += 1
        self._guard(self.limits.body_timeout, b"request body not received in time")
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is before or cycle is None:
            return  # an upgrade, or no cycle made: nothing of ours to do
        if not LeanHttpToolsProtocol._checked_cycle:
            LeanHttpToolsProtocol._checked_cycle = True
            missing = [f"RequestResponseCycle().{name}" for name in _CYCLE_ATTRIBUTES if not hasattr(cycle, name)]
            if missing:
                self._turn_off(f"lacks what it relies on: {'; '.join(missing)}")
                return
        # A new request cycle: nothing has waited on or set its event yet.
        if not cycle.message_event.is_set():
            cycle.message_event = _Signal()  # type: ignore[assignment]


def _version(text: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def _methods_called(module: Any, attribute: str) -> set[str] | None:
    """The methods ``module``'s source calls on ``<something>.<attribute>``; None where the
    source cannot be read (a frozen or compiled install: the version range is then the guard)."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return None
    return set(re.findall(rf"\b{attribute}\.(\w+)\(", source))


@functools.lru_cache(maxsize=1)
def _missing_internals() -> tuple[str, ...]:
    """What the lean protocol relies on and this uvicorn lacks, each naming the attribute (empty:
    all there). Checked without a server; see LeanHttpToolsProtocol for what needs a connection."""
    missing = [
        f"HttpToolsProtocol.{name}()"
        for name in _PROTOCOL_METHODS
        if not callable(getattr(HttpToolsProtocol, name, None))
    ]
    try:
        made = set(vars(FlowControl(_NO_TRANSPORT)))
    except Exception as exc:  # a changed constructor: report it, as any other mismatch
        missing.append(f"FlowControl(transport) ({type(exc).__name__}: {exc})")
    else:
        if made != _FLOW_ATTRIBUTES:
            missing.append(f"FlowControl attributes {sorted(_FLOW_ATTRIBUTES)} (it sets {sorted(made)})")
    for module, attribute, has in (
        (httptools_impl, "pipeline", _PIPELINE_METHODS),
        (httptools_impl, "message_event", _SIGNAL_METHODS),
        (flow_control, "_is_writable_event", _SIGNAL_METHODS),
    ):
        called = _methods_called(module, attribute)
        if called is not None and not called <= has:
            extra = ", ".join(sorted(called - has))
            missing.append(f"{attribute}.{{{extra}}}() (uvicorn calls it; the stand-in has {', '.join(sorted(has))})")
    return tuple(missing)


class _NoTransport:
    """Enough of a transport for FlowControl's constructor, which only stores it."""


_NO_TRANSPORT: Any = _NoTransport()


def _off(why: str) -> str:
    return (
        f"durable-streams-asgi: the lean HTTP protocol is off: {why}; {_OFF_EFFECT}. "
        f"To keep those limits: pip install 'uvicorn{SUPPORTED_UVICORN}', or upgrade durable-streams-asgi."
    )


def lean_protocol_status() -> tuple[type[asyncio.Protocol] | None, str]:
    """The lean protocol class and a line saying it is on, or None and the warning to log: which
    uvicorn this is, why the lean protocol is not used, what that costs, and what to do."""
    installed = uvicorn.__version__
    version = _version(installed)
    if version is None:
        return None, _off(f"uvicorn {installed!r} has a version number this package cannot read")
    low, high = _TESTED
    if not (low <= version < high):
        checked = f"is not one of the releases it was checked against ({SUPPORTED_UVICORN})"
        return None, _off(f"uvicorn {installed} {checked}")
    missing = _missing_internals()
    if missing:
        return None, _off(f"uvicorn {installed} lacks what it relies on: {'; '.join(missing)}")
    if LeanHttpToolsProtocol.off_reason is not None:
        return None, _off(f"uvicorn {installed} {LeanHttpToolsProtocol.off_reason}")
    return LeanHttpToolsProtocol, f"lean HTTP protocol on (uvicorn {installed}, checked: {SUPPORTED_UVICORN})"


def lean_protocol() -> type[asyncio.Protocol] | None:
    """The lean protocol class, or None where this uvicorn was not checked or lacks what it
    relies on (then use uvicorn's; :func:`lean_protocol_status` says why)."""
    return lean_protocol_status()[0]
