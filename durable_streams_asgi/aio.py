"""Stopping background tasks for sure.

Before Python 3.12, ``asyncio.wait_for`` returns its inner call's result instead of raising when a
cancellation arrives in the same loop iteration as that result (python/cpython#86296). redis-py
sends every command through ``wait_for`` when a socket timeout is set, so a task cancelled while
it talks to Redis sometimes never sees its cancellation and carries on: a loop that sleeps and
works until cancelled then runs forever, and whoever awaits it after ``cancel()`` waits forever
(a storage's ``aclose()`` hung that way after a cluster failover test, 2 runs in 25). Every
background task of this package is stopped through :func:`cancel_and_wait`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

#: How long a cancelled task has to end before it is cancelled again (a lost cancellation is rare,
#: so this bounds how late a stop can be, not how long a usual one takes).
RECANCEL_EVERY = 0.1


async def cancel_and_wait(
    tasks: asyncio.Future[Any] | Iterable[asyncio.Future[Any]] | None, *, patience: float = RECANCEL_EVERY
) -> None:
    """Cancel ``tasks`` (one, several or None) and return once every one has ended, cancelling
    again any still running ``patience`` seconds later (and so on). A task that cleans up after
    its cancellation behind ``asyncio.shield`` is cut short by the next cancel: give it the
    patience its cleanup needs. What they raised is retrieved and dropped: they are being
    stopped. The caller's own cancellation still propagates."""
    if tasks is None:
        return
    stopping = [tasks] if isinstance(tasks, asyncio.Future) else list(tasks)
    pending = set(stopping)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
    for task in stopping:  # (marked as retrieved: no "exception was never retrieved" at exit)
        if not task.cancelled():
            task.exception()
