"""Identical concurrent calls share one run: one append wakes every reader of a stream at once,
and they all read the same range, so they share one round trip (and its snapshot, which each of
them could have got on its own).

A caller that needs state newer than some moment (a subscription confirmed) must not get an
answer read before it: moments are counted, never clock readings, which can tie (uvloop's
``loop.time()`` has a 1 ms resolution). What counts is when the call runs, not when it is asked
for: a shared call starts at the end of the event-loop tick that asked for it, and until then
anyone may join it, whatever their moment. That is what lets the hundreds of long-poll readers
that one append wakes, whose next requests arrive in the same few ticks, share one final check
per tick instead of one each. (Starting the call explicitly later, rather than counting on a new
task's first step to come after this tick, keeps that true under an eager task factory.)
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Awaitable, Callable
from typing import Any


class _Shared:
    __slots__ = ("future", "moment", "open", "task")

    def __init__(self, future: asyncio.Future[Any], moment: int) -> None:
        self.future = future
        self.moment = moment
        #: Not started yet: anyone may join it.
        self.open = True
        #: The call once started (held here: the event loop keeps only weak references to tasks).
        self.task: asyncio.Future[Any] | None = None


class SharedCalls:
    def __init__(self) -> None:
        self._inflight: dict[tuple[Any, ...], _Shared] = {}
        self._order = itertools.count(1)

    def moment(self) -> int:
        """A point in the order of shared calls: a call begun later has a greater one."""
        return next(self._order)

    async def run(self, key: tuple[Any, ...], fn: Callable[..., Awaitable[Any]], *args: Any, since: int = 0) -> Any:
        """``fn(*args)``, or the result of an identical call (same ``key``) that has not started
        yet or started after the moment ``since``."""
        entry = self._inflight.get(key)
        if entry is None or (entry.moment < since and not entry.open):
            loop = asyncio.get_running_loop()
            entry = _Shared(loop.create_future(), self.moment())
            self._inflight[key] = entry
            loop.call_soon(self._start, key, entry, fn, args)
        # Shielded: one caller leaving (a client that disconnected) must not cancel the others'.
        return await asyncio.shield(entry.future)

    def _start(self, key: tuple[Any, ...], entry: _Shared, fn: Callable[..., Awaitable[Any]], args: Any) -> None:
        entry.open = False  # from here on, its call may reach the backend
        task = entry.task = asyncio.ensure_future(fn(*args))
        task.add_done_callback(functools.partial(self._settle, key, entry))

    def _settle(self, key: tuple[Any, ...], entry: _Shared, task: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is entry:
            del self._inflight[key]
        future = entry.future
        if future.done():
            return
        if task.cancelled():
            future.cancel()
        elif task.exception() is not None:
            future.set_exception(task.exception())  # type: ignore[arg-type]
        else:
            future.set_result(task.result())
