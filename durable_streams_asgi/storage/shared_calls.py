"""Identical concurrent calls share one run: one append wakes every reader of a stream at once,
and they all read the same range, so they share one round trip (and its snapshot, which each of
them could have got on its own).

A caller that needs state newer than some moment (a subscription confirmed) must not get an
answer read before it: moments are counted, never clock readings, which can tie (uvloop's
``loop.time()`` has a 1 ms resolution).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any


class SharedCalls:
    def __init__(self) -> None:
        self._inflight: dict[tuple[Any, ...], tuple[asyncio.Future[Any], int]] = {}
        self._order = itertools.count(1)

    def moment(self) -> int:
        """A point in the order of shared calls: a call begun later has a greater one."""
        return next(self._order)

    async def run(self, key: tuple[Any, ...], fn: Callable[..., Awaitable[Any]], *args: Any, since: int = 0) -> Any:
        """``fn(*args)``, or the result of an identical call (same ``key``) already under way that
        began after the moment ``since``."""
        entry = self._inflight.get(key)
        if entry is None or entry[1] < since:
            task = asyncio.ensure_future(fn(*args))
            entry = (task, self.moment())
            self._inflight[key] = entry

            def forget(_: Any, key: tuple[Any, ...] = key, entry: Any = entry) -> None:
                if self._inflight.get(key) is entry:
                    del self._inflight[key]

            task.add_done_callback(forget)
        # Shielded: one caller leaving (a client that disconnected) must not cancel the others'.
        return await asyncio.shield(entry[0])
