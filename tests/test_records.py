"""The storage's records, stream scans and append observers, over every backend: compare-and-set
that one concurrent writer wins (across two storages, like two processes), versions that never
repeat, and observers that see exactly this process's writes."""

from __future__ import annotations

import asyncio

import pytest

from durable_streams_asgi.storage.base import AppendRequest, RecordConflict, Storage, StreamConfig

from .conftest import STORAGE_BACKENDS, StorageFactory


@pytest.fixture(params=STORAGE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Memory, one Redis, and a Redis Cluster."""
    return request.param


TEXT = StreamConfig(content_type="text/plain")
JSON = StreamConfig(content_type="application/json")


async def test_put_get_and_compare_and_set(storage: Storage) -> None:
    assert await storage.get_record("subs", "a") is None
    first = await storage.put_record("subs", "a", b'{"x":1}', 0)
    assert first.key == "a" and first.value == b'{"x":1}' and first.version > 0 and first.now_ms > 0
    got = await storage.get_record("subs", "a")
    assert got is not None and (got.version, got.value) == (first.version, first.value)

    with pytest.raises(RecordConflict) as conflict:  # it exists: 0 no longer matches
        await storage.put_record("subs", "a", b"other", 0)
    assert conflict.value.current is not None and conflict.value.current.value == b'{"x":1}'
    second = await storage.put_record("subs", "a", b"", first.version)  # empty and binary values
    assert second.version != first.version and second.value == b""
    with pytest.raises(RecordConflict):  # the old version is stale
        await storage.put_record("subs", "a", b"late", first.version)
    third = await storage.put_record("subs", "a", b"\x00:\xff\n", second.version)
    assert (await storage.get_record("subs", "a")).value == b"\x00:\xff\n"  # type: ignore[union-attr]

    # Delete, then a new record at the key: versions never repeat, so the old one cannot land.
    await storage.delete_record("subs", "a", third.version)
    assert await storage.get_record("subs", "a") is None
    again = await storage.put_record("subs", "a", b"new", 0)
    assert again.version not in (first.version, second.version, third.version)
    with pytest.raises(RecordConflict):
        await storage.delete_record("subs", "a", third.version)
    with pytest.raises(RecordConflict) as gone:
        await storage.delete_record("subs", "missing", 5)
    assert gone.value.current is None
    await storage.delete_record("subs", "missing", 0)  # absent, as expected: nothing to do


async def test_spaces_are_apart_and_listed_whole(storage: Storage) -> None:
    for i in range(30):
        await storage.put_record("one", f"k{i}", str(i).encode(), 0)
    await storage.put_record("two", "k0", b"two", 0)
    now, records = await storage.list_records("one")
    assert now > 0 and sorted(r.value for r in records) == sorted(str(i).encode() for i in range(30))
    assert [r.value for r in (await storage.list_records("two"))[1]] == [b"two"]
    assert (await storage.list_records("three"))[1] == []
    assert (await storage.get_record("two", "k1")) is None


async def test_one_of_many_concurrent_writers_wins(storage_factory: StorageFactory, backend: str) -> None:
    """Two storages on Redis (two processes' worth of connections; memory storage is one
    process's), 20 writers, one version."""
    first = await storage_factory()
    storages = [first, first if backend == "memory" else await storage_factory()]
    base = await storages[0].put_record("race", "doc", b"0", 0)

    async def write(i: int) -> bool:
        try:
            await storages[i % 2].put_record("race", "doc", f"writer {i}".encode(), base.version)
        except RecordConflict:
            return False
        return True

    wins = await asyncio.gather(*(write(i) for i in range(20)))
    assert sum(wins) == 1
    winner = wins.index(True)
    assert (await storages[1].get_record("race", "doc")).value == f"writer {winner}".encode()  # type: ignore[union-attr]


async def test_scan_streams_pages_through_a_prefix(storage: Storage) -> None:
    paths = [f"/events/{i:03d}" for i in range(25)] + ["/events/{braces}%", "/events/*star", "/other/1", "/ev"]
    for path in paths:
        await storage.create(path, TEXT)
    await storage.create("/events/deleted", TEXT)
    await storage.delete("/events/deleted")
    # A crowded keyspace: a page of /events/ takes several SCANs, each returning a cursor to go on.
    await asyncio.gather(*(storage.create(f"/noise/{i}", TEXT) for i in range(3000)))

    async def scan(prefix: str, count: int) -> list[str]:
        found: list[str] = []
        cursor = ""
        for _ in range(1000):
            page, cursor = await storage.scan_streams(prefix, cursor, count)
            assert isinstance(cursor, str)  # redis-py gives SCAN's cursor as an int
            found += page
            if not cursor:
                return found
        raise AssertionError("the scan did not end")

    expected = sorted(p for p in paths if p.startswith("/events/"))
    assert sorted(set(await scan("/events/", 7))) == expected
    assert sorted(set(await scan("/events/", 1000))) == expected
    assert sorted(set(await scan("/events/*", 5))) == ["/events/*star"]  # a glob character is literal
    assert sorted(p for p in set(await scan("/", 1000)) if not p.startswith("/noise/")) == sorted(paths)
    assert await scan("/nothing/", 10) == []


async def test_observers_see_this_storages_writes_with_their_positions(storage_factory: StorageFactory) -> None:
    storage, other = await storage_factory(), await storage_factory()
    seen: list[tuple[str, int, int]] = []
    stop = storage.observe_appends(lambda path, start, end: seen.append((path, start, end)))

    await storage.create("/t", TEXT, [b"hello"])
    await storage.create("/empty", TEXT)  # no data: not an append
    await storage.create("/t", TEXT)  # an idempotent create writes nothing
    await storage.append("/t", AppendRequest("text/plain", [b"ab", b"c"]))
    await storage.append("/t", AppendRequest(None, [], close=True))  # a close writes no data
    await storage.create("/j", JSON, [b"1", b"2"])
    await storage.append("/j", AppendRequest("application/json", [b"3"]))
    await other.create("/o", TEXT, [b"theirs"])  # another process's write: not ours to see
    assert seen == [("/t", 0, 5), ("/t", 5, 8), ("/j", 0, 2), ("/j", 2, 3)]

    def broken(path: str, start: int, end: int) -> None:
        raise RuntimeError("an observer's bug")

    stop_broken = storage.observe_appends(broken)
    await storage.append("/j", AppendRequest("application/json", [b"4"]))  # the write still succeeds
    assert seen[-1] == ("/j", 3, 4)
    stop()
    stop_broken()
    await storage.append("/j", AppendRequest("application/json", [b"5"]))
    assert len(seen) == 5
