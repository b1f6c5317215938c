"""One SSE live read (PROTOCOL.md section 5.8), parked without a task of its own while idle.

A server with thousands of live readers spends most of its memory on idle ones, so an idle SSE
response holds as little as it can: the request's own task, suspended in ``receive()`` (which is
also how a departing client is noticed), a :class:`~durable_streams_asgi.storage.base.Watch` whose
shared future calls back on the stream's next change, and a place on one timer per event loop for
keep-alives and the connection's lifetime. The writing is done by a short task (the "pump") that
exists only while there is something to send: it reads, writes, and parks again.

The pump ends the response by cancelling the request's task out of its ``receive()``; the request's
task, when the client leaves, cancels the pump. Flags, not only cancellation, keep the two apart:
a cancellation can be lost on Python 3.11 (inside ``asyncio.wait_for``, which connection pools
use), and then the pump stops at its next step instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from starlette.types import Receive, Send

from . import metrics, offsets, sse
from .aio import cancel_and_wait
from .drain import Drain
from .options import Options
from .storage.base import ReadResult, Storage, StorageError, Watch

logger = logging.getLogger("durable_streams_asgi")

DataEvent = Callable[[ReadResult, bool], bytes]

# The timer's granularity: keep-alives and lifetimes fire at most this late (seconds).
_TICK = 0.1


class _Ticker:
    """Every parked session's next keep-alive or end, on one timer per event loop.

    A timer handle per connection costs about half a kilobyte (uvloop's handle and libuv's timer);
    here a session costs a set entry. Sessions due within the same ``_TICK`` share a bucket.
    """

    __slots__ = ("__weakref__", "_buckets", "_due", "_heap", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, set[SSESession]] = {}
        self._heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._due: int | None = None  # the bucket the timer is set for

    def add(self, session: SSESession, when: float) -> int:
        """Call ``session.on_tick()`` at loop time ``when`` (or up to ``_TICK`` later); returns the
        key to :meth:`discard` it with."""
        key = math.ceil(when / _TICK)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._heap, key)
            if self._due is None or key < self._due:
                self._schedule(key)
        bucket.add(session)
        return key

    def discard(self, session: SSESession, key: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.discard(session)  # an emptied bucket is dropped when it falls due

    def _schedule(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = key
        self._timer = self._loop.call_at(key * _TICK, self._tick)

    def _tick(self) -> None:
        self._timer = self._due = None
        # Timers may fire a hair early (the loop's clock resolution): count those as due.
        due = math.floor((self._loop.time() + 0.005) / _TICK)
        heap = self._heap
        while heap and heap[0] <= due:
            for session in self._buckets.pop(heapq.heappop(heap), ()):
                session.on_tick()
        if heap:
            self._schedule(heap[0])


_tickers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticker] = weakref.WeakKeyDictionary()


def _ticker() -> _Ticker:
    loop = asyncio.get_running_loop()
    ticker = _tickers.get(loop)
    if ticker is None:
        ticker = _tickers[loop] = _Ticker(loop)
    return ticker


class SSESession:
    """The body of one SSE response, from its first read on. See the module's docstring."""

    __slots__ = (
        "_data_event",
        "deadline",
        "done",
        "drain",
        "encode",
        "first",
        "first_cursor",
        "keepalive_at",
        "listening",
        "loop",
        "options",
        "path",
        "position",
        "pump",
        "send",
        "storage",
        "task",
        "tick_key",
        "ticker",
        "told_up_to_date",
        "watch",
        "woken",
    )

    def __init__(
        self,
        storage: Storage,
        send: Send,
        path: str,
        first: ReadResult,
        *,
        encode: bool,
        first_cursor: int,
        options: Options,
        data_event: DataEvent,
        drain: Drain | None = None,
    ) -> None:
        self.storage = storage
        self.send = send
        self.path = path
        self.first: ReadResult | None = first  # written by the first pump, then dropped
        self.encode = encode
        self.options = options
        self._data_event = data_event
        # The first cursor answers the client's (strictly after it, section 10.1); later ones
        # only move forward with the clock.
        self.first_cursor = first_cursor
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + options.sse_max_duration
        self.keepalive_at = 0.0
        self.position = 0
        self.told_up_to_date = False
        self.ticker = _ticker()
        self.tick_key: int | None = None
        self.watch: Watch | None = None
        self.pump: asyncio.Task[None] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.done = False  # nothing more is to be written
        self.listening = False  # the request's task is in its receive() loop
        self.drain = drain if drain is not None else Drain()
        self.woken = 0.0  # when a change woke the parked session (for metrics), else 0

    # -- the request's task ------------------------------------------------------------------

    async def serve(self, receive: Receive) -> None:
        """Write the first read and everything after it; return when the stream ended (EOF,
        lifetime, storage failure) or the client left. Runs in the request's task."""
        task = self.task = asyncio.current_task()
        assert task is not None
        first, self.first = self.first, None
        self.listening = True
        self.pump = asyncio.ensure_future(self._pump(first))
        del first
        measure = metrics.current.enabled
        if measure:
            metrics.current.live_reader("sse", 1)
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            if not self.done:
                raise  # cancelled from outside (shutdown): let it propagate
            # The pump ended the response and woke us: that is no error. (Python 3.10 counts no
            # cancellations, so there is nothing to take back there.)
            if hasattr(task, "uncancel"):
                task.uncancel()
        finally:
            if measure:
                metrics.current.live_reader("sse", -1)
            self.listening = False
            self.done = True
            self._unpark()
            await cancel_and_wait(self.pump)

    # -- waking up ---------------------------------------------------------------------------

    def on_tick(self) -> None:
        """The ticker: a keep-alive or the end is due."""
        self.tick_key = None
        self._kick()

    def _kick(self, _future: object = None) -> None:
        """Something to do (a change, or the ticker): start the pump unless it is running, in
        which case it sees the change before it parks again."""
        if not self.done and self.pump is None:
            if _future is not None and not self.woken:
                self.woken = self.loop.time()
                metrics.current.woken("sse")
            self.pump = asyncio.ensure_future(self._pump(None))

    def _park(self, watch: Watch) -> None:
        self.watch = watch
        watch.future.add_done_callback(self._kick)
        self.keepalive_at = self.loop.time() + self.options.sse_keepalive

    def _arm(self) -> None:
        if self.tick_key is not None:
            self.ticker.discard(self, self.tick_key)
        self.tick_key = self.ticker.add(self, min(self.deadline, self.keepalive_at))

    def _unwatch(self) -> None:
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.future.remove_done_callback(self._kick)
            watch.close()

    def _unpark(self) -> None:
        self._unwatch()
        if self.tick_key is not None:
            self.ticker.discard(self, self.tick_key)
            self.tick_key = None

    # -- the pump ----------------------------------------------------------------------------

    async def _pump(self, result: ReadResult | None) -> None:
        try:
            await self._run(result)
        except asyncio.CancelledError:
            raise
        except StorageError:
            await self._end()  # deleted, expired or unavailable: the reconnect will tell
        except OSError:
            self.done = True  # the connection broke while we wrote; receive() says the rest
            self._unpark()
        except Exception:
            logger.exception("SSE writer for %r failed", self.path)
            with contextlib.suppress(Exception):
                await self._end()
        finally:
            if self.pump is asyncio.current_task():
                self.pump = None

    async def _run(self, result: ReadResult | None) -> None:
        loop, options = self.loop, self.options
        while not self.done:
            watch = self.watch
            if result is None and watch is not None and not watch.future.done():
                # Parked, nothing changed: the ticker woke us (or it is time to set it).
                now = loop.time()
                if now >= self.deadline:
                    # The connection's lifetime is over: CDNs collapse the reconnecting clients.
                    await self._end()
                    return
                if now >= self.keepalive_at:
                    # A comment keeps the connection (and any proxy) from timing out.
                    self.keepalive_at = now + options.sse_keepalive
                    await self._write(sse.KEEPALIVE)
                    continue
                self._arm()
                return
            self._unwatch()
            if result is None:
                result = await self.storage.read(self.path, self.position, options.max_read_bytes)
                if self.done:
                    return
            shown = self._whole(result)
            chunk = self._events(shown)
            if chunk:
                await self._write(chunk)
                if self.woken and shown.items:
                    metrics.current.delivered("sse", loop.time() - self.woken)
            self.woken = 0.0
            if result.at_end:
                await self._end()
                return
            if self.drain.started:
                # The server is stopping: a last control event says where this reader is, and
                # the end of the response sends it to reconnect (to another server) from there.
                self.position = shown.next
                cursor = max(self.first_cursor, offsets.current_cursor_interval())
                await self._write(control_event(shown.next, cursor, self.told_up_to_date, False))
                await self._end()
                return
            # Resume after what was sent; wait for data past what was read (a split character's
            # first bytes are read again with the rest, once that is there).
            self.position, seen = shown.next, result.next
            caught_up = result.up_to_date
            result = None
            if not caught_up:
                if loop.time() >= self.deadline:
                    await self._end()
                    return
                continue
            watch = await self.storage.watch(self.path, seen)
            if self.done or watch.future.done():
                watch.close()  # gone, or changed already: read again (at the top)
                continue
            self._park(watch)

    def _whole(self, result: ReadResult) -> ReadResult:
        """For a text stream, the read less a character split across appends: an SSE data event
        is text, and half a character would reach the client as U+FFFD (a catch-up read, being
        bytes, has no such problem). The control event's offset then matches what was sent. At
        the end of a closed stream everything goes out."""
        if self.encode or result.info.is_json or not result.items or result.at_end:
            return result
        payload = result.items[0] if len(result.items) == 1 else b"".join(result.items)
        keep = sse.whole_characters(payload)
        if keep == len(payload):
            return result
        return replace(result, next=result.start + keep, items=[payload[:keep]] if keep else [])

    def _events(self, result: ReadResult) -> bytes:
        # A control event follows every data event, in the same write so that no reader ever
        # sees one without the other; with no data, a control event goes out only the first time
        # the reader is caught up (or at EOF): a wake-up that found nothing new says nothing.
        chunk = b""
        if result.items:
            chunk = self._data_event(result, self.encode)
        if result.items or result.at_end or (result.up_to_date and not self.told_up_to_date):
            self.told_up_to_date = result.up_to_date
            cursor = max(self.first_cursor, offsets.current_cursor_interval())
            chunk += control_event(result.next, cursor, result.up_to_date, result.at_end)
        return chunk

    async def _write(self, chunk: bytes) -> None:
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _end(self) -> None:
        """Finish the response and wake the request's task out of its receive()."""
        if self.done:
            return
        self.done = True
        self._unpark()
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.listening and self.task is not None:
            self.listening = False
            self.task.cancel()


@functools.lru_cache(maxsize=4096)
def control_event(position: int, cursor: int, up_to_date: bool, closed: bool) -> bytes:
    """Control events are the same for every reader at a position: encoded once."""
    return sse.control_event(offsets.encode_offset(position), cursor=str(cursor), up_to_date=up_to_date, closed=closed)
