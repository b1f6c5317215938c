"""Background tasks stop even when a cancellation is lost on the way (Python < 3.12's
``asyncio.wait_for``, which redis-py sends every command through when a socket timeout is set,
returns its inner result instead of raising a cancellation that arrives in the same loop
iteration as that result)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from durable_streams_asgi.aio import cancel_and_wait
from durable_streams_asgi.storage.base import StreamConfig
from durable_streams_asgi.storage.redis import RedisStorage

from .conftest import unique_prefix

LOSES_CANCELLATIONS = sys.version_info < (3, 12)
#: Resolved with the task that stops the one under test, once it has started.
Stopping = asyncio.Future[asyncio.Future[Any]]


async def _work_racing_a_stop(stop: Callable[[], Awaitable[Any]], stopping: Stopping) -> None:
    """One call through a real ``asyncio.wait_for`` whose inner future completes in the same
    loop iteration as the cancellation that ``stop()`` (started just before) sends: the order in
    which Python 3.10 and 3.11 lose that cancellation (3.12 raises it)."""
    loop = asyncio.get_running_loop()
    inner: asyncio.Future[None] = loop.create_future()

    def stop_then_complete() -> None:
        if not stopping.done():
            stopping.set_result(asyncio.ensure_future(stop()))  # cancels us at its first step...
        inner.set_result(None)  # ...when wait_for's inner future is already done

    loop.call_soon(stop_then_complete)
    await asyncio.wait_for(inner, 10)


async def _ended_within(future: asyncio.Future[Any], seconds: float) -> bool:
    done, _ = await asyncio.wait({future}, timeout=seconds)
    if not done:
        future.cancel()
    return bool(done)


async def _background_loop(stop: Callable[[], Awaitable[Any]], stopping: Stopping) -> None:
    """The usual shape: work, then sleep until the next round, until cancelled."""
    while True:
        await _work_racing_a_stop(stop, stopping)
        await asyncio.sleep(3600)


async def test_one_cancel_is_lost_in_this_race_before_python_3_12() -> None:
    """What the tests below stand on: on this Python, ``cancel()`` then ``await`` hangs."""
    stopping: Stopping = asyncio.get_running_loop().create_future()
    task: asyncio.Task[None] | None = None

    async def plain_stop() -> None:
        assert task is not None
        task.cancel()
        await asyncio.wait({task})

    task = asyncio.ensure_future(_background_loop(plain_stop, stopping))
    assert await _ended_within(await stopping, 0.5) is not LOSES_CANCELLATIONS
    task.cancel()
    await asyncio.wait({task})


async def test_a_task_that_loses_its_cancellation_is_stopped_all_the_same() -> None:
    stopping: Stopping = asyncio.get_running_loop().create_future()
    task: asyncio.Task[None] | None = None

    async def stop() -> None:
        await cancel_and_wait(task)

    task = asyncio.ensure_future(_background_loop(stop, stopping))
    assert await _ended_within(await stopping, 5), "cancel_and_wait did not return"
    assert task.done()


async def test_several_tasks_and_none_are_stopped() -> None:
    async def fails() -> None:
        raise RuntimeError("a background task that failed earlier")

    failed = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    sleepers = [asyncio.ensure_future(asyncio.sleep(3600)) for _ in range(3)]
    await cancel_and_wait(iter([failed, *sleepers]))
    assert all(task.done() for task in [failed, *sleepers])
    await cancel_and_wait(None)


async def test_the_callers_own_cancellation_propagates() -> None:
    stubborn = asyncio.ensure_future(asyncio.sleep(3600))
    stopper = asyncio.ensure_future(cancel_and_wait(stubborn))
    await asyncio.sleep(0)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    await cancel_and_wait(stubborn)


async def test_a_redis_storage_closes_while_its_fork_sweeper_loses_the_cancellation(redis_url: str) -> None:
    """The hang seen in CI: ``aclose()`` cancelled the fork sweeper in the middle of a sweep's
    command, the sweeper lost the cancellation and went back to sleep, and ``aclose()`` waited
    for it forever."""
    storage = RedisStorage.from_url(redis_url, key_prefix=unique_prefix())
    stopping: Stopping = asyncio.get_running_loop().create_future()
    real_sweep = storage.sweep

    async def sweep() -> int:
        storage.sweep_interval = 3600.0  # after this round, a long sleep
        await _work_racing_a_stop(storage.aclose, stopping)
        return await real_sweep()

    storage.sweep = sweep  # type: ignore[method-assign]
    storage.sweep_interval = 0.0
    try:
        await storage.create("/s", StreamConfig(content_type="text/plain"))  # starts the sweeper
        assert await _ended_within(await stopping, 5), "aclose() hung on its fork sweeper"
    finally:
        await storage.aclose()
