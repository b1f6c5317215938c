"""Shared calls: who may join a call under way, and what each joiner gets."""

from __future__ import annotations

import asyncio

import pytest

from durable_streams_asgi.storage.shared_calls import SharedCalls


class _Backend:
    """Counts its runs; each answers with its run number once released."""

    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def read(self) -> int:
        self.runs += 1
        self.started.set()
        run = self.runs
        await self.release.wait()
        return run


async def test_waiters_that_arrive_together_share_one_call_whatever_their_moments() -> None:
    """As long-poll readers do: each takes its moment (its subscription confirmed) and then asks
    for a check that must not predate it. Readers whose requests arrive together (their tasks
    made in one pass of the event loop) all ask before the check starts: one check serves all."""
    calls, backend = SharedCalls(), _Backend()

    async def waiter() -> int:
        confirmed = calls.moment()
        return await calls.run(("k",), backend.read, since=confirmed)

    waiters = [asyncio.ensure_future(waiter()) for _ in range(50)]
    await backend.started.wait()
    backend.release.set()
    assert await asyncio.gather(*waiters) == [1] * 50
    assert backend.runs == 1


async def test_a_call_that_started_before_the_callers_moment_is_not_shared() -> None:
    calls, backend = SharedCalls(), _Backend()
    first = asyncio.ensure_future(calls.run(("k",), backend.read))
    await backend.started.wait()  # the shared call has started: it reads from here on
    later = calls.moment()
    second = asyncio.ensure_future(calls.run(("k",), backend.read, since=later))
    third = asyncio.ensure_future(calls.run(("k",), backend.read))  # no moment: shares what runs
    await asyncio.sleep(0)
    backend.release.set()
    assert await first == 1
    assert await second == 2 and await third == 2
    assert backend.runs == 2


async def test_a_caller_that_leaves_does_not_cancel_the_others() -> None:
    calls, backend = SharedCalls(), _Backend()
    leaving = asyncio.ensure_future(calls.run(("k",), backend.read))
    staying = asyncio.ensure_future(calls.run(("k",), backend.read))
    await asyncio.sleep(0)
    leaving.cancel()
    backend.release.set()
    assert await staying == 1
    with pytest.raises(asyncio.CancelledError):
        await leaving


async def test_every_caller_gets_the_calls_error() -> None:
    calls = SharedCalls()

    async def fails() -> None:
        raise LookupError("no such stream")

    results = await asyncio.gather(*(calls.run(("k",), fails) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(result, LookupError) for result in results)
