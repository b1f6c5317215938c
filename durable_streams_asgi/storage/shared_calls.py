"""Identical concurrent calls share one run: one append wakes every reader of a stream at once,
and they all read the same range, so they share one round trip (and its snapshot, which each of
them could have got on its own).

A caller that needs state newer than some moment (a subscription confirmed) must not get an
answer read before it: moments are counted, never clock readings, which can tie (uvloop's
``loop.time()`` has a 1 ms resolution). A call is read when Redis runs it, not when it is made:
its task's first step comes after the event-loop tick that made it, and the batcher that sends
it after that, so until the end of that tick it may be shared by anyone, whatever their moment.
That is what lets the hundreds of long-poll readers that one append wakes, whose next requests
arrive in the same few ticks, share one final check per tick instead of one each.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any


class _Shared:
    __slots__ = ("moment", "open", "task")

    def __init__(self, task: asyncio.Future[Any], moment: int) -> None:
        self.task = task
        self.moment = moment
        #: Not sent yet (the tick that made it has not ended): anyone may share it.
        self.open = True

    def close(self) -> None:
        self.open = False


class SharedCalls:
    def __init__(self) -> None:
        self._inflight: dict[tuple[Any, ...], _Shared] = {}
        self._order = itertools.count(1)

    def moment(self) -> int:
        """A point in the order of shared calls: a call begun later has a greater one."""
        return next(self._order)

    async def run(self, key: tuple[Any, ...], fn: Callable[..., Awaitable[Any]], *args: Any, since: int = 0) -> Any:
        """``fn(*args)``, or the result of an identical call (same ``key``) already under way that
        began after the moment ``since`` or has not been sent yet."""
        entry = self._inflight.get(key)
        if entry is None or (entry.moment < since and not entry.open):
            task = asyncio.ensure_future(fn(*args))  # (its first step: after this tick's callbacks)
            entry = _Shared(task, self.moment())
            self._inflight[key] = entry
            asyncio.get_running_loop().call_soon(entry.close)

            def forget(_: Any, key: tuple[Any, ...] = key, entry: Any = entry) -> None:
                if self._inflight.get(key) is entry:
                    del self._inflight[key]

            task.add_done_callback(forget)
        # Shielded: one caller leaving (a client that disconnected) must not cancel the others'.
        return await asyncio.shield(entry.task)
