"""The storage's leases, over every backend: one holder at a time, fences that grow, expiry on the
storage's clock, and dead holders found."""

from __future__ import annotations

import asyncio

import pytest

from durable_streams_asgi.storage.base import Storage

from .conftest import STORAGE_BACKENDS, StorageFactory


@pytest.fixture(params=STORAGE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Memory, one Redis, and a Redis Cluster."""
    return request.param


async def wait_until_expired(storage: Storage, key: str) -> None:
    """Lease deadlines are on the storage's clock, which only moves: poll that clock (the event)."""
    for _ in range(200):
        lease = await storage.get_lease(key)
        if lease is not None and not lease.held:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"lease {key} did not expire")


async def test_one_holder_at_a_time_and_the_fence_grows(storage: Storage) -> None:
    first = await storage.acquire_lease("chat:a", "p1", 10_000, "v1")
    assert first is not None and first.held and first.fence == 1 and first.value == "v1"
    assert await storage.acquire_lease("chat:a", "p2", 10_000, "v2") is None
    held = await storage.get_lease("chat:a")
    assert held is not None and (held.owner, held.fence, held.value, held.held) == ("p1", 1, "v1", True)

    assert await storage.release_lease("chat:a", "p1", 1)
    assert not await storage.release_lease("chat:a", "p1", 1)  # idempotent: no longer held
    released = await storage.get_lease("chat:a")
    assert released is not None and not released.held and released.fence == 1

    second = await storage.acquire_lease("chat:a", "p2", 10_000, "v2")
    assert second is not None and second.fence == 2 and second.owner == "p2"
    # force takes it from a live holder, with a higher fence; the old holder can neither renew nor
    # release it any more.
    third = await storage.acquire_lease("chat:a", "p3", 10_000, "v3", force=True)
    assert third is not None and third.fence == 3
    assert not await storage.renew_lease("chat:a", "p2", 2, 10_000)
    assert not await storage.release_lease("chat:a", "p2", 2)
    assert await storage.renew_lease("chat:a", "p3", 3, 10_000)
    assert await storage.get_lease("chat:unknown") is None


async def test_a_lease_that_is_not_renewed_expires_and_is_found(storage: Storage) -> None:
    lease = await storage.acquire_lease("gen:x/1", "dead", 100, "payload")
    other = await storage.acquire_lease("gen:x/2", "alive", 60_000)
    elsewhere = await storage.acquire_lease("other:1", "dead", 100)
    assert lease is not None and other is not None and elsewhere is not None
    assert await storage.expired_leases("gen:") == []
    await wait_until_expired(storage, "gen:x/1")
    assert not await storage.renew_lease("gen:x/1", "dead", lease.fence, 100)  # too late
    found = await storage.expired_leases("gen:")
    assert [(f.key, f.owner, f.value, f.held) for f in found] == [("gen:x/1", "dead", "payload", False)]
    # Exactly one taker wins the orphan, however many try at once.
    takers = await asyncio.gather(*(storage.acquire_lease("gen:x/1", f"t{i}", 10_000, "payload") for i in range(5)))
    winners = [t for t in takers if t is not None]
    assert len(winners) == 1 and winners[0].fence == lease.fence + 1
    assert await storage.expired_leases("gen:") == []
    # A released lease is not an orphan.
    assert await storage.release_lease("gen:x/1", winners[0].owner, winners[0].fence)
    assert await storage.expired_leases("gen:") == []


async def test_processes_share_leases(storage_factory: StorageFactory) -> None:
    """Two storages over one backend (on Redis, two processes' worth): the same truth."""
    one = await storage_factory()
    two = one if type(one).__name__ == "MemoryStorage" else await storage_factory()
    taken = await one.acquire_lease("chat:shared", "p1", 10_000, "path")
    assert taken is not None
    seen = await two.get_lease("chat:shared")
    assert seen is not None and seen.held and seen.owner == "p1" and seen.value == "path"
    assert await two.acquire_lease("chat:shared", "p2", 10_000) is None
    assert await one.release_lease("chat:shared", "p1", taken.fence)
    again = await two.acquire_lease("chat:shared", "p2", 10_000)
    assert again is not None and again.fence == taken.fence + 1
